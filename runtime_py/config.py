"""The CoSMoE model config (HF-style, ``model_type: "cosmoe"``) and the canonical tensor table.

One config describes every architecture we import: a Llama-3 decoder whose FFN is, layer by
layer, one kind of FFN_KINDS: a Mixture-of-Experts ("moe", the default in every layer) or a plain
SwiGLU MLP ("dense": Qwen3-MoE's ``mlp_only_layers``, ERNIE's and GLM's first layers). The
per-family differences (q/k norm, attention biases, shared expert and its gate, the router and its
score bias, partial RoPE, Granite's multipliers, Phi-MoE's LayerNorms) are fields here, so one model implementation runs
them all (docs/FAMILIES.md says which family sets which).

Canonical tensor names (the names in every bundle file) and their shapes come from
``tensor_shapes(config)``: the single place that says what a complete model contains.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from runtime_py import format as fmt
from runtime_py.errors import ConfigError

MODEL_TYPE = "cosmoe"
ARCHITECTURE = "CosmoeForCausalLM"
EXPERT_KINDS = ("standard", "wd")
# head: per head_dim before RoPE (Qwen3-MoE, GLM-4-MoE); full: the whole projection (OLMoE);
# head_after_rope: per head_dim after RoPE (HunYuan-MoE).
QK_NORMS = ("none", "head", "full", "head_after_rope")
# How router logits become expert weights (runtime_py/routers.py ROUTERS has the math): softmax
# (Mixtral, Qwen, OLMoE, Granite, HunYuan, ERNIE) or sigmoid (GLM-4-MoE, DeepSeek-V3).
# sparsemixer: Phi-MoE's top-2 (its inference path, modeling_phimoe.py sparsemixer).
ROUTERS = ("softmax", "sigmoid", "sparsemixer")
# The decoder's norms (attention, FFN, final): RMSNorm, or LayerNorm with a bias (Phi-MoE). q/k
# norms are RMSNorm in every family.
NORMS = ("rms", "layer")
ROPE_TYPES = ("default", "llama3", "yarn")
# How an expert's gate and up projections combine (runtime_py/model.py EXPERT_ACTS has the math):
# SwiGLU, or gpt-oss's clamped SwiGLU (gate clamped above, up both ways at swiglu_limit;
# (up + 1) * gate * sigmoid(swiglu_alpha * gate)).
EXPERT_ACTS = ("silu", "clamped_swiglu")
# Per-layer token mixers by the name the manifest's ``layer_mixers`` uses: full causal attention,
# causal attention over the last ``sliding_window`` positions (gpt-oss's sliding_attention layers),
# multi-head latent attention (DeepSeek-V2/V3: keys and values from a cached latent of
# kv_lora_rank dims plus one shared RoPE key; runtime_py/model.py LatentAttention), or a gated
# short convolution (LFM2: out(C * conv(B * x)), a depthwise causal conv of conv_kernel taps whose
# last conv_kernel - 1 inputs are the layer's whole state; runtime_py/model.py ShortConv), or gated
# linear attention (Qwen3.5's Gated DeltaNet: a recurrent [H, dk, dv] state per layer and a short
# convolution over q, k and v; runtime_py/model.py GatedDeltaNet).
MIXER_KINDS = ("full", "sliding", "mla", "conv", "linear")
# How group-limited routing scores a group: the sum of its two best experts (DeepSeek-V3, GLM) or
# its best one (DeepSeek-V2's group_limited_greedy).
GROUP_SCORES = ("top2_sum", "max")
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



@dataclass(frozen=True)
class FfnKind:
    """One kind of per-layer FFN: whether it has routed experts (expert files, a router, the store's
    units) and the backbone tensors it adds to its layer (``shapes(config, layer)``)."""
    name: str
    routed: bool
    shapes: Callable[[CosmoeConfig, int], dict[str, tuple[int, ...]]]


def _moe_shapes(config: CosmoeConfig, layer: int) -> dict[str, tuple[int, ...]]:
    """Router [E, D], its score bias [E] where the config has one, and the shared expert where the
    config has one (with its sigmoid gate [1, D] in Qwen2-MoE)."""
    d, pre = config.hidden_size, f"layers.{layer}.moe"
    s: dict[str, tuple[int, ...]] = {f"{pre}.router.weight": (config.num_experts, d)}
    if config.router_bias:
        s[f"{pre}.router.bias"] = (config.num_experts,)
    if config.score_bias:
        s[f"{pre}.score_bias"] = (config.num_experts,)
    if config.shared_expert_intermediate_size:
        fs = config.shared_expert_intermediate_size
        s.update({f"{pre}.shared.gate.weight": (fs, d), f"{pre}.shared.up.weight": (fs, d),
                  f"{pre}.shared.down.weight": (d, fs)})
        if config.shared_expert_gate:
            s[f"{pre}.shared_gate.weight"] = (1, d)
    return s


def _dense_shapes(config: CosmoeConfig, layer: int) -> dict[str, tuple[int, ...]]:
    """SwiGLU gate/up [F_dense, D], down [D, F_dense]: F_dense is the source's dense ``intermediate_size``."""
    d, f, pre = config.hidden_size, config.dense_intermediate_size, f"layers.{layer}.mlp"
    return {f"{pre}.gate.weight": (f, d), f"{pre}.up.weight": (f, d), f"{pre}.down.weight": (d, f)}


