"""Calibration: run text through the float model one decoder layer at a time and hand out, per
layer, what quantization needs to know about that layer's inputs:

- for every backbone matrix asked for, GPTQ's Hessian H = sum_t x_t x_t^T of its inputs;
- for every routed expert, the calibration tokens routed to it (its input x_t and routing weight
  w_t), from which the stage derives each expert matrix's Hessian (cosmoe_export/quantization/gptq.py) and the
  expert's output error under a candidate encoding:

    error[l, e, q] = sum_t w_t^2 * ||E_e^q(x_t) - E_e(x_t)||^2  /  sum_t ||h_t||^2

  the error that rounding expert e through q alone adds to the layer's output h_t (the residual
  stream after the MoE block, which moves by exactly w_t * (E^q - E)(x_t)), relative to that
  output's energy: the next layer normalises h_t, so a relative change is what propagates. Hot
  experts collect it over more tokens, sensitive ones over larger per-token errors, so one number
  ranks both. Dividing by the MoE block's own output energy instead ranks every layer alike, and on
  tiny-moe that was wrong by 10x: int4 experts in layer 0 alone cost KL 0.0054, in layer 1, 2 or 3
  about 0.0005 each; relative to h_t the four layers' errors track those KLs within 2.5x.

Layer by layer (not one full forward with hooks) so that memory holds one layer's statistics and
the hidden states of the calibration tokens, whatever the model's depth; every layer sees the float
model's own inputs. Runs on one thread: sums reduce in an order that depends on the thread count,
and the bytes written from them must not.

Shape legend: B windows, T tokens per window, N tokens routed, D hidden, K active experts, E experts.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.func import functional_call

from cosmoe_export.reference import TorchRuntime
from runtime_py.model import Expert, LowRankLinear, rope_cos_sin
from runtime_py.routers import route

HEAD = "lm_head.weight"


@dataclass
class Routed:
    """The calibration tokens one expert saw."""

    x: torch.Tensor  # [N, D] its inputs
    weight: torch.Tensor  # [N] their routing weights


@dataclass
class LayerCalibration:
    layer: int
    hessians: dict[str, torch.Tensor]  # backbone matrix (canonical name) -> H [K, K] float64
    moe_inputs: torch.Tensor | None  # [N, D] the MoE block's input, every calibration token (None: no MoE block)
    # expert -> (its tokens' rows in moe_inputs [n_e], their routing weights [n_e]); never-selected experts absent
    routing: dict[int, tuple[torch.Tensor, torch.Tensor]]
    out_energy: float  # sum_t ||h_t||^2 of the layer's output (the residual stream after the MoE block)
    selections: list[int] = field(default_factory=list)  # [E] tokens routed to each expert

    @property
    def routed_experts(self) -> list[int]:
        return sorted(self.routing)

    def routed(self, e: int) -> Routed | None:
        """The tokens expert e saw, or None. Copied out of moe_inputs when asked: a layer holds its
        tokens once, not K times (top-8 of 16,384 tokens at hidden 2,048 would be 1 GB per layer)."""
        if e not in self.routing:
            return None
        assert self.moe_inputs is not None
        rows, weight = self.routing[e]
        return Routed(self.moe_inputs[rows], weight)


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def matrix_inputs(expert: Expert, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """x [N, D] -> the input of every weight matrix of the expert (parameter name -> [N, K_m])."""
    def inputs(lin: torch.nn.Module, inp: torch.Tensor, name: str) -> dict[str, torch.Tensor]:
        if isinstance(lin, LowRankLinear):  # CoSMoEs Eq. 1: y = L (R x)
            return {f"{name}.right": inp, f"{name}.left": F.linear(inp, lin.right)}
        return {f"{name}.weight": inp}

    mid = F.silu(expert.gate(x)) * expert.up(x)  # [N, F]
    return {**inputs(expert.gate, x, "gate"), **inputs(expert.up, x, "up"), **inputs(expert.down, mid, "down")}


def output_error(expert: Expert, params: dict[str, torch.Tensor], routed: Routed) -> float:
    """sum_t w_t^2 ||E'(x_t) - E(x_t)||^2 where E' is ``expert`` with ``params`` (parameter name -> tensor)."""
    ref = expert(routed.x)  # [N, D]
    got = functional_call(expert, params, (routed.x,))  # [N, D]
    return float((routed.weight[:, None] * (got - ref)).double().pow(2).sum())


@torch.inference_mode()
def walk(runtime: TorchRuntime, batches: Sequence[torch.Tensor], matrices: set[str]) -> Iterator[LayerCalibration]:
    """Yield one LayerCalibration per decoder layer, then (if ``lm_head.weight`` is in ``matrices``)
    a last one with ``layer = num_hidden_layers`` holding only the head's Hessian.

    ``matrices``: canonical names of the backbone matrices whose Hessians to collect. A runtime with
    ``stream_experts`` holds one expert at a time (each loaded once per batch), one without keeps
    every expert it has run."""
    model, cfg = runtime.model, runtime.config
    with one_thread():
        hidden = [model.embed(ids) for ids in batches]  # [b, T, D] each
        for index in range(cfg.num_hidden_layers):
            hidden, calibration = _run_layer(runtime, index, hidden, matrices)
            yield calibration
        if HEAD in matrices:
            h_head: torch.Tensor | int = 0
            for h in hidden:
                x = model.norm(h).reshape(-1, cfg.hidden_size).double()  # [b*T, D]
                h_head = h_head + x.t() @ x
            yield LayerCalibration(cfg.num_hidden_layers, {HEAD: h_head}, None, {}, 0.0)


def _run_layer(runtime: TorchRuntime, index: int, hidden: list[torch.Tensor],
               matrices: set[str]) -> tuple[list[torch.Tensor], LayerCalibration]:
    """Run decoder layer ``index`` on every batch's hidden states [b, T, D], watching its inputs."""
    model, cfg = runtime.model, runtime.config
    layer = model.layers[index]
    hessians: dict[str, torch.Tensor] = {}
    inputs: list[torch.Tensor] = []  # [N_b, D] per batch
    parts: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}

    # The last input's x^T x, kept with the input (so its id is not reused): q, k and v read one
    # tensor, and its product [K, K] costs 2 N K^2 flops (16,384 tokens at hidden 2,048: 137 GFLOP).
    last: list[tuple[torch.Tensor, torch.Tensor]] = []

    def capture(name: str):
        def hook(module, args) -> None:
            if not last or last[0][0] is not args[0]:
                x = args[0].reshape(-1, args[0].shape[-1]).double()  # [N, K]
                last[:] = [(args[0], x.t() @ x)]
            hessians[name] = hessians.get(name, 0) + last[0][1]
        return hook

    def moe_hook(module, args, output) -> None:
        x = args[0]  # [N, D]
        _, logits = output  # [N, E]
        weights, idx = route(logits, module.config, module.score_bias)  # [N, K] x2
        offset = sum(len(i) for i in inputs)
        inputs.append(x)
        for e in torch.unique(idx).tolist():
            tok, slot = torch.where(idx == e)  # [n_e] x2
            parts.setdefault(e, []).append((tok + offset, weights[tok, slot]))

    # A dense layer (the layer plan) routes nothing: only its MLP's inputs are watched.
    handles = [layer.routed.register_forward_hook(moe_hook)] if layer.routed is not None else []
    for name, module in layer.named_modules():
        full = f"layers.{index}.{name}.weight"
        if isinstance(module, torch.nn.Linear) and full in matrices:
            handles.append(module.register_forward_pre_hook(capture(full)))
    try:
        cos, sin = rope_cos_sin(model.inv_freq, torch.arange(hidden[0].shape[1]), hidden[0].dtype)  # [T, Dh] x2
        hidden = [layer(h, cos, sin, None, 0)[0] for h in hidden]
    finally:
        for h in handles:
            h.remove()
        last.clear()
    routing = {e: (torch.cat([p[0] for p in ps]), torch.cat([p[1] for p in ps])) for e, ps in sorted(parts.items())}
    selections = [len(routing[e][1]) if e in routing else 0 for e in range(cfg.num_experts)]
    energy = sum(float(h.double().pow(2).sum()) for h in hidden)  # [b, T, D] each
    moe_inputs = torch.cat(inputs) if inputs else None
    return hidden, LayerCalibration(index, hessians, moe_inputs, routing, energy, selections)
