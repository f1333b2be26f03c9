"""Architecture adapters, registered by Hugging Face architecture name.

An adapter maps a source config to the canonical ``CosmoeConfig``; tensor names go through the
one table in ``tensor_names``. Adding a family = one small class with ``@register``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cosmoe_export.errors import CheckpointError, UnsupportedArchitecture
from runtime_py.config import ARCHITECTURE, CosmoeConfig

ADAPTERS: dict[str, type[Adapter]] = {}
# Architectures refused by name, and why: what the bundle format cannot express.
REFUSED: dict[str, str] = {
    "JetMoeForCausalLM": "its attention is a mixture of experts too (JetMoE's MoA: every token's query and output "
                         "projections are routed to top-k of num_local_experts attention experts); a bundle's experts "
                         "are FFNs only, and its attention lives in the always-resident layer program",
}


def register(name: str) -> Callable[[type[Adapter]], type[Adapter]]:
    def wrap(cls: type[Adapter]) -> type[Adapter]:
        ADAPTERS[name] = cls
        cls.architecture = name
        return cls
    return wrap


def supported_architectures() -> list[str]:
    return sorted(ADAPTERS)


def adapter_for(raw_config: dict[str, Any], where: str) -> Adapter:
    archs = raw_config.get("architectures") or []
    if not isinstance(archs, list) or len(archs) != 1 or not isinstance(archs[0], str):
        raise UnsupportedArchitecture(f"{where}: 'architectures' must list exactly one architecture, got {archs!r}; "
                                      f"supported: {', '.join(supported_architectures())}")
    cls = ADAPTERS.get(archs[0])
    if archs[0] in REFUSED:
        raise UnsupportedArchitecture(f"{where}: architecture {archs[0]!r} is not supported: {REFUSED[archs[0]]}")
    if cls is None:
        raise UnsupportedArchitecture(f"{where}: architecture {archs[0]!r} is not supported; "
                                      f"supported: {', '.join(supported_architectures())}")
    return cls()


class Adapter:
    architecture = ""
    uses_transformers = True  # the reference for verify is transformers' own model
    # RoPE rotates interleaved pairs (2i, 2i+1) (ERNIE) rather than halves (i, i + Dh/2).
    interleaved_rope = False
    # Fused experts stored transposed with gate and up interleaved, biases beside them, optionally
    # as MXFP4 blocks (gpt-oss: sources._gpt_oss_expert).
    gpt_oss_experts = False

    def head_permutation(self, config: CosmoeConfig) -> list[int] | None:
        """The order of each q/k head's dims that puts the family's RoPE pairs in the bundle's
        half-split layout (docs/FAMILIES.md), or None when they already are. Attention scores are
        dot products of q and k over a head, so permuting both alike changes no output."""
        return rope_permutation(config.head_size, config.rope_dims, self.interleaved_rope)

    def row_permutations(self, config: CosmoeConfig) -> list[RowPermutation]:
        """Which canonical tensors' rows to reorder at import, in blocks (heads) of one permutation:
        q and k (weights, biases, per-head norms) by head_permutation."""
        perm = self.head_permutation(config)
        if perm is None:
            return []
        heads = {"q": config.num_attention_heads, "k": config.num_key_value_heads}
        return [RowPermutation(rf"layers\.\d+\.attn\.{p}{norm}\.(weight|bias)", 1 if norm else heads[p], perm)
                for p in "qk" for norm in ("", "_norm")]

    def ignores(self, key: str, config: CosmoeConfig) -> bool:
        """Source tensors the family's transformers class does not load either."""
        return False

    def zero_centered_norms(self, config: CosmoeConfig) -> list[str]:
        """Canonical norm weights the family stores as w for a scale of 1 + w (importers add 1)."""
        return []

    def config(self, raw: dict[str, Any], path: Path) -> CosmoeConfig:
        hf = self._hf_config(path)
        fields = {**_common(hf, path), **self.family_fields(hf, path)}
        return CosmoeConfig.from_dict(fields, source=str(path / "config.json"))

    def family_fields(self, hf: Any, path: Path) -> dict[str, Any]:
        raise NotImplementedError

    @staticmethod
    def _hf_config(path: Path) -> Any:
        # transformers resolves family defaults and legacy spellings (rope_scaling -> rope_parameters).
        from transformers import AutoConfig
        try:
            return AutoConfig.from_pretrained(str(path), local_files_only=True)
        except Exception as e:  # transformers raises many types for a bad config
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise CheckpointError(f"{path / 'config.json'}: transformers cannot read it ({first})") from None


