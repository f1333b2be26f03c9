"""The memory-vs-speed curve of a build (``[budget_curve]`` of a recipe): one bundle decoded at
backbone + k experts per layer for k from top-k to all experts (every k, or ``points`` of them
spaced geometrically), on each backend, so a release shows how much memory buys how much speed
(plotted by report_plots.budget_curve)."""

from __future__ import annotations

import multiprocessing
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from runtime_py.bundle import Bundle
from runtime_py.runner import open_runner


def budgets(top_k: int, num_experts: int, points: int) -> list[int]:
    """The experts per layer the curve measures: every k in top_k..num_experts when there are at most
    ``points`` of them, else ``points`` values spaced geometrically from top_k to num_experts (both
    ends included; a cache's hit rate grows roughly with log k), fewer where two round alike."""
    if points < 2:
        raise ValueError(f"a budget curve needs at least 2 points, got {points}")
    if num_experts - top_k + 1 <= points:
        return list(range(top_k, num_experts + 1))
    ratio = num_experts / top_k
    return sorted({round(top_k * ratio ** (i / (points - 1))) for i in range(points)})


def measure(*, bundle_path: Path, backends: Sequence[str], policy: str, prompt_ids: list[int],
            new_tokens: int, repeats: int = 3, points: int = 8, progress: bool = True) -> dict[str, Any]:
    """Decode tokens/s and loads per token at backbone + k experts per layer, k in ``budgets``, for
    each backend: how much memory buys how much speed. Each point is the median of ``repeats``
    generations after a warm-up (on a shared 2-core machine one run's speed varies 2-5x).

    Each backend runs in a fresh process (spawned, not forked), its budgets smallest first: a
    point's peak RSS is then that runner's (plus what the smaller budgets before it left behind,
    which is less than it needs itself), not the calling process's, which holds whatever the stages
    before it left resident (at OLMoE's widths 3-7 GB over budgets of 0.4-1.2 GB)."""
    cfg = Bundle.open(bundle_path).config
    ks = budgets(cfg.num_experts_per_tok, cfg.num_experts, points)
    measured = []
    bar = tqdm(total=len(ks) * len(backends), desc="budget curve", unit="run", disable=not progress or None)
    spawn = multiprocessing.get_context("spawn")
    for backend in backends:
        with ProcessPoolExecutor(max_workers=1, mp_context=spawn) as pool:
            for k in ks:  # one worker: the points run one after another, in the order submitted
                measured.append(pool.submit(_point, bundle_path, backend, k, policy, prompt_ids, new_tokens,
                                            repeats).result())
                bar.update(1)
    bar.close()
    return {"policy": policy, "prompt_tokens": len(prompt_ids), "new_tokens": new_tokens, "repeats": repeats,
            "points": measured}


def _point(bundle_path: Path, backend: str, k: int, policy: str, prompt_ids: list[int], new_tokens: int,
           repeats: int) -> dict[str, Any]:
    """One point of the curve, in the backend's own process (``measure``)."""
    bundle = Bundle.open(bundle_path)
    with open_runner(bundle, backend=backend, experts_per_layer=k, policy=policy) as runner:
        # A short warm-up first: the first calls of a backend pay one-off costs (allocations,
        # kernel selection) that would otherwise land in the smallest budget's decode speed.
        runner.generate(prompt_ids, 2)
        runs = [runner.generate(prompt_ids, new_tokens).metrics for _ in range(repeats)]
    speeds = [m["decode_tok_s"] for m in runs if m["decode_tok_s"] is not None]
    return {"backend": backend, "experts_per_layer": k, "budget_bytes": runs[0]["budget_bytes"],
            "decode_tok_s": float(np.median(speeds)) if speeds else None, "decode_tok_s_runs": speeds,
            "loads_per_token": float(np.median([m["loads_per_token"] for m in runs])),
            "hit_rate": float(np.median([m["hit_rate"] for m in runs])),
            "peak_rss_mb": max(m["peak_rss_mb"] for m in runs)}
