"""``lower --target gguf``: the whole bundle as one llama.cpp model file (docs/LOWERING.md "GGUF").

One file, not one per unit: llama.cpp memory-maps a model and pages its experts itself. Written
with the ``gguf`` package (the writer llama.cpp's own converter uses), one tensor at a time through
its temporary file, so memory holds one layer's experts, not the model.

Exact where GGUF can hold the bundle's form (docs/FORMAT.md "Quantized tensors" is ours, ggml's
block layouts are in ggml-common.h):
    int4, G a multiple of 32  -> Q4_0: per block of 32, d = scale (fp16), q = code + 8,
                                  byte j = q[j] | q[j + 16] << 4
    int8 per channel          -> Q8_0: per block of 32, d = the row's scale, q = code
    float                     -> F32 / BF16 / F16 as stored (1-D tensors F32: llama.cpp's norms)
Where it cannot, the nearest form, recorded in the manifest entry's ``gguf.fallbacks``: a row
length not a multiple of 32 (hidden 432) or a scale outside fp16's normal range -> F16 when every
value is exact in it, else F32; a layer's stacked experts share one type, so mixed precision
becomes the layer's highest (int4 codes are exact in Q8_0's blocks).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

from cosmoe_export.errors import CosmoeError
from cosmoe_export.importers.adapters import rope_permutation
from cosmoe_export.lower import units
from runtime_py import format as fmt
from runtime_py import model as rt_model
from runtime_py.bundle import Bundle
from runtime_py.config import CosmoeConfig

Q = gguf.GGMLQuantizationType
BLOCK = 32  # Q4_0 and Q8_0 hold 32 values per block
FLOAT_TYPES = {"float32": Q.F32, "bfloat16": Q.BF16, "float16": Q.F16}  # the bundle's dtype -> GGUF's
# How exact each GGUF float type is, from the most compact: a value is written in the first that holds it.
FALLBACK_FLOATS = (Q.F16, Q.F32)


# ---------------------------------------------------------------------------------------- architectures
@dataclass(frozen=True)
class Arch:
    """A llama.cpp architecture and what its graph (llama.cpp src/models/{name}.cpp) computes."""

    name: str  # gguf.MODEL_ARCH_NAMES value
    norm_topk_prob: bool | None  # build_moe_ffn's norm_w: fixed per architecture, or None: a key (keys writes it)
    qk_norm: str | tuple[str, ...]  # runtime_py.config qk_norm the graph applies (or those it takes)
    # RoPE on interleaved pairs (ggml's NORM mode): HF's half-split q/k rows are reordered, as
    # llama.cpp's converter does (LlamaModel.permute). The others rotate half-split (NEOX).
    interleaved_rope: bool
    # The shared experts the graph computes (_shared_kind): "none", "gated" by a sigmoid (ffn_gate_inp_shexp),
    # "plain" (added as is); ffn_*_shexp tensors either way.
    shared: tuple[str, ...] = ("none",)
    # RoPE scalings (rope_scaling's rope_type) the graph takes: Llama 3.1's as the rope_freqs tensor,
    # YaRN as the rope.scaling.* keys (_rope_keys).
    rope_kinds: tuple[str, ...] = ("default",)
    tied_head: bool = True  # output.weight may be absent (the embedding is the head)
    hidden_heads: bool = False  # the output projection sized n_embd: heads * head_dim == hidden
    kv_full: bool = False  # the k norm sized n_embd too: as many kv heads as heads
    shared_by_count: bool = False  # shared experts as a count of routed-expert widths (expert_shared_count)
    dense_lead: bool = False  # dense layers allowed before the MoE ones (ffn_{gate,up,down}, leading_dense_block_count)
    hparams: frozenset[str] = frozenset()  # config fields beyond _HPARAMS that ``keys`` writes
    allowed: tuple[tuple[str, tuple[Any, ...]], ...] = ()  # of those, the values the graph computes
    renames: tuple[tuple[gguf.MODEL_TENSOR, gguf.MODEL_TENSOR], ...] = ()  # its names for BACKBONE_TENSORS' tensors
    keys: Callable[[gguf.GGUFWriter, CosmoeConfig], None] | None = None  # the architecture's own keys
    check: Callable[[CosmoeConfig], list[str]] | None = None  # what else it cannot take, as _mismatches says it


def _granite_keys(w: gguf.GGUFWriter, cfg: CosmoeConfig) -> None:
    """Granite's multipliers (llama.cpp src/models/granite.cpp): the embeddings scaled, each residual
    branch scaled, the attention scores scaled (0: 1 / sqrt(head size)), the logits divided."""
    w.add_embedding_scale(cfg.embedding_multiplier)
    w.add_residual_scale(cfg.residual_multiplier)
    if cfg.attention_multiplier is not None:
        w.add_attention_scale(cfg.attention_multiplier)
    w.add_logit_scale(cfg.logits_scaling)


def _ernie_keys(w: gguf.GGUFWriter, cfg: CosmoeConfig) -> None:
    w.add_interleave_moe_layer_step(1)
    w.add_leading_dense_block_count(_dense_lead(cfg))


def _groups_check(cfg: CosmoeConfig) -> list[str]:
    # build_moe_ffn scores a group by the sum of its best two experts (DeepSeek-V3's, GLM's).
    return [f"expert groups scored by {cfg.group_score!r}"] if cfg.n_group > 1 and cfg.group_score != "top2_sum" else []


def _moe_keys(w: gguf.GGUFWriter, cfg: CosmoeConfig) -> None:
    """The routing keys of llama.cpp's DeepSeek-style graphs: dense layers first, shared experts by count,
    renormalisation, scaling, the gating function, groups."""
    w.add_leading_dense_block_count(_dense_lead(cfg))
    w.add_expert_shared_count(cfg.shared_expert_intermediate_size // cfg.intermediate_size)
    w.add_expert_weights_norm(cfg.norm_topk_prob)
    w.add_expert_weights_scale(cfg.routed_scaling_factor)
    w.add_expert_gating_func({"softmax": gguf.ExpertGatingFuncType.SOFTMAX,
                              "sigmoid": gguf.ExpertGatingFuncType.SIGMOID}[cfg.router])
    w.add_expert_group_count(cfg.n_group)
    w.add_expert_group_used_count(cfg.topk_group)


def _deepseek_keys(w: gguf.GGUFWriter, cfg: CosmoeConfig) -> None:
    """DeepSeek-V2/V3 (llama.cpp src/models/deepseek2.cpp): latent attention run as MQA over the latent
    (one kv head of kv_lora_rank + the RoPE key), decompressed by attn_k_b / attn_v_b."""
    _moe_keys(w, cfg)
    w.add_q_lora_rank(cfg.q_lora_rank or 0)
    w.add_kv_lora_rank(cfg.kv_lora_rank)
    w.add_head_count_kv(1)
    w.add_key_length(cfg.kv_lora_rank + cfg.qk_rope_head_dim)
    w.add_value_length(cfg.kv_lora_rank)
    w.add_key_length_mla(cfg.head_size)
    w.add_value_length_mla(cfg.v_head_dim)
    if mscale_all_dim := _mscale_all_dim(cfg):  # read back divided by 0.1 (its converter's legacy)
        w.add_rope_scaling_yarn_log_mul(0.1 * mscale_all_dim)


def _mscale_all_dim(cfg: CosmoeConfig) -> float:
    """YaRN's mscale_all_dim behind the bundle's softmax scale: the importer folded it into
    attention_multiplier = m^2 / sqrt(head), m = 1 + 0.1 mscale_all_dim ln(factor); llama.cpp takes
    mscale_all_dim itself and computes m (0: no YaRN scale)."""
    rope = cfg.rope_scaling or {}
    if cfg.attention_multiplier is None or rope.get("rope_type") != "yarn" or rope["factor"] <= 1:
        return 0.0
    m = math.sqrt(cfg.attention_multiplier * math.sqrt(cfg.head_size))
    return (m - 1.0) / (0.1 * math.log(rope["factor"]))


def _deepseek_check(cfg: CosmoeConfig) -> list[str]:
    why = _groups_check(cfg)
    if not cfg.latent_attention or {cfg.mixer(layer) for layer in range(cfg.num_hidden_layers)} != {"mla"}:
        why.append("token mixers other than latent attention")
    rope = cfg.rope_scaling or {}
    # llama.cpp's deepseek2 computes the softmax scale from YaRN's mscale_all_dim and takes mscale equal to
    # it (cos and sin unscaled): another scale, or YaRN's attention_factor away from 1, it cannot say.
    if cfg.attention_multiplier is not None and rope.get("rope_type") != "yarn":
        why.append(f"attention_multiplier {cfg.attention_multiplier} without YaRN")
    if rope.get("attention_factor", 1.0) != 1.0:
        why.append(f"YaRN attention_factor {rope['attention_factor']}")
    return why


def _lfm2_keys(w: gguf.GGUFWriter, cfg: CosmoeConfig) -> None:
    """LFM2-MoE (llama.cpp src/models/lfm2.cpp): short-convolution layers are those with no kv heads
    (head_count_kv per layer, _head_count_kv); the router renormalises, always, and never scales."""
    w.add_shortconv_l_cache(cfg.conv_kernel)
    w.add_leading_dense_block_count(_dense_lead(cfg))
    w.add_expert_gating_func({"softmax": gguf.ExpertGatingFuncType.SOFTMAX,
                              "sigmoid": gguf.ExpertGatingFuncType.SIGMOID}[cfg.router])


def _lfm2_check(cfg: CosmoeConfig) -> list[str]:
    mixers = {cfg.mixer(layer) for layer in range(cfg.num_hidden_layers)}
    why = [f"{m} token mixers" for m in sorted(mixers - {"full", "conv"})]
    if "conv" not in mixers:  # llama.cpp's hybrid memory then has no recurrent buffer: it aborts
        why.append("no short-convolution layer")
    return why


def _qwen35_keys(w: gguf.GGUFWriter, cfg: CosmoeConfig) -> None:
    """Qwen3.5-MoE (llama.cpp src/models/qwen35moe.cpp): which layers are Gated DeltaNet ones, and
    their widths; RoPE as interleaved MRoPE, whose sections give text positions the plain rotation
    whatever their split (t, h and w are the same position), so each covers every pair."""
    pairs = cfg.rope_dims // 2
    w.add_rope_dimension_sections([pairs, pairs, pairs, 0])
    w.add_array(f"{gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.QWEN35MOE]}.attention.recurrent_layers",
                [cfg.mixer(layer) == "linear" for layer in range(cfg.num_hidden_layers)])
    w.add_ssm_conv_kernel(cfg.linear_conv_kernel)
    w.add_ssm_state_size(cfg.linear_key_head_dim)
    w.add_ssm_group_count(cfg.linear_num_key_heads)
    w.add_ssm_time_step_rank(cfg.linear_num_value_heads)
    w.add_ssm_inner_size(cfg.linear_value_head_dim * cfg.linear_num_value_heads)


def _qwen35_check(cfg: CosmoeConfig) -> list[str]:
    mixers = {cfg.mixer(layer) for layer in range(cfg.num_hidden_layers)}
    why = [f"{m} token mixers" for m in sorted(mixers - {"full", "linear"})]
    if "linear" not in mixers:
        why.append("no Gated DeltaNet layer")
    elif cfg.linear_key_head_dim != cfg.linear_value_head_dim:  # llama.cpp's state is [Dv, Dv] per head
        why.append(f"DeltaNet key heads of {cfg.linear_key_head_dim} dims and value heads of "
                   f"{cfg.linear_value_head_dim}")
    if not cfg.attention_output_gate:
        why.append("attention without its output gate")
    return why


def _glm_keys(w: gguf.GGUFWriter, cfg: CosmoeConfig) -> None:
    """GLM-4.5 (llama.cpp src/models/glm4-moe.cpp): its shared experts by count, as wide as a routed one."""
    _moe_keys(w, cfg)


def _gpt_oss_keys(w: gguf.GGUFWriter, cfg: CosmoeConfig) -> None:
    """gpt-oss (llama.cpp src/models/openai-moe.cpp): which layers slide, and over how many positions."""
    w.add_sliding_window(cfg.sliding_window)
    w.add_sliding_window_pattern([cfg.mixer(layer) == "sliding" for layer in range(cfg.num_hidden_layers)])


def _gpt_oss_check(cfg: CosmoeConfig) -> list[str]:
    mixers = {cfg.mixer(layer) for layer in range(cfg.num_hidden_layers)}
    return [f"{m} token mixers" for m in sorted(mixers - {"full", "sliding"})]


ARCHES = (
    Arch("llama", norm_topk_prob=True, qk_norm="none", interleaved_rope=True, rope_kinds=("default", "llama3")),
    Arch("qwen2moe", norm_topk_prob=False, qk_norm="none", shared=("gated",), interleaved_rope=False,
         tied_head=False, hidden_heads=True),
    Arch("qwen3moe", norm_topk_prob=True, qk_norm="head", interleaved_rope=False),
    Arch("olmoe", norm_topk_prob=False, qk_norm="full", interleaved_rope=False,
         tied_head=False, hidden_heads=True, kv_full=True),
    Arch("granitemoe", norm_topk_prob=True, qk_norm="none", shared=("none", "plain"), interleaved_rope=True,
         hparams=frozenset({"embedding_multiplier", "residual_multiplier", "attention_multiplier",
                            "logits_scaling"}), keys=_granite_keys),
    # HunYuan-A13B: q/k norms per head after RoPE, an ungated shared MLP in every layer.
    Arch("hunyuan-moe", norm_topk_prob=True, qk_norm="head_after_rope", shared=("plain",), interleaved_rope=False),
    # ERNIE 4.5: dense layers first, then MoE in every layer (interleave step 1); the correction bias
    # (exp_probs_b) added to the softmax for choosing only, as transformers does.
    Arch("ernie4_5-moe", norm_topk_prob=True, qk_norm="none", shared=("none", "plain"), interleaved_rope=True,
         dense_lead=True, hparams=frozenset({"dense_intermediate_size", "score_bias"}), keys=_ernie_keys),
    # GLM-4.5: dense layers first, the sigmoid (or softmax) router with a correction bias, groups scored by
    # their top-2 sum, routed scaling, partial RoPE, optional per-head q/k norm; its pre-FFN norm is
    # llama.cpp's post_attention_norm.
    Arch("glm4moe", norm_topk_prob=None, qk_norm=("none", "head"), shared=("plain",), interleaved_rope=False,
         shared_by_count=True, dense_lead=True,
         hparams=frozenset({"dense_intermediate_size", "score_bias", "router", "n_group", "topk_group", "group_score",
                            "routed_scaling_factor", "rotary_dim"}),
         allowed=(("router", ("softmax", "sigmoid")),), keys=_glm_keys, check=_groups_check,
         renames=((gguf.MODEL_TENSOR.FFN_NORM, gguf.MODEL_TENSOR.ATTN_POST_NORM),)),
    # gpt-oss: attention sinks, sliding and full layers, biases on the router and the experts, and the
    # clamped SwiGLU with llama.cpp's constants (alpha 1.702, limit 7: gpt-oss's own); YaRN.
    Arch("gpt-oss", norm_topk_prob=True, qk_norm="none", interleaved_rope=False, tied_head=False,
         rope_kinds=("default", "yarn"),
         hparams=frozenset({"layer_mixers", "sliding_window", "attention_sinks", "router_bias", "expert_bias",
                            "expert_act", "swiglu_alpha", "swiglu_limit"}),
         allowed=(("expert_act", ("clamped_swiglu",)), ("swiglu_alpha", (1.702,)), ("swiglu_limit", (7.0,))),
         keys=_gpt_oss_keys, check=_gpt_oss_check,
         renames=((gguf.MODEL_TENSOR.FFN_NORM, gguf.MODEL_TENSOR.ATTN_POST_NORM),)),
    # DeepSeek-V2 (greedy, as V2-Lite) and V3: latent attention (q direct or through q_lora_rank),
    # dense layers first, the softmax or sigmoid router, groups by top-2 sum, routed scaling, YaRN.
    Arch("deepseek2", norm_topk_prob=None, qk_norm="none", shared=("plain",), interleaved_rope=True,
         shared_by_count=True, dense_lead=True, rope_kinds=("default", "yarn"),
         hparams=frozenset({"dense_intermediate_size", "score_bias", "router", "n_group", "topk_group", "group_score",
                            "routed_scaling_factor", "layer_mixers", "kv_lora_rank", "q_lora_rank",
                            "qk_rope_head_dim", "v_head_dim", "attention_multiplier"}),
         allowed=(("router", ("softmax", "sigmoid")),), keys=_deepseek_keys, check=_deepseek_check),
    # LFM2-MoE: short gated convolutions (no conv biases in llama.cpp's) around attention layers with
    # per-head q/k norms, dense layers first, the sigmoid router with its expert bias, renormalised
    # (llama.cpp floors the sum at 6e-5 where LFM2 adds topk_norm_eps 1e-6: apart only for sums near 0)
    # and never scaled (llama.cpp's lfm2moe reads no expert_weights_scale); its final norm is llama.cpp's
    # token_embd_norm.
    Arch("lfm2moe", norm_topk_prob=True, qk_norm="head", interleaved_rope=False, dense_lead=True,
         hparams=frozenset({"dense_intermediate_size", "score_bias", "router", "layer_mixers", "conv_kernel",
                            "topk_norm_eps"}),
         allowed=(("router", ("softmax", "sigmoid")),), keys=_lfm2_keys, check=_lfm2_check,
         renames=((gguf.MODEL_TENSOR.OUTPUT_NORM, gguf.MODEL_TENSOR.TOKEN_EMBD_NORM),)),
    # Qwen3.5-MoE: Gated DeltaNet layers (key and value heads of one width) around full-attention ones
    # whose output is gated per head dim (q_proj's gate rows), partial RoPE, per-head q/k norms, a
    # sigmoid-gated shared expert; its pre-FFN norm is llama.cpp's post_attention_norm.
    Arch("qwen35moe", norm_topk_prob=True, qk_norm="head", shared=("gated",), interleaved_rope=False,
         hparams=frozenset({"layer_mixers", "rotary_dim", "linear_num_key_heads", "linear_num_value_heads",
                            "linear_key_head_dim", "linear_value_head_dim", "linear_conv_kernel",
                            "attention_output_gate"}),
         keys=_qwen35_keys, check=_qwen35_check,
         renames=((gguf.MODEL_TENSOR.FFN_NORM, gguf.MODEL_TENSOR.ATTN_POST_NORM),)),
)
# The llama.cpp architecture that runs each family (convert_hf_to_gguf.py's registrations); those not in
# ARCHES are refused by that name, so the error says what is missing.
FAMILY_ARCH = {"CosmoeForCausalLM": "llama", "MixtralForCausalLM": "llama", "Qwen2MoeForCausalLM": "qwen2moe",
               "Qwen3MoeForCausalLM": "qwen3moe", "OlmoeForCausalLM": "olmoe", "GraniteMoeForCausalLM": "granitemoe",
               "GraniteMoeSharedForCausalLM": "granitemoe", "HunYuanMoEV1ForCausalLM": "hunyuan-moe",
               "Ernie4_5_MoeForCausalLM": "ernie4_5-moe", "Glm4MoeForCausalLM": "glm4moe",
               "PhimoeForCausalLM": "phimoe", "GptOssForCausalLM": "gpt-oss", "DeepseekV2ForCausalLM": "deepseek2",
               "DeepseekV3ForCausalLM": "deepseek2", "Lfm2MoeForCausalLM": "lfm2moe",
               "Qwen3_5MoeForCausalLM": "qwen35moe"}
NOT_WRITTEN = {family: name for family, name in FAMILY_ARCH.items() if name not in {a.name for a in ARCHES}}
# Of those, the ones whose llama.cpp graph computes something else than the model: writing them would
# give a file that runs and is wrong.
DIFFERENT_GRAPH = {"phimoe": "whose graph routes by a renormalised softmax top-k, not by Phi-MoE's sparsemixer"}
# Config fields every architecture above takes as metadata (or checks itself); any other field away from its
# default is a feature only the architectures naming it in ``hparams`` have.
_HPARAMS = {"vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "intermediate_size", "num_experts", "num_experts_per_tok", "head_dim", "rms_norm_eps", "rope_theta",
            "max_position_embeddings", "tie_word_embeddings", "bos_token_id", "eos_token_id", "attention_bias",
            "attention_out_bias", "norm_topk_prob", "qk_norm", "shared_expert_intermediate_size", "shared_expert_gate",
            "rope_scaling", "layer_ffns"}


def _features(cfg: CosmoeConfig) -> list[str]:
    """The config fields outside _HPARAMS away from their defaults."""
    return [f.name for f in dataclasses.fields(cfg) if f.name not in _HPARAMS and getattr(cfg, f.name) != f.default]


def _dense_lead(cfg: CosmoeConfig) -> int:
    """How many layers lead with a dense MLP before the first MoE one."""
    plan = cfg.layer_ffns or ()
    return next((i for i, kind in enumerate(plan) if kind != "dense"), len(plan))


def _head_count_kv(cfg: CosmoeConfig) -> int | list[int]:
    """One count, or per layer where some layers have no attention (LFM2's convolutions: 0)."""
    counts = [0 if cfg.mixer(layer) == "conv" else cfg.num_key_value_heads for layer in range(cfg.num_hidden_layers)]
    return counts if 0 in counts else cfg.num_key_value_heads


def _shared_kind(cfg: CosmoeConfig) -> str:
    if not cfg.shared_expert_intermediate_size:
        return "none"
    return "gated" if cfg.shared_expert_gate else "plain"


def _mismatches(arch: Arch, cfg: CosmoeConfig) -> list[str]:
    why = []
    if arch.norm_topk_prob is not None and cfg.norm_topk_prob != arch.norm_topk_prob:
        why.append(f"norm_topk_prob {cfg.norm_topk_prob}")
    if cfg.qk_norm not in (arch.qk_norm if isinstance(arch.qk_norm, tuple) else (arch.qk_norm,)):
        why.append(f"qk_norm {cfg.qk_norm!r}")
    why += [f"{name} {getattr(cfg, name)!r}" for name, values in arch.allowed if getattr(cfg, name) not in values]
    if arch.shared_by_count and cfg.shared_expert_intermediate_size % cfg.intermediate_size:
        why.append("a shared expert not a whole number of routed ones")
    if arch.check is not None:
        why += arch.check(cfg)
    if _shared_kind(cfg) not in arch.shared:
        why.append({"none": "no shared expert", "gated": "a gated shared expert",
                    "plain": "an ungated shared expert"}[_shared_kind(cfg)])
    plan = cfg.layer_ffns or ("moe",) * cfg.num_hidden_layers
    if set(plan) != {"moe"}:
        lead = _dense_lead(cfg)
        if not arch.dense_lead:
            why.append("layer_ffns " + "/".join(sorted(set(plan))))
        elif set(plan[lead:]) != {"moe"}:
            why.append("dense layers after MoE ones")
    why += [f for f in _features(cfg) if f not in arch.hparams]
    kind = (cfg.rope_scaling or {}).get("rope_type", "default")
    if kind not in arch.rope_kinds:
        why.append(f"{kind} RoPE scaling")
    if cfg.tie_word_embeddings and not arch.tied_head:
        why.append("a tied head")
    if arch.hidden_heads and cfg.num_attention_heads * cfg.head_size != cfg.hidden_size:
        why.append(f"head_dim {cfg.head_size} x {cfg.num_attention_heads} heads != hidden {cfg.hidden_size}")
    if arch.kv_full and cfg.num_key_value_heads != cfg.num_attention_heads:
        why.append(f"{cfg.num_key_value_heads} kv heads for {cfg.num_attention_heads}")
    return why


def architecture(bundle: Bundle) -> Arch:
    """The llama.cpp architecture that computes what ``bundle`` computes, or the error naming why none does."""
    cfg = bundle.config
    family = bundle.manifest["provenance"]["source"].get("architecture", "CosmoeForCausalLM")
    why = {arch.name: _mismatches(arch, cfg) for arch in ARCHES}
    for arch in ARCHES:
        if not why[arch.name]:
            return arch
    own = FAMILY_ARCH.get(family)
    if own in DIFFERENT_GRAPH:
        raise CosmoeError(f"{bundle.root}: {family}: llama.cpp runs it as {own!r}, {DIFFERENT_GRAPH[own]}; lower it "
                          "to executorch or onnx")
    if own in NOT_WRITTEN.values():
        written = frozenset().union(*(arch.hparams for arch in ARCHES))
        features = [f for f in _features(cfg) if f not in written] or min(why.values(), key=len)
        raise CosmoeError(f"{bundle.root}: {family}: llama.cpp runs it as {own!r}, which lower --target gguf does "
                          f"not write yet (it has {', '.join(features)}); lower it to executorch or onnx")
    if own is not None:
        raise CosmoeError(f"{bundle.root}: {family}: llama.cpp runs it as {own!r}, whose graph does not compute "
                          f"it (it has {', '.join(why[own])}); lower it to executorch or onnx")
    closest = min(ARCHES, key=lambda a: len(why[a.name]))
    raise CosmoeError(f"{bundle.root}: {family} matches no llama.cpp architecture GGUF can describe (closest: "
                      f"{closest.name}, which cannot take {', '.join(why[closest.name])}); lower it to "
                      "executorch or onnx")


def differences(cfg: CosmoeConfig) -> list[str]:
    """What llama.cpp computes otherwise than the bundle in a graph that is otherwise its own, said in
    the manifest and by ``inspect`` (verify measures how much it matters)."""
    rope = cfg.rope_scaling or {}
    if rope.get("rope_type") == "yarn" and rope.get("truncate", True) is False:
        return ["YaRN: llama.cpp rounds the correction range to whole dims (transformers' truncate true) where "
                "this model's config has truncate false, so the RoPE frequencies of the dims in that range differ"]
    return []


# ---------------------------------------------------------------------------------------- tensors
@dataclass
class Encoded:
    data: np.ndarray  # uint8 [..., N, row bytes] (raw_dtype set) or float32 [..., N, K]
    type: Q
    fallback: str | None = None  # why the bundle's form was not kept


def _fp16_scales(scales: torch.Tensor) -> np.ndarray | None:
    """fp32 scales as fp16, or None when one is not exact in it (outside fp16's normal range)."""
    half = scales.half()
    if not torch.equal(half.float(), scales):
        return None
    return half.numpy()


def _blocks(w: units.QuantWeight) -> tuple[np.ndarray, np.ndarray] | None:
    """A quantized weight as ggml blocks: codes int8 [N, K/32, 32] and fp16 d [N, K/32]; None when it has
    no such form (K or G not a multiple of 32, a scale not exact in fp16)."""
    n, k = w.codes.shape
    g = w.encoding.group_size
    if k % BLOCK or g % BLOCK:
        return None
    d = _fp16_scales(w.scales.repeat_interleave(g // BLOCK, dim=1)[:, :k // BLOCK])  # [N, K/32]
    if d is None:
        return None
    return w.codes.reshape(n, k // BLOCK, BLOCK).numpy(), d


def _q4_0(codes: np.ndarray, d: np.ndarray) -> np.ndarray:
    """ggml's block_q4_0 rows: uint8 [N, K/32 * 18] (d, then q[j] | q[j + 16] << 4)."""
    q = (codes + 8).astype(np.uint8)  # [N, B, 32]
    qs = q[..., :16] | (q[..., 16:] << 4)  # [N, B, 16]
    blocks = np.concatenate([d[..., None].view(np.uint8), qs], axis=-1)  # [N, B, 18]
    return blocks.reshape(codes.shape[0], -1)


def _q8_0(codes: np.ndarray, d: np.ndarray) -> np.ndarray:
    """ggml's block_q8_0 rows: uint8 [N, K/32 * 34] (d, then the 32 codes)."""
    blocks = np.concatenate([d[..., None].view(np.uint8), codes.view(np.uint8)], axis=-1)  # [N, B, 34]
    return blocks.reshape(codes.shape[0], -1)


BLOCK_TYPES: dict[int, tuple[Q, Callable[[np.ndarray, np.ndarray], np.ndarray]]] = {4: (Q.Q4_0, _q4_0),
                                                                                      8: (Q.Q8_0, _q8_0)}


def _float(values: torch.Tensor, t: Q) -> np.ndarray | None:
    """fp32 values as GGUF float type ``t`` (F16 and BF16 as their bytes), None when one is not exact in it."""
    if t == Q.F32:
        return values.contiguous().numpy()
    cast = values.to(torch.float16 if t == Q.F16 else torch.bfloat16)
    if not torch.equal(cast.float(), values):
        return None
    return cast.contiguous().view(torch.int16).numpy().view(np.uint8)  # [..., 2K]


def encode(weights: list[units.Weight], float_type: Q, *, experts: bool) -> Encoded:
    """Weights of one GGUF tensor in one type: a backbone tensor [N, K] (``[w]``), or a layer's experts
    [N, K] each -> [E, N, K] (ggml's [K, N, E], innermost first)."""
    stack = np.stack if experts else (lambda rows: rows[0])
    quant = [w for w in weights if isinstance(w, units.QuantWeight)]
    if len(quant) == len(weights):
        bits = max(w.encoding.bits for w in quant)  # the layer's highest precision
        qtype, pack = BLOCK_TYPES[bits]
        blocks = [_blocks(w) for w in quant]
        if all(b is not None for b in blocks):
            rows = [pack(*b) for b in blocks]
            mixed = len({w.encoding.bits for w in quant}) > 1
            return Encoded(stack(rows), qtype, "mixed precision: the layer's highest, int4 codes in Q8_0 blocks"
                           if mixed else None)
        k, g = quant[0].codes.shape[1], quant[0].encoding.group_size
        reason = (f"row length {k} is not a multiple of {BLOCK}" if k % BLOCK else
                  f"group size {g} is not a multiple of {BLOCK}" if g % BLOCK else "a scale outside fp16's range")
        data, t = _floats([w.dequantize() for w in quant], FALLBACK_FLOATS, stack)
        return Encoded(data, t, f"{reason}: {t.name}, every value exact")
    values = [w.dequantize() if isinstance(w, units.QuantWeight) else w for w in weights]
    if quant:  # a layer with float and quantized experts: the float dtype if it holds every value
        data, t = _floats(values, (float_type, Q.F32), stack)
        return Encoded(data, t, f"mixed precision: the layer's highest, {t.name}")
    types = (Q.F32,) if values[0].dim() == 1 else (float_type, Q.F32)  # llama.cpp's norms and biases are F32
    data, t = _floats(values, types, stack)
    return Encoded(data, t)


def _floats(values: list[torch.Tensor], types: tuple[Q, ...],
            stack: Callable[[list[np.ndarray]], np.ndarray]) -> tuple[np.ndarray, Q]:
    """fp32 tensors in the first of ``types`` that holds every value exactly (F32 always does)."""
    for t in types:
        arrays = [_float(v, t) for v in values]
        if all(a is not None for a in arrays):
            return stack(arrays), t
    return stack([v.numpy() for v in values]), Q.F32


def _rope_rows(w: units.Weight, cfg: CosmoeConfig, interleaved: bool) -> units.Weight:
    """q or k rows (weights, biases, norms: blocks of one head each) from our canonical order to the one
    llama.cpp rotates. Ours pairs dims (i, i + Dh/2), the rotated ones first in each half
    (importers.adapters.rope_permutation); llama.cpp rotates the first n_rot dims, as halves (NEOX) or
    as interleaved pairs (NORM: convert_hf_to_gguf.py LlamaModel.permute). Row j of each head is our
    row inverse[j] of the permutation that made ours from that order."""
    perm = rope_permutation(cfg.head_size, cfg.rope_dims, interleaved)
    if perm is None:
        return w
    inverse = torch.argsort(torch.tensor(perm))

    def permute(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(-1, cfg.head_size, *t.shape[1:])[:, inverse].reshape(t.shape)
    if isinstance(w, units.QuantWeight):
        return units.QuantWeight(permute(w.codes), permute(w.scales), w.encoding)
    return permute(w)


def _mla_rope_rows(w: units.Weight, cfg: CosmoeConfig, kv_a: bool) -> units.Weight:
    """Latent attention's RoPE rows from our half-split order to llama.cpp's interleaved pairs: the last
    qk_rope_head_dim rows of each query head (q or q_b), or of kv_a (the shared RoPE key after the latent)."""
    r = cfg.qk_rope_head_dim
    block = cfg.kv_lora_rank + r if kv_a else cfg.head_size
    inverse = torch.argsort(torch.tensor(rope_permutation(r, r, True)))
    order = torch.cat([torch.arange(block - r), block - r + inverse])

    def permute(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(-1, block, *t.shape[1:])[:, order].reshape(t.shape)
    if isinstance(w, units.QuantWeight):
        return units.QuantWeight(permute(w.codes), permute(w.scales), w.encoding)
    return permute(w)


def _as_float(w: units.Weight) -> torch.Tensor:
    return w.dequantize() if isinstance(w, units.QuantWeight) else w


def _rows(w: units.Weight, order: torch.Tensor) -> units.Weight:
    if isinstance(w, units.QuantWeight):
        return units.QuantWeight(w.codes[order], w.scales[order], w.encoding)
    return w[order]


def _merge_gate(q: units.Weight, gate: units.Weight, cfg: CosmoeConfig) -> units.Weight:
    """Qwen3.5's q [H * Dh, ...] and output gate [H * Dh, ...] as its q_proj holds them and llama.cpp's
    qwen35moe reads them: each head's query rows, then its gate rows."""
    if isinstance(q, units.QuantWeight) != isinstance(gate, units.QuantWeight):
        q, gate = _as_float(q), _as_float(gate)

    def merge(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        heads = cfg.num_attention_heads
        both = torch.stack([a.reshape(heads, cfg.head_size, *a.shape[1:]),
                            b.reshape(heads, cfg.head_size, *b.shape[1:])], 1)
        return both.reshape(2 * a.shape[0], *a.shape[1:])
    if isinstance(q, units.QuantWeight):
        return units.QuantWeight(merge(q.codes, gate.codes), merge(q.scales, gate.scales), q.encoding)
    return merge(q, gate)


def _deltanet(name: str, w: units.Weight, cfg: CosmoeConfig) -> tuple[units.Weight, str | None]:
    """A Gated DeltaNet tensor as llama.cpp's converter writes it (conversion/qwen.py): A as -exp(A_log),
    the conv kernel [C, K], and the value heads from grouped by key head (v0 v1 of k0, then of k1) to
    tiled (v0 of k0, v0 of k1, ...), which ggml's broadcast reads; returns the tensor and, where the
    bundle's integers could not stay its blocks, why."""
    nk, nv, dk, dv = (cfg.linear_num_key_heads, cfg.linear_num_value_heads, cfg.linear_key_head_dim,
                      cfg.linear_value_head_dim)

    def tiled(head_dim: int) -> torch.Tensor:  # new row -> old row over nv * head_dim rows
        return torch.arange(nv * head_dim).reshape(nk, nv // nk, head_dim).transpose(0, 1).reshape(-1)
    qk = torch.arange(2 * nk * dk)
    if name == "A_log":
        return -torch.exp(_as_float(w))[tiled(1)], None
    if name == "dt_bias":
        return _as_float(w)[tiled(1)], None
    if name in ("in_proj_b.weight", "in_proj_a.weight"):
        return _rows(w, tiled(1)), None
    if name == "in_proj_z.weight":
        return _rows(w, tiled(dv)), None
    if name == "in_proj_qkv.weight":
        return _rows(w, torch.cat([qk, 2 * nk * dk + tiled(dv)])), None
    if name == "conv.weight":
        c = _as_float(w)
        return c.reshape(c.shape[0], -1)[torch.cat([qk, 2 * nk * dk + tiled(dv)])], None
    if name == "out_proj.weight":  # its columns move: a quantized row's groups would mix
        why = ("its value-head columns reordered for llama.cpp: every value exact"
               if isinstance(w, units.QuantWeight) else None)
        return _as_float(w)[:, tiled(dv)].contiguous(), why
    return w, None  # norm.weight: one value head's width, shared


def _add_kv_b(add: Callable[[str, Encoded], None], w: units.Weight, cfg: CosmoeConfig, layer: int,
              float_type: Q) -> None:
    """kv_b [H * (nope + v), latent] as llama.cpp's absorbed MLA takes it (its converter's split):
    attn_v_b [H, v, latent], each head's value rows as they are, and attn_k_b [H, latent, nope], each
    head's key rows transposed, so a quantized kv_b's rows cannot stay its blocks there: floats, exact."""
    heads, nope, v = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.v_head_dim
    rows = [torch.arange(h * (nope + v), (h + 1) * (nope + v)) for h in range(heads)]
    if isinstance(w, units.QuantWeight):
        values = w.dequantize()
        v_b = [units.QuantWeight(w.codes[r[nope:]], w.scales[r[nope:]], w.encoding) for r in rows]
    else:
        values = w
        v_b = [w[r[nope:]] for r in rows]
    add(_gguf_name(T.ATTN_V_B, "weight", layer), encode(v_b, float_type, experts=True))
    k_b = encode([values[r[:nope]].T.contiguous() for r in rows], float_type, experts=True)
    if isinstance(w, units.QuantWeight):
        k_b.fallback = f"kv_b's key rows transposed for llama.cpp's MLA: {k_b.type.name}, every value exact"
    add(_gguf_name(T.ATTN_K_B, "weight", layer), k_b)


# ---------------------------------------------------------------------------------------- names
T = gguf.MODEL_TENSOR
# Our canonical backbone names (cosmoe_export/importers/tensor_names.py) -> llama.cpp's tensors.
BACKBONE_TENSORS = {
    "embed.weight": (T.TOKEN_EMBD, "weight"),
    "norm.weight": (T.OUTPUT_NORM, "weight"),
    "lm_head.weight": (T.OUTPUT, "weight"),
    "layers.{l}.attn_norm.weight": (T.ATTN_NORM, "weight"),
    **{f"layers.{{l}}.attn.{p}.{kind}": (tensor, kind) for p, tensor in
       (("q", T.ATTN_Q), ("k", T.ATTN_K), ("v", T.ATTN_V), ("o", T.ATTN_OUT)) for kind in ("weight", "bias")},
    "layers.{l}.attn.q_a.weight": (T.ATTN_Q_A, "weight"),  # latent attention (DeepSeek)
    "layers.{l}.attn.q_a_norm.weight": (T.ATTN_Q_A_NORM, "weight"),
    "layers.{l}.attn.q_b.weight": (T.ATTN_Q_B, "weight"),
    "layers.{l}.attn.kv_a.weight": (T.ATTN_KV_A_MQA, "weight"),
    "layers.{l}.attn.kv_a_norm.weight": (T.ATTN_KV_A_NORM, "weight"),
    "layers.{l}.attn.kv_b.weight": (T.ATTN_KV_B, "weight"),  # written as attn_k_b and attn_v_b (_add_kv_b)
    "layers.{l}.conv.in_proj.weight": (T.SHORTCONV_INPROJ, "weight"),  # LFM2's short convolution
    "layers.{l}.conv.weight": (T.SHORTCONV_CONV, "weight"),  # [D, 1, L] here, {L, D} there
    "layers.{l}.conv.out_proj.weight": (T.SHORTCONV_OUTPROJ, "weight"),
    "layers.{l}.attn.gate.weight": (T.ATTN_Q, "gate"),  # Qwen3.5's output gate: in q's rows there (_merge_gate)
    "layers.{l}.attn.gate.bias": (T.ATTN_Q, "gate"),
    "layers.{l}.linear.in_proj_qkv.weight": (T.ATTN_QKV, "weight"),  # Gated DeltaNet (_deltanet)
    "layers.{l}.linear.in_proj_z.weight": (T.ATTN_GATE, "weight"),
    "layers.{l}.linear.in_proj_b.weight": (T.SSM_BETA, "weight"),
    "layers.{l}.linear.in_proj_a.weight": (T.SSM_ALPHA, "weight"),
    "layers.{l}.linear.A_log": (T.SSM_A, ""),
    "layers.{l}.linear.dt_bias": (T.SSM_DT, "bias"),
    "layers.{l}.linear.conv.weight": (T.SSM_CONV1D, "weight"),
    "layers.{l}.linear.norm.weight": (T.SSM_NORM, "weight"),
    "layers.{l}.linear.out_proj.weight": (T.SSM_OUT, "weight"),
    "layers.{l}.attn.q_norm.weight": (T.ATTN_Q_NORM, "weight"),
    "layers.{l}.attn.k_norm.weight": (T.ATTN_K_NORM, "weight"),
    "layers.{l}.ffn_norm.weight": (T.FFN_NORM, "weight"),
    "layers.{l}.mlp.gate.weight": (T.FFN_GATE, "weight"),  # a dense layer's MLP
    "layers.{l}.mlp.up.weight": (T.FFN_UP, "weight"),
    "layers.{l}.mlp.down.weight": (T.FFN_DOWN, "weight"),
    "layers.{l}.attn.sinks": (T.ATTN_SINKS, "weight"),
    "layers.{l}.moe.router.weight": (T.FFN_GATE_INP, "weight"),
    "layers.{l}.moe.router.bias": (T.FFN_GATE_INP, "bias"),
    "layers.{l}.moe.score_bias": (T.FFN_EXP_PROBS_B, "bias"),
    "layers.{l}.moe.shared.gate.weight": (T.FFN_GATE_SHEXP, "weight"),
    "layers.{l}.moe.shared.up.weight": (T.FFN_UP_SHEXP, "weight"),
    "layers.{l}.moe.shared.down.weight": (T.FFN_DOWN_SHEXP, "weight"),
    "layers.{l}.moe.shared_gate.weight": (T.FFN_GATE_INP_SHEXP, "weight"),
}
EXPERT_TENSORS = {f"{p}.{kind}": (tensor, kind)
                  for p, tensor in (("gate", T.FFN_GATE_EXP), ("up", T.FFN_UP_EXP), ("down", T.FFN_DOWN_EXP))
                  for kind in ("weight", "bias")}


def _gguf_name(tensor: T, kind: str, layer: int | None = None) -> str:
    return gguf.TENSOR_NAMES[tensor].format(bid=layer) + (f".{kind}" if kind else "")


def _template(name: str) -> tuple[str, int | None]:
    parts = name.split(".")
    if parts[0] == "layers":
        return ".".join(["layers", "{l}", *parts[2:]]), int(parts[1])
    return name, None


# ---------------------------------------------------------------------------------------- the file
def lower(bundle: Bundle, out_dir: Path) -> list[dict[str, Any]]:
    """Write ``out_dir``/model.gguf for ``bundle``; returns its manifest entry (a list of one)."""
    arch = architecture(bundle)
    cfg = bundle.config
    rel = fmt.program_path("gguf", "model")
    path = out_dir / rel.split("/", 1)[1]
    path.parent.mkdir(parents=True, exist_ok=True)
    float_type = FLOAT_TYPES[bundle.backbone.dtype]
    writer = gguf.GGUFWriter(path, arch.name, use_temp_file=True)
    tokenizer = _metadata(writer, bundle, arch)
    types: dict[str, int] = {}
    fallbacks: list[dict[str, str]] = []

    def add(name: str, enc: Encoded) -> None:
        raw = enc.type if enc.data.dtype == np.uint8 else None
        writer.add_tensor(name, enc.data, raw_dtype=raw)
        types[enc.type.name] = types.get(enc.type.name, 0) + 1
        if enc.fallback is not None:
            fallbacks.append({"tensor": name, "type": enc.type.name, "why": enc.fallback})

    backbone = units.backbone_weights(bundle)
    for name, w in backbone.items():
        template, layer = _template(name)
        if template not in BACKBONE_TENSORS:
            raise CosmoeError(f"{bundle.root}: tensor {name} has no llama.cpp counterpart in {arch.name}")
        tensor, kind = BACKBONE_TENSORS[template]
        tensor = dict(arch.renames).get(tensor, tensor)
        if cfg.latent_attention and tensor in (T.ATTN_Q, T.ATTN_Q_B, T.ATTN_KV_A_MQA):
            w = _mla_rope_rows(w, cfg, tensor == T.ATTN_KV_A_MQA)
        elif tensor in (T.ATTN_Q, T.ATTN_K, T.ATTN_Q_NORM, T.ATTN_K_NORM):
            w = _rope_rows(w, cfg, arch.interleaved_rope)
        if tensor == T.ATTN_KV_B:
            _add_kv_b(add, w, cfg, layer, float_type)
            continue
        if kind == "gate":  # written inside q's rows
            continue
        if tensor == T.ATTN_Q and cfg.attention_output_gate:
            w = _merge_gate(w, backbone[name.replace(".q.", ".gate.")], cfg)
        fallback = None
        if template.startswith("layers.{l}.linear."):
            w, fallback = _deltanet(template.rsplit(".linear.", 1)[1], w, cfg)
        if tensor == T.FFN_GATE_INP_SHEXP and isinstance(w, torch.Tensor):  # [1, D] in HF, {n_embd} here
            w = w.reshape(-1)
        if tensor == T.SHORTCONV_CONV:
            w = w.reshape(w.shape[0], -1)
        enc = encode([w], float_type, experts=False)
        enc.fallback = enc.fallback or fallback
        add(_gguf_name(tensor, kind, layer), enc)
        if layer is not None and template == "layers.{l}.moe.router.weight":
            _add_experts(add, bundle, layer, float_type)
    if (cfg.rope_scaling or {}).get("rope_type") == "llama3":
        base = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_size, 2).float() / cfg.head_size))
        # ggml divides each pair's angle by its factor: default frequency / scaled frequency.
        writer.add_tensor(_gguf_name(T.ROPE_FREQS, "weight"), (base / rt_model.rope_inv_freq(cfg)).numpy())
        types["F32"] = types.get("F32", 0) + 1
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    data = path.read_bytes()
    precision = "+".join(sorted(types, key=lambda t: (t[0] != "Q", t)))
    return [{"path": rel, "role": "program", "target": "gguf", "unit": "model", "precision": precision,
             "max_tokens": cfg.max_position_embeddings, "bytes": len(data),
             "sha256": hashlib.sha256(data).hexdigest(),
             "gguf": {"architecture": arch.name, "tokenizer": tokenizer, "tensor_types": dict(sorted(types.items())),
                      "fallbacks": fallbacks, **({"differences": diff} if (diff := differences(cfg)) else {})}}]


def _add_experts(add: Callable[[str, Encoded], None], bundle: Bundle, layer: int, float_type: Q) -> None:
    """Layer ``layer``'s routed experts stacked as llama.cpp's *_exps tensors: [E, N, K] each."""
    experts = [units.expert_weights(bundle, layer, e) for e in range(bundle.config.num_experts)]
    for name, (tensor, kind) in EXPERT_TENSORS.items():
        if name in experts[0]:
            add(_gguf_name(tensor, kind, layer), encode([x[name] for x in experts], float_type, experts=True))


def _metadata(w: gguf.GGUFWriter, bundle: Bundle, arch: Arch) -> str:
    """The architecture's keys and the tokenizer's; returns the tokenizer written (_tokenizer)."""
    cfg = bundle.config
    source = bundle.manifest["provenance"]["source"]  # not the directory's name: the same bundle, the same bytes
    w.add_name(str(source.get("name") or source.get("architecture", "CosmoeForCausalLM")))
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.dense_intermediate_size if _dense_lead(cfg) else cfg.intermediate_size)
    w.add_expert_feed_forward_length(cfg.intermediate_size)
    if cfg.shared_expert_intermediate_size:
        w.add_expert_shared_feed_forward_length(cfg.shared_expert_intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    if not cfg.latent_attention:  # MLA's are the architecture's keys (_deepseek_keys)
        w.add_head_count_kv(_head_count_kv(cfg))
        w.add_key_length(cfg.head_size)
        w.add_value_length(cfg.head_size)
    w.add_rope_dimension_count(cfg.rope_dims)
    w.add_rope_freq_base(cfg.rope_theta)
    _rope_keys(w, cfg)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_expert_count(cfg.num_experts)
    w.add_expert_used_count(cfg.num_experts_per_tok)
    w.add_vocab_size(cfg.vocab_size)
    if arch.keys is not None:
        arch.keys(w, cfg)
    return _tokenizer(w, bundle)


def _rope_keys(w: gguf.GGUFWriter, cfg: CosmoeConfig) -> None:
    """YaRN as llama.cpp's converter writes it (conversion/base.py); Llama 3.1's is the rope_freqs tensor."""
    rope = cfg.rope_scaling or {}
    if rope.get("rope_type") != "yarn":
        return
    w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
    w.add_rope_scaling_factor(rope["factor"])
    w.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
    for key, add in (("attention_factor", w.add_rope_scaling_yarn_attn_factor),
                     ("beta_fast", w.add_rope_scaling_yarn_beta_fast),
                     ("beta_slow", w.add_rope_scaling_yarn_beta_slow)):
        if rope.get(key) is not None:
            add(rope[key])


# ---------------------------------------------------------------------------------------- tokenizer
# A Split pre-tokenizer's regex (tokenizer.json) -> llama.cpp's name for it (src/llama-vocab.cpp).
SPLIT_PRE = {
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|"
    "\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+": "llama-bpe",
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|"
    "\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+": "qwen2",
}


def _tokenizer(w: gguf.GGUFWriter, bundle: Bundle) -> str:
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
