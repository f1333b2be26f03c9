"""ONNX graphs (ONNX Runtime) for each unit.

ONNX Runtime binds initializers when a session is created, so every (layer, expert) is its own
small model whose weights are initializers. Expert graphs are written directly with
``onnx.helper`` (three matmuls and a SiLU need no exporter, cost nothing per expert, and give the
same bytes every time); quantized weights become ``com.microsoft::MatMulNBits`` whose packed
``B`` is the bundle's own int4 nibbles or int8 codes (offset binary, default zero point), and
whose scales are the bundle's bf16 scales converted exactly to fp32. Backbone units (layer,
head, embed) are exported with ``torch.onnx.export``, one export each (the exporter folds and
deduplicates initializers, so weights are not substituted into a shared graph). Where the bundle
holds integers, their linears are first replaced by ``NBitsLinear`` and the embedding by
``NBitsEmbedding``: two custom torch ops that the exporter translates to ``MatMulNBits`` and
``com.microsoft::GatherBlockQuantized`` fed by the same packed codes, so the exported graph holds
the bundle's integers, never a dequantized fp32 copy.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from cosmoe_export.lower.units import QuantWeight, Weight, swap_quantized
from runtime_py import quant
from runtime_py.config import CosmoeConfig

OPSET = 18
MS_DOMAIN = "com.microsoft"


# MatMulNBits' accuracy_level per integer scheme: the least precise compute ONNX Runtime may use
# (1 fp32, 2 fp16, 3 bf16, 4 int8 with the activations quantized per block, as XNNPACK's 8da
# kernels; absent, it dequantizes and multiplies in fp32). bench/onnx_accuracy.py measured
# levels 0-4 for speed and parity (docs/LOWERING.md); the choice is in each program's precision
# label (targets.py).
ACCURACY_LEVEL = {"int4": 4, "int8": 4}


def _matmul_nbits_block(w: QuantWeight) -> int:
    """MatMulNBits and GatherBlockQuantized need a power-of-two block of at least 16. int4 groups
    are 32/64/128 already; per-channel int8 (one scale per row) is expressed with the scale
    repeated over 32-wide blocks, which is the same function."""
    return w.encoding.group_size if w.encoding.scheme == "int4" else 32


def nbits_tensors(w: QuantWeight) -> tuple[torch.Tensor, torch.Tensor, dict[str, int]]:
    """The bundle's codes as MatMulNBits inputs: B uint8 [N, blocks, blob], scales fp32 [N * blocks],
    and the node's attributes. Codes are offset binary (ORT's default zero point 2^(bits-1)); a
    block that runs past K is padded with zero codes, which MatMulNBits ignores."""
    n, k = w.codes.shape
    block = _matmul_nbits_block(w)
    blocks = -(-k // block)
    bits = w.encoding.bits
    packed = _offset_binary(F.pad(w.codes, (0, blocks * block - k)), bits)  # [N, Kb*bits/8], zero-code padding
    packed = packed.reshape(n, blocks, -1).contiguous()  # [N, blocks, blob]
    scales = w.scales if w.encoding.scheme == "int4" else w.scales.expand(n, blocks)  # [N, blocks]
    attrs = {"K": k, "N": n, "bits": bits, "block_size": block, "accuracy_level": ACCURACY_LEVEL[w.encoding.scheme]}
    return packed, scales.reshape(-1).float().contiguous(), attrs


def _offset_binary(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """codes int8 [R, K] -> uint8 [R, K*bits/8] as ORT reads them: code + 2^(bits-1) (its default zero
    point). For 4 bits that is the bundle's own int4 packing (code + 8, even column in the low nibble)."""
    if bits == 4:
        return quant.SCHEMES["int4"].pack(codes)
    return (codes.to(torch.int16) + 128).to(torch.uint8)