@dataclass(frozen=True)
class RowPermutation:
    """Rows of every canonical tensor whose name matches ``pattern`` are ``blocks`` blocks (heads)
    of len(perm) rows each, reordered within each block: new row i = old row perm[i]."""
    pattern: str
    blocks: int
    perm: list[int]


def rope_permutation(head_size: int, rope_dims: int, interleaved: bool) -> list[int] | None:
    """New position -> old dim of one head, so that RoPE pair i is (i, i + head_size/2) with frequency
    i, as rotate_half computes it. The rotated dims come first in each half and the ones a partial
    RoPE passes through after them (their frequency is 0: runtime_py.model.rope_inv_freq)."""
    r = rope_dims
    rot = [*range(0, r, 2), *range(1, r, 2)] if interleaved else list(range(r))  # pairs (rot[i], rot[i + r/2])
    rest = list(range(r, head_size))
    perm = rot[:r // 2] + rest[:len(rest) // 2] + rot[r // 2:] + rest[len(rest) // 2:]
    return None if perm == list(range(head_size)) else perm


def _unsupported(path: Path, what: str) -> CheckpointError:
    return CheckpointError(f"{path / 'config.json'}: {what} is not supported (docs/FAMILIES.md lists what each "
                           "family may use)")


def _common(hf: Any, path: Path) -> dict[str, Any]:
    if getattr(hf, "hidden_act", "silu") != "silu":
        raise _unsupported(path, f"hidden_act {hf.hidden_act!r}")
    rope = dict(getattr(hf, "rope_parameters", None) or {})
    theta = rope.pop("rope_theta", getattr(hf, "rope_theta", 10000.0))
    kind = rope.get("rope_type", "default")
    if kind not in ("default", "llama3", "yarn"):
        raise _unsupported(path, f"rope_type {kind!r}")
    partial = rope.get("partial_rotary_factor", getattr(hf, "partial_rotary_factor", 1.0)) or 1.0
    scaling = None
    if kind == "llama3":
        scaling = {k: rope[k] for k in ("rope_type", "factor", "low_freq_factor", "high_freq_factor",
                                         "original_max_position_embeddings") if k in rope}
    if kind == "yarn":
        scaling = _yarn(rope, hf)
    n_heads = hf.num_attention_heads
    head = getattr(hf, "head_dim", None) or hf.hidden_size // n_heads
    rotary = None if partial == 1.0 else int(head * partial)  # as transformers' rope init computes it
    # LFM2 names its eps norm_eps.
    return dict(
        rotary_dim=rotary, vocab_size=hf.vocab_size, hidden_size=hf.hidden_size, num_hidden_layers=hf.num_hidden_layers,
        num_attention_heads=n_heads, num_key_value_heads=getattr(hf, "num_key_value_heads", None) or n_heads,
        head_dim=getattr(hf, "head_dim", None), num_experts_per_tok=getattr(hf, "num_experts_per_tok", None),
        rms_norm_eps=float(getattr(hf, "rms_norm_eps", None) or hf.norm_eps), rope_theta=float(theta),
        rope_scaling=scaling,
        max_position_embeddings=hf.max_position_embeddings, tie_word_embeddings=bool(hf.tie_word_embeddings),
        bos_token_id=hf.bos_token_id, eos_token_id=hf.eos_token_id,
    )


def _yarn(rope: dict[str, Any], hf: Any) -> dict[str, Any]:
    """The bundle's YaRN parameters, defaults and attention factor resolved as transformers'
    _compute_yarn_parameters does, so that no runtime derives them again."""
    old_ctx = rope["original_max_position_embeddings"]
    factor = rope.get("factor") or hf.max_position_embeddings / old_ctx

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention = rope.get("attention_factor")
    if attention is None:
        m, m_all = rope.get("mscale"), rope.get("mscale_all_dim")
        attention = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)
    return {"rope_type": "yarn", "factor": float(factor), "beta_fast": float(rope.get("beta_fast") or 32),
            "beta_slow": float(rope.get("beta_slow") or 1), "original_max_position_embeddings": old_ctx,
            "truncate": bool(rope.get("truncate", True)), "attention_factor": float(attention)}


