"""``inspect``: sizes of a checkpoint, preset or bundle, from its config alone.

The memory table follows the paper's Table 4: "resident" holds every expert, "offloaded" holds
the backbone plus the top-k experts of every layer (what a device must keep for one token).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cosmoe_export.importers.presets import PAPER_PARAMS
from cosmoe_export.importers.sources import open_source
from runtime_py import format as fmt
from runtime_py.bundle import Bundle
from runtime_py.config import CosmoeConfig, param_counts

# Bytes per parameter. int8: one byte, per-output-channel scales are < 0.1 % and ignored.
# int4: half a byte plus one bf16 scale per group of 32 weights (2/32 byte).
BYTES_PER_PARAM = {"fp32": 4.0, "bf16": 2.0, "int8": 1.0, "int4": 0.5 + 2 / 32}
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def inspect(path: str, *, allow_pickle: bool = False) -> dict[str, Any]:
    if (Path(path) / fmt.MANIFEST_NAME).is_file():
        bundle = Bundle.open(path)
        report = describe(bundle.config, kind="bundle", architecture=bundle.manifest["provenance"]["source"].get(
            "architecture", "CosmoeForCausalLM"))
        experts = [f.bytes for f in bundle.files if f.role == "expert"]
        report["backbone_bytes"] = bundle.backbone.bytes
        report["bytes_per_expert"] = max(experts)
        report["dtype"] = bundle.backbone.dtype  # of the tensors kept in float
        if "source_precision" in bundle.manifest["provenance"]["source"]:
            report["source_precision"] = bundle.manifest["provenance"]["source"]["source_precision"]
        if bundle.quantization is not None:  # quantized bundles: what the bytes above hold
            report["quantization"] = {k: bundle.quantization[k]
                                      for k in ("experts", "backbone", "group_size", "rounding")}
        report["programs"] = _programs(bundle)
        return report
    source = open_source(path, allow_pickle=allow_pickle, hash_files=False)
    arch = source.adapter.architecture if source.adapter else "CosmoeForCausalLM"
    kind = "preset" if source.provenance["kind"] == "preset" else "checkpoint"
    report = describe(source.config, kind=kind, architecture=arch)
    dtype = str(next(iter(source.plan.values())).dtype).removeprefix("torch.")
    counts = param_counts(source.config)
    report["dtype"] = dtype
    if "source_precision" in source.provenance:
        report["source_precision"] = source.provenance["source_precision"]
    report["backbone_bytes"] = counts.backbone * DTYPE_BYTES[dtype]
    report["bytes_per_expert"] = counts.per_expert * DTYPE_BYTES[dtype]
    if path in PAPER_PARAMS:
        active, total = PAPER_PARAMS[path]
        report["paper"] = {"params_active": active, "params_total": total,
                           "active_diff_pct": round(100 * (counts.active / active - 1), 2),
                           "total_diff_pct": round(100 * (counts.total / total - 1), 2)}
    return report


def _programs(bundle: Bundle) -> dict[str, Any]:
    """The lowered targets: files, bytes and precisions; a GGUF's architecture, tensor types and every
    tensor it could not hold in the bundle's form (lower/gguf_target/)."""
    out: dict[str, Any] = {}
    for f in bundle.files:
        if f.role != "program":
            continue
        t = out.setdefault(f.target, {"files": 0, "bytes": 0, "precisions": []})
        t["files"] += 1
        t["bytes"] += f.bytes
        if f.precision not in t["precisions"]:
            t["precisions"].append(f.precision)
        if f.gguf is not None:
            t["gguf"] = f.gguf
    return out


def describe(config: CosmoeConfig, *, kind: str, architecture: str) -> dict[str, Any]:
    c = param_counts(config)
    offloaded = c.backbone + c.per_expert * c.num_layers * c.top_k
    return {
        "kind": kind,
        "architecture": architecture,
        "num_layers": config.num_hidden_layers,
        "num_experts": config.num_experts,
        "top_k": config.num_experts_per_tok,
        "expert_kind": config.expert_kind,
        "hidden_size": config.hidden_size,
        "vocab_size": config.vocab_size,
        "params_total": c.total,
        "params_active": c.active,
        "params_backbone": c.backbone,
        "params_per_expert": c.per_expert,
        "memory_bytes": {name: {"resident": round(c.total * bpp), "offloaded": round(offloaded * bpp)}
                         for name, bpp in BYTES_PER_PARAM.items()},
    }
