"""Text for measuring a model: encode a file with the bundle's own tokenizer and cut it into
windows of the model's context. Used by quantize (calibration), verify (perplexity, KL) and analyze."""

from __future__ import annotations

from pathlib import Path

import torch

from cosmoe_export.errors import CosmoeError
from runtime_py import format as fmt
from runtime_py.bundle import Bundle


def encode_file(bundle: Bundle, text: Path, *, max_tokens: int | None, purpose: str) -> list[int]:
    """Token ids of ``text`` (UTF-8), at most ``max_tokens``, encoded with the bundle's tokenizer.json."""
    tok_dir = bundle.tokenizer_dir
    return encode_with(tok_dir / fmt.TOKENIZER_FILE if tok_dir is not None else None, text,
                       vocab_size=bundle.config.vocab_size, max_tokens=max_tokens, purpose=purpose, owner=bundle.root)


def encode_with(tok_path: Path | None, text: Path, *, vocab_size: int, max_tokens: int | None, purpose: str,
                owner: str | Path) -> list[int]:
    """Token ids of ``text`` under the tokenizer.json at ``tok_path`` (the model ``owner``'s)."""
    if tok_path is None or not tok_path.is_file():
        raise CosmoeError(f"{owner}: has no {fmt.TOKENIZER_FILE}; {purpose} needs the model's tokenizer "
                          "to encode the text (split a checkpoint that has one)")
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(tok_path))
    try:
        raw = Path(text).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise CosmoeError(f"{text}: cannot read as UTF-8 text ({e})") from None
    ids = tok.encode(raw).ids[:max_tokens]
    if len(ids) < 2:
        raise CosmoeError(f"{text}: encodes to {len(ids)} token(s); {purpose} needs at least 2")
    if max(ids) >= vocab_size:
        raise CosmoeError(f"{owner}: its tokenizer makes id {max(ids)}, beyond the model's vocabulary "
                          f"({vocab_size}); the tokenizer does not belong to this model")
    return ids


def windows(ids: list[int], context: int) -> torch.Tensor:
    """ids [N] -> [B, T]: full, non-overlapping windows of the context (the tail that does not fill
    one is dropped); a text shorter than one window is one window."""
    t = min(context, len(ids))
    b = len(ids) // t
    return torch.tensor(ids[:b * t]).view(b, t)


def batches(ids: torch.Tensor, vocab_size: int, max_logits: int = 1 << 24) -> list[torch.Tensor]:
    """Split windows [B, T] into forward batches whose logits [b, T, V] stay under ``max_logits``
    values (64 MB of fp32), so a 32k vocabulary at 2k context still runs in bounded memory."""
    per = max(1, max_logits // (ids.shape[1] * vocab_size))
    return list(ids.split(per))
