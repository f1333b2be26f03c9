"""The lowering targets by name: how each writes a unit's program (ExecuTorch .pte, ONNX .onnx) and
labels its precision; and the whole-model targets (GGUF), one file for the bundle.
``cosmoe_export.lower.lower`` runs them over a bundle."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cosmoe_export.lower import executorch_target, gguf_target, onnx_target, pte_template, units
from runtime_py.bundle import Bundle
from runtime_py.config import CosmoeConfig


@dataclass(frozen=True)
class Target:
    name: str
    expert: Callable[[CosmoeConfig, dict[str, units.Weight]], bytes]
    # Backbone units: (module, example inputs, dynamic shapes, input names, output names) -> bytes.
    module: Callable[[torch.nn.Module, tuple, Any, list[str], list[str]], bytes]
    precision: Callable[[dict[str, units.Weight]], str]
    packages: tuple[str, ...]
    # Swap a backbone unit's linears (and embedding) for the bundle's integers (names: units.*_linears,
    # units.embed_tables); returns the unit's precision label.
    backbone_integers: Callable[[torch.nn.Module, dict[str, str], dict[str, units.Weight]], str]
    # A layer program from (config, layer, its weights relative to the layer, a direct export of such
    # weights -> (bytes, precision)); None: every layer exported directly.
    layer: Callable[[CosmoeConfig, int, dict[str, units.Weight], pte_template.LayerExport],
                    tuple[bytes, str]] | None = None


def _et_expert(config: CosmoeConfig, weights: dict[str, units.Weight]) -> bytes:
    # Experts of one layout share one graph: lowered once, then each expert's weights written into
    # it (milliseconds instead of seconds per expert), byte for byte what a direct export gives.
    return pte_template.expert_pte(config, weights)


def _et_module(module: torch.nn.Module, inputs: tuple, dynamic_shapes, names: list[str], outputs: list[str]) -> bytes:
    return executorch_target.to_pte(module, inputs, dynamic_shapes)


def _onnx_expert(config: CosmoeConfig, weights: dict[str, units.Weight]) -> bytes:
    return onnx_target.expert_model(config, weights).SerializeToString()


def _onnx_module(module: torch.nn.Module, inputs: tuple, dynamic_shapes, names: list[str],
                 outputs: list[str]) -> bytes:
    return onnx_target.export_module(module, inputs, dynamic_shapes, names, outputs).SerializeToString()


def _et_precision(weights: dict[str, units.Weight]) -> str:
    labels = {"fp32": "fp32", "int4": "8da4w", "int8": "8da8w", "int4+int8": "8da4w+8da8w"}
    return labels[units.precision_label(weights)]


def _onnx_precision(weights: dict[str, units.Weight]) -> str:
    """matmulnbits-SCHEMES-accL: the integer schemes and MatMulNBits' accuracy_level (onnx_target)."""
    label = units.precision_label(weights)
    if label == "fp32":
        return label
    levels = sorted({onnx_target.ACCURACY_LEVEL[s] for s in label.split("+")})
    return f"matmulnbits-{label}-acc" + "+".join(map(str, levels))


def _swapped(unit: torch.nn.Module, tensors: dict[str, str], raw: dict[str, units.Weight]) -> dict[str, units.Weight]:
    """The bundle weights a unit now holds as integers (the modules a target replaced), for its label."""
    still_float = (torch.nn.Linear, torch.nn.Embedding)
    return {name: raw[name] for attr, name in tensors.items()
            if isinstance(raw.get(name), units.QuantWeight) and not isinstance(unit.get_submodule(attr), still_float)}


def _et_backbone_integers(unit: torch.nn.Module, tensors: dict[str, str], raw: dict[str, units.Weight]) -> str:
    executorch_target.use_bundle_integers(unit, tensors, raw)
    return _et_precision(_swapped(unit, tensors, raw))


def _onnx_backbone_integers(unit: torch.nn.Module, tensors: dict[str, str], raw: dict[str, units.Weight]) -> str:
    onnx_target.use_bundle_integers(unit, tensors, raw)
    weights = _swapped(unit, tensors, raw)
    if isinstance(unit, units.EmbedUnit) and weights:  # a gather, not a matmul
        return "gatherblockquantized-" + units.precision_label(weights)
    return _onnx_precision(weights)


TARGETS: dict[str, Target] = {
    # ExecuTorch layers of one kind and layout from one template (seconds of export each otherwise).
    "executorch": Target("executorch", _et_expert, _et_module, _et_precision, ("executorch", "torchao"),
                         _et_backbone_integers, pte_template.layer_pte),
    "onnx": Target("onnx", _onnx_expert, _onnx_module, _onnx_precision, ("onnx", "onnxscript"),
                   _onnx_backbone_integers),
}


@dataclass(frozen=True)
class ModelTarget:
    """A target that writes the whole bundle as one program file."""

    name: str
    write: Callable[[Bundle, Path], list[dict]]  # (bundle, the target's directory) -> its manifest entries
    packages: tuple[str, ...]


# Asked for by name: `lower --target all` is the split targets above (a bundle's family may have no GGUF form).
MODEL_TARGETS: dict[str, ModelTarget] = {"gguf": ModelTarget("gguf", gguf_target.lower, ("gguf",))}