# Per-layer FFN kinds by the name the manifest's ``layer_ffns`` uses. A new kind is one entry here
# and one module in runtime_py/model.py's FFN_MODULES.
FFN_KINDS: dict[str, FfnKind] = {k.name: k for k in (
    FfnKind("moe", routed=True, shapes=_moe_shapes),
    FfnKind("dense", routed=False, shapes=_dense_shapes),
)}
DEFAULT_FFN = "moe"
DEFAULT_MIXER = "full"
# Fields a v1 manifest never has: written only when not at their default, so a bundle of the four
# v1 families keeps its v1 bytes (runtime_py/format.py format_version_for): the layer plan and the
# knobs of the families added with it.
V2_FIELDS = fmt.V2_MODEL_KEYS

@dataclass(frozen=True)
class CacheSpec:
    """A layer's two cache tensors, [heads, rows, width] each (batch 1). ``positional``: one row per
    position (rows = the context): runtimes pass the filled prefix and write a call's new rows at
    its positions. Otherwise a fixed-size state: runtimes pass it whole and replace it by what the
    call returns; it starts at zeros (the programs zero it themselves at position 0)."""
    positional: bool
    k: tuple[int, int, int]
    v: tuple[int, int, int]

    def bytes(self, positions: int, itemsize: int = 4) -> int:
        rows = (lambda r: positions) if self.positional else (lambda r: r)
        return sum(h * rows(r) * w for h, r, w in (self.k, self.v)) * itemsize


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
    # The layer plan: one FFN_KINDS name per layer; None means "moe" in every layer (v1 bundles).
    # A plan of only "moe" is stored as None, so it serialises as v1 did.
    layer_ffns: tuple[str, ...] | None = None
    dense_intermediate_size: int = 0  # FFN width of a "dense" layer's MLP (Qwen3-MoE intermediate_size)
    # Routing (runtime_py/routers.py). score_bias: a per-expert bias added to the scores for the
    # choice of experts only, not to their weights (ERNIE-4.5, GLM-4-MoE, DeepSeek-V3's
    # e_score_correction_bias), tensor layers.L.moe.score_bias [E]. Group-limited top-k: experts
    # form n_group groups, and only the topk_group best groups are eligible (DeepSeek-V3, GLM).
    router: str = "softmax"
    score_bias: bool = False
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0  # the routed experts' weights are scaled by this (GLM, DeepSeek-V3)
    sparsemixer_eps: float = 0.01  # sparsemixer's jitter epsilon: scores this close to the best stay in its softmax
    shared_expert_gate: bool = True  # Qwen2-MoE gates its shared expert by a sigmoid; the others add it as is
    # RoPE on the first rotary_dim dims of each head only (GLM partial_rotary_factor); None: all of
    # them. Bundles store q/k in the half-split RoPE layout (rotate_half), so importers permute the
    # head dims of families that rotate interleaved pairs or a prefix (docs/MODELS.md).
    rotary_dim: int | None = None
    # Granite's multipliers: embeddings times embedding_multiplier; each residual branch times
    # residual_multiplier; attention scores times attention_multiplier (None: 1 / sqrt(head size));
    # logits divided by logits_scaling.
    embedding_multiplier: float = 1.0
    residual_multiplier: float = 1.0
    attention_multiplier: float | None = None
    logits_scaling: float = 1.0
    norm: str = "rms"  # NORMS; "layer" adds a bias [D] to each of the decoder's norms
    lm_head_bias: bool = False  # a bias [V] on the output head (Phi-MoE lm_head_bias)
    # gpt-oss. The token-mixer plan: one MIXER_KINDS name per layer, None meaning "full" everywhere
    # (stored as None when all are full, like layer_ffns); "sliding" layers attend to the last
    # sliding_window positions (the query's own included).
    layer_mixers: tuple[str, ...] | None = None
    sliding_window: int = 0
    # A learned logit per query head [H] that joins every softmax over the keys and is dropped after
    # it (tensor layers.L.attn.sinks): attention may put weight on "nothing".
    attention_sinks: bool = False
    router_bias: bool = False  # a bias [E] on the router's logits (layers.L.moe.router.bias)
    expert_bias: bool = False  # biases on each routed expert's gate [F], up [F] and down [D]
    expert_act: str = "silu"  # EXPERT_ACTS
    swiglu_alpha: float = 1.702  # clamped_swiglu only
    swiglu_limit: float = 7.0
    group_score: str = "top2_sum"  # GROUP_SCORES, with n_group > 1
    # DeepSeek-V2/V3's latent attention ("mla" layers; head_dim is then qk_nope_head_dim +
    # qk_rope_head_dim): q from D (q_lora_rank None) or through a q_lora_rank bottleneck with an
    # RMSNorm; a kv_lora_rank latent (RMSNorm'd) and one qk_rope_head_dim RoPE key per token, which
    # is what the cache holds; per head, keys [nope | rope] and values of v_head_dim from the latent.
    kv_lora_rank: int = 0
    q_lora_rank: int | None = None
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    # LFM2's "conv" layers: taps of the depthwise convolution, and biases on its three tensors.
    conv_kernel: int = 0
    conv_bias: bool = False
    # Qwen3.5's "linear" layers (Gated DeltaNet): key/query heads and value heads (a multiple of
    # them) and their widths, and the taps of the convolution over q, k, v.
    linear_num_key_heads: int = 0
    linear_num_value_heads: int = 0
    linear_key_head_dim: int = 0
    linear_value_head_dim: int = 0
    linear_conv_kernel: int = 0
    # Qwen3.5's full-attention layers gate their output per head dim: o(attn * sigmoid(gate(x))),
    # tensor layers.L.attn.gate.weight [H*Dh, D].
    attention_output_gate: bool = False
    # The sigmoid router's renormalisation adds this to the sum (transformers: 1e-20 for
    # DeepSeek-V3 and GLM, 1e-6 for LFM2).
    topk_norm_eps: float = 1e-20

    def __post_init__(self) -> None:
        for name, default in (("layer_ffns", DEFAULT_FFN), ("layer_mixers", DEFAULT_MIXER)):
            plan = getattr(self, name)
            if isinstance(plan, (list, tuple)):
                plan = None if plan and all(k == default for k in plan) else tuple(plan)
                object.__setattr__(self, name, plan)

    # ---- the layer plan ------------------------------------------------------------------------
    def ffn_kind(self, layer: int) -> FfnKind:
        return FFN_KINDS[self.layer_ffns[layer] if self.layer_ffns is not None else DEFAULT_FFN]

    def mixer(self, layer: int) -> str:
        return self.layer_mixers[layer] if self.layer_mixers is not None else DEFAULT_MIXER

    def window(self, layer: int) -> int | None:
        """How many positions (the query's own included) layer ``layer`` attends to; None: all."""
        return self.sliding_window if self.mixer(layer) == "sliding" else None

    @functools.cached_property  # the runner asks at every layer of every token
    def moe_layers(self) -> tuple[int, ...]:
        """The layers with routed experts, in order: the only ones with expert files and store units."""
        return tuple(i for i in range(self.num_hidden_layers) if self.ffn_kind(i).routed)

    @property
    def all_moe(self) -> bool:
        return self.layer_ffns is None

    @property
    def latent_attention(self) -> bool:
        """Multi-head latent attention (every layer "mla": one RoPE width per model)."""
        return self.mixer(0) == "mla"

    # ---- derived sizes -------------------------------------------------------------------------
    @property
    def head_size(self) -> int:
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_attention_heads

    @property
    def rope_width(self) -> int:
        """Width of the cos/sin rows every runtime builds: a head, or MLA's RoPE part of one."""
        return self.qk_rope_head_dim if self.latent_attention else self.head_size

    @property
    def rope_dims(self) -> int:
        """Dims of each head that RoPE rotates (the first ones, in the half-split layout)."""
        return self.rotary_dim if self.rotary_dim is not None else self.rope_width

    @property
    def linear_conv_dim(self) -> int:
        """Channels of a linear layer's convolution: q and k (key heads x key width each), then v."""
        keys = self.linear_num_key_heads * self.linear_key_head_dim
        return 2 * keys + self.linear_num_value_heads * self.linear_value_head_dim

    @property
    def qk_nope_head_dim(self) -> int:
        return self.head_size - self.qk_rope_head_dim  # MLA only

    def cache_spec(self, layer: int) -> CacheSpec:
        """Layer ``layer``'s two cache tensors (the runtimes' k and v caches): its kv heads' keys and
        values, or for MLA the latent [1, C, kv_lora_rank] and the RoPE key [1, C, qk_rope_head_dim],
        one row per position; or a conv layer's state, its last conv_kernel - 1 inputs
        [1, conv_kernel - 1, D] (and a [1, 1, 1] placeholder: a layer program has two cache tensors)."""
        c = self.max_position_embeddings
        kind = self.mixer(layer)
        if kind == "conv":
            return CacheSpec(False, (1, self.conv_kernel - 1, self.hidden_size), (1, 1, 1))
        if kind == "linear":  # the q/k/v convolution's last inputs, and the recurrent state
            hv, dk, dv = self.linear_num_value_heads, self.linear_key_head_dim, self.linear_value_head_dim
            return CacheSpec(False, (1, self.linear_conv_kernel - 1, self.linear_conv_dim), (hv, dk, dv))
        if kind == "mla":
            return CacheSpec(True, (1, c, self.kv_lora_rank), (1, c, self.qk_rope_head_dim))
        g, dh = self.num_key_value_heads, self.head_size
        return CacheSpec(True, (g, c, dh), (g, c, dh))

    @property
    def rank(self) -> int:
        return self.wd_rank if self.wd_rank is not None else self.hidden_size // 2

    # ---- (de)serialisation ---------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
             if f.name not in V2_FIELDS or getattr(self, f.name) != f.default}
        for name in ("layer_ffns", "layer_mixers"):
            if name in d:
                d[name] = list(d[name])
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
        for name in ("head_dim", "wd_rank", "rotary_dim", "q_lora_rank"):
            if getattr(self, name) is not None:
                ints_ok &= positive_int(name, getattr(self, name))
        for name in ("shared_expert_intermediate_size", "dense_intermediate_size"):
            s = getattr(self, name)
            if isinstance(s, bool) or not isinstance(s, int) or s < 0:
                p.append(f"{name} must be an integer >= 0, got {s!r}")
                ints_ok = False
        plan_ok = self._plan_problems(p)
        ints_ok &= plan_ok
        ints_ok &= all([positive_int(n, getattr(self, n)) for n in ("n_group", "topk_group")])
        for name in ("norm_topk_prob", "attention_bias", "attention_out_bias", "tie_word_embeddings", "score_bias",
                     "shared_expert_gate", "lm_head_bias", "attention_sinks", "router_bias", "expert_bias", "conv_bias",
                     "attention_output_gate"):
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
        if self.router not in ROUTERS:
            p.append(f"router must be one of {list(ROUTERS)}, got {self.router!r}")
        elif self.router == "sparsemixer" and (self.num_experts_per_tok != 2 or self.score_bias or self.n_group > 1):
            p.append("router 'sparsemixer' picks exactly 2 experts, without score bias or groups")
        if not _is_number(self.sparsemixer_eps) or self.sparsemixer_eps < 0:
            p.append(f"sparsemixer_eps must be a number >= 0, got {self.sparsemixer_eps!r}")
        if self.expert_act not in EXPERT_ACTS:
            p.append(f"expert_act must be one of {list(EXPERT_ACTS)}, got {self.expert_act!r}")
        if self.expert_act != "silu" and self.expert_kind != "standard":
            p.append(f"expert_act {self.expert_act!r} needs standard experts")
        if self.expert_bias is True and self.expert_kind != "standard":
            p.append("expert_bias needs standard experts")
        for name in ("swiglu_alpha", "swiglu_limit"):
            if not _is_number(getattr(self, name)) or not getattr(self, name) > 0:
                p.append(f"{name} must be a positive number, got {getattr(self, name)!r}")
        p.extend(self._mixer_problems())
        if self.group_score not in GROUP_SCORES:
            p.append(f"group_score must be one of {list(GROUP_SCORES)}, got {self.group_score!r}")
        if self.norm not in NORMS:
            p.append(f"norm must be one of {list(NORMS)}, got {self.norm!r}")
        if self.lm_head_bias is True and self.tie_word_embeddings is True:
            p.append("lm_head_bias needs an untied output head (tie_word_embeddings false)")
        if not _is_number(self.topk_norm_eps) or self.topk_norm_eps < 0:
            p.append(f"topk_norm_eps must be a number >= 0, got {self.topk_norm_eps!r}")
        for name in ("routed_scaling_factor", "embedding_multiplier", "residual_multiplier", "logits_scaling"):
            if not _is_number(getattr(self, name)) or not getattr(self, name) > 0:
                p.append(f"{name} must be a positive number, got {getattr(self, name)!r}")
        if self.attention_multiplier is not None and (not _is_number(self.attention_multiplier)
                                                      or not self.attention_multiplier > 0):
            p.append(f"attention_multiplier must be a positive number or null, got {self.attention_multiplier!r}")
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
            if self.rotary_dim is not None and (self.rotary_dim % 2 or self.rotary_dim > self.head_size):
                p.append(f"rotary_dim ({self.rotary_dim}) must be even and at most the head size ({self.head_size})")
            if self.num_experts % self.n_group or not self.topk_group <= self.n_group:
                p.append(f"n_group ({self.n_group}) must divide num_experts ({self.num_experts}) and be at least "
                         f"topk_group ({self.topk_group})")
            elif self.n_group > 1 and (self.num_experts // self.n_group < 2 or
                                       self.topk_group * (self.num_experts // self.n_group) < self.num_experts_per_tok):
                p.append(f"{self.topk_group} of {self.n_group} groups of {self.num_experts // self.n_group} "
                         f"experts cannot hold num_experts_per_tok ({self.num_experts_per_tok}) experts "
                         "(a group needs 2 or more)")
            if not p:
                total = param_counts(self).total
                if total > MAX_PARAMS:
                    p.append(f"{total:,} parameters exceeds the limit of {MAX_PARAMS:,}; check the sizes")
                files = len(self.moe_layers) * self.num_experts
                if files > MAX_EXPERT_FILES:
                    p.append(f"{len(self.moe_layers)} MoE layers x {self.num_experts} experts = {files:,} expert files "
                             f"exceeds the limit of {MAX_EXPERT_FILES:,}; check the sizes")
                kv = kv_cache_bytes(self)
                if kv > MAX_KV_CACHE_BYTES:
                    p.append(f"max_position_embeddings {self.max_position_embeddings:,} needs a {kv / 2**30:,.0f} GiB "
                             f"KV cache, above the limit of {MAX_KV_CACHE_BYTES >> 30} GiB; check the sizes")
        if p:
            raise ConfigError(f"{source}: " + "; ".join(p))

    def _mixer_problems(self) -> list[str]:
        plan, n, w = self.layer_mixers, self.num_hidden_layers, self.sliding_window
        if isinstance(w, bool) or not isinstance(w, int) or w < 0:
            return [f"sliding_window must be an integer >= 0, got {w!r}"]
        if plan is None:
            return []
        if not isinstance(plan, tuple) or not all(isinstance(k, str) for k in plan):
            return [f"layer_mixers must be a list of token mixers, got {plan!r}"]
        p = []
        if isinstance(n, int) and len(plan) != n:
            p.append(f"layer_mixers lists {len(plan)} layers, num_hidden_layers is {n}")
        unknown = sorted(set(plan) - set(MIXER_KINDS))
        if unknown:
            p.append(f"layer_mixers has unknown kinds {unknown}; known: {list(MIXER_KINDS)}")
        if "sliding" in plan and not w:
            p.append("layer_mixers has 'sliding' layers but sliding_window is 0")
        if "mla" in plan:
            p.extend(self._latent_problems(plan))
        k = self.conv_kernel
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            p.append(f"conv_kernel must be an integer >= 0, got {k!r}")
        elif "conv" in plan and k < 2:
            p.append(f"layer_mixers has 'conv' layers but conv_kernel is {k} (at least 2 taps)")
        if "linear" in plan:
            p.extend(self._linear_problems())
        return p

    def _linear_problems(self) -> list[str]:
        names = ("linear_num_key_heads", "linear_num_value_heads", "linear_key_head_dim", "linear_value_head_dim")
        bad = [n for n in names if isinstance(getattr(self, n), bool) or not isinstance(getattr(self, n), int)
               or getattr(self, n) <= 0]
        if bad:
            return [f"'linear' layers need positive integers {bad}"]
        p = []
        if self.linear_num_value_heads % self.linear_num_key_heads:
            p.append(f"linear_num_key_heads ({self.linear_num_key_heads}) must divide linear_num_value_heads "
                     f"({self.linear_num_value_heads})")
        k = self.linear_conv_kernel
        if isinstance(k, bool) or not isinstance(k, int) or k < 2:
            p.append(f"'linear' layers need linear_conv_kernel >= 2, got {k!r}")
        return p

    def _latent_problems(self, plan: tuple[str, ...]) -> list[str]:
        p = []
        if set(plan) != {"mla"}:
            p.append("layer_mixers: 'mla' layers cannot mix with other token mixers (one RoPE width per model)")
        for name in ("kv_lora_rank", "qk_rope_head_dim", "v_head_dim"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                p.append(f"'mla' layers need a positive integer {name}, got {v!r}")
        if not p:
            if self.qk_rope_head_dim % 2 or self.head_dim is None or self.head_dim <= self.qk_rope_head_dim:
                p.append(f"'mla' layers need an even qk_rope_head_dim ({self.qk_rope_head_dim}) below head_dim "
                         f"({self.head_dim}, = qk_nope_head_dim + qk_rope_head_dim)")
            taken = {"attention_sinks": self.attention_sinks, "qk_norm": self.qk_norm != "none",
                     "clip_qkv": self.clip_qkv is not None, "rotary_dim": self.rotary_dim is not None}
            unsupported = [n for n, bad in taken.items() if bad]
            if unsupported:
                p.append(f"'mla' layers do not take {unsupported}")
        return p

    def _plan_problems(self, p: list[str]) -> bool:
        """Append the layer plan's problems to ``p``; True when the plan can be used."""
        plan = self.layer_ffns
        if plan is None:
            return True
        n = self.num_hidden_layers
        if not isinstance(plan, tuple) or not all(isinstance(k, str) for k in plan):
            p.append(f"layer_ffns must be a list of FFN kinds, got {plan!r}")
            return False
        ok = True
        if isinstance(n, int) and len(plan) != n:
            p.append(f"layer_ffns lists {len(plan)} layers, num_hidden_layers is {n}")
            ok = False
        unknown = sorted(set(plan) - set(FFN_KINDS))
        if unknown:
            p.append(f"layer_ffns has unknown kinds {unknown}; known: {list(FFN_KINDS)}")
            return False
        if not any(FFN_KINDS[k].routed for k in plan):
            p.append("layer_ffns has no 'moe' layer; CoSMoE needs routed experts in at least one layer")
            ok = False
        if "dense" in plan and not self.dense_intermediate_size:
            p.append("layer_ffns has 'dense' layers but dense_intermediate_size is 0")
            ok = False
        return ok


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
    if kind == "yarn":
        keys = ("factor", "beta_fast", "beta_slow", "original_max_position_embeddings", "attention_factor")
        bad = [k for k in keys if not _is_number(rope.get(k)) or not rope.get(k) > 0]
        if bad or not isinstance(rope.get("truncate"), bool):
            return [f"rope_scaling (yarn) needs positive numbers for {bad or list(keys)} and truncate true or false"]
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
        out = {f"{prefix}.{m}.weight": shape for m, shape in mats.items()}
        if config.expert_bias:  # gpt-oss: after the matrices, in the order of their names
            out.update({f"{prefix}.{m}.bias": (shape[0],) for m, shape in mats.items()})
        return out
    out = {}
    for m, (n, k) in mats.items():
        out[f"{prefix}.{m}.left"] = (n, r)
        out[f"{prefix}.{m}.right"] = (r, k)
    return out


def _latent_attention_shapes(config: CosmoeConfig, pre: str) -> dict[str, tuple[int, ...]]:
    """MLA (DeepSeek-V2 Eqs. 9-19): q [H*(nope+rope), D], or q_a [q_lora, D] + q_a_norm + q_b
    [H*(nope+rope), q_lora]; kv_a [r + rope, D] (the latent, then the shared RoPE key); kv_a_norm [r];
    kv_b [H*(nope+v), r] (per head: its key's nope part, then its value); o [D, H*v]."""
    d, h, r = config.hidden_size, config.num_attention_heads, config.kv_lora_rank
    qk, v, ql = config.head_size, config.v_head_dim, config.q_lora_rank
    s: dict[str, tuple[int, ...]] = {}
    if ql is None:
        s[f"{pre}.attn.q.weight"] = (h * qk, d)
    else:
        s[f"{pre}.attn.q_a.weight"] = (ql, d)
        if config.attention_bias:
            s[f"{pre}.attn.q_a.bias"] = (ql,)
        s.update({f"{pre}.attn.q_a_norm.weight": (ql,), f"{pre}.attn.q_b.weight": (h * qk, ql)})
    s[f"{pre}.attn.kv_a.weight"] = (r + config.qk_rope_head_dim, d)
    if config.attention_bias:
        s[f"{pre}.attn.kv_a.bias"] = (r + config.qk_rope_head_dim,)
    s.update({f"{pre}.attn.kv_a_norm.weight": (r,), f"{pre}.attn.kv_b.weight": (h * (config.qk_nope_head_dim + v), r),
              f"{pre}.attn.o.weight": (d, h * v)})
    if config.attention_out_bias:
        s[f"{pre}.attn.o.bias"] = (d,)
    return s


def _attention_shapes(config: CosmoeConfig, pre: str) -> dict[str, tuple[int, ...]]:
    """q [H*Dh, D], k and v [G*Dh, D], o [D, H*Dh], and the family's biases, sinks and q/k norms."""
    d, hd = config.hidden_size, config.head_size
    q_out, kv_out = config.num_attention_heads * hd, config.num_key_value_heads * hd
    s: dict[str, tuple[int, ...]] = {
        f"{pre}.attn.q.weight": (q_out, d),
        f"{pre}.attn.k.weight": (kv_out, d),
        f"{pre}.attn.v.weight": (kv_out, d),
        f"{pre}.attn.o.weight": (d, q_out),
    }
    if config.attention_bias:
        s.update({f"{pre}.attn.q.bias": (q_out,), f"{pre}.attn.k.bias": (kv_out,), f"{pre}.attn.v.bias": (kv_out,)})
    if config.attention_out_bias:
        s[f"{pre}.attn.o.bias"] = (d,)
    if config.attention_sinks:
        s[f"{pre}.attn.sinks"] = (config.num_attention_heads,)
    if config.attention_output_gate:
        s[f"{pre}.attn.gate.weight"] = (q_out, d)
        if config.attention_bias:
            s[f"{pre}.attn.gate.bias"] = (q_out,)
    if config.qk_norm in ("head", "head_after_rope"):
        s.update({f"{pre}.attn.q_norm.weight": (hd,), f"{pre}.attn.k_norm.weight": (hd,)})
    elif config.qk_norm == "full":
        s.update({f"{pre}.attn.q_norm.weight": (q_out,), f"{pre}.attn.k_norm.weight": (kv_out,)})
    return s


def _conv_shapes(config: CosmoeConfig, pre: str) -> dict[str, tuple[int, ...]]:
    """LFM2's short convolution: in_proj [3D, D] (B, C and x, in that order of rows), the
    depthwise kernel weight [D, 1, K], out_proj [D, D]; with conv_bias, a bias on each."""
    d = config.hidden_size
    s: dict[str, tuple[int, ...]] = {f"{pre}.conv.in_proj.weight": (3 * d, d),
                                     f"{pre}.conv.weight": (d, 1, config.conv_kernel),
                                     f"{pre}.conv.out_proj.weight": (d, d)}
    if config.conv_bias:
        s.update({f"{pre}.conv.in_proj.bias": (3 * d,), f"{pre}.conv.bias": (d,), f"{pre}.conv.out_proj.bias": (d,)})
    return s


def _linear_shapes(config: CosmoeConfig, pre: str) -> dict[str, tuple[int, ...]]:
    """Gated DeltaNet (Qwen3.5, modeling_qwen3_5_moe.py Qwen3_5MoeGatedDeltaNet): in_proj_qkv
    [2 Hk dk + Hv dv, D] (q, k, v rows), in_proj_z [Hv dv, D] (the output gate), in_proj_b and
    in_proj_a [Hv, D] (write strength and decay), the depthwise conv weight [C, 1, K] over q, k, v,
    A_log and dt_bias [Hv], the gated norm's weight [dv], out_proj [D, Hv dv]."""
    d, hv, dv = config.hidden_size, config.linear_num_value_heads, config.linear_value_head_dim
    c = config.linear_conv_dim
    return {f"{pre}.linear.in_proj_qkv.weight": (c, d), f"{pre}.linear.in_proj_z.weight": (hv * dv, d),
            f"{pre}.linear.in_proj_b.weight": (hv, d), f"{pre}.linear.in_proj_a.weight": (hv, d),
            f"{pre}.linear.conv.weight": (c, 1, config.linear_conv_kernel), f"{pre}.linear.A_log": (hv,),
            f"{pre}.linear.dt_bias": (hv,), f"{pre}.linear.norm.weight": (dv,),
            f"{pre}.linear.out_proj.weight": (d, hv * dv)}


# Token mixer -> its tensors in a layer (the DecoderLayer attribute is their name segment).
MIXER_SHAPES: dict[str, Callable[[CosmoeConfig, str], dict[str, tuple[int, ...]]]] = {
    "full": _attention_shapes, "sliding": _attention_shapes, "mla": _latent_attention_shapes, "conv": _conv_shapes,
    "linear": _linear_shapes}


def backbone_layer_shapes(config: CosmoeConfig, layer: int) -> dict[str, tuple[int, ...]]:
    """Everything in one layer that is not a routed expert."""
    d, pre = config.hidden_size, f"layers.{layer}"
    s: dict[str, tuple[int, ...]] = {f"{pre}.attn_norm.weight": (d,)}
    if config.norm == "layer":
        s[f"{pre}.attn_norm.bias"] = (d,)
    s.update(MIXER_SHAPES[config.mixer(layer)](config, pre))
    s[f"{pre}.ffn_norm.weight"] = (d,)
    if config.norm == "layer":
        s[f"{pre}.ffn_norm.bias"] = (d,)
    s.update(config.ffn_kind(layer).shapes(config, layer))
    return s


def tensor_shapes(config: CosmoeConfig) -> dict[str, tuple[int, ...]]:
    """Every canonical tensor in model order: embedding, then per layer backbone and experts, then head."""
    shapes = {"embed.weight": (config.vocab_size, config.hidden_size)}
    for layer in range(config.num_hidden_layers):
        shapes.update(backbone_layer_shapes(config, layer))
        for expert in range(config.num_experts if config.ffn_kind(layer).routed else 0):
            shapes.update(expert_tensor_shapes(config, layer, expert))
    shapes["norm.weight"] = (config.hidden_size,)
    if config.norm == "layer":
        shapes["norm.bias"] = (config.hidden_size,)
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, config.hidden_size)
    if config.lm_head_bias:
        shapes["lm_head.bias"] = (config.vocab_size,)
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
    return sum(config.cache_spec(layer).bytes(positions, itemsize) for layer in range(config.num_hidden_layers))


@dataclass(frozen=True)
class ParamCounts:
    backbone: int  # embeddings, attention, norms, routers, shared experts, dense MLPs, head
    per_expert: int  # one routed expert in one layer
    num_layers: int  # layers with routed experts (config.moe_layers)
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
    """Counts from the config alone, in O(kinds): nothing is materialised, every layer of one FFN
    kind has the same shapes."""
    def numel(shapes: dict[str, tuple[int, ...]]) -> int:
        return sum(math.prod(s) for s in shapes.values())

    ends = (config.vocab_size * config.hidden_size * (1 if config.tie_word_embeddings else 2)
            + config.hidden_size * (2 if config.norm == "layer" else 1) + config.vocab_size * config.lm_head_bias)
    # A layer of each (FFN kind, token mixer) stands for all of its kind.
    plan = [(config.ffn_kind(i).name, config.mixer(i)) for i in range(config.num_hidden_layers)]
    first = {kind: plan.index(kind) for kind in set(plan)}
    backbone = ends + sum(numel(backbone_layer_shapes(config, first[kind])) * plan.count(kind) for kind in first)
    return ParamCounts(backbone, numel(expert_tensor_shapes(config, 0, 0)), len(config.moe_layers),
                       config.num_experts, config.num_experts_per_tok)
