"""Valid inputs to break: a tiny CoSMoE checkpoint (canonical names, no transformers), its bundle,
and helpers that read and rewrite safetensors files byte by byte."""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
from pathlib import Path

import torch
from safetensors.torch import save_file

from runtime_py.config import CosmoeConfig, tensor_shapes

# Small enough that a split takes milliseconds: 2 layers x 4 experts, hidden 16.
TINY = CosmoeConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                    intermediate_size=8, num_experts=4, num_experts_per_tok=2, max_position_embeddings=32)
WORDS = ["[UNK]"] + [f"w{i}" for i in range(TINY.vocab_size - 1)]


def make_checkpoint(out: Path, config: CosmoeConfig = TINY, seed: int = 0) -> Path:
    """config.json + model.safetensors (canonical names) + a word-level tokenizer.json."""
    out.mkdir(parents=True)
    g = torch.Generator().manual_seed(seed)
    tensors = {n: torch.randn(s, generator=g) * 0.3 for n, s in tensor_shapes(config).items()}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config.to_dict(), indent=2))
    _write_tokenizer(out / "tokenizer.json")
    return out


def _write_tokenizer(path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path))


def make_bundle(checkpoint: Path, out: Path) -> Path:
    from cosmoe_export.importers.sources import open_source
    from cosmoe_export.importers.split import split
    split(source=open_source(str(checkpoint)), out=out, progress=False)
    return out


def copy_tree(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# ---- safetensors surgery -----------------------------------------------------------------------------
def read_raw(path: Path) -> tuple[dict, bytes]:
    """(header JSON, data bytes) of a safetensors file."""
    buf = path.read_bytes()
    (n,) = struct.unpack("<Q", buf[:8])
    return json.loads(buf[8:8 + n]), buf[8 + n:]


def write_raw(path: Path, header: dict | bytes, data: bytes) -> None:
    text = header if isinstance(header, bytes) else json.dumps(header, separators=(",", ":")).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


def tensor_names_of(path: Path) -> list[str]:
    return [k for k in read_raw(path)[0] if k != "__metadata__"]


# ---- manifest surgery --------------------------------------------------------------------------------
def edit_manifest(bundle: Path, edit) -> None:
    """Apply ``edit(manifest)`` and write it back (the bundle stays self-consistent otherwise)."""
    m = json.loads((bundle / "manifest.json").read_text())
    edit(m)
    (bundle / "manifest.json").write_text(json.dumps(m, indent=2))


def rehash(bundle: Path, rel: str) -> None:
    """Record ``rel``'s current size and sha256 in the manifest: a tampered file that the manifest vouches for."""
    data = (bundle / rel).read_bytes()

    def edit(m: dict) -> None:
        entry = next(f for f in m["files"] if f["path"] == rel)
        entry["bytes"], entry["sha256"] = len(data), hashlib.sha256(data).hexdigest()
    edit_manifest(bundle, edit)