def _check_every_layer_sparse(hf: Any, path: Path) -> None:
    if getattr(hf, "mlp_only_layers", None):
        raise _unsupported(path, f"mlp_only_layers {hf.mlp_only_layers}")
    if getattr(hf, "decoder_sparse_step", 1) != 1:
        raise _unsupported(path, f"decoder_sparse_step {hf.decoder_sparse_step}")
    _check_full_attention(hf, path)


def _check_full_attention(hf: Any, path: Path) -> None:
    if getattr(hf, "use_sliding_window", False):
        raise _unsupported(path, "use_sliding_window")


def _layer_plan(plan: list[str], hf: Any, path: Path, what: str) -> dict[str, Any]:
    """The config keys of a layer plan: none when every layer is MoE (a v1 bundle)."""
    if all(k == "moe" for k in plan):
        return {}
    if "moe" not in plan:
        raise _unsupported(path, f"{what} (no MoE layer left)")
    return dict(layer_ffns=plan, dense_intermediate_size=hf.intermediate_size)


def _sparse_step_plan(hf: Any, path: Path) -> dict[str, Any]:
    """The layer plan of Qwen2/3-MoE's ``mlp_only_layers`` and ``decoder_sparse_step``, exactly as
    transformers' modeling_qwen3_moe.py builds its layers: layer i is MoE iff
    ``i not in mlp_only_layers and num_experts > 0 and (i + 1) % decoder_sparse_step == 0``, else a
    dense MLP of width ``intermediate_size``. An all-MoE plan adds no keys (a v1 bundle)."""
    only = set(getattr(hf, "mlp_only_layers", None) or [])
    step = getattr(hf, "decoder_sparse_step", 1) or 1
    plan = ["moe" if i not in only and hf.num_experts > 0 and (i + 1) % step == 0 else "dense"
            for i in range(hf.num_hidden_layers)]
    return _layer_plan(plan, hf, path, f"mlp_only_layers {sorted(only)} with decoder_sparse_step {step}")


def _first_dense_plan(hf: Any, k: int, path: Path, what: str) -> dict[str, Any]:
    """The layer-plan keys of k dense first layers, then MoE ones (GLM, DeepSeek, LFM2)."""
    return _layer_plan(["dense" if i < k else "moe" for i in range(hf.num_hidden_layers)], hf, path, what)


def _layer_mixers(hf: Any, kinds: dict[str, str], path: Path) -> list[str]:
    """The token mixer of each layer from the family's ``layer_types`` (kinds: its names -> ours)."""
    types = list(hf.layer_types)
    unknown = sorted(set(types) - set(kinds))
    if unknown:
        raise _unsupported(path, f"layer_types {unknown}")
    return [kinds[t] for t in types]


def _check_no_window(hf: Any, path: Path) -> None:
    """A sliding window shorter than the context would change attention (Mixtral, Phi-MoE)."""
    window = getattr(hf, "sliding_window", None)
    if window is not None and window < hf.max_position_embeddings:
        raise _unsupported(path, f"sliding_window {window}")


@register("MixtralForCausalLM")
class Mixtral(Adapter):
    def family_fields(self, hf: Any, path: Path) -> dict[str, Any]:
        _check_no_window(hf, path)
        # Mixtral always renormalises its top-2 weights.
        return dict(num_experts=hf.num_local_experts, intermediate_size=hf.intermediate_size, norm_topk_prob=True)


@register("Qwen2MoeForCausalLM")
class Qwen2Moe(Adapter):
    def family_fields(self, hf: Any, path: Path) -> dict[str, Any]:
        _check_every_layer_sparse(hf, path)
        return dict(num_experts=hf.num_experts, intermediate_size=hf.moe_intermediate_size,
                    norm_topk_prob=bool(hf.norm_topk_prob),
                    shared_expert_intermediate_size=hf.shared_expert_intermediate_size,
                    attention_bias=bool(getattr(hf, "qkv_bias", True)))  # Qwen2: q/k/v biased, o not


