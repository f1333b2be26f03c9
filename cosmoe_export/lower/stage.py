"""``lower``: add ExecuTorch and ONNX programs to a bundle, one per unit (docs/LOWERING.md).

Programs are written into a temporary directory inside the bundle and renamed into place; the
manifest is then replaced atomically (write + rename). A run killed in between leaves at worst an
unlisted directory that the next run replaces: readers only open files the manifest lists.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from cosmoe_export.atomic import atomic_dir
from cosmoe_export.errors import CosmoeError
from cosmoe_export.lower import executorch_target, onnx_target, pte_template, units
from cosmoe_export.manifest_writer import ManifestWriter
from cosmoe_export.versions import tool_versions
from runtime_py import format as fmt
from runtime_py.bundle import Bundle, sha256_file
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
    label = units.precision_label(weights)
    return "fp32" if label == "fp32" else "matmulnbits-" + label


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
    "executorch": Target("executorch", _et_expert, _et_module, _et_precision, ("executorch", "torchao"),
                         _et_backbone_integers),
    "onnx": Target("onnx", _onnx_expert, _onnx_module, _onnx_precision, ("onnx", "onnxscript"),
                   _onnx_backbone_integers),
}


def lower(*, bundle_path: Path, targets: list[str], progress: bool = True) -> dict[str, Any]:
    """Lower every unit of the bundle for each target; returns timings per target."""
    unknown = [t for t in targets if t not in TARGETS]
    if unknown:
        raise CosmoeError(f"unknown target(s) {unknown}; choose from {sorted(TARGETS)} or 'all'")
    bundle = Bundle.open(bundle_path)
    cfg = bundle.config
    backbone = units.backbone_weights(bundle)  # raw: QuantWeight where the bundle holds integers
    timings: dict[str, Any] = {}
    new_entries: list[dict] = []
    for name in targets:
        target = TARGETS[name]
        # The target's directory is replaced as a whole, like any output: written beside, renamed in.
        with atomic_dir(bundle.root / name, force=True) as tmp:
            entries, timings[name] = _lower_target(bundle, cfg, backbone, target, tmp, progress)
        new_entries.extend(entries)
    _update_manifest(bundle, targets, new_entries)
    return timings


def _lower_target(bundle: Bundle, cfg: CosmoeConfig, backbone: dict[str, units.Weight], target: Target,
                  tmp: Path, progress: bool) -> tuple[list[dict], dict[str, float]]:
    entries: list[dict] = []
    t_backbone = time.perf_counter()

    def write(rel: str, data: bytes, unit: str, precision: str, max_tokens: int, **fields) -> None:
        path = tmp / rel.split("/", 1)[1]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        entries.append({"path": rel, "role": "program", "target": target.name, "unit": unit, **fields,
                        "precision": precision, "max_tokens": max_tokens, "bytes": len(data),
                        "sha256": sha256_file(path)})

    floats = units.dequantized(backbone)
    # Backbone programs take T tokens per call, 1 <= T <= p (one program for decode and prefill).
    p = units.max_tokens(cfg)
    t = units.token_dim(cfg)
    d = cfg.hidden_size

    embed = units.build_embed(cfg, floats)
    precision = target.backbone_integers(embed, units.embed_tables(cfg), backbone)
    data = target.module(embed, (torch.zeros(1, 2, dtype=torch.long),), ({1: t},), ["ids"], ["x"])
    write(fmt.program_path(target.name, "embed"), data, "embed", precision, p)
    for layer in range(cfg.num_hidden_layers):
        module = units.build_layer(cfg, floats, layer)
        precision = target.backbone_integers(module, units.layer_linears(cfg, layer), backbone)
        data = target.module(module, units.layer_example_inputs(cfg), units.layer_dynamic_shapes(cfg),
                             units.LAYER_INPUTS, units.LAYER_OUTPUTS)
        write(fmt.program_path(target.name, "layer", layer), data, "layer", precision, p, layer=layer, cache="prefix")
    head = units.build_head(cfg, floats)
    precision = target.backbone_integers(head, units.head_linears(cfg), backbone)
    data = target.module(head, (torch.zeros(1, 2, d),), ({1: t},), ["x"], ["logits"])
    write(fmt.program_path(target.name, "head"), data, "head", precision, p)
    t_experts = time.perf_counter()
    bar = tqdm(total=cfg.num_hidden_layers * cfg.num_experts, desc=f"lower {target.name}", unit="expert",
               disable=not progress or None)
    for layer in range(cfg.num_hidden_layers):
        for e in range(cfg.num_experts):
            weights = units.expert_weights(bundle, layer, e)
            write(fmt.program_path(target.name, "expert", layer, e), target.expert(cfg, weights), "expert",
                  target.precision(weights), p, layer=layer, expert=e)
            bar.update(1)
    bar.close()
    done = time.perf_counter()
    n = cfg.num_hidden_layers * cfg.num_experts
    return entries, {"backbone_s": t_experts - t_backbone, "experts_s": done - t_experts,
                     "per_expert_s": (done - t_experts) / n}


def _update_manifest(bundle: Bundle, targets: list[str], entries: list[dict]) -> None:
    """The bundle's manifest with these targets' programs replaced by ``entries``."""
    manifest = ManifestWriter.updating(
        bundle.manifest, keep=lambda f: not (f["role"] == "program" and f.get("target") in targets))
    manifest.add_files(entries)
    for name in targets:
        manifest.add_tools(tool_versions(*TARGETS[name].packages))
    manifest.write(bundle.root, where=f"lower {bundle.root}: the manifest it wrote")
