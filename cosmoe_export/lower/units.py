"""The units a device runs, as export-friendly PyTorch modules, and their weights from a bundle.

Cut (docs/LOWERING.md): ``embed`` (ids -> x), one ``layer`` program per decoder layer (attention
with the KV cache passed in, the router logits and the shared expert; for a "dense" layer of the
plan its whole MLP, and zero router logits), one ``expert`` program per (MoE layer, routed expert),
and ``head`` (final norm + output projection). Top-k routing and the
weighted sum of expert outputs happen in the runtime, so no unit needs another expert's weights.

Shape legend: T tokens in this call, S cache slots (the context), D hidden, G kv heads, Dh head
size, E experts, N tokens routed to one expert, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from runtime_py import quant
from runtime_py.bundle import Bundle, FileEntry
from runtime_py.config import CosmoeConfig, backbone_shapes, expert_tensor_shapes
from runtime_py.errors import FormatError
from runtime_py.model import (
    DELTA_CHUNK,
    MIXER_MODULES,
    Attention,
    Expert,
    GatedDeltaNet,
    LatentAttention,
    ShortConv,
    add_residual,
    decoder_norm,
    routed_expert,
    scale_embeddings,
    scale_logits,
    shared_expert,
    sink_attention,
    window_mask,
)
from runtime_py.shards import read_shard


@dataclass(frozen=True)
class QuantWeight:
    """A bundle's own integers: codes int8 [N, K] and fp32 scales [N, ceil(K/G)] (exact from bf16)."""

    codes: torch.Tensor
    scales: torch.Tensor
    encoding: quant.Encoding

    def dequantize(self) -> torch.Tensor:
        return quant.dequantize_codes(self.codes, self.scales, self.encoding)  # [N, K] fp32


Weight = torch.Tensor | QuantWeight


def read_weights(bundle: Bundle, entry: FileEntry, shapes: dict[str, tuple[int, ...]]) -> dict[str, Weight]:
    """Canonical name -> fp32 tensor, or QuantWeight for quantized tensors (codes kept). Its sha256 is
    checked first: what gets lowered is exactly what the manifest vouches for."""
    return read_shard(bundle, entry, shapes, dtype=torch.float32, keep=_keep_codes)


def _keep_codes(name: str, shape: tuple[int, ...], enc: quant.Encoding) -> Callable[..., QuantWeight]:
    return _quant_weight


def _quant_weight(stored: torch.Tensor, scale: torch.Tensor, enc: quant.Encoding, k: int) -> QuantWeight:
    return QuantWeight(quant.codes(stored, enc, k), scale.float(), enc)


def dequantized(weights: dict[str, Weight], prefix: str = "") -> dict[str, torch.Tensor]:
    return {k.removeprefix(prefix): (v.dequantize() if isinstance(v, QuantWeight) else v) for k, v in weights.items()}


def expert_weights(bundle: Bundle, layer: int, expert: int) -> dict[str, Weight]:
    """Weights of one expert, keys relative to the expert ('gate.weight', 'up.left', ...)."""
    kind = bundle.config.ffn_kind(layer)
    if not kind.routed:  # the caller must loop over config.moe_layers
        raise FormatError(f"{bundle.root}: layer {layer} is a {kind.name} layer and has no expert {expert}; "
                          "lower experts of config.moe_layers only")
    shapes = expert_tensor_shapes(bundle.config, layer, expert)
    prefix = f"layers.{layer}.moe.experts.{expert}."
    return {k.removeprefix(prefix): v for k, v in read_weights(bundle, bundle.experts[(layer, expert)], shapes).items()}


def backbone_weights(bundle: Bundle) -> dict[str, Weight]:
    """Every backbone tensor: fp32, or QuantWeight where the bundle holds integers."""
    return read_weights(bundle, bundle.backbone, backbone_shapes(bundle.config))


# Which linear of a backbone unit holds which canonical tensor: how a target swaps in the bundle's
# integer weights after building the unit from dequantized ones.
def layer_linears(config: CosmoeConfig, layer: int) -> dict[str, str]:
    pre = f"layers.{layer}."
    # MLA's kv_b is not a linear of the program: its blocks multiply the query and the attended
    # latent (model.LatentAttention), so the program holds it dequantized.
    gate = ("gate",) if config.attention_output_gate else ()
    names = {"mla": ("q_a", "q_b", "kv_a", "o") if config.q_lora_rank else ("q", "kv_a", "o"),
             "conv": ("in_proj", "out_proj"), "linear": ("in_proj_qkv", "in_proj_z", "out_proj")
             }.get(config.mixer(layer), (*"qkvo", *gate))
    attr = MIXER_MODULES[config.mixer(layer)][0]
    out = {f"{attr}.{p}": f"{pre}{attr}.{p}.weight" for p in names}
    out.update(LAYER_FFNS[config.ffn_kind(layer).name].linears(config, pre))
    return out


