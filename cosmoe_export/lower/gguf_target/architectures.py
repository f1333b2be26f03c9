"""The llama.cpp architectures GGUF output writes (ARCHES), each with the config fields its graph takes,
the keys it writes and its names for our tensors; and which one a bundle is, or why none is."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import gguf

from cosmoe_export.errors import CosmoeError
from runtime_py.bundle import Bundle
from runtime_py.config import CosmoeConfig


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


# The router (runtime_py.config ROUTERS) -> llama.cpp's expert_gating_func.
GATING = {"softmax": gguf.ExpertGatingFuncType.SOFTMAX, "sigmoid": gguf.ExpertGatingFuncType.SIGMOID}


def _mixers(cfg: CosmoeConfig) -> set[str]:
    return {cfg.mixer(layer) for layer in range(cfg.num_hidden_layers)}


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
    w.add_leading_dense_block_count(dense_lead(cfg))


def _groups_check(cfg: CosmoeConfig) -> list[str]:
    # build_moe_ffn scores a group by the sum of its best two experts (DeepSeek-V3's, GLM's).
    return [f"expert groups scored by {cfg.group_score!r}"] if cfg.n_group > 1 and cfg.group_score != "top2_sum" else []


def _moe_keys(w: gguf.GGUFWriter, cfg: CosmoeConfig) -> None:
    """The routing keys of llama.cpp's DeepSeek-style graphs: dense layers first, shared experts by count,
    renormalisation, scaling, the gating function, groups."""
    w.add_leading_dense_block_count(dense_lead(cfg))
    w.add_expert_shared_count(cfg.shared_expert_intermediate_size // cfg.intermediate_size)
    w.add_expert_weights_norm(cfg.norm_topk_prob)
    w.add_expert_weights_scale(cfg.routed_scaling_factor)
    w.add_expert_gating_func(GATING[cfg.router])
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
    if not cfg.latent_attention or _mixers(cfg) != {"mla"}:
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
    (head_count_kv per layer, head_count_kv); the router renormalises, always, and never scales."""
    w.add_shortconv_l_cache(cfg.conv_kernel)
    w.add_leading_dense_block_count(dense_lead(cfg))
    w.add_expert_gating_func(GATING[cfg.router])


def _lfm2_check(cfg: CosmoeConfig) -> list[str]:
    mixers = _mixers(cfg)
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
    mixers = _mixers(cfg)
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
    mixers = _mixers(cfg)
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


def dense_lead(cfg: CosmoeConfig) -> int:
    """How many layers lead with a dense MLP before the first MoE one."""
    plan = cfg.layer_ffns or ()
    return next((i for i, kind in enumerate(plan) if kind != "dense"), len(plan))


def head_count_kv(cfg: CosmoeConfig) -> int | list[int]:
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
        lead = dense_lead(cfg)
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