@register("Qwen3MoeForCausalLM")
class Qwen3Moe(Adapter):
    def family_fields(self, hf: Any, path: Path) -> dict[str, Any]:
        _check_full_attention(hf, path)
        bias = bool(getattr(hf, "attention_bias", False))
        return dict(num_experts=hf.num_experts, intermediate_size=hf.moe_intermediate_size,
                    norm_topk_prob=bool(hf.norm_topk_prob), qk_norm="head",
                    attention_bias=bias, attention_out_bias=bias, **_sparse_step_plan(hf, path))


@register("OlmoeForCausalLM")
class Olmoe(Adapter):
    def family_fields(self, hf: Any, path: Path) -> dict[str, Any]:
        bias = bool(getattr(hf, "attention_bias", False))
        return dict(num_experts=hf.num_experts, intermediate_size=hf.intermediate_size,
                    norm_topk_prob=bool(hf.norm_topk_prob), qk_norm="full", clip_qkv=hf.clip_qkv,
                    attention_bias=bias, attention_out_bias=bias)


def _uniform(hf: Any, name: str, path: Path) -> int:
    """A per-layer list that must hold one value (HunYuan's num_experts, moe_topk)."""
    v = getattr(hf, name)
    if isinstance(v, list):
        if len(set(v)) != 1:
            raise _unsupported(path, f"{name} varying by layer ({v})")
        v = v[0]
    return int(v)


@register("GraniteMoeForCausalLM")
class GraniteMoe(Adapter):
    """Granite's multipliers; its router's softmax over the top-k logits is the renormalised top-k
    of the softmax over all (modeling_granitemoe.py GraniteMoeTopKRouter)."""

    def family_fields(self, hf: Any, path: Path) -> dict[str, Any]:
        bias = bool(getattr(hf, "attention_bias", False))
        return dict(num_experts=hf.num_local_experts, intermediate_size=hf.intermediate_size, norm_topk_prob=True,
                    attention_bias=bias, attention_out_bias=bias, **self.shared(hf),
                    embedding_multiplier=float(hf.embedding_multiplier),
                    residual_multiplier=float(hf.residual_multiplier),
                    attention_multiplier=float(hf.attention_multiplier), logits_scaling=float(hf.logits_scaling))

    def shared(self, hf: Any) -> dict[str, Any]:
        return {}


@register("GraniteMoeSharedForCausalLM")
class GraniteMoeShared(GraniteMoe):
    def shared(self, hf: Any) -> dict[str, Any]:
        # An ungated shared MLP beside the routed experts (0: none, as transformers builds it).
        return dict(shared_expert_intermediate_size=int(hf.shared_intermediate_size or 0), shared_expert_gate=False)


@register("HunYuanMoEV1ForCausalLM")
class HunYuanMoE(Adapter):
    """q/k RMSNorm per head after RoPE; a shared MLP as wide as an expert, ungated; softmax top-k
    renormalised (modeling_hunyuan_v1_moe.py HunYuanMoEV1Gate)."""

    def family_fields(self, hf: Any, path: Path) -> dict[str, Any]:
        bias = bool(getattr(hf, "attention_bias", False))
        return dict(num_experts=_uniform(hf, "num_experts", path), num_experts_per_tok=_uniform(hf, "moe_topk", path),
                    intermediate_size=hf.intermediate_size, norm_topk_prob=True, qk_norm="head_after_rope",
                    attention_bias=bias, attention_out_bias=bias,
                    shared_expert_intermediate_size=hf.intermediate_size, shared_expert_gate=False)


