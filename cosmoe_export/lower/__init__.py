"""``lower``: add ExecuTorch and ONNX programs to a bundle, kept split: one program per backbone piece
and one per (layer, expert), so a device loads and drops experts one by one (docs/LOWERING.md).

Programs are written into a temporary directory inside the bundle and renamed into place; the
manifest is then replaced atomically (write + rename). A run killed in between leaves at worst an
unlisted directory that the next run replaces: readers only open files the manifest lists.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from cosmoe_export.atomic import atomic_dir
from cosmoe_export.errors import CosmoeError
from cosmoe_export.lower import units
from cosmoe_export.lower.targets import TARGETS, Target
from cosmoe_export.manifest_writer import ManifestWriter
from cosmoe_export.versions import tool_versions
from runtime_py import format as fmt
from runtime_py.bundle import Bundle, sha256_file
from runtime_py.config import CosmoeConfig


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
