"""The bundle's tokenizer (tokenizers' tokenizer.json) with its stop tokens, and streaming decode."""

from __future__ import annotations

import json
from collections.abc import Sequence

from runtime_py import format as fmt
from runtime_py.bundle import Bundle
from runtime_py.errors import ConfigError, FormatError


class BundleTokenizer:
    def __init__(self, bundle: Bundle) -> None:
        from tokenizers import Tokenizer

        root = bundle.tokenizer_dir
        if root is None or not (root / fmt.TOKENIZER_FILE).is_file():
            raise ConfigError(f"{bundle.root}: has no tokenizer; give token ids instead of text (--prompt-ids)")
        try:
            self.tok = Tokenizer.from_file(str(root / fmt.TOKENIZER_FILE))
        except Exception as e:  # tokenizers raises plain Exception subclasses from Rust
            raise FormatError(f"{root / fmt.TOKENIZER_FILE}: cannot be read by tokenizers ({e})") from None
        self.stop_ids = self._stop_ids(bundle, root / "tokenizer_config.json")

    def _stop_ids(self, bundle: Bundle, config_path) -> list[int]:
        """eos_token of tokenizer_config.json, plus the model config's eos_token_id(s) if it has any."""
        ids: set[int] = set()
        if config_path.is_file():
            eos = json.loads(config_path.read_text()).get("eos_token")
            if isinstance(eos, dict):  # {"content": ...} in older tokenizer configs
                eos = eos.get("content")
            if isinstance(eos, str) and self.tok.token_to_id(eos) is not None:
                ids.add(self.tok.token_to_id(eos))
        extra = getattr(bundle.config, "eos_token_id", None)
        ids.update([extra] if isinstance(extra, int) else list(extra or []))
        return sorted(ids)

    def encode(self, text: str, *, where: str = "prompt") -> list[int]:
        if not text:
            raise ConfigError(f"{where}: is empty; give some text")
        ids = self.tok.encode(text).ids
        if not ids:
            raise ConfigError(f"{where}: encodes to no tokens")
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=True)


class TextStream:
    """Feeds tokens, returns the new text each time. Decodes the whole continuation and holds back a
    trailing replacement character: byte-level tokens can end in the middle of a UTF-8 character."""

    def __init__(self, tokenizer: BundleTokenizer) -> None:
        self.tokenizer, self.ids, self.shown = tokenizer, [], 0

    def feed(self, token: int) -> str:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        new, self.shown = text[self.shown:], len(text)
        return new
