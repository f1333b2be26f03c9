"""Per-expert mixed precision: give each routed expert one of a ladder of encodings so that the
bundle meets a size target with the least calibration error (cosmoe_export/quantization/calibrate.py).

The ladder runs from the cheapest int4 (largest group) to int8: cold, robust experts stay small,
hot or sensitive ones get more bits. Choosing one level per expert under a byte budget is a
multiple-choice knapsack; we solve it greedily on each expert's lower convex hull of
(bytes, error): repeatedly take the upgrade with the largest error reduction per extra byte that
still fits. On convex hulls this is the classic near-optimal greedy, and it is deterministic: ties
go to the lower (layer, expert) index.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cosmoe_export.errors import CosmoeError
from runtime_py import quant


@dataclass(frozen=True)
class Level:
    """One rung of the ladder: a scheme and, for int4, its group size."""

    scheme: str
    group_size: int | None = None

    @property
    def name(self) -> str:
        return self.scheme if self.group_size is None else f"{self.scheme}/g{self.group_size}"

    def encoding(self, shape: tuple[int, ...], float_dtype: str) -> quant.Encoding:
        return quant.choose_encoding(self.scheme, shape, self.group_size or 0, float_dtype)


def ladder(min_group_size: int) -> list[Level]:
    """int4 at every allowed group size >= ``min_group_size`` (largest group, fewest bytes, first),
    then int8. Sorted by bytes for any expert shape: a larger group only removes scales."""
    groups = sorted((g for g in quant.GROUP_SIZES if g >= min_group_size), reverse=True)
    return [Level("int4", g) for g in groups] + [Level("int8")]


def _lower_hull(cost: np.ndarray, err: np.ndarray) -> list[int]:
    """Indices of the lower convex hull of points (cost, err), cost ascending, error strictly falling:
    levels that cost more without lowering the error, or that lie above the hull, are never chosen."""
    hull: list[int] = []
    for i in np.argsort(cost, kind="stable"):
        if hull and err[i] >= err[hull[-1]]:
            continue  # dominated: more bytes, no less error
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            # b lies on or above the segment a -> i: drop it
            if (err[b] - err[a]) * (cost[i] - cost[a]) >= (err[i] - err[a]) * (cost[b] - cost[a]):
                hull.pop()
            else:
                break
        hull.append(int(i))
    return hull


def allocate(error: np.ndarray, cost: np.ndarray, budget: int) -> np.ndarray:
    """error, cost [X, Q] (X experts, Q levels, level 0 the cheapest) -> chosen level per expert [X].

    Every expert starts at its cheapest level; upgrades are taken best error-per-byte first while
    the total cost stays within ``budget`` bytes."""
    x = error.shape[0]
    hulls = [_lower_hull(cost[i], error[i]) for i in range(x)]
    choice = np.array([h[0] for h in hulls], dtype=np.int64)
    spent = int(cost[np.arange(x), choice].sum())
    if spent > budget:
        raise CosmoeError(f"size target too small: even the cheapest encoding of every expert needs {spent:,} bytes "
                          f"for the experts, {spent - budget:,} more than the target leaves them")
    steps = []  # (-gain per byte, expert, from level, to level)
    for i, h in enumerate(hulls):
        for a, b in zip(h, h[1:], strict=False):
            steps.append((-(error[i, a] - error[i, b]) / (cost[i, b] - cost[i, a]), i, a, b))
    steps.sort()
    for _, i, a, b in steps:
        extra = int(cost[i, b] - cost[i, a])
        if choice[i] == a and spent + extra <= budget:
            choice[i] = b
            spent += extra
    return choice


def _sig(x: float) -> float:
    """Six significant digits: the manifest records inputs for people, not for re-computation."""
    return float(f"{x:.6g}")


def record(*, layers: tuple[int, ...], levels: list[Level], level_bytes: list[int], selections: np.ndarray,
           error: np.ndarray, choice: np.ndarray, target_bytes: int, bundle_bytes: int) -> dict:
    """The manifest's ``quantization.mixed_precision``: the decision and everything it was made from.
    Rows of ``selections`` and ``error`` are the MoE layers ``layers`` (the config's moe_layers)."""
    n_experts = selections.shape[1]
    experts = []
    for row, layer in enumerate(layers):
        for e in range(n_experts):
            i = row * n_experts + e
            experts.append({"layer": layer, "expert": e, "level": levels[choice[i]].name,
                            "selections": int(selections[row, e]),
                            # share of the layer's selections (sums to 1 over the layer's experts)
                            "load": _sig(selections[row, e] / max(1, int(selections[row].sum()))),
                            "error": [_sig(v) for v in error[row, e]]})
    counts = {lv.name: int((choice == q).sum()) for q, lv in enumerate(levels)}
    return {
        "objective": "least total calibration error (sum over experts of error[level]: the squared change "
                     "rounding the expert adds to its layer's output, relative to that output's energy) within "
                     "target_bytes; greedy on convex hulls",
        "target_bytes": target_bytes,
        "bundle_bytes": bundle_bytes,
        "levels": [{"name": lv.name, "scheme": lv.scheme, "group_size": lv.group_size, "expert_bytes": b}
                   for lv, b in zip(levels, level_bytes, strict=True)],
        "counts": counts,
        "experts": experts,
    }
