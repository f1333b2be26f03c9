"""ONNX graphs (ONNX Runtime) for each unit.

ONNX Runtime binds initializers when a session is created, so every (layer, expert) is its own
small model whose weights are initializers. Expert graphs are written directly with
``onnx.helper`` (three matmuls and a SiLU need no exporter, cost nothing per expert, and give the
same bytes every time); quantized weights become ``com.microsoft::MatMulNBits`` whose packed
``B`` is the bundle's own int4 nibbles or int8 codes (offset binary, default zero point), and
whose scales are the bundle's bf16 scales converted exactly to fp32. Backbone units (layer,
head, embed) are exported with ``torch.onnx.export``; their weights
are not substituted: the exporter folds and deduplicates initializers (two all-ones norms become
one), so each layer is exported on its own (about 2 s each, measured in docs/LOWERING.md).
"""

from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from cosmoe_export.lower.units import QuantWeight, Weight
from runtime_py.config import CosmoeConfig

OPSET = 18
MS_DOMAIN = "com.microsoft"


def _matmul_nbits_block(k: int, w: QuantWeight) -> int:
    """MatMulNBits needs a power-of-two block of at least 16. int4 groups are 32/64/128 already;
    per-channel int8 (one scale per row) is expressed with the scale repeated over 32-wide blocks,
    which is the same function."""
    return w.encoding.group_size if w.encoding.scheme == "int4" else 32


def _nbits_initializers(name: str, w: QuantWeight) -> tuple[list[onnx.TensorProto], dict]:
    n, k = w.codes.shape
    block = _matmul_nbits_block(k, w)
    blocks = -(-k // block)
    bits = 4 if w.encoding.scheme == "int4" else 8
    codes = torch.nn.functional.pad(w.codes, (0, blocks * block - k)).to(torch.int16)  # [N, Kb], zero codes
    u = (codes + (1 << (bits - 1))).to(torch.uint8)  # offset binary: ORT's default zero point
    if bits == 4:
        u = u[:, 0::2] | (u[:, 1::2] << 4)  # [N, Kb/2], even column in the low nibble
    packed = u.reshape(n, blocks, -1).numpy()  # [N, blocks, blob]
    if w.encoding.scheme == "int4":
        scales = w.scales  # [N, blocks]
    else:
        scales = w.scales.expand(n, blocks)  # one per-channel scale repeated over the blocks
    inits = [numpy_helper.from_array(np.ascontiguousarray(packed), name + ".B"),
             numpy_helper.from_array(np.ascontiguousarray(scales.reshape(-1).numpy().astype(np.float32)),
                                     name + ".scales")]
    return inits, {"K": k, "N": n, "bits": bits, "block_size": block}


def _linear(nodes: list, inits: list, x: str, name: str, w: Weight) -> str:
    out = name + ".out"
    if isinstance(w, QuantWeight):
        new, attrs = _nbits_initializers(name, w)
        inits.extend(new)
        nodes.append(helper.make_node("MatMulNBits", [x, name + ".B", name + ".scales"], [out], name=name,
                                      domain=MS_DOMAIN, **attrs))
    else:
        inits.append(numpy_helper.from_array(np.ascontiguousarray(w.t().contiguous().numpy()), name + ".wT"))
        nodes.append(helper.make_node("MatMul", [x, name + ".wT"], [out], name=name))
    return out


def expert_model(config: CosmoeConfig, weights: dict[str, Weight]) -> onnx.ModelProto:
    """x [N, D] -> y [N, D]: down(silu(gate(x)) * up(x)); WD matrices (Eq. 1) as R then L."""
    nodes: list = []
    inits: list = []

    def proj(x: str, m: str) -> str:
        if config.expert_kind == "wd":
            return _linear(nodes, inits, _linear(nodes, inits, x, f"{m}.right", weights[f"{m}.right"]),
                           f"{m}.left", weights[f"{m}.left"])
        return _linear(nodes, inits, x, m, weights[f"{m}.weight"])

    g, u = proj("x", "gate"), proj("x", "up")
    nodes += [helper.make_node("Sigmoid", [g], ["gate.sig"]), helper.make_node("Mul", [g, "gate.sig"], ["gate.silu"]),
              helper.make_node("Mul", ["gate.silu", u], ["hidden"])]
    y = proj("hidden", "down")
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
    """torch.onnx (dynamo) export of one backbone unit."""
    with torch.no_grad():
        prog = torch.onnx.export(module, inputs, dynamo=True, dynamic_shapes=dynamic_shapes, optimize=True,
                                 input_names=input_names, output_names=output_names, opset_version=OPSET,
                                 verbose=False)
    model = prog.model_proto
    model.producer_version = ""  # keep the bytes free of anything but the graph
    return model
