"""The CoSMoE model config (HF-style, ``model_type: "cosmoe"``) and the canonical tensor table.

One config describes every architecture we import: a Llama-3 decoder whose FFN is a
Mixture-of-Experts in every layer. The per-family differences (q/k norm, attention biases,
shared expert, renormalised top-k) are fields here, so one model implementation runs them all.

Canonical tensor names (the names in every bundle file) and their shapes come from
``tensor_shapes(config)``: the single place that says what a complete model contains.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Any

from runtime_py.errors import ConfigError

MODEL_TYPE = "cosmoe"
ARCHITECTURE = "CosmoeForCausalLM"
EXPERT_KINDS = ("standard", "wd")
QK_NORMS = ("none", "head", "full")  # head: Qwen3-MoE (per head_dim); full: OLMoE (whole projection)
ROPE_TYPES = ("default", "llama3")
# Keys HF writes into every config.json that carry no model information.
_IGNORED_KEYS = {"model_type", "architectures", "transformers_version", "torch_dtype", "dtype"}
# A model past this many parameters would not fit any machine this tool targets; refusing it early
# keeps a typo in a config (hidden_size 14400000) from exhausting memory instead of failing.
MAX_PARAMS = 200_000_000_000
# The other two ways a config can make us allocate without bound, checked before anything is built:
# tensor_shapes() and the manifest list every (layer, expert), so their count must stay sane (the
# largest MoE LMs have ~16k: DeepSeek-V3 61 x 256); and the runtime's static KV cache holds one full
# context (kv_cache_bytes: 2 x layers x kv heads x context x head size, fp32), 16 GB for Qwen3-235B at 40k tokens.
MAX_EXPERT_FILES = 1 << 16
MAX_KV_CACHE_BYTES = 128 << 30

EXPERT_NAME_RE = re.compile(r"^layers\.(\d+)\.moe\.experts\.(\d+)\.(.+)$")


@dataclass(frozen=True)
class CosmoeConfig:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int  # FFN width of one routed expert
    num_experts: int = 8
    num_experts_per_tok: int = 2
    norm_topk_prob: bool = True  # renormalise the top-k softmax weights to sum to 1
    expert_kind: str = "standard"  # "standard" SwiGLU or "wd" weight-decomposed (CoSMoEs Eq. 1)
    wd_rank: int | None = None  # rank r of WD experts; None means hidden_size // 2 (the paper's default)
    shared_expert_intermediate_size: int = 0  # 0: no shared expert (Qwen2-MoE has one, sigmoid-gated)
    head_dim: int | None = None  # None means hidden_size // num_attention_heads
    qk_norm: str = "none"
    attention_bias: bool = False  # bias on q, k, v projections
    attention_out_bias: bool = False  # bias on the output projection
    clip_qkv: float | None = None  # OLMoE clamps q, k, v to [-clip, clip]
    rms_norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    rope_scaling: dict[str, Any] | None = None  # {"rope_type": "llama3", "factor": ..., ...}
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    # ---- derived sizes -------------------------------------------------------------------------
    @property
    def head_size(self) -> int:
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_attention_heads

    @property
    def rank(self) -> int:
        return self.wd_rank if self.wd_rank is not None else self.hidden_size // 2

    # ---- (de)serialisation ---------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return {"model_type": MODEL_TYPE, "architectures": [ARCHITECTURE], **d}

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "config") -> CosmoeConfig:
        """Build and validate a config; every problem is reported at once, in one line."""
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(data).__name__}")
        problems = []
        if data.get("model_type", MODEL_TYPE) != MODEL_TYPE:
            problems.append(f"model_type is {data.get('model_type')!r}, expected {MODEL_TYPE!r}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names - _IGNORED_KEYS)
        if unknown:
            problems.append(f"unknown keys {unknown}")
        kwargs = {k: v for k, v in data.items() if k in names}
        required = [f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING]
        missing = [k for k in required if k not in kwargs]
        if missing:
            problems.append(f"missing keys {missing}")
        if problems:
            raise ConfigError(f"{source}: " + "; ".join(problems))
        config = cls(**kwargs)
        config.validate(source=source)
        return config

    # ---- validation ----------------------------------------------------------------------------
    def validate(self, *, source: str = "config") -> None:
        p: list[str] = []

        def positive_int(name: str, value: Any) -> bool:
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                p.append(f"{name} must be a positive integer, got {value!r}")
                return False
            return True

        ints_ok = all([positive_int(n, getattr(self, n)) for n in (
            "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "intermediate_size", "num_experts", "num_experts_per_tok",
            "max_position_embeddings")])
        for name in ("head_dim", "wd_rank"):
            if getattr(self, name) is not None:
                ints_ok &= positive_int(name, getattr(self, name))
        s = self.shared_expert_intermediate_size
        if isinstance(s, bool) or not isinstance(s, int) or s < 0:
            p.append(f"shared_expert_intermediate_size must be an integer >= 0, got {s!r}")
            ints_ok = False
        for name in ("norm_topk_prob", "attention_bias", "attention_out_bias", "tie_word_embeddings"):
            if not isinstance(getattr(self, name), bool):
                p.append(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.expert_kind not in EXPERT_KINDS:
            p.append(f"expert_kind must be one of {list(EXPERT_KINDS)}, got {self.expert_kind!r}")
        if self.qk_norm not in QK_NORMS:
            p.append(f"qk_norm must be one of {list(QK_NORMS)}, got {self.qk_norm!r}")
        if not _is_number(self.rms_norm_eps) or not self.rms_norm_eps > 0:
            p.append(f"rms_norm_eps must be a positive number, got {self.rms_norm_eps!r}")
        if not _is_number(self.rope_theta) or not self.rope_theta > 0:
            p.append(f"rope_theta must be a positive number, got {self.rope_theta!r}")
        if self.clip_qkv is not None and (not _is_number(self.clip_qkv) or not self.clip_qkv > 0):
            p.append(f"clip_qkv must be a positive number or null, got {self.clip_qkv!r}")
        p.extend(_rope_problems(self.rope_scaling))
        if ints_ok:
            if self.num_experts_per_tok > self.num_experts:
                p.append(f"num_experts_per_tok ({self.num_experts_per_tok}) exceeds num_experts ({self.num_experts})")
            if self.head_dim is None and self.hidden_size % self.num_attention_heads:
                p.append(f"num_attention_heads ({self.num_attention_heads}) does not divide "
                         f"hidden_size ({self.hidden_size}); set head_dim explicitly")
            if self.num_attention_heads % self.num_key_value_heads:
                p.append(f"num_key_value_heads ({self.num_key_value_heads}) does not divide "
                         f"num_attention_heads ({self.num_attention_heads})")
            if self.head_size % 2:
                p.append(f"head size {self.head_size} must be even for rotary embeddings")
            if not p:
                total = param_counts(self).total
                if total > MAX_PARAMS:
                    p.append(f"{total:,} parameters exceeds the limit of {MAX_PARAMS:,}; check the sizes")
                files = self.num_hidden_layers * self.num_experts
                if files > MAX_EXPERT_FILES:
                    p.append(f"{self.num_hidden_layers} layers x {self.num_experts} experts = {files:,} expert files "
                             f"exceeds the limit of {MAX_EXPERT_FILES:,}; check the sizes")
                kv = kv_cache_bytes(self)
                if kv > MAX_KV_CACHE_BYTES:
                    p.append(f"max_position_embeddings {self.max_position_embeddings:,} needs a {kv / 2**30:,.0f} GiB "
                             f"KV cache, above the limit of {MAX_KV_CACHE_BYTES >> 30} GiB; check the sizes")
        if p:
            raise ConfigError(f"{source}: " + "; ".join(p))


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _rope_problems(rope: Any) -> list[str]:
    if rope is None:
        return []
    if not isinstance(rope, dict):
        return [f"rope_scaling must be an object or null, got {rope!r}"]
    kind = rope.get("rope_type")
    if kind not in ROPE_TYPES:
        return [f"rope_scaling.rope_type must be one of {list(ROPE_TYPES)}, got {kind!r}"]
    if kind == "llama3":
        keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
        bad = [k for k in keys if not _is_number(rope.get(k)) or not rope.get(k) > 0]
        if bad:
            return [f"rope_scaling (llama3) needs positive numbers for {bad}"]
        if rope["high_freq_factor"] <= rope["low_freq_factor"]:
            return ["rope_scaling: high_freq_factor must exceed low_freq_factor"]
    return []


# ---- the canonical tensor table ----------------------------------------------------------------
def expert_tensor_shapes(config: CosmoeConfig, layer: int, expert: int) -> dict[str, tuple[int, ...]]:
    """Tensors of one routed expert. Standard: SwiGLU gate/up [F, D], down [D, F].

    WD (CoSMoEs Eq. 1): each matrix M (n x m) is stored as left L (n x r) and right R (r x m),
    M = L @ R, so y = x @ R.T @ L.T never materialises M.
    """
    d, f, r = config.hidden_size, config.intermediate_size, config.rank
    prefix = f"layers.{layer}.moe.experts.{expert}"
    mats = {"gate": (f, d), "up": (f, d), "down": (d, f)}
    if config.expert_kind == "standard":
        return {f"{prefix}.{m}.weight": shape for m, shape in mats.items()}
    out = {}
    for m, (n, k) in mats.items():
        out[f"{prefix}.{m}.left"] = (n, r)
        out[f"{prefix}.{m}.right"] = (r, k)
    return out


def backbone_layer_shapes(config: CosmoeConfig, layer: int) -> dict[str, tuple[int, ...]]:
    """Everything in one layer that is not a routed expert."""
    d, hd = config.hidden_size, config.head_size
    q_out, kv_out = config.num_attention_heads * hd, config.num_key_value_heads * hd
    pre = f"layers.{layer}"
    s: dict[str, tuple[int, ...]] = {
        f"{pre}.attn_norm.weight": (d,),
        f"{pre}.attn.q.weight": (q_out, d),
        f"{pre}.attn.k.weight": (kv_out, d),
        f"{pre}.attn.v.weight": (kv_out, d),
        f"{pre}.attn.o.weight": (d, q_out),
    }
    if config.attention_bias:
        s.update({f"{pre}.attn.q.bias": (q_out,), f"{pre}.attn.k.bias": (kv_out,), f"{pre}.attn.v.bias": (kv_out,)})
    if config.attention_out_bias:
        s[f"{pre}.attn.o.bias"] = (d,)
    if config.qk_norm == "head":
        s.update({f"{pre}.attn.q_norm.weight": (hd,), f"{pre}.attn.k_norm.weight": (hd,)})
    elif config.qk_norm == "full":
        s.update({f"{pre}.attn.q_norm.weight": (q_out,), f"{pre}.attn.k_norm.weight": (kv_out,)})
    s[f"{pre}.ffn_norm.weight"] = (d,)
    s[f"{pre}.moe.router.weight"] = (config.num_experts, d)
    if config.shared_expert_intermediate_size:
        fs = config.shared_expert_intermediate_size
        s.update({
            f"{pre}.moe.shared.gate.weight": (fs, d),
            f"{pre}.moe.shared.up.weight": (fs, d),
            f"{pre}.moe.shared.down.weight": (d, fs),
            f"{pre}.moe.shared_gate.weight": (1, d),
        })
    return s


def tensor_shapes(config: CosmoeConfig) -> dict[str, tuple[int, ...]]:
    """Every canonical tensor in model order: embedding, then per layer backbone and experts, then head."""
    shapes = {"embed.weight": (config.vocab_size, config.hidden_size)}
    for layer in range(config.num_hidden_layers):
        shapes.update(backbone_layer_shapes(config, layer))
        for expert in range(config.num_experts):
            shapes.update(expert_tensor_shapes(config, layer, expert))
    shapes["norm.weight"] = (config.hidden_size,)
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, config.hidden_size)
    return shapes


def expert_of(name: str) -> tuple[int, int] | None:
    """(layer, expert) for a routed-expert tensor name, None for a backbone tensor."""
    m = EXPERT_NAME_RE.match(name)
    return (int(m.group(1)), int(m.group(2))) if m else None


def backbone_shapes(config: CosmoeConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of the backbone file: all but the routed experts, in model order."""
    return {name: shape for name, shape in tensor_shapes(config).items() if expert_of(name) is None}