def head_linears(config: CosmoeConfig) -> dict[str, str]:
    # A tied head multiplies by the embedding table: its integers are the head's integers too (the
    # table is [V, D] quantized along D, exactly a linear's [N, K] along K).
    return {"lm_head": "embed.weight" if config.tie_word_embeddings else "lm_head.weight"}


def embed_tables(config: CosmoeConfig) -> dict[str, str]:
    return {"embed": "embed.weight"}


class EmbedUnit(nn.Module):
    def __init__(self, config: CosmoeConfig) -> None:
        super().__init__()
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.config = config

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return scale_embeddings(self.embed(ids), self.config)  # [1, T] -> [1, T, D]


class LayerUnit(nn.Module):
    """One decoder layer without its routed experts.

    The cache is state the runtime owns: it passes the S filled slots in and gets this call's keys
    and values back (it writes them at its position). Keys attended to are the S slots followed by
    the T new ones; ``slot_mask`` [S] and ``new_mask`` [T, T] (0 or -inf) say which are visible, so
    the graph has no data-dependent indexing and one program serves prefill and decode at any
    position. (Two masks, not one [T, S+T]: torch.export cannot express a dim that is the sum of two
    dynamic dims.)
    """

    def __init__(self, config: CosmoeConfig, layer: int = 0) -> None:
        super().__init__()
        self.attn_norm = decoder_norm(config)
        self.mix = LAYER_MIXERS[config.mixer(layer)]
        self.mixer, module = MIXER_MODULES[config.mixer(layer)]  # "attn" | "conv": the tensor names
        setattr(self, self.mixer, module(config, layer))
        self.ffn_norm = decoder_norm(config)
        self.residual_multiplier = config.residual_multiplier
        self.ffn = LAYER_FFNS[config.ffn_kind(layer).name]
        self.ffn.build(self, config)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, slot_mask: torch.Tensor,
                new_mask: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor):
        """x [1, T, D], cos/sin [T, Dh], slot_mask [S], new_mask [T, T], k_cache [1, G, S, Wk],
        v_cache [1, G, S, Wv] (config.cache_spec; a conv layer's state instead) -> base [1, T, D]
        (residual + shared expert, or + the MLP in a dense layer), xn [T, D] (expert input), logits
        [T, E] (zeros in a dense layer), k_new [1, G, T, Wk], v_new [1, G, T, Wv] (or the new state)."""
        t = x.shape[1]
        mask = torch.cat([slot_mask.expand(t, -1), new_mask], dim=1)  # [T, S+T]
        att, k_new, v_new = self.mix(getattr(self, self.mixer), self.attn_norm(x), cos, sin, mask,
                                     k_cache, v_cache)  # [1, T, D]
        x = add_residual(x, att, self.residual_multiplier)
        xn = self.ffn_norm(x).reshape(t, -1)  # [T, D]
        base, logits = self.ffn.forward(self, x, xn)  # [1, T, D], [T, E]
        return base, xn, logits, k_new, v_new