def _unpack_blocks(packed: torch.Tensor, scales: torch.Tensor, rows: int, bits: int, block: int) -> torch.Tensor:
    """Inverse of the packing above: uint8 [R, bytes] -> fp32 [R, blocks * block], the eager path of
    the custom ops (the exported graph never runs it)."""
    u = packed.reshape(rows, -1)  # [R, bytes]
    if bits == 4:
        codes = quant.SCHEMES["int4"].unpack(u, 2 * u.shape[1])  # [R, blocks*block] int8
    else:
        codes = (u.to(torch.int16) - 128).to(torch.int8)
    return (codes.float().view(rows, -1, block) * scales.view(rows, -1, 1)).view(rows, -1)


@torch.library.custom_op("cosmoe::matmul_nbits", mutates_args=())
def matmul_nbits(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, k: int, n: int, bits: int,
                 block: int, accuracy: int) -> torch.Tensor:
    """x [..., K] @ W.T -> [..., N] with W held as MatMulNBits' B and scales (``accuracy``: the node's
    accuracy_level, which only ONNX Runtime reads)."""
    return F.linear(x, _unpack_blocks(packed, scales, n, bits, block)[:, :k])


@matmul_nbits.register_fake
def _(x, packed, scales, k, n, bits, block, accuracy):
    return x.new_empty((*x.shape[:-1], n))


