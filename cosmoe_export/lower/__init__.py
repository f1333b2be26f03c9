"""``lower``: add ExecuTorch and ONNX programs to a bundle, kept split: one program per backbone piece
and one per (layer, expert), so a device loads and drops experts one by one (docs/LOWERING.md); or
a whole-model file (GGUF, for llama.cpp: lower/gguf_target.py).

Programs are written into a temporary directory inside the bundle and renamed into place; the
manifest is then replaced atomically (write + rename). A run killed in between leaves at worst an
unlisted directory that the next run replaces: readers only open files the manifest lists.

Expert programs are per-expert tasks on an executor (cosmoe_export/executors.py: ``--jobs``,
``--executor ray``): a task reads its expert from the bundle path and returns the program's bytes
and sha256; this process writes them and their manifest entries in (layer, expert) order. Backbone
units (one per layer) are exported here.
"""

from __future__ import annotations

import functools
import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from cosmoe_export.atomic import atomic_dir
from cosmoe_export.errors import CosmoeError
from cosmoe_export.executors import Executor, ExecutorConfig, open_executor
from cosmoe_export.lower import units
from cosmoe_export.lower.targets import MODEL_TARGETS, TARGETS, Target
from cosmoe_export.manifest_writer import ManifestWriter
from cosmoe_export.versions import tool_versions
from runtime_py import format as fmt
from runtime_py.bundle import Bundle
from runtime_py.config import CosmoeConfig


def lower(*, bundle_path: Path, targets: list[str], progress: bool = True,
          executor: ExecutorConfig | None = None) -> dict[str, Any]:
    """Lower every unit of the bundle for each target; returns timings per target. ``executor``:
    where the expert programs are written (default: local, every core for large bundles)."""
    unknown = [t for t in targets if t not in TARGETS and t not in MODEL_TARGETS]
    if unknown:
        raise CosmoeError(f"unknown target(s) {unknown}; choose from {sorted([*TARGETS, *MODEL_TARGETS])} or 'all'")
    bundle = Bundle.open(bundle_path)
    cfg = bundle.config
    backbone = units.backbone_weights(bundle)  # raw: QuantWeight where the bundle holds integers
    timings: dict[str, Any] = {}
    new_entries: list[dict] = []
    manifest_sha = hashlib.sha256((bundle.root / fmt.MANIFEST_NAME).read_bytes()).hexdigest()
    try:
        with open_executor(executor, tasks=len(cfg.moe_layers) * cfg.num_experts) as ex:
            for name in targets:
                if name in MODEL_TARGETS:
                    t0 = time.perf_counter()
                    with atomic_dir(bundle.root / name, force=True) as tmp:
                        new_entries.extend(MODEL_TARGETS[name].write(bundle, tmp))
                    timings[name] = {"model_s": time.perf_counter() - t0}
                    continue
                target = TARGETS[name]
                job = _Job(str(bundle.root.resolve()), manifest_sha, name)
                # The target's directory is replaced as a whole, like any output: written beside, renamed in.
                with atomic_dir(bundle.root / name, force=True) as tmp:
                    entries, timings[name] = _lower_target(bundle, cfg, backbone, target, tmp, progress, ex, job)
                new_entries.extend(entries)
    finally:
        _bundle.cache_clear()  # the in-process task's bundle (a pool's workers have ended)
    _update_manifest(bundle, targets, new_entries)
    return timings


