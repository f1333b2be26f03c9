"""The split bundle, format v2: the spec in code. ``docs/FORMAT.md`` says the same in words.

A bundle is a directory:
    manifest.json                                  this module's MANIFEST_* keys
    backbone.safetensors                           every non-expert tensor
    experts/layer_{L:03d}/expert_{E:03d}.safetensors   one routed expert of one layer
    tokenizer/...                                  tokenizer files passed through from the source
    {target}/embed{suffix}, {target}/layer_{L:03d}{suffix}, {target}/head{suffix},
    {target}/experts/layer_{L:03d}/expert_{E:03d}{suffix}   lowered programs (cosmoe-export lower)
    gguf/model.gguf                                the whole model for llama.cpp (lower --target gguf)

Format versions: 1 is every bundle whose layers are all MoE (its manifest's model has no
``layer_ffns``); 2 adds the layer plan (``model.layer_ffns``, runtime_py/config.py FFN_KINDS) and is
written only for bundles that have one, so an all-MoE bundle keeps its v1 bytes.

Quantized bundles add the manifest's QUANTIZATION_KEY section and a per-file ``tensors`` map;
runtime_py/quant.py is the spec of their tensors' bytes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources

FORMAT_NAME = "cosmoe-bundle"
FORMAT_VERSION = 2  # the newest version this runtime reads
PLAN_VERSION = 2  # the first version with a layer plan (model.layer_ffns) and the keys below
LAYER_PLAN_KEY = "layer_ffns"  # runtime_py.config.CosmoeConfig.layer_ffns
# Model keys a v1 manifest never has (runtime_py.config.CosmoeConfig fields written only when not at
# their default): the layer plan, and the routing, RoPE and multiplier knobs of the families added
# with it (docs/FORMAT.md).
V2_MODEL_KEYS = (LAYER_PLAN_KEY, "dense_intermediate_size", "router", "score_bias", "n_group", "topk_group",
                 "routed_scaling_factor", "shared_expert_gate", "rotary_dim", "embedding_multiplier",
                 "residual_multiplier", "attention_multiplier", "logits_scaling", "sparsemixer_eps", "norm",
                 "lm_head_bias", "layer_mixers", "sliding_window", "attention_sinks", "router_bias", "expert_bias",
                 "expert_act", "swiglu_alpha", "swiglu_limit", "group_score", "kv_lora_rank", "q_lora_rank",
                 "qk_rope_head_dim", "v_head_dim", "conv_kernel", "conv_bias", "topk_norm_eps",
                 "linear_num_key_heads", "linear_num_value_heads", "linear_key_head_dim", "linear_value_head_dim",
                 "linear_conv_kernel", "attention_output_gate")
# And values of v1 keys that a v1 reader does not know.
V2_MODEL_VALUES = {"qk_norm": ("head_after_rope",)}  # (rope_scaling "yarn" only comes with gpt-oss's v2 keys)
MANIFEST_NAME = "manifest.json"
QUANTIZATION_KEY = "quantization"  # present only in quantized bundles
BACKBONE_PATH = "backbone.safetensors"
EXPERT_PATH = "experts/layer_{layer:03d}/expert_{expert:03d}.safetensors"
TOKENIZER_DIR = "tokenizer"
# Every shard's safetensors metadata: what transformers' loaders expect to find.
SHARD_METADATA = {"format": "pt"}
# The manifest is small (a few hundred KB even for 1,000s of experts); a cap stops a crafted
# multi-GB "manifest" from being read into memory.
MAX_MANIFEST_BYTES = 64 * 1024 * 1024

ROLES = ("backbone", "expert", "tokenizer", "program")  # program: a lowered unit (cosmoe-export lower)
TOKENIZER_FILE = "tokenizer.json"  # the one file tokenizers reads, inside TOKENIZER_DIR


@dataclass(frozen=True)
class DType:
    """One tensor dtype under its three spellings: the manifest's (torch's attribute name),
    safetensors' header string, and the CLI's short alias (floats a bundle may be split to)."""
    name: str
    st: str
    alias: str | None = None

    @property
    def torch(self):  # torch imported here only: format stays importable without it
        import torch
        return getattr(torch, self.name)


# Every dtype the tools read or write. Float dtypes with an alias are the ones a v1 bundle's
# tensors may be stored in; integers hold quantized codes (runtime_py/quant.py).
DTYPE_TABLE = (DType("float32", "F32", "fp32"), DType("bfloat16", "BF16", "bf16"), DType("float16", "F16", "fp16"),
               DType("int8", "I8"), DType("uint8", "U8"), DType("int32", "I32"), DType("int64", "I64"),
               DType("float64", "F64"))
_BY_NAME = {d.name: d for d in DTYPE_TABLE}
_BY_ST = {d.st: d for d in DTYPE_TABLE}
# The float dtypes a bundle's float tensors may use (safetensors spelling -> manifest spelling).
DTYPES = {d.st: d.name for d in DTYPE_TABLE if d.alias}
# CLI spelling -> manifest/torch dtype name.
DTYPE_ALIASES = {d.alias: d.name for d in DTYPE_TABLE if d.alias}


def dtype(name: str) -> DType:
    """The dtype by its manifest name ("bfloat16"); KeyError for one the tools do not know."""
    return _BY_NAME[name]


def st_dtype(st: str) -> DType | None:
    """The dtype by its safetensors spelling ("BF16"); None for one the tools do not read."""
    return _BY_ST.get(st)


def dtype_of(torch_dtype) -> DType | None:
    """The dtype of a torch.dtype; None for one the tools do not write."""
    return _BY_NAME.get(str(torch_dtype).removeprefix("torch."))


# Lowered programs: one file per unit under the target's directory (cosmoe-export lower).
# gguf is one file for the whole model ("model"), for llama.cpp (cosmoe_export/lower/gguf_target.py).
PROGRAM_TARGETS = {"executorch": ".pte", "onnx": ".onnx", "gguf": ".gguf"}  # target -> file suffix
PROGRAM_UNITS = ("embed", "layer", "head", "expert", "model")
# A layer program's KV cache input: the filled prefix of the slots, or the whole context (older bundles).
PROGRAM_CACHES = ("prefix", "context")


def program_path(target: str, unit: str, layer: int | None = None, expert: int | None = None) -> str:
    suffix = PROGRAM_TARGETS[target]
    if unit == "expert":
        return f"{target}/experts/layer_{layer:03d}/expert_{expert:03d}{suffix}"
    if unit == "layer":
        return f"{target}/layer_{layer:03d}{suffix}"
    return f"{target}/{unit}{suffix}"


def expert_path(layer: int, expert: int) -> str:
    return EXPERT_PATH.format(layer=layer, expert=expert)


def format_version_for(model: dict) -> int:
    """The version a manifest with this model config is written as: the oldest that can say it."""
    newer = any(k in model for k in V2_MODEL_KEYS) or any(model.get(k) in v for k, v in V2_MODEL_VALUES.items())
    return PLAN_VERSION if newer else 1


def manifest_schema() -> dict:
    return json.loads(resources.files("runtime_py").joinpath("manifest.schema.json").read_text())


def dumps_manifest(manifest: dict) -> bytes:
    """Canonical manifest bytes: fixed key order as built, 2-space indent, trailing newline."""
    return (json.dumps(manifest, indent=2, ensure_ascii=False) + "\n").encode("utf-8")
