"""The split bundle, format v1: the spec in code. ``docs/FORMAT.md`` says the same in words.

A bundle is a directory:
    manifest.json                                  this module's MANIFEST_* keys
    backbone.safetensors                           every non-expert tensor
    experts/layer_{L:03d}/expert_{E:03d}.safetensors   one routed expert of one layer
    tokenizer/...                                  tokenizer files passed through from the source

Quantized bundles add the manifest's QUANTIZATION_KEY section and a per-file ``tensors`` map;
runtime_py/quant.py is the spec of their tensors' bytes.
"""

from __future__ import annotations

import json
from importlib import resources

FORMAT_NAME = "cosmoe-bundle"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
QUANTIZATION_KEY = "quantization"  # present only in quantized bundles
BACKBONE_PATH = "backbone.safetensors"
EXPERT_PATH = "experts/layer_{layer:03d}/expert_{expert:03d}.safetensors"
TOKENIZER_DIR = "tokenizer"
# The manifest is small (a few hundred KB even for 1,000s of experts); a cap stops a crafted
# multi-GB "manifest" from being read into memory.
MAX_MANIFEST_BYTES = 64 * 1024 * 1024

ROLES = ("backbone", "expert", "tokenizer", "program")  # program: a lowered unit (cosmoe-export lower)
# Tensor dtypes a v1 bundle may hold (safetensors spelling -> torch spelling).
DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}
# CLI spelling -> torch dtype name.
DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def expert_path(layer: int, expert: int) -> str:
    return EXPERT_PATH.format(layer=layer, expert=expert)


def manifest_schema() -> dict:
    return json.loads(resources.files("runtime_py").joinpath("manifest.schema.json").read_text())


def dumps_manifest(manifest: dict) -> bytes:
    """Canonical manifest bytes: fixed key order as built, 2-space indent, trailing newline."""
    return (json.dumps(manifest, indent=2, ensure_ascii=False) + "\n").encode("utf-8")