# A layer program's token mixer: (module, normed x [1, T, D], cos, sin, additive mask [T, S+T],
# k_cache, v_cache) -> (output [1, T, D], k_new, v_new). One per runtime_py.config.MIXER_KINDS.
Mixer = Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def _attention(a: Attention, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor,
               k_cache: torch.Tensor, v_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Full or sliding attention over the S cached keys [1, G, S, Dh] then the T new ones."""
    q, k_new, v_new = a.project(x, cos, sin)  # [1, H, T, Dh], [1, G, T, Dh] x2
    keys = torch.cat([k_cache, k_new], dim=2)  # [1, G, S+T, Dh]
    values = torch.cat([v_cache, v_new], dim=2)
    if a.window is not None:
        mask = mask + window_far(x.shape[1], k_cache.shape[2], a.window)
    if a.sinks is not None:
        att = sink_attention(q, _repeat_kv(keys, a), _repeat_kv(values, a), mask, a.scale, a.sinks)  # [1, H, T, Dh]
    else:
        att = grouped_attention(q, keys, values, mask, a.scale)  # [1, H, T, Dh]
    return a.output(x, att), k_new, v_new


def grouped_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
                      scale: float | None) -> torch.Tensor:
    """softmax(q k^T * scale + mask) v, as F.scaled_dot_product_attention computes it, in two
    batched matmuls over the G kv heads: q [1, H, T, Dh], keys [1, G, S, Dh], values [1, G, S, Dv],
    additive mask [T, S] -> [1, H, T, Dv].

    Why not SDPA: torch.export decomposes it into 4-D matmuls, which become expand copies of the
    keys and values and a guard against fully masked rows (where / any / logical_not), none of them
    taken by XNNPACK; each splits the layer's delegate and runs as a portable kernel over the whole
    cache, every token (docs/LOWERING.md measures it). The H = G x rep query heads of one kv head
    are rows of one matrix, so kv heads are never repeated either. No row is fully masked here:
    every token sees itself."""
    _, h, t, dh = q.shape
    g, s, dv = keys.shape[1], keys.shape[2], values.shape[-1]
    rep = h // g
    scale = dh ** -0.5 if scale is None else scale
    # contiguous first: a reshape of the transposed q would need a guard torch.export cannot prove
    # for a dynamic T (as _repeat_kv's)
    q3 = q.contiguous().reshape(g, rep * t, dh)  # [G, rep*T, Dh]
    scores = torch.bmm(q3, keys.reshape(g, s, dh).transpose(1, 2)) * scale  # [G, rep*T, S]
    probs = torch.softmax(scores.reshape(g, rep, t, s) + mask, dim=-1).reshape(g, rep * t, s)
    out = torch.bmm(probs, values.reshape(g, s, dv))  # [G, rep*T, Dv]
    # unflatten, not reshape: the same guard again, on the bmm's output
    return out.unflatten(1, (rep, t)).flatten(0, 1).unsqueeze(0)  # [1, H, T, Dv]


def _repeat_kv(z: torch.Tensor, a: Attention) -> torch.Tensor:
    """[1, G, S, W] -> [1, H, S, W], each kv head repeated for its query heads. As a concatenation
    of per-group slices, not expand + reshape: with a dynamic T, torch.export cannot prove the
    reshape's contiguity guard (Min((S+T)*Dh, G*(S+T)*Dh) == (S+T)*Dh) for T = 1 and refuses the
    dynamic dim (docs/LOWERING.md)."""
    if a.n_kv == a.n_heads:
        return z
    rep = a.n_heads // a.n_kv
    return torch.cat([z[:, g:g + 1] for g in range(a.n_kv) for _ in range(rep)], dim=1)


def _latent(a: LatentAttention, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor,
            k_cache: torch.Tensor, v_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """MLA: the cache tensors hold the latents [1, 1, S, r] and RoPE keys [1, 1, S, R]."""
    q, c_new, k_rope_new = a.project(x, cos, sin)  # [1, H, T, r+R], [1, 1, T, r], [1, 1, T, R]
    c = torch.cat([k_cache, c_new], dim=2)  # [1, 1, S+T, r]
    k_rope = torch.cat([v_cache, k_rope_new], dim=2)  # [1, 1, S+T, R]
    return a.attend(q, c, k_rope, mask), c_new, k_rope_new


def _filled(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[1]: 0 at position 0 (the one slot passed is not filled yet: masked), else 1; a state times it
    starts a sequence at zeros whatever the runtime's buffer holds."""
    return (mask[0, :1] == 0).to(dtype)


def _conv(a: ShortConv, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor,
          k_cache: torch.Tensor, v_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """LFM2's short convolution: k_cache is the state [1, 1, K-1, D], returned updated (v_cache, a
    placeholder, as it came). The slot mask's first entry is -inf only at position 0 (the one slot
    passed is not filled yet), where the state must be zeros whatever the buffer holds."""
    filled = _filled(mask, k_cache.dtype)
    y, state = a.mix(x, k_cache * filled)
    return y, state, v_cache


def _linear(a: GatedDeltaNet, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor,
            k_cache: torch.Tensor, v_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gated DeltaNet: k_cache is the convolution state [1, 1, K-1, C], v_cache the recurrent state
    [1, Hv, dk, dv], both returned updated; T <= max_tokens = DELTA_CHUNK, one closed-form step.
    Both start at zeros at position 0, as the conv layer's (the slot mask says where that is)."""
    filled = _filled(mask, k_cache.dtype)
    return a.mix(x, k_cache * filled, v_cache * filled, chunk=None)


LAYER_MIXERS: dict[str, Mixer] = {"full": _attention, "sliding": _attention, "mla": _latent, "conv": _conv,
                                  "linear": _linear}


def window_far(t: int, s: int, window: int) -> torch.Tensor:
    """-inf [T, S+T] where a key is outside a sliding layer's window (model.window_mask), else 0:
    from the shapes alone. The S slots passed in are positions 0..S-1 and the new tokens S..S+T-1
    (the runtimes pass the filled prefix; at position 0 the one slot is masked anyway), so the
    program needs no position input."""
    return torch.zeros(t, s + t).masked_fill(~window_mask(t, s + t, window, offset=s), float("-inf"))


@dataclass(frozen=True)
class LayerFfn:
    """What a layer program computes after attention for one FFN kind (runtime_py.config.FFN_KINDS):
    ``build(unit, config)`` adds its modules to the LayerUnit (attribute names = canonical tensor
    names less ``layers.L.`` and ``moe.``), ``forward(unit, x, xn) -> (base [1, T, D], logits [T, E])``,
    ``linears(config, prefix)`` the attribute -> canonical tensor map for integer swaps."""
    build: Callable[[nn.Module, CosmoeConfig], None]
    forward: Callable[[nn.Module, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
    linears: Callable[[CosmoeConfig, str], dict[str, str]]


def _routed_build(unit: nn.Module, config: CosmoeConfig) -> None:
    d = config.hidden_size
    unit.router = nn.Linear(d, config.num_experts, bias=config.router_bias)
    fs = config.shared_expert_intermediate_size
    unit.shared = Expert(d, fs) if fs else None
    unit.shared_gate = nn.Linear(d, 1, bias=False) if fs and config.shared_expert_gate else None


def _routed_forward(unit: nn.Module, x: torch.Tensor, xn: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # Raw logits out: the runtime routes (runtime_py/routers.py), with the score bias it reads itself.
    logits = unit.router(xn)  # [T, E]
    if unit.shared is None:
        return x, logits
    return add_residual(x, shared_expert(unit, xn).view(x.shape[0], x.shape[1], -1), unit.residual_multiplier), logits


def _routed_linears(config: CosmoeConfig, pre: str) -> dict[str, str]:
    if not config.shared_expert_intermediate_size:
        return {}
    out = {f"shared.{m}": f"{pre}moe.shared.{m}.weight" for m in ("gate", "up", "down")}
    if config.shared_expert_gate:
        out["shared_gate"] = f"{pre}moe.shared_gate.weight"
    return out


def _dense_build(unit: nn.Module, config: CosmoeConfig) -> None:
    unit.mlp = Expert(config.hidden_size, config.dense_intermediate_size)
    unit.num_experts = config.num_experts


def _dense_forward(unit: nn.Module, x: torch.Tensor, xn: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # Zero router logits keep every layer program's five outputs; the runtimes never route a dense
    # layer (the plan says so), so the zeros are never read.
    zeros = xn.new_zeros((xn.shape[0], unit.num_experts))  # [T, E]
    return add_residual(x, unit.mlp(xn).view(x.shape[0], x.shape[1], -1), unit.residual_multiplier), zeros


def _dense_linears(config: CosmoeConfig, pre: str) -> dict[str, str]:
    return {f"mlp.{m}": f"{pre}mlp.{m}.weight" for m in ("gate", "up", "down")}


# FFN kind -> what its layer program computes. A new kind is one entry here.
LAYER_FFNS: dict[str, LayerFfn] = {
    "moe": LayerFfn(_routed_build, _routed_forward, _routed_linears),
    "dense": LayerFfn(_dense_build, _dense_forward, _dense_linears),
}


class HeadUnit(nn.Module):
    def __init__(self, config: CosmoeConfig) -> None:
        super().__init__()
        self.norm = decoder_norm(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=config.lm_head_bias)
        self.config = config

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return scale_logits(self.lm_head(self.norm(x)), self.config)  # [1, T, D] -> [1, T, V]


def build_layer(config: CosmoeConfig, weights: dict[str, torch.Tensor], layer: int) -> LayerUnit:
    prefix = f"layers.{layer}."
    # The score bias is the runtime's (it routes); the program returns raw logits.
    sd = {k.removeprefix(prefix).replace("moe.", ""): v for k, v in weights.items()
          if k.startswith(prefix) and not k.endswith(".moe.score_bias")}
    with torch.device("meta"):
        unit = LayerUnit(config, layer)
    unit.load_state_dict(sd, assign=True, strict=True)
    return unit.eval()


def build_head(config: CosmoeConfig, weights: dict[str, torch.Tensor]) -> HeadUnit:
    with torch.device("meta"):
        unit = HeadUnit(config)
    head = weights["embed.weight"] if config.tie_word_embeddings else weights["lm_head.weight"]
    sd = {"norm.weight": weights["norm.weight"], "lm_head.weight": head}
    sd.update({k: weights[k] for k in ("norm.bias", "lm_head.bias") if k in weights})
    unit.load_state_dict(sd, assign=True, strict=True)
    return unit.eval()


def build_embed(config: CosmoeConfig, weights: dict[str, torch.Tensor]) -> EmbedUnit:
    with torch.device("meta"):
        unit = EmbedUnit(config)
    unit.load_state_dict({"embed.weight": weights["embed.weight"]}, assign=True, strict=True)
    return unit.eval()


def build_expert(config: CosmoeConfig, weights: dict[str, torch.Tensor]) -> Expert:
    with torch.device("meta"):
        unit = routed_expert(config)
    unit.load_state_dict(weights, assign=True, strict=True)
    return unit.eval()


# Most tokens one backbone program call takes (a prefill chunk); decode is T = 1 on the same program.
MAX_TOKENS = 64


def max_tokens(config: CosmoeConfig) -> int:
    # A Gated DeltaNet layer program takes its tokens in one closed-form step, exact up to DELTA_CHUNK.
    linear = "linear" in (config.layer_mixers or ())
    return min(MAX_TOKENS, config.max_position_embeddings, DELTA_CHUNK if linear else MAX_TOKENS)


def layer_example_inputs(config: CosmoeConfig, t: int = 2, s: int = 3, *, layer: int = 0) -> tuple[torch.Tensor, ...]:
    """Inputs of layer ``layer``'s program for T new tokens after S cached positions: x, cos, sin,
    slot_mask, new_mask, k_cache, v_cache."""
    spec = config.cache_spec(layer)
    k, v = ((h, s if spec.positional else r, w) for h, r, w in (spec.k, spec.v))
    dh, d = config.rope_width, config.hidden_size
    return (torch.zeros(1, t, d), torch.ones(t, dh), torch.zeros(t, dh), torch.zeros(s), torch.zeros(t, t),
            torch.zeros(1, *k), torch.zeros(1, *v))


def token_dim(config: CosmoeConfig) -> torch.export.Dim:
    return torch.export.Dim("t", min=1, max=max_tokens(config))


def cache_dim(config: CosmoeConfig) -> torch.export.Dim:
    return torch.export.Dim("s", min=1, max=config.max_position_embeddings)


def layer_dynamic_shapes(config: CosmoeConfig, layer: int = 0) -> tuple:
    """T dynamic in 1..max_tokens and S, the cached positions passed in, in 1..context. The runtime
    passes only the filled prefix of its cache, so a decode step costs its position, not the
    context: with S fixed at the context, every step copied and attended over all 2,048 slots of
    the wearable model (docs/BENCHMARKS.md)."""
    t, s = token_dim(config), cache_dim(config)
    cache = {2: s} if config.cache_spec(layer).positional else {}  # a state has fixed shapes
    return ({1: t}, {0: t}, {0: t}, {0: s}, {0: t, 1: t}, cache, cache)


LAYER_INPUTS = ["x", "cos", "sin", "slot_mask", "new_mask", "k_cache", "v_cache"]
LAYER_OUTPUTS = ["base", "xn", "router_logits", "k_new", "v_new"]


def precision_label(weights: dict) -> str:
    """Precision label of a unit's weights: 'fp32', or the integer scheme(s) it carries."""
    schemes = sorted({w.encoding.scheme for w in weights.values() if isinstance(w, QuantWeight)})
    return "+".join(schemes) if schemes else "fp32"


def swap_quantized(unit: nn.Module, tensors: dict[str, str], raw: dict[str, Weight],
                   make: Callable[[nn.Module, QuantWeight], nn.Module | None]) -> bool:
    """Replace each of the unit's float modules (attribute -> canonical tensor) whose tensor the bundle
    holds as integers by ``make(old_module, weight)`` (None keeps it); True if any was replaced.
    Each target passes its own integer modules."""
    swapped = False
    for attr, name in tensors.items():
        w = raw.get(name)
        if not isinstance(w, QuantWeight):
            continue
        parent, _, leaf = attr.rpartition(".")
        owner = unit.get_submodule(parent) if parent else unit
        new = make(getattr(owner, leaf), w)
        if new is not None:
            setattr(owner, leaf, new)
            swapped = True
    return swapped