@register("Ernie4_5_MoeForCausalLM")
class Ernie45Moe(Adapter):
    """Interleaved RoPE (permuted to halves at import), dense layers outside moe_layer_start_index ..
    moe_layer_end_index every moe_layer_interval, ungated shared experts, and the softmax router's
    selection-only correction bias (modeling_ernie4_5_moe.py)."""

    interleaved_rope = True

    def family_fields(self, hf: Any, path: Path) -> dict[str, Any]:
        if getattr(hf, "use_bias", False):
            raise _unsupported(path, "use_bias (biases on every linear, experts included)")
        start, end, step = hf.moe_layer_start_index, hf.moe_layer_end_index, hf.moe_layer_interval
        plan = ["moe" if (i + 1) % step == 0 and start <= i <= end else "dense" for i in range(hf.num_hidden_layers)]
        shared = hf.moe_intermediate_size * (hf.moe_num_shared_experts or 0)
        return dict(num_experts=hf.moe_num_experts, num_experts_per_tok=hf.moe_k,
                    intermediate_size=hf.moe_intermediate_size, norm_topk_prob=True, score_bias=True,
                    shared_expert_intermediate_size=shared, shared_expert_gate=False,
                    **_layer_plan(plan, hf, path, f"moe_layer_start_index {start} .. end {end} every {step}"))


@register("Glm4MoeForCausalLM")
class Glm4Moe(Adapter):
    """Partial RoPE (permuted at import), optional q/k norm per head, dense first layers, ungated
    shared experts, the sigmoid router with a correction bias, group-limited top-k and a routed
    scaling factor (modeling_glm4_moe.py Glm4MoeTopkRouter)."""

    def family_fields(self, hf: Any, path: Path) -> dict[str, Any]:
        k = hf.first_k_dense_replace
        return dict(num_experts=hf.n_routed_experts, intermediate_size=hf.moe_intermediate_size,
                    norm_topk_prob=bool(hf.norm_topk_prob), qk_norm="head" if hf.use_qk_norm else "none",
                    attention_bias=bool(hf.attention_bias), router="sigmoid", score_bias=True,
                    n_group=hf.n_group, topk_group=hf.topk_group,
                    routed_scaling_factor=float(hf.routed_scaling_factor),
                    shared_expert_intermediate_size=hf.moe_intermediate_size * (hf.n_shared_experts or 0),
                    shared_expert_gate=False, **_first_dense_plan(hf, k, path, f"first_k_dense_replace {k}"))

    def ignores(self, key: str, config: CosmoeConfig) -> bool:
        return _ignores_mtp_layers(key, config)  # Glm4MoePreTrainedModel._keys_to_ignore_on_load_unexpected


@register("PhimoeForCausalLM")
class Phimoe(Adapter):
    """LayerNorm (weight and bias) for the decoder's norms, biases on q/k/v/o and optionally the
    head, and sparsemixer top-2 routing at inference (modeling_phimoe.py)."""

    def family_fields(self, hf: Any, path: Path) -> dict[str, Any]:
        _check_no_window(hf, path)
        bias = bool(getattr(hf, "attention_bias", False))
        return dict(num_experts=hf.num_local_experts, intermediate_size=hf.intermediate_size, router="sparsemixer",
                    sparsemixer_eps=float(hf.router_jitter_noise), norm="layer",
                    lm_head_bias=bool(getattr(hf, "lm_head_bias", False)), attention_bias=bias, attention_out_bias=bias)


@register("GptOssForCausalLM")
class GptOss(Adapter):
    """Sliding-window and full attention layers (layer_types), per-head attention sinks, biases on
    q/k/v/o, the router and the experts, the clamped SwiGLU, and the router's softmax over its top-k
    logits (the renormalised top-k of the softmax over all); experts fused, transposed, gate and up
    interleaved, or MXFP4 blocks (modeling_gpt_oss.py, integrations/mxfp4.py)."""

    gpt_oss_experts = True
    MIXERS = {"sliding_attention": "sliding", "full_attention": "full"}

    def family_fields(self, hf: Any, path: Path) -> dict[str, Any]:
        mixers = _layer_mixers(hf, self.MIXERS, path)
        bias = bool(hf.attention_bias)
        return dict(num_experts=hf.num_local_experts, intermediate_size=hf.intermediate_size, norm_topk_prob=True,
                    attention_bias=bias, attention_out_bias=bias, attention_sinks=True, router_bias=True,
                    expert_bias=True, expert_act="clamped_swiglu", swiglu_alpha=float(hf.swiglu_alpha),
                    swiglu_limit=float(hf.swiglu_limit), layer_mixers=mixers,
                    sliding_window=int(hf.sliding_window or 0) if "sliding" in mixers else 0)


