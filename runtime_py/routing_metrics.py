"""Routing metrics over realised expert selections: one implementation for analyze, the runtime
and verify.

A selection sequence is an integer array ``sel [T, K]`` (or ``[B, T, K]``): the experts chosen for
each of T consecutive tokens of one layer.
"""

from __future__ import annotations

import numpy as np


def _as_batched(sel: np.ndarray) -> np.ndarray:
    sel = np.asarray(sel)
    if sel.ndim == 2:
        sel = sel[None]
    if sel.ndim != 3:
        raise ValueError(f"selections must be [T, K] or [B, T, K], got shape {sel.shape}")
    return sel


def selection_mask(sel: np.ndarray, num_experts: int) -> np.ndarray:
    """[B, T, K] indices -> [B, T, E] 0/1 mask (CoSMoEs' S)."""
    sel = _as_batched(sel)
    mask = np.zeros(sel.shape[:2] + (num_experts,), dtype=np.int64)
    np.put_along_axis(mask, sel, 1, axis=-1)
    return mask


def replacement_count(sel: np.ndarray, num_experts: int) -> int:
    """CoSMoEs Eq. 4: H = sum_b sum_t sum_e |S[t+1, e] - S[t, e]|; every replacement counts twice
    (the expert that leaves and the one that enters)."""
    s = selection_mask(sel, num_experts)
    return int(np.abs(np.diff(s, axis=1)).sum())


def exrep(sel: np.ndarray, num_experts: int) -> float:
    """Expert Replacement ratio in percent, CoSMoEs Eq. 5: H_norm = floor(H/2) / (B*K*(T-1)).

    The share of expert slots that must be swapped between consecutive tokens when only the
    selected experts are kept (the paper's Eq. 8 offloading policy).
    """
    sel = _as_batched(sel)
    b, t, k = sel.shape
    if t < 2:
        return 0.0
    return 100.0 * (replacement_count(sel, num_experts) // 2) / (b * k * (t - 1))


def expert_load(sel: np.ndarray, num_experts: int) -> np.ndarray:
    """Share of all selections that went to each expert, [E], summing to 1."""
    counts = np.bincount(np.asarray(sel).reshape(-1), minlength=num_experts).astype(np.float64)
    total = counts.sum()
    return counts / total if total else counts


def delta_uniform(sel: np.ndarray, num_experts: int) -> float:
    """ΔUniform in percentage points: sum_e |load_e - 1/E| * 100 (L1 distance of the realised load
    from the uniform load). 0 for perfectly balanced routing; 2*(1 - K/E)*100 for a router that
    always picks the same K experts (150 for E=8, K=2)."""
    load = expert_load(sel, num_experts)
    return float(np.abs(load - 1.0 / num_experts).sum() * 100.0)
