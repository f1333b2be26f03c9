"""PNG plots for ``analyze`` (matplotlib, Agg backend: no display needed).

- selection_map.png: which experts one layer picks for each token (like CoSMoEs Figure 5);
- delta_uniform.png: ΔUniform per layer (like CoSMoEs Figure 6);
- hit_rate.png: expert-cache hit rate against cache size, LRU vs the Belady optimum.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from runtime_py import routing_metrics

SELECTION_MAP_TOKENS = 128  # enough tokens to see blocks of repeated experts, few enough to read


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def selection_map(out: Path, sel: np.ndarray, num_experts: int, layer: int, title: str) -> Path:
    """sel [T, K] of one window: a cell per (expert, token), dark where the expert is selected."""
    plt = _pyplot()
    sel = sel[:SELECTION_MAP_TOKENS]
    mask = routing_metrics.selection_mask(sel, num_experts)[0].T  # [E, T]
    fig, ax = plt.subplots(figsize=(12, 0.35 * num_experts + 1.6))
    ax.imshow(mask, aspect="auto", cmap="Greys", interpolation="nearest", vmin=0, vmax=1)
    ax.set_yticks(range(num_experts))
    ax.set_ylabel("expert")
    ax.set_xlabel("token position")
    ax.set_title(f"{title}: layer {layer}, experts selected per token "
                 f"(ExRep {routing_metrics.exrep(sel, num_experts):.1f} % over these {len(sel)} tokens)")
    return _save(plt, fig, out / "selection_map.png")


def delta_uniform(out: Path, report: dict[str, Any], title: str) -> Path:
    plt = _pyplot()
    layers = [p["layer"] for p in report["per_layer"]]
    values = [p["delta_uniform"] for p in report["per_layer"]]
    fig, ax = plt.subplots(figsize=(max(5, 0.4 * len(layers) + 2), 3.5))
    ax.bar(layers, values, color="tab:blue")
    ax.axhline(report["delta_uniform"], color="tab:red", ls="--", label=f"mean {report['delta_uniform']:.1f}")
    ax.set_xticks(layers)
    ax.set_xlabel("layer")
    ax.set_ylabel("ΔUniform (percentage points)")
    ax.set_title(f"{title}: distance of expert load from uniform")
    ax.legend()
    return _save(plt, fig, out / "delta_uniform.png")


def hit_rate(out: Path, report: dict[str, Any], title: str) -> Path:
    plt = _pyplot()
    curve = report["hit_rate_curve"]
    sizes = curve["cache_size"]
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    ax.plot(sizes, [100 * h for h in curve["belady"]], "o-", label="Belady (optimal)")
    ax.plot(sizes, [100 * h for h in curve["lru"]], "s-", label="LRU")
    k = report["top_k"]
    ax.plot([k], [100 - report["exrep"]], "k*", ms=12, label=f"Eq. 8: keep the {k} selected (100 - ExRep)")
    ax.set_xticks(sizes)
    ax.set_ylim(0, 100)
    ax.set_xlabel("cache size (experts per layer)")
    ax.set_ylabel("hit rate (%), mean over layers")
    ax.set_title(f"{title}: expert cache hit rate")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    return _save(plt, fig, out / "hit_rate.png")


def write_all(out: Path, report: dict[str, Any], window_sel: np.ndarray, layer: int) -> list[Path]:
    """window_sel [T, K]: one window of ``layer``'s selections, for the selection map."""
    out.mkdir(parents=True, exist_ok=True)
    title = Path(report["model"]).name
    return [selection_map(out, window_sel, report["num_experts"], layer, title),
            delta_uniform(out, report, title), hit_rate(out, report, title)]


def _save(plt, fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