@register("Lfm2MoeForCausalLM")
class Lfm2Moe(Adapter):
    """Gated short-convolution layers beside attention ones (layer_types "conv" / "full_attention"),
    q/k RMSNorm per head before RoPE, num_dense_layers dense first layers, and the sigmoid router
    with a selection-only expert bias, renormalised with +1e-6 (modeling_lfm2_moe.py)."""

    MIXERS = {"conv": "conv", "full_attention": "full"}

    def family_fields(self, hf: Any, path: Path) -> dict[str, Any]:
        k = hf.num_dense_layers
        return dict(num_experts=hf.num_experts, intermediate_size=hf.moe_intermediate_size, qk_norm="head",
                    norm_topk_prob=bool(hf.norm_topk_prob), router="sigmoid", score_bias=bool(hf.use_expert_bias),
                    topk_norm_eps=1e-6, routed_scaling_factor=float(hf.routed_scaling_factor),
                    layer_mixers=_layer_mixers(hf, self.MIXERS, path), conv_kernel=int(hf.conv_L_cache),
                    conv_bias=bool(hf.conv_bias), **_first_dense_plan(hf, k, path, f"num_dense_layers {k}"))


@register("Qwen3_5MoeForCausalLM")
class Qwen3_5Moe(Adapter):
    """Gated DeltaNet layers (layer_types "linear_attention") beside full-attention ones whose output
    is gated per head dim (q_proj holds each head's query and gate rows); partial RoPE (permuted at
    import); q/k RMSNorm per head; every RMSNorm but the DeltaNet's scales by 1 + w (stored w, made
    1 + w at import); a sigmoid-gated shared expert; softmax top-k renormalised
    (modeling_qwen3_5_moe.py)."""

    MIXERS = {"linear_attention": "linear", "full_attention": "full"}

    def family_fields(self, hf: Any, path: Path) -> dict[str, Any]:
        bias = bool(getattr(hf, "attention_bias", False))
        return dict(num_experts=hf.num_experts, intermediate_size=hf.moe_intermediate_size, norm_topk_prob=True,
                    shared_expert_intermediate_size=hf.shared_expert_intermediate_size, qk_norm="head",
                    attention_bias=bias, attention_out_bias=bias, attention_output_gate=True,
                    layer_mixers=_layer_mixers(hf, self.MIXERS, path), linear_num_key_heads=hf.linear_num_key_heads,
                    linear_num_value_heads=hf.linear_num_value_heads, linear_key_head_dim=hf.linear_key_head_dim,
                    linear_value_head_dim=hf.linear_value_head_dim, linear_conv_kernel=hf.linear_conv_kernel_dim)

    def zero_centered_norms(self, config: CosmoeConfig) -> list[str]:
        return [r"norm\.weight", r"layers\.\d+\.(attn_norm|ffn_norm|attn\.q_norm|attn\.k_norm)\.weight"]

    def ignores(self, key: str, config: CosmoeConfig) -> bool:
        return _ignores_mtp_layers(key, config)  # the multi-token-prediction head (mtp.*), if saved


def _ignores_mtp_layers(key: str, config: CosmoeConfig) -> bool:
    """The multi-token-prediction layers after the last decoder layer (GLM's num_mtp_layers,
    DeepSeek-V3's num_nextn_predict_layers), which transformers does not load either."""
    m = re.match(r"model\.layers\.(\d+)\.", key)
    return m is not None and int(m.group(1)) >= config.num_hidden_layers


