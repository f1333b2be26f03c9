"""ExecuTorch programs (XNNPACK) for each unit.

XNNPACK packs a method's weights when it loads and refuses quantized weights as inputs, so each
(layer, expert) is its own small program with its weights inside: loading one expert is loading
one ``.pte``. Quantized experts use torchao's Int8DynamicActivationIntxWeightConfig ("8da4w" /
"8da8w"); its codes and scales are overwritten with the bundle's own, so the program computes
the bundle's weights exactly, with XNNPACK's dynamic int8 activation quantization on top (a
re-quantization the backend forces: measured in docs/LOWERING.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cosmoe_export.lower.units import QuantWeight, Weight, swap_quantized
from runtime_py.config import CosmoeConfig
from runtime_py.model import EXPERT_ACTS


def backend_config():
    """How every program is serialized. Inputs stay outside the memory plan: the runtimes' own buffers
    (the KV cache above all) are read where they lie instead of being copied into planned ones on every
    call (Method::set_input shares an unplanned input's data), and the plan shrinks by the inputs."""
    from executorch.exir import ExecutorchBackendConfig
    from executorch.exir.passes import MemoryPlanningPass
    return ExecutorchBackendConfig(memory_planning_pass=MemoryPlanningPass(alloc_graph_input=False))


def to_pte(module: nn.Module, inputs: tuple, dynamic_shapes=None) -> bytes:
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    with torch.no_grad():
        ep = torch.export.export(module, inputs, dynamic_shapes=dynamic_shapes, strict=False)
    edge = to_edge_transform_and_lower(ep, partitioner=[XnnpackPartitioner()])
    return bytes(edge.to_executorch(backend_config()).buffer)


class QLinear(nn.Module):
    """A linear layer holding a bundle's integer weights through torchao's 8da{4,8}w tensor.

    XNNPACK needs K to be a multiple of the group size; when it is not (hidden 432 at G = 32), the
    codes are padded with zeros (exactly zero weights) and the input with zeros to match."""

    def __init__(self, w: QuantWeight, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        from torchao.quantization import Int8DynamicActivationIntxWeightConfig, quantize_
        from torchao.quantization.granularity import PerAxis, PerGroup

        n, k = w.codes.shape
        g = w.encoding.group_size
        per_channel = w.encoding.scheme == "int8"
        kp = k if per_channel else -(-k // g) * g
        self.pad = kp - k
        self.lin = nn.Linear(kp, n, bias=bias is not None)
        if bias is not None:
            with torch.no_grad():
                self.lin.bias.copy_(bias)  # biases stay float, as torchao keeps them
        config = Int8DynamicActivationIntxWeightConfig(
            weight_dtype=torch.int8 if per_channel else torch.int4,
            weight_granularity=PerAxis(0) if per_channel else PerGroup(g))
        quantize_(self, config)
        qw = self.lin.weight
        with torch.no_grad():
            qw.qdata.copy_(F.pad(w.codes, (0, self.pad)))  # [N, Kp] int8 codes, zero padding
            qw.scale.copy_(w.scales.reshape(qw.scale.shape))  # [N, Kp/G] fp32, exact from bf16
            qw.zero_point.zero_()  # symmetric

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(F.pad(x, (0, self.pad)) if self.pad else x)


def linear(w: Weight, bias: torch.Tensor | None = None) -> nn.Module:
    if isinstance(w, QuantWeight):
        return QLinear(w, bias)
    lin = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None)
    with torch.no_grad():
        lin.weight.copy_(w)
        if bias is not None:
            lin.bias.copy_(bias)
    return lin


class ExpertProgram(nn.Module):
    """A routed expert from per-matrix linear layers (biases where the config has them) and the
    config's activation; WD matrices (Eq. 1) stay two matmuls, R then L."""

    def __init__(self, config: CosmoeConfig, weights: dict[str, Weight]) -> None:
        super().__init__()
        self.wd = config.expert_kind == "wd"
        mats = {}
        for m in ("gate", "up", "down"):
            if self.wd:
                mats[m] = nn.Sequential(linear(weights[f"{m}.right"]), linear(weights[f"{m}.left"]))
            else:
                mats[m] = linear(weights[f"{m}.weight"], weights.get(f"{m}.bias"))
        self.gate, self.up, self.down = mats["gate"], mats["up"], mats["down"]
        self.act = EXPERT_ACTS[config.expert_act](config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.act(self.gate(x), self.up(x)))  # [N, D]


def use_bundle_integers(unit: nn.Module, linears: dict[str, str], raw: dict[str, Weight]) -> bool:
    """Replace the unit's float linears by QLinear where the bundle holds integers; True if any.

    Embeddings stay float: a gather is not a linear and XNNPACK does not take it; ExecuTorch's
    quantized embedding ops (``quantized_decomposed::embedding_{byte,4bit}``) live in its separate
    quantized-kernels library, which a runtime has to link (docs/LOWERING.md)."""
    def make(old: nn.Module, w: QuantWeight) -> nn.Module | None:
        if isinstance(old, nn.Embedding):
            return None
        return QLinear(w, old.bias.detach() if old.bias is not None else None)
    return swap_quantized(unit, linears, raw, make)