def kv_cache_bytes(config: CosmoeConfig, positions: int | None = None, itemsize: int = 4) -> int:
    """Bytes of a static KV cache: keys and values of every layer for ``positions`` tokens (default:
    the whole context), ``itemsize`` bytes each (fp32 unless the runtime computes in another dtype)."""
    positions = config.max_position_embeddings if positions is None else positions
    return 2 * config.num_hidden_layers * config.num_key_value_heads * positions * config.head_size * itemsize


@dataclass(frozen=True)
class ParamCounts:
    backbone: int  # embeddings, attention, norms, routers, shared experts, head
    per_expert: int  # one routed expert in one layer
    num_layers: int
    num_experts: int
    top_k: int

    @property
    def total(self) -> int:
        return self.backbone + self.per_expert * self.num_layers * self.num_experts

    @property
    def active(self) -> int:
        # Parameters touched by one token: the backbone plus top-k experts in every layer.
        return self.backbone + self.per_expert * self.num_layers * self.top_k


def param_counts(config: CosmoeConfig) -> ParamCounts:
    """Counts from the config alone, in O(1): nothing is materialised, every layer has the same shapes."""
    def numel(shapes: dict[str, tuple[int, ...]]) -> int:
        return sum(math.prod(s) for s in shapes.values())

    ends = config.vocab_size * config.hidden_size * (1 if config.tie_word_embeddings else 2) + config.hidden_size
    backbone = ends + numel(backbone_layer_shapes(config, 0)) * config.num_hidden_layers
    return ParamCounts(backbone, numel(expert_tensor_shapes(config, 0, 0)), config.num_hidden_layers,
                       config.num_experts, config.num_experts_per_tok)