@register("DeepseekV2ForCausalLM")
class DeepseekV2(Adapter):
    """Multi-head latent attention in every layer (kv_lora_rank latent + a shared RoPE key, q direct
    or through q_lora_rank; RoPE on interleaved pairs, permuted to halves at import), dense first
    layers (first_k_dense_replace), ungated shared experts, and the softmax router without
    renormalisation, greedy or group-limited by each group's best expert, times routed_scaling_factor
    (modeling_deepseek_v2.py DeepseekV2TopkRouter). YaRN's mscale_all_dim scales the softmax by
    mscale^2 (yarn_apply_mscale)."""

    interleaved_rope = True

    def family_fields(self, hf: Any, path: Path) -> dict[str, Any]:
        if getattr(hf, "mlp_bias", False):
            raise _unsupported(path, "mlp_bias")
        return {**self.latent(hf, path), **self.routing(hf, path)}

    def routing(self, hf: Any, path: Path) -> dict[str, Any]:
        method = hf.topk_method
        if method not in ("greedy", "group_limited_greedy"):
            raise _unsupported(path, f"topk_method {method!r}")
        groups = method == "group_limited_greedy"
        # The router never renormalises, whatever norm_topk_prob says (DeepseekV2TopkRouter.forward).
        return dict(norm_topk_prob=False, n_group=hf.n_group if groups else 1,
                    topk_group=hf.topk_group if groups else 1, group_score="max")

    def latent(self, hf: Any, path: Path) -> dict[str, Any]:
        k = hf.first_k_dense_replace
        qk = hf.qk_nope_head_dim + hf.qk_rope_head_dim
        rope = dict(getattr(hf, "rope_parameters", None) or {})
        scale = qk ** -0.5
        if rope.get("rope_type", "default") != "default" and rope.get("mscale_all_dim"):
            m = 0.1 * rope["mscale_all_dim"] * math.log(rope["factor"]) + 1.0 if rope["factor"] > 1 else 1.0
            scale = scale * m * m
        bias = bool(getattr(hf, "attention_bias", False))
        return dict(num_experts=hf.n_routed_experts, intermediate_size=hf.moe_intermediate_size,
                    num_key_value_heads=hf.num_attention_heads, head_dim=qk,
                    layer_mixers=["mla"] * hf.num_hidden_layers,
                    kv_lora_rank=hf.kv_lora_rank, q_lora_rank=hf.q_lora_rank, qk_rope_head_dim=hf.qk_rope_head_dim,
                    v_head_dim=hf.v_head_dim, attention_bias=bias, attention_out_bias=bias,
                    attention_multiplier=None if scale == qk ** -0.5 else scale,
                    routed_scaling_factor=float(hf.routed_scaling_factor),
                    shared_expert_intermediate_size=hf.moe_intermediate_size * (hf.n_shared_experts or 0),
                    shared_expert_gate=False, **_first_dense_plan(hf, k, path, f"first_k_dense_replace {k}"))

    def row_permutations(self, config: CosmoeConfig) -> list[RowPermutation]:
        """The RoPE rows only: each query head's last qk_rope_head_dim rows (q, or q_b), and the
        shared RoPE key after the latent in kv_a (weight and bias)."""
        perm = rope_permutation(config.qk_rope_head_dim, config.qk_rope_head_dim, self.interleaved_rope)
        if perm is None:
            return []
        nope, r = config.qk_nope_head_dim, config.kv_lora_rank
        return [RowPermutation(r"layers\.\d+\.attn\.(q|q_b)\.weight", config.num_attention_heads,
                               list(range(nope)) + [nope + i for i in perm]),
                RowPermutation(r"layers\.\d+\.attn\.kv_a\.(weight|bias)", 1, list(range(r)) + [r + i for i in perm])]

    def ignores(self, key: str, config: CosmoeConfig) -> bool:
        return _ignores_mtp_layers(key, config)


@register("DeepseekV3ForCausalLM")
class DeepseekV3(DeepseekV2):
    """DeepSeek-V2's latent attention and layer plan with V3's router: sigmoid scores, the
    e_score_correction_bias for the choice only, groups scored by their two best experts,
    renormalised when norm_topk_prob (modeling_deepseek_v3.py DeepseekV3TopkRouter). RoPE pairs are
    interleaved when rope_interleave, else already halves."""

    def family_fields(self, hf: Any, path: Path) -> dict[str, Any]:
        self.interleaved_rope = bool(getattr(hf, "rope_interleave", True))
        return super().family_fields(hf, path)

    def routing(self, hf: Any, path: Path) -> dict[str, Any]:
        return dict(router="sigmoid", score_bias=True, norm_topk_prob=bool(hf.norm_topk_prob), n_group=hf.n_group,
                    topk_group=hf.topk_group)


@register(ARCHITECTURE)
class Cosmoe(Adapter):
    """Our own checkpoints: config.json is a CosmoeConfig, tensor names are already canonical."""

    uses_transformers = False

    def config(self, raw: dict[str, Any], path: Path) -> CosmoeConfig:
        return CosmoeConfig.from_dict(raw, source=str(path / "config.json"))
