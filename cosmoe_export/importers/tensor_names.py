"""The canonical tensor-name table: every source spelling of each canonical tensor.

Keys are canonical templates (the names in our bundles); values are source templates, tried in
order, with the families that use them. ``{l}`` is the layer, ``{e}`` the expert. A source is a
name, or a ``Part`` of one: rows ``index`` of ``parts`` equal blocks (a fused gate/up matrix), or
the tensor without its leading 1 (ERNIE's [1, E] bias).
"""

from __future__ import annotations

from dataclasses import dataclass

HF_LAYER = "model.layers.{l}"


@dataclass(frozen=True)
class Part:
    template: str
    index: int = 0  # which block of rows
    parts: int = 1  # the source has this many blocks of the canonical tensor's rows (dim 0)
    squeeze: bool = False  # the source is [1, *canonical shape]
    per_head: bool = False  # the blocks alternate within each attention head's rows (Qwen3.5's q_proj: q, gate)

    def source_shape(self, want: tuple[int, ...]) -> tuple[int, ...]:
        return (1, *want) if self.squeeze else (want[0] * self.parts, *want[1:])


TENSOR_NAMES: dict[str, list[str | Part]] = {
    "embed.weight": ["model.embed_tokens.weight"],  # all HF families
    "norm.weight": ["model.norm.weight"],
    "lm_head.weight": ["lm_head.weight"],
    "lm_head.bias": ["lm_head.bias"],  # Phi-MoE lm_head_bias
    "norm.bias": ["model.norm.bias"],  # LayerNorm biases: Phi-MoE
    **{f"layers.{{l}}.{n}.{kind}": [HF_LAYER + f".{hf}.{kind}"] for n, hf in (
        ("attn_norm", "input_layernorm"), ("ffn_norm", "post_attention_layernorm")) for kind in ("weight", "bias")},
    **{f"layers.{{l}}.attn.{p}.{kind}": [HF_LAYER + f".self_attn.{p}_proj.{kind}"]
       for p in "qkvo" for kind in ("weight", "bias")},
    "layers.{l}.attn.q_norm.weight": [HF_LAYER + ".self_attn.q_norm.weight",  # Qwen3-MoE, OLMoE, GLM
                                      HF_LAYER + ".self_attn.query_layernorm.weight"],  # HunYuan
    "layers.{l}.attn.k_norm.weight": [HF_LAYER + ".self_attn.k_norm.weight",
                                      HF_LAYER + ".self_attn.key_layernorm.weight"],
    "layers.{l}.moe.router.weight": [
        HF_LAYER + ".block_sparse_moe.gate.weight",  # Mixtral
        HF_LAYER + ".mlp.gate.weight",  # Qwen2-MoE, Qwen3-MoE, OLMoE, ERNIE, GLM
        HF_LAYER + ".block_sparse_moe.router.layer.weight",  # Granite, as saved
        HF_LAYER + ".block_sparse_moe.router.weight",  # Granite, as transformers >= 5 holds it
        HF_LAYER + ".mlp.gate.wg.weight",  # HunYuan
        HF_LAYER + ".mlp.router.weight",  # Phi-MoE, as transformers >= 5 holds it
    ],
    "layers.{l}.attn.sinks": [HF_LAYER + ".self_attn.sinks"],  # gpt-oss
    # DeepSeek-V2/V3's latent attention (q_proj and o_proj are the rows above).
    **{f"layers.{{l}}.attn.{n}.{kind}": [HF_LAYER + f".self_attn.{hf}.{kind}"] for n, hf in (
        ("q_a", "q_a_proj"), ("q_b", "q_b_proj"), ("kv_a", "kv_a_proj_with_mqa"), ("kv_b", "kv_b_proj"))
       for kind in ("weight", "bias")},
    "layers.{l}.attn.q_a_norm.weight": [HF_LAYER + ".self_attn.q_a_layernorm.weight"],
    "layers.{l}.attn.kv_a_norm.weight": [HF_LAYER + ".self_attn.kv_a_layernorm.weight"],
    "layers.{l}.moe.router.bias": [HF_LAYER + ".mlp.router.bias"],  # gpt-oss
    "layers.{l}.moe.score_bias": [
        HF_LAYER + ".mlp.gate.e_score_correction_bias",  # GLM, DeepSeek-V3
        Part(HF_LAYER + ".mlp.moe_statics.e_score_correction_bias", squeeze=True),  # ERNIE, [1, E], as saved
        Part(HF_LAYER + ".mlp.gate.moe_statics.e_score_correction_bias", squeeze=True),  # ERNIE, in memory
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
    # Shared experts: Qwen2-MoE shared_expert, ERNIE and GLM shared_experts, HunYuan shared_mlp.
    # Granite's shared MLP: input_linear [2F, D] is gate then up (GraniteMoeSharedMLP's chunk(2)).
    "layers.{l}.moe.shared.gate.weight": [
        *[HF_LAYER + f".mlp.{s}.gate_proj.weight" for s in ("shared_expert", "shared_experts", "shared_mlp")],
        Part(HF_LAYER + ".shared_mlp.input_linear.weight", 0, 2)],
    "layers.{l}.moe.shared.up.weight": [
        *[HF_LAYER + f".mlp.{s}.up_proj.weight" for s in ("shared_expert", "shared_experts", "shared_mlp")],
        Part(HF_LAYER + ".shared_mlp.input_linear.weight", 1, 2)],
    "layers.{l}.moe.shared.down.weight": [
        *[HF_LAYER + f".mlp.{s}.down_proj.weight" for s in ("shared_expert", "shared_experts", "shared_mlp")],
        HF_LAYER + ".shared_mlp.output_linear.weight"],
    "layers.{l}.moe.shared_gate.weight": [HF_LAYER + ".mlp.shared_expert_gate.weight"],
    # A "dense" layer's MLP (runtime_py.config FFN_KINDS).
    "layers.{l}.mlp.gate.weight": [HF_LAYER + ".mlp.gate_proj.weight"],  # Qwen3-MoE, ERNIE, GLM
    "layers.{l}.mlp.up.weight": [HF_LAYER + ".mlp.up_proj.weight"],
    "layers.{l}.mlp.down.weight": [HF_LAYER + ".mlp.down_proj.weight"],
}

# LFM2-MoE (modeling_lfm2_moe.py): its own names for the norms, the output projection, q/k norms,
# the FFN block (feed_forward.*, w1/w3/w2 = gate/up/down) and the final norm (embedding_norm, applied
# after the last layer despite its name); and its short-convolution layers.
_LFM2 = {
    "norm.weight": ["model.embedding_norm.weight"],
    "layers.{l}.attn_norm.weight": [HF_LAYER + ".operator_norm.weight"],
    "layers.{l}.ffn_norm.weight": [HF_LAYER + ".ffn_norm.weight"],
    "layers.{l}.attn.o.weight": [HF_LAYER + ".self_attn.out_proj.weight"],
    "layers.{l}.attn.q_norm.weight": [HF_LAYER + ".self_attn.q_layernorm.weight"],
    "layers.{l}.attn.k_norm.weight": [HF_LAYER + ".self_attn.k_layernorm.weight"],
    "layers.{l}.moe.router.weight": [HF_LAYER + ".feed_forward.gate.weight"],
    "layers.{l}.moe.score_bias": [HF_LAYER + ".feed_forward.expert_bias"],
    **{f"layers.{{l}}.moe.experts.{{e}}.{m}.weight": [HF_LAYER + f".feed_forward.experts.{{e}}.{w}.weight"]
       for m, w in (("gate", "w1"), ("up", "w3"), ("down", "w2"))},
    **{f"layers.{{l}}.mlp.{m}.weight": [HF_LAYER + f".feed_forward.{w}.weight"]
       for m, w in (("gate", "w1"), ("up", "w3"), ("down", "w2"))},
    **{f"layers.{{l}}.conv.{n}.{kind}": [HF_LAYER + f".conv.{n}.{kind}"] for n in ("in_proj", "out_proj")
       for kind in ("weight", "bias")},
    **{f"layers.{{l}}.conv.{kind}": [HF_LAYER + f".conv.conv.{kind}"] for kind in ("weight", "bias")},
}
# Qwen3.5-MoE (modeling_qwen3_5_moe.py): q_proj holds each head's query rows then its output-gate
# rows; the Gated DeltaNet layers (linear_attn, conv1d = the q/k/v convolution).
_QWEN3_5 = {
    "layers.{l}.attn.q.weight": [Part(HF_LAYER + ".self_attn.q_proj.weight", 0, 2, per_head=True)],
    "layers.{l}.attn.gate.weight": [Part(HF_LAYER + ".self_attn.q_proj.weight", 1, 2, per_head=True)],
    "layers.{l}.attn.q.bias": [Part(HF_LAYER + ".self_attn.q_proj.bias", 0, 2, per_head=True)],
    "layers.{l}.attn.gate.bias": [Part(HF_LAYER + ".self_attn.q_proj.bias", 1, 2, per_head=True)],
    **{f"layers.{{l}}.linear.{n}": [HF_LAYER + f".linear_attn.{n}"] for n in (
        "in_proj_qkv.weight", "in_proj_z.weight", "in_proj_b.weight", "in_proj_a.weight", "out_proj.weight", "A_log",
        "dt_bias", "norm.weight")},
    "layers.{l}.linear.conv.weight": [HF_LAYER + ".linear_attn.conv1d.weight"],
}
for _table in (_LFM2, _QWEN3_5):
    for _name, _sources in _table.items():
        TENSOR_NAMES.setdefault(_name, []).extend(_sources)

# Fused 3-D expert tensors (the layout transformers >= 5 keeps in memory; some checkpoints are
# saved that way). gate_up [E, 2F, D]: rows 0..F-1 are gate, F..2F-1 are up (transformers'
# ``.chunk(2)``); down [E, D, F]. Splitting gate and up in the wrong order is a known trap
# (MoE-Infinity PR #108): the parity tests cover it.
FUSED_GATE_UP = [HF_LAYER + ".block_sparse_moe.experts.gate_up_proj",  # Mixtral
                 HF_LAYER + ".mlp.experts.gate_up_proj",  # Qwen2-MoE, Qwen3-MoE, OLMoE, ERNIE, GLM, HunYuan
                 HF_LAYER + ".feed_forward.experts.gate_up_proj",  # LFM2
                 HF_LAYER + ".block_sparse_moe.input_linear.weight"]  # Granite (as its checkpoints are saved)
FUSED_DOWN = [HF_LAYER + ".block_sparse_moe.experts.down_proj",
              HF_LAYER + ".mlp.experts.down_proj",
              HF_LAYER + ".feed_forward.experts.down_proj",
              HF_LAYER + ".block_sparse_moe.output_linear.weight"]

# gpt-oss's experts (modeling_gpt_oss.py GptOssExperts): gate_up [E, D, 2F] with gate in the even
# columns and up in the odd ones, down [E, F, D], x @ W + b; biases gate_up [E, 2F] (interleaved
# alike) and down [E, D]. Released checkpoints hold the matrices as MXFP4: NAME_blocks [E, R, C/32,
# 16] uint8 (two e2m1 codes a byte, the low nibble first) and NAME_scales [E, R, C/32] uint8 (a
# power of two, biased by 127), rows R the output features (integrations/mxfp4.py).
GPT_OSS_GATE_UP = HF_LAYER + ".mlp.experts.gate_up_proj"
GPT_OSS_DOWN = HF_LAYER + ".mlp.experts.down_proj"
MXFP4_SUFFIXES = ("_blocks", "_scales")

# Buffers some older exports carry that hold no weights.
IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


def source_candidates(canonical: str) -> list[Part]:
    """Sources that may hold canonical tensor ``canonical`` (e.g. 'layers.3.attn.q.weight'), in order."""
    parts = canonical.split(".")
    layer = expert = None
    template = []
    for i, part in enumerate(parts):
        if i > 0 and parts[i - 1] == "layers":
            layer, part = part, "{l}"
        elif i > 0 and parts[i - 1] == "experts":
            expert, part = part, "{e}"
        template.append(part)
    out = []
    for t in TENSOR_NAMES.get(".".join(template), []):
        part = t if isinstance(t, Part) else Part(t)
        out.append(Part(part.template.format(l=layer, e=expert), part.index, part.parts, part.squeeze, part.per_head))
    return out
