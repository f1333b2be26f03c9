"""The canonical tensor-name table: every source spelling of each canonical tensor.

Keys are canonical templates (the names in our bundles); values are source templates, tried in
order, with the families that use them. ``{l}`` is the layer, ``{e}`` the expert.
"""

from __future__ import annotations

HF_LAYER = "model.layers.{l}"

TENSOR_NAMES: dict[str, list[str]] = {
    "embed.weight": ["model.embed_tokens.weight"],  # all HF families
    "norm.weight": ["model.norm.weight"],
    "lm_head.weight": ["lm_head.weight"],
    "layers.{l}.attn_norm.weight": [HF_LAYER + ".input_layernorm.weight"],
    "layers.{l}.ffn_norm.weight": [HF_LAYER + ".post_attention_layernorm.weight"],
    **{f"layers.{{l}}.attn.{p}.{kind}": [HF_LAYER + f".self_attn.{p}_proj.{kind}"]
       for p in "qkvo" for kind in ("weight", "bias")},
    "layers.{l}.attn.q_norm.weight": [HF_LAYER + ".self_attn.q_norm.weight"],  # Qwen3-MoE, OLMoE
    "layers.{l}.attn.k_norm.weight": [HF_LAYER + ".self_attn.k_norm.weight"],  # Qwen3-MoE, OLMoE
    "layers.{l}.moe.router.weight": [
        HF_LAYER + ".block_sparse_moe.gate.weight",  # Mixtral
        HF_LAYER + ".mlp.gate.weight",  # Qwen2-MoE, Qwen3-MoE, OLMoE
    ],
    "layers.{l}.moe.experts.{e}.gate.weight": [
        HF_LAYER + ".block_sparse_moe.experts.{e}.w1.weight",  # Mixtral
        HF_LAYER + ".mlp.experts.{e}.gate_proj.weight",  # Qwen2-MoE, Qwen3-MoE, OLMoE
    ],
    "layers.{l}.moe.experts.{e}.up.weight": [
        HF_LAYER + ".block_sparse_moe.experts.{e}.w3.weight",  # Mixtral
        HF_LAYER + ".mlp.experts.{e}.up_proj.weight",
    ],
    "layers.{l}.moe.experts.{e}.down.weight": [
        HF_LAYER + ".block_sparse_moe.experts.{e}.w2.weight",  # Mixtral
        HF_LAYER + ".mlp.experts.{e}.down_proj.weight",
    ],
    "layers.{l}.moe.shared.gate.weight": [HF_LAYER + ".mlp.shared_expert.gate_proj.weight"],  # Qwen2-MoE
    "layers.{l}.moe.shared.up.weight": [HF_LAYER + ".mlp.shared_expert.up_proj.weight"],
    "layers.{l}.moe.shared.down.weight": [HF_LAYER + ".mlp.shared_expert.down_proj.weight"],
    "layers.{l}.moe.shared_gate.weight": [HF_LAYER + ".mlp.shared_expert_gate.weight"],
    # A "dense" layer's MLP (runtime_py.config FFN_KINDS).
    "layers.{l}.mlp.gate.weight": [HF_LAYER + ".mlp.gate_proj.weight"],  # Qwen3-MoE mlp_only_layers
    "layers.{l}.mlp.up.weight": [HF_LAYER + ".mlp.up_proj.weight"],
    "layers.{l}.mlp.down.weight": [HF_LAYER + ".mlp.down_proj.weight"],
}

# Fused 3-D expert tensors (the layout transformers >= 5 keeps in memory; some checkpoints are
# saved that way). gate_up [E, 2F, D]: rows 0..F-1 are gate, F..2F-1 are up (transformers'
# ``.chunk(2)``); down [E, D, F]. Splitting gate and up in the wrong order is a known trap
# (MoE-Infinity PR #108): the parity tests cover it.
FUSED_GATE_UP = [HF_LAYER + ".block_sparse_moe.experts.gate_up_proj",  # Mixtral
                 HF_LAYER + ".mlp.experts.gate_up_proj"]  # Qwen2-MoE, Qwen3-MoE, OLMoE
FUSED_DOWN = [HF_LAYER + ".block_sparse_moe.experts.down_proj",
              HF_LAYER + ".mlp.experts.down_proj"]

# Buffers some older exports carry that hold no weights.
IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


def source_candidates(canonical: str) -> list[str]:
    """Source names that may hold canonical tensor ``canonical`` (e.g. 'layers.3.attn.q.weight')."""
    parts = canonical.split(".")
    layer = expert = None
    template = []
    for i, part in enumerate(parts):
        if i > 0 and parts[i - 1] == "layers":
            layer, part = part, "{l}"
        elif i > 0 and parts[i - 1] == "experts":
            expert, part = part, "{e}"
        template.append(part)
    return [t.format(l=layer, e=expert) for t in TENSOR_NAMES.get(".".join(template), [])]