def _lower_target(bundle: Bundle, cfg: CosmoeConfig, backbone: dict[str, units.Weight], target: Target,
                  tmp: Path, progress: bool, ex: Executor, job: _Job) -> tuple[list[dict], dict[str, float]]:
    entries: list[dict] = []
    t_backbone = time.perf_counter()

    def write(rel: str, data: bytes, unit: str, precision: str, max_tokens: int, sha256: str | None = None,
              **fields) -> None:
        path = tmp / rel.split("/", 1)[1]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        entries.append({"path": rel, "role": "program", "target": target.name, "unit": unit, **fields,
                        "precision": precision, "max_tokens": max_tokens, "bytes": len(data),
                        "sha256": sha256 or hashlib.sha256(data).hexdigest()})

    # The experts' tasks go first: the workers write expert programs while this process exports
    # the backbone's units.
    experts = ex.map(_expert_task, [(job, layer, e) for layer in cfg.moe_layers
                                    for e in range(cfg.num_experts)])

    floats = units.dequantized(backbone)
    # Backbone programs take T tokens per call, 1 <= T <= p (one program for decode and prefill).
    p = units.max_tokens(cfg)
    t = units.token_dim(cfg)
    d = cfg.hidden_size

    # The backbone's units are exported one by one in this process (seconds each for ExecuTorch):
    # a bar of their own, so a long build shows where it is before the experts' bar starts.
    units_bar = tqdm(total=cfg.num_hidden_layers + 2, desc=f"lower {target.name} backbone", unit="unit",
                     disable=not progress or None)
    embed = units.build_embed(cfg, floats)
    precision = target.backbone_integers(embed, units.embed_tables(cfg), backbone)
    data = target.module(embed, (torch.zeros(1, 2, dtype=torch.long),), ({1: t},), ["ids"], ["x"])
    write(fmt.program_path(target.name, "embed"), data, "embed", precision, p)
    units_bar.update(1)
    for layer in range(cfg.num_hidden_layers):
        raw = layer_weights(cfg, backbone, layer)
        export = layer_export(target, cfg, layer)
        data, precision = target.layer(cfg, layer, raw, export) if target.layer is not None else export(raw)
        write(fmt.program_path(target.name, "layer", layer), data, "layer", precision, p, layer=layer, cache="prefix")
        units_bar.update(1)
    head = units.build_head(cfg, floats)
    precision = target.backbone_integers(head, units.head_linears(cfg), backbone)
    data = target.module(head, (torch.zeros(1, 2, d),), ({1: t},), ["x"], ["logits"])
    write(fmt.program_path(target.name, "head"), data, "head", precision, p)
    units_bar.update(1)
    units_bar.close()
    t_experts = time.perf_counter()
    bar = tqdm(total=len(cfg.moe_layers) * cfg.num_experts, desc=f"lower {target.name}", unit="expert",
               disable=not progress or None)
    for (layer, e), (data, sha256, precision) in zip(
            ((layer, e) for layer in cfg.moe_layers for e in range(cfg.num_experts)), experts,
            strict=True):
        write(fmt.program_path(target.name, "expert", layer, e), data, "expert", precision, p, sha256,
              layer=layer, expert=e)
        bar.update(1)
    bar.close()
    done = time.perf_counter()
    n = len(cfg.moe_layers) * cfg.num_experts
    return entries, {"backbone_s": t_experts - t_backbone, "experts_s": done - t_experts,
                     "per_expert_s": (done - t_experts) / n}


def layer_weights(cfg: CosmoeConfig, backbone: dict[str, units.Weight], layer: int) -> dict[str, units.Weight]:
    """The tensors layer ``layer``'s program holds, names relative to the layer (the score bias is the
    runtime's: it routes)."""
    pre = f"layers.{layer}."
    return {k.removeprefix(pre): w for k, w in backbone.items() if k.startswith(pre) and k != pre + "moe.score_bias"}


def layer_export(target: Target, cfg: CosmoeConfig,
                 layer: int) -> Callable[[dict[str, units.Weight]], tuple[bytes, str]]:
    """A direct export of layer ``layer``'s program from such weights -> (bytes, precision label)."""
    pre = f"layers.{layer}."

    def export(weights: dict[str, units.Weight]) -> tuple[bytes, str]:
        full = {pre + k: w for k, w in weights.items()}
        module = units.build_layer(cfg, units.dequantized(full), layer)
        precision = target.backbone_integers(module, units.layer_linears(cfg, layer), full)
        data = target.module(module, units.layer_example_inputs(cfg, layer=layer),
                             units.layer_dynamic_shapes(cfg, layer), units.LAYER_INPUTS, units.LAYER_OUTPUTS)
        return data, precision
    return export


@dataclass(frozen=True)
class _Job:
    """What every expert task of one target shares."""

    bundle: str  # the bundle's directory (on a cluster: a path every node sees)
    manifest_sha256: str  # the bundle as this run opened it: a changed one is refused
    target: str  # TARGETS key


@functools.lru_cache(maxsize=1)
def _bundle(path: str, manifest_sha256: str) -> Bundle:
    bundle = Bundle.open(Path(path))
    if hashlib.sha256((bundle.root / fmt.MANIFEST_NAME).read_bytes()).hexdigest() != manifest_sha256:
        raise CosmoeError(f"{bundle.root}: its manifest changed while lowering it; lower again")
    return bundle


def _expert_task(job: _Job, layer: int, e: int) -> tuple[bytes, str, str]:
    """Expert (layer, e)'s program for the job's target: (bytes, sha256, precision label)."""
    bundle = _bundle(job.bundle, job.manifest_sha256)
    target = TARGETS[job.target]
    weights = units.expert_weights(bundle, layer, e)
    data = target.expert(bundle.config, weights)
    return data, hashlib.sha256(data).hexdigest(), target.precision(weights)


def _update_manifest(bundle: Bundle, targets: list[str], entries: list[dict]) -> None:
    """The bundle's manifest with these targets' programs replaced by ``entries``."""
    manifest = ManifestWriter.updating(
        bundle.manifest, keep=lambda f: not (f["role"] == "program" and f.get("target") in targets))
    manifest.add_files(entries)
    for name in targets:
        manifest.add_tools(tool_versions(*(TARGETS.get(name) or MODEL_TARGETS[name]).packages))
    manifest.write(bundle.root, where=f"lower {bundle.root}: the manifest it wrote")