@torch.library.custom_op("cosmoe::gather_block_quantized", mutates_args=())
def gather_block_quantized(data: torch.Tensor, ids: torch.Tensor, scales: torch.Tensor, bits: int,
                           block: int) -> torch.Tensor:
    """Rows ``ids`` of a table held as uint8 codes [V, bytes] and fp32 scales [V, blocks] -> [..., Kp]
    (Kp = the row's codes: K, or K rounded up to even for int4)."""
    rows = data[ids.reshape(-1)]  # [n, bytes]
    table = _unpack_blocks(F.pad(rows, (0, -rows.shape[1] % (block * bits // 8))), scales[ids.reshape(-1)],
                           rows.shape[0], bits, block)
    return table[:, :data.shape[1] * (8 // bits)].reshape(*ids.shape, -1)


@gather_block_quantized.register_fake
def _(data, ids, scales, bits, block):
    return scales.new_empty((*ids.shape, data.shape[1] * (8 // bits)))


def _contrib_schemas() -> None:
    """Declare the two com.microsoft ops to onnx (ONNX Runtime implements them but does not register
    their schemas with the onnx package), so the exporter can emit them; only what we use."""
    from onnx import defs

    param, attr, int_attr = defs.OpSchema.FormalParameter, defs.OpSchema.Attribute, defs.OpSchema.AttrType.INT
    floats, bytes_, ids = ["tensor(float)"], ["tensor(uint8)"], ["tensor(int64)", "tensor(int32)"]
    schemas = [
        defs.OpSchema("MatMulNBits", MS_DOMAIN, 1, inputs=[param("A", "T1"), param("B", "T2"), param("scales", "T1")],
                      outputs=[param("Y", "T1")], type_constraints=[("T1", floats, ""), ("T2", bytes_, "")],
                      attributes=[attr(a, int_attr) for a in ("K", "N", "bits", "block_size", "accuracy_level")]),
        defs.OpSchema("GatherBlockQuantized", MS_DOMAIN, 1,
                      inputs=[param("data", "T1"), param("indices", "Tind"), param("scales", "T2")],
                      outputs=[param("output", "T2")],
                      type_constraints=[("T1", bytes_, ""), ("T2", floats, ""), ("Tind", ids, "")],
                      attributes=[attr(a, int_attr) for a in ("bits", "block_size", "gather_axis", "quantize_axis")]),
    ]
    for schema in schemas:
        if not defs.has(schema.name, schema.domain):
            defs.register_schema(schema)


def _translations() -> dict:
    import onnxscript

    _contrib_schemas()
    ms = onnxscript.values.Opset(MS_DOMAIN, 1)

    def matmul(x, packed, scales, k: int, n: int, bits: int, block: int, accuracy: int):
        return ms.MatMulNBits(x, packed, scales, K=k, N=n, bits=bits, block_size=block, accuracy_level=accuracy)

    def gather(data, ids, scales, bits: int, block: int):
        return ms.GatherBlockQuantized(data, ids, scales, bits=bits, block_size=block, gather_axis=0, quantize_axis=1)

    return {torch.ops.cosmoe.matmul_nbits.default: matmul, torch.ops.cosmoe.gather_block_quantized.default: gather}


class NBitsLinear(nn.Module):
    """A linear layer on the bundle's integers, exported as one MatMulNBits (bias, if any, stays float)."""

    def __init__(self, w: QuantWeight, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        packed, scales, self.attrs = nbits_tensors(w)
        self.register_buffer("B", packed)
        self.register_buffer("scales", scales)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.attrs
        y = matmul_nbits(x, self.B, self.scales, a["K"], a["N"], a["bits"], a["block_size"],
                         a["accuracy_level"])  # [..., N]
        return y if self.bias is None else y + self.bias


class NBitsEmbedding(nn.Module):
    """An embedding table on the bundle's integers, exported as one GatherBlockQuantized: the codes
    in the bundle's own layout (int4: two per byte, even column low; int8: one per byte), offset
    binary, one fp32 scale per block of the row."""

    def __init__(self, w: QuantWeight) -> None:
        super().__init__()
        v, self.dim = w.codes.shape
        bits, self.block = w.encoding.bits, _matmul_nbits_block(w)
        blocks = -(-self.dim // self.block)
        u = (F.pad(w.codes, (0, -self.dim % (8 // bits))).to(torch.int16) + (1 << (bits - 1))).to(torch.uint8)
        if bits == 4:
            u = u[:, 0::2] | (u[:, 1::2] << 4)  # [V, ceil(D/2)]
        scales = w.scales if w.encoding.scheme == "int4" else w.scales.expand(v, blocks)  # [V, blocks]
        self.bits = bits
        self.register_buffer("data", u.contiguous())
        self.register_buffer("scales", scales.float().contiguous())

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        y = gather_block_quantized(self.data, ids, self.scales, self.bits, self.block)  # [..., Dp]
        return y if y.shape[-1] == self.dim else y[..., :self.dim]  # odd D at int4: drop the pad nibble


def use_bundle_integers(unit: nn.Module, tensors: dict[str, str], raw: dict[str, Weight]) -> bool:
    """Replace the unit's float linears and embeddings (attribute -> canonical tensor) by their
    integer versions where the bundle holds integers; True if any was replaced."""
    def make(old: nn.Module, w: QuantWeight) -> nn.Module:
        return NBitsEmbedding(w) if isinstance(old, nn.Embedding) else NBitsLinear(w, old.bias)
    return swap_quantized(unit, tensors, raw, make)


def _linear(nodes: list, inits: list, x: str, name: str, w: Weight, bias: torch.Tensor | None = None) -> str:
    out = name + ".out"
    if isinstance(w, QuantWeight):
        packed, scales, attrs = nbits_tensors(w)
        inits += [numpy_helper.from_array(packed.numpy(), name + ".B"),
                  numpy_helper.from_array(scales.numpy(), name + ".scales")]
        nodes.append(helper.make_node("MatMulNBits", [x, name + ".B", name + ".scales"], [out], name=name,
                                      domain=MS_DOMAIN, **attrs))
    else:
        inits.append(numpy_helper.from_array(np.ascontiguousarray(w.t().contiguous().numpy()), name + ".wT"))
        nodes.append(helper.make_node("MatMul", [x, name + ".wT"], [out], name=name))
    if bias is None:
        return out
    inits.append(numpy_helper.from_array(np.ascontiguousarray(bias.float().numpy()), name + ".b"))
    nodes.append(helper.make_node("Add", [out, name + ".b"], [name + ".biased"]))
    return name + ".biased"


def _swiglu(nodes: list, inits: list, g: str, u: str, config: CosmoeConfig) -> str:
    nodes += [helper.make_node("Sigmoid", [g], ["gate.sig"]), helper.make_node("Mul", [g, "gate.sig"], ["gate.silu"]),
              helper.make_node("Mul", ["gate.silu", u], ["hidden"])]
    return "hidden"


def _clamped_swiglu(nodes: list, inits: list, g: str, u: str, config: CosmoeConfig) -> str:
    """runtime_py.model.ClampedSwiGLU: (clip(up) + 1) * min(gate, limit) * sigmoid(alpha * min(gate, limit))."""
    consts = {"act.limit": config.swiglu_limit, "act.neg_limit": -config.swiglu_limit, "act.alpha": config.swiglu_alpha,
              "act.one": 1.0}
    inits += [numpy_helper.from_array(np.array(v, dtype=np.float32), k) for k, v in consts.items()]
    nodes += [helper.make_node("Min", [g, "act.limit"], ["gate.c"]),
              helper.make_node("Clip", [u, "act.neg_limit", "act.limit"], ["up.c"]),
              helper.make_node("Mul", ["gate.c", "act.alpha"], ["gate.a"]),
              helper.make_node("Sigmoid", ["gate.a"], ["gate.sig"]),
              helper.make_node("Mul", ["gate.c", "gate.sig"], ["glu"]),
              helper.make_node("Add", ["up.c", "act.one"], ["up.p1"]),
              helper.make_node("Mul", ["up.p1", "glu"], ["hidden"])]
    return "hidden"


# config.expert_act -> its nodes (runtime_py/model.py EXPERT_ACTS has the math): (nodes, inits, gate,
# up, config) -> the hidden activation's name.
ACTS: dict[str, Callable[[list, list, str, str, CosmoeConfig], str]] = {
    "silu": _swiglu, "clamped_swiglu": _clamped_swiglu}


def expert_model(config: CosmoeConfig, weights: dict[str, Weight]) -> onnx.ModelProto:
    """x [N, D] -> y [N, D]: down(act(gate(x), up(x))) with the biases where the config has them;
    WD matrices (Eq. 1) as R then L."""
    nodes: list = []
    inits: list = []

    def proj(x: str, m: str) -> str:
        if config.expert_kind == "wd":
            return _linear(nodes, inits, _linear(nodes, inits, x, f"{m}.right", weights[f"{m}.right"]),
                           f"{m}.left", weights[f"{m}.left"])
        return _linear(nodes, inits, x, m, weights[f"{m}.weight"], weights.get(f"{m}.bias"))

    g, u = proj("x", "gate"), proj("x", "up")
    y = proj(ACTS[config.expert_act](nodes, inits, g, u, config), "down")
    nodes.append(helper.make_node("Identity", [y], ["y"]))
    d = config.hidden_size
    graph = helper.make_graph(nodes, "expert", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", d])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", d])], inits)
    opsets = [helper.make_opsetid("", OPSET)]
    if any(n.domain == MS_DOMAIN for n in nodes):
        opsets.append(helper.make_opsetid(MS_DOMAIN, 1))
    model = helper.make_model(graph, opset_imports=opsets, producer_name="cosmoe-export")
    model.ir_version = 9
    onnx.checker.check_model(model)
    return model


def export_module(module: torch.nn.Module, inputs: tuple, dynamic_shapes, input_names: list[str],
                  output_names: list[str]) -> onnx.ModelProto:
    """torch.onnx (dynamo) export of one backbone unit; the custom integer ops become com.microsoft ops."""
    with torch.no_grad():
        prog = torch.onnx.export(module, inputs, dynamo=True, dynamic_shapes=dynamic_shapes, optimize=True,
                                 input_names=input_names, output_names=output_names, opset_version=OPSET,
                                 custom_translation_table=_translations(), verbose=False)
    model = prog.model_proto
    # Keep the bytes free of anything but the graph: per-node metadata holds stack traces with this
    # checkout's absolute paths (and is a third of a small layer's bytes); the graph's own metadata
    # (signature, T's range) stays.
    model.producer_version = ""
    for node in model.graph.node:
        del node.metadata_props[:]
    return model
