"""PNG plots of the release report (matplotlib, Agg backend, no display needed).

- selection_map.png, delta_uniform.png, hit_rate.png: the routing plots of ``analyze``
  (cosmoe_export/release/analyze_plots.py), titled with the recipe's name;
- budget_curve.png: decode tokens/s and expert loads per token against the memory budget, one line
  per backend: the curve that tells a product team how much memory buys how much speed.

PNG metadata is fixed (no software string, no time), so a plot made from the same numbers has the
same bytes; the budget curve holds timings and differs from run to run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from cosmoe_export.release import analyze_plots
from runtime_py.backends import BACKENDS

PNG_METADATA = {"Software": None}
# A line style per backend, in runtime_py.backends.BACKENDS's order (a backend beyond these: "x-").
MARKERS = dict(zip(BACKENDS, ("o-", "s-", "^-", "D-", "v-", "P-"), strict=False))


def routing(out: Path, numbers: dict[str, Any], window_sel: np.ndarray, layer: int, title: str) -> list[Path]:
    """numbers: analyze.routing_report's; window_sel [T, K]: one window of ``layer``'s selections."""
    out.mkdir(parents=True, exist_ok=True)
    return [analyze_plots.selection_map(out, window_sel, numbers["num_experts"], layer, title),
            analyze_plots.delta_uniform(out, numbers, title), analyze_plots.hit_rate(out, numbers, title)]


def budget_curve(out: Path, curve: dict[str, Any], title: str) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (speed, loads) = plt.subplots(2, 1, figsize=(6.5, 6.2), sharex=True)
    for backend in dict.fromkeys(p["backend"] for p in curve["points"]):
        pts = [p for p in curve["points"] if p["backend"] == backend and p["decode_tok_s"] is not None]
        mb = [p["budget_bytes"] / 1e6 for p in pts]
        style = MARKERS.get(backend, "x-")
        speed.plot(mb, [p["decode_tok_s"] for p in pts], style, label=backend)
        loads.plot(mb, [p["loads_per_token"] for p in pts], style, label=backend)
        for p, x in zip(pts, mb, strict=True):  # k experts per layer beside each point
            loads.annotate(str(p["experts_per_layer"]), (x, p["loads_per_token"]), textcoords="offset points",
                           xytext=(3, 4), fontsize=7)
    speed.set_ylabel("decode tokens/s")
    speed.set_title(f"{title}: memory budget vs speed (policy {curve['policy']})")
    loads.set_ylabel("expert loads per token")
    loads.set_xlabel("memory budget (MB): backbone + KV cache + k experts per layer")
    loads.set_title("expert loads per token (k experts per layer beside each point)", fontsize=9)
    for ax in (speed, loads):
        ax.grid(alpha=0.3)
        ax.legend()
    speed.set_ylim(bottom=0)
    loads.set_ylim(bottom=0)
    fig.tight_layout()
    path = out / "budget_curve.png"
    fig.savefig(path, dpi=110, metadata=PNG_METADATA)
    plt.close(fig)
    return path
