"""tokenizer.ggml.* from the bundle's tokenizer.json: the BPE models llama.cpp has."""

from __future__ import annotations

import json
from pathlib import Path

import gguf

from cosmoe_export.errors import CosmoeError
from runtime_py import format as fmt
from runtime_py.bundle import Bundle

# A Split pre-tokenizer's regex (tokenizer.json) -> llama.cpp's name for it (src/llama-vocab.cpp).
SPLIT_PRE = {
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|"
    "\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+": "llama-bpe",
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|"
    "\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+": "qwen2",
}


def write_tokenizer(w: gguf.GGUFWriter, bundle: Bundle) -> str:
    """tokenizer.ggml.* from the bundle's tokenizer.json: byte-level BPE as llama.cpp's "gpt2" model,
    SentencePiece-style BPE (Metaspace, byte fallback) as its "llama" model; a bundle without one (a
    preset) as "none", which llama.cpp runs on token ids. Returns the model (and pre-tokenizer) written."""
    cfg = bundle.config
    where = bundle.tokenizer_dir / fmt.TOKENIZER_FILE if bundle.tokenizer_dir else None
    if where is None or not where.is_file():
        w.add_tokenizer_model("none")
        return "none"
    tj = json.loads(where.read_text(encoding="utf-8"))
    model = tj["model"]
    if model.get("type") != "BPE":
        raise CosmoeError(f"{where}: a {model.get('type')} tokenizer; GGUF output takes BPE tokenizers "
                          "(byte-level or SentencePiece-style)")
    vocab: dict[str, int] = dict(model["vocab"])
    added = {t["id"]: t for t in tj.get("added_tokens", [])}
    for t in added.values():
        vocab[t["content"]] = t["id"]
    if max(vocab.values()) >= cfg.vocab_size:
        raise CosmoeError(f"{where}: has token ids up to {max(vocab.values())}, beyond the model's vocabulary "
                          f"{cfg.vocab_size}")
    by_id = {i: s for s, i in vocab.items()}
    byte_level = _byte_level(tj)
    pre = _pre_name(tj.get("pre_tokenizer"), where) if byte_level else None
    tokens, kinds, scores = [], [], []
    for i in range(cfg.vocab_size):
        text = by_id.get(i)
        if text is None:  # the model's rows past the tokenizer's vocabulary
            tokens.append(f"[PAD{i}]")
            kinds.append(gguf.TokenType.UNUSED)
        else:
            tokens.append(text)
            kinds.append(_token_type(text, added.get(i), byte_level))
        scores.append(-float(i))  # SentencePiece BPE: ids follow merge order, the earliest merge wins
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    if byte_level:
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(pre)
        w.add_token_list(tokens)
        w.add_token_types(kinds)
        w.add_token_merges(merges)
        label = f"gpt2 ({pre})"
    elif model.get("byte_fallback") or _metaspace(tj):
        w.add_tokenizer_model("llama")
        w.add_tokenizer_pre("default")
        w.add_token_list(tokens)
        w.add_token_scores(scores)
        w.add_token_types(kinds)
        w.add_add_space_prefix(_metaspace_prefix(tj))
        label = "llama"
    else:
        raise CosmoeError(f"{where}: a BPE tokenizer that is neither byte-level nor SentencePiece-style; "
                          "llama.cpp has no model for it")
    if cfg.bos_token_id is not None:
        w.add_bos_token_id(cfg.bos_token_id)
    eos = cfg.eos_token_id[0] if isinstance(cfg.eos_token_id, list) else cfg.eos_token_id
    if eos is not None:
        w.add_eos_token_id(eos)
    w.add_add_bos_token(False)  # the bundle's prompts are ids as given: nothing is prepended
    w.add_add_eos_token(False)
    return label


def _byte_level(tj: dict) -> bool:
    pre = tj.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    return any(s.get("type") == "ByteLevel" for s in steps)


def _pre_name(pre: dict, where: Path) -> str:
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    splits = [s for s in steps if s.get("type") == "Split"]
    if not splits:
        level = next(s for s in steps if s.get("type") == "ByteLevel")
        if level.get("use_regex", True):
            return "gpt-2"  # ByteLevel's own regex is GPT-2's
    elif len(splits) == 1 and splits[0].get("pattern", {}).get("Regex") in SPLIT_PRE:
        return SPLIT_PRE[splits[0]["pattern"]["Regex"]]
    raise CosmoeError(f"{where}: its pre-tokenizer {json.dumps(pre)[:200]} is none llama.cpp names "
                      f"(GPT-2's, or a Split on {', '.join(sorted(set(SPLIT_PRE.values())))}'s regex)")


def _metaspace(tj: dict) -> dict | None:
    pre = tj.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    return next((s for s in steps if s.get("type") == "Metaspace"), None)


def _metaspace_prefix(tj: dict) -> bool:
    m = _metaspace(tj)
    return m is not None and m.get("prepend_scheme", "always") != "never"


def _token_type(text: str, added: dict | None, byte_level: bool) -> gguf.TokenType:
    # SentencePiece's byte-fallback pieces <0x00>..<0xFF> (often added as special tokens): bytes to llama.cpp.
    if not byte_level and len(text) == 6 and text.startswith("<0x") and text.endswith(">"):
        return gguf.TokenType.BYTE
    if added is not None:
        return gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
    return gguf.TokenType.NORMAL
