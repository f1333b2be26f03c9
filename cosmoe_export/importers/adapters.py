"""Architecture adapters, registered by Hugging Face architecture name.

An adapter maps a source config to the canonical ``CosmoeConfig``; tensor names go through the
one table in ``tensor_names``. Adding a family = one small class with ``@register``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from cosmoe_export.errors import CheckpointError, UnsupportedArchitecture
from runtime_py.config import ARCHITECTURE, CosmoeConfig

ADAPTERS: dict[str, type[Adapter]] = {}


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
    if cls is None:
        raise UnsupportedArchitecture(f"{where}: architecture {archs[0]!r} is not supported; "
                                      f"supported: {', '.join(supported_architectures())}")
    return cls()


class Adapter:
    architecture = ""
    uses_transformers = True  # the reference for verify is transformers' own model

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


def _unsupported(path: Path, what: str) -> CheckpointError:
    return CheckpointError(f"{path / 'config.json'}: {what} is not supported (CoSMoE needs full attention in "
                           "every layer, an MoE FFN in every layer but Qwen3-MoE's dense ones)")


def _common(hf: Any, path: Path) -> dict[str, Any]:
    if getattr(hf, "hidden_act", "silu") != "silu":
        raise _unsupported(path, f"hidden_act {hf.hidden_act!r}")
    rope = dict(getattr(hf, "rope_parameters", None) or {})
    theta = rope.pop("rope_theta", getattr(hf, "rope_theta", 10000.0))
    kind = rope.get("rope_type", "default")
    if kind not in ("default", "llama3"):
        raise _unsupported(path, f"rope_type {kind!r}")
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        raise _unsupported(path, "partial_rotary_factor != 1")
    scaling = None
    if kind == "llama3":
        scaling = {k: rope[k] for k in ("rope_type", "factor", "low_freq_factor", "high_freq_factor",
                                         "original_max_position_embeddings") if k in rope}
    n_heads = hf.num_attention_heads
    return dict(
        vocab_size=hf.vocab_size, hidden_size=hf.hidden_size, num_hidden_layers=hf.num_hidden_layers,
        num_attention_heads=n_heads, num_key_value_heads=getattr(hf, "num_key_value_heads", None) or n_heads,
        head_dim=getattr(hf, "head_dim", None), num_experts_per_tok=hf.num_experts_per_tok,
        rms_norm_eps=float(hf.rms_norm_eps), rope_theta=float(theta), rope_scaling=scaling,
        max_position_embeddings=hf.max_position_embeddings, tie_word_embeddings=bool(hf.tie_word_embeddings),
        bos_token_id=hf.bos_token_id, eos_token_id=hf.eos_token_id,
    )


def _check_every_layer_sparse(hf: Any, path: Path) -> None:
    if getattr(hf, "mlp_only_layers", None):
        raise _unsupported(path, f"mlp_only_layers {hf.mlp_only_layers}")
    if getattr(hf, "decoder_sparse_step", 1) != 1:
        raise _unsupported(path, f"decoder_sparse_step {hf.decoder_sparse_step}")
    _check_full_attention(hf, path)


def _check_full_attention(hf: Any, path: Path) -> None:
    if getattr(hf, "use_sliding_window", False):
        raise _unsupported(path, "use_sliding_window")


def _sparse_step_plan(hf: Any, path: Path) -> dict[str, Any]:
    """The layer plan of Qwen2/3-MoE's ``mlp_only_layers`` and ``decoder_sparse_step``, exactly as
    transformers' modeling_qwen3_moe.py builds its layers: layer i is MoE iff
    ``i not in mlp_only_layers and num_experts > 0 and (i + 1) % decoder_sparse_step == 0``, else a
    dense MLP of width ``intermediate_size``. An all-MoE plan adds no keys (a v1 bundle)."""
    only = set(getattr(hf, "mlp_only_layers", None) or [])
    step = getattr(hf, "decoder_sparse_step", 1) or 1
    plan = ["moe" if i not in only and hf.num_experts > 0 and (i + 1) % step == 0 else "dense"
            for i in range(hf.num_hidden_layers)]
    if all(k == "moe" for k in plan):
        return {}
    if "moe" not in plan:
        raise _unsupported(path, f"mlp_only_layers {sorted(only)} with decoder_sparse_step {step} (no MoE layer left)")
    return dict(layer_ffns=plan, dense_intermediate_size=hf.intermediate_size)


@register("MixtralForCausalLM")
class Mixtral(Adapter):
    def family_fields(self, hf: Any, path: Path) -> dict[str, Any]:
        window = getattr(hf, "sliding_window", None)
        if window is not None and window < hf.max_position_embeddings:
            raise _unsupported(path, f"sliding_window {window}")
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


@register(ARCHITECTURE)
class Cosmoe(Adapter):
    """Our own checkpoints: config.json is a CosmoeConfig, tensor names are already canonical."""

    uses_transformers = False

    def config(self, raw: dict[str, Any], path: Path) -> CosmoeConfig:
        return CosmoeConfig.from_dict(raw, source=str(path / "config.json"))
