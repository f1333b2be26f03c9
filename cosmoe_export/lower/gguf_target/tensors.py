"""Our tensors as llama.cpp's: their names, their ggml blocks (Q4_0, Q8_0) or exact floats, and the row
orders its graphs read (RoPE pairs, latent attention's kv_b, Qwen3.5's DeltaNet)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import gguf
import numpy as np
import torch

from cosmoe_export.importers.adapters import rope_permutation
from cosmoe_export.lower import units
from runtime_py.config import CosmoeConfig

Q = gguf.GGMLQuantizationType
BLOCK = 32  # Q4_0 and Q8_0 hold 32 values per block
FLOAT_TYPES = {"float32": Q.F32, "bfloat16": Q.BF16, "float16": Q.F16}  # the bundle's dtype -> GGUF's
# How exact each GGUF float type is, from the most compact: a value is written in the first that holds it.
FALLBACK_FLOATS = (Q.F16, Q.F32)


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
    "layers.{l}.attn.kv_b.weight": (T.ATTN_KV_B, "weight"),  # written as attn_k_b and attn_v_b (add_kv_b)
    "layers.{l}.conv.in_proj.weight": (T.SHORTCONV_INPROJ, "weight"),  # LFM2's short convolution
    "layers.{l}.conv.weight": (T.SHORTCONV_CONV, "weight"),  # [D, 1, L] here, {L, D} there
    "layers.{l}.conv.out_proj.weight": (T.SHORTCONV_OUTPROJ, "weight"),
    "layers.{l}.attn.gate.weight": (T.ATTN_Q, "gate"),  # Qwen3.5's output gate: in q's rows there (merge_gate)
    "layers.{l}.attn.gate.bias": (T.ATTN_Q, "gate"),
    "layers.{l}.linear.in_proj_qkv.weight": (T.ATTN_QKV, "weight"),  # Gated DeltaNet (deltanet)
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


def gguf_name(tensor: T, kind: str, layer: int | None = None) -> str:
    return gguf.TENSOR_NAMES[tensor].format(bid=layer) + (f".{kind}" if kind else "")


def template_of(name: str) -> tuple[str, int | None]:
    parts = name.split(".")
    if parts[0] == "layers":
        return ".".join(["layers", "{l}", *parts[2:]]), int(parts[1])
    return name, None


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


def rope_rows(w: units.Weight, cfg: CosmoeConfig, interleaved: bool) -> units.Weight:
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


def mla_rope_rows(w: units.Weight, cfg: CosmoeConfig, kv_a: bool) -> units.Weight:
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


def merge_gate(q: units.Weight, gate: units.Weight, cfg: CosmoeConfig) -> units.Weight:
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


def deltanet(name: str, w: units.Weight, cfg: CosmoeConfig) -> tuple[units.Weight, str | None]:
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


def add_kv_b(add: Callable[[str, Encoded], None], w: units.Weight, cfg: CosmoeConfig, layer: int,
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
    add(gguf_name(T.ATTN_V_B, "weight", layer), encode(v_b, float_type, experts=True))
    k_b = encode([values[r[:nope]].T.contiguous() for r in rows], float_type, experts=True)
    if isinstance(w, units.QuantWeight):
        k_b.fallback = f"kv_b's key rows transposed for llama.cpp's MLA: {k_b.type.name}, every value exact"
    add(gguf_name(T.ATTN_K_B, "weight", layer), k_b)
