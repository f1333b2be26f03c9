"""``split``: a source (checkpoint or preset) -> a bundle (backbone + one file per expert).

Streams tensor by tensor: every file (each expert's, then the backbone with the streaming writer)
is written one tensor at a time, and the source's memory maps are dropped after each tensor, so
peak memory is the largest tensor plus a constant (bench/split_rss.py measures it).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from cosmoe_export.atomic import atomic_dir
from cosmoe_export.errors import CheckpointError
from cosmoe_export.importers.sources import PlannedTensor, Source
from cosmoe_export.manifest_writer import ManifestWriter
from cosmoe_export.st_writer import SafetensorsWriter
from cosmoe_export.versions import tool_versions
from runtime_py import format as fmt
from runtime_py.bundle import sha256_file
from runtime_py.config import expert_of


@dataclass(frozen=True)
class SplitResult:
    out: Path
    files: int
    bytes: int


def split(*, source: Source, out: Path, dtype: str | None = None, force: bool = False,
          progress: bool = True) -> SplitResult:
    """Write ``source`` as a bundle at ``out`` (atomically). ``dtype``: float32 | bfloat16 | float16,
    or None to keep the source's (the embedding's) dtype."""
    first = next(iter(source.plan.values()))
    target = fmt.dtype(dtype).torch if dtype else first.dtype
    cfg = source.config
    experts: dict[tuple[int, int], list[PlannedTensor]] = {}
    backbone: list[PlannedTensor] = []
    for t in source.plan.values():
        loc = expert_of(t.name)
        (experts.setdefault(loc, []) if loc else backbone).append(t)
    with atomic_dir(out, force=force) as tmp:
        entries = []
        bar = tqdm(total=cfg.num_hidden_layers + 1, desc="split", unit="layer", disable=not progress or None)
        for layer in range(cfg.num_hidden_layers):
            for e in range(cfg.num_experts if cfg.ffn_kind(layer).routed else 0):  # a dense layer has none
                rel = fmt.expert_path(layer, e)
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                entry = _write_file(tmp, rel, experts[(layer, e)], target, source)
                entries.append({**entry, "role": "expert", "layer": layer, "expert": e})
            bar.update(1)
        entries.insert(0, {**_write_file(tmp, fmt.BACKBONE_PATH, backbone, target, source),
                           "role": "backbone"})
        bar.update(1)
        bar.close()
        tok_files = []
        for src in source.tokenizer_files:
            rel = f"{fmt.TOKENIZER_DIR}/{src.name}"
            (tmp / fmt.TOKENIZER_DIR).mkdir(exist_ok=True)
            shutil.copyfile(src, tmp / rel)
            entries.append({"path": rel, "role": "tokenizer", "bytes": (tmp / rel).stat().st_size,
                            "sha256": sha256_file(tmp / rel)})
            tok_files.append(rel)
        tools = tool_versions(*(("transformers",) if source.reference_is_transformers else ()))
        manifest = ManifestWriter(model=cfg.to_dict(), tokenizer={"files": tok_files} if tok_files else None,
                                  provenance={"source": source.provenance, "tools": tools})
        manifest.add_files(entries)
        manifest.write(tmp, where=f"split {out}: the manifest it wrote")
    return SplitResult(out, len(entries) + 1, sum(e["bytes"] for e in entries))


def _write_file(root: Path, rel: str, tensors: list[PlannedTensor], dtype: torch.dtype, source: Source) -> dict:
    by_name = {t.name: t for t in tensors}
    writer = SafetensorsWriter(root / rel, {t.name: (dtype, t.shape) for t in tensors}, fmt.SHARD_METADATA)
    try:
        for name in writer.order:
            t = by_name[name].load()
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise CheckpointError(f"{by_name[name].origin}: contains NaN or Inf values; fix the checkpoint "
                                      "(a diverged training run?)")
            writer.write(name, t.to(dtype).contiguous())
            del t
            # Unmap now: pages read through a memory map count in RSS until unmapped, so releasing
            # only between layers let a whole layer (hundreds of MB) pile up. Reopening is cheap.
            source.release()
        sha = writer.close()
    except BaseException:
        writer.abort()
        raise
    return {"path": rel, "bytes": writer.bytes, "sha256": sha, "dtype": str(dtype).removeprefix("torch.")}
