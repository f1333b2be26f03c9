"""Per-layer expert cache simulators, offline over recorded selections (``analyze``): how many
expert loads a cache of C experts saves when the model decodes token by token. LRU is the runtime's
online policy (runtime_py/store.py); Belady's optimum is the bound no online policy can beat.

One layer's selections ``sel [T, K]`` are processed token by token. The router picks all K
experts of a token before any of them runs, so a token first uses its resident experts (hits),
then loads the missing ones (misses), each evicting one resident expert when the cache is full.
Hits first matters: loading a miss must not evict an expert the same token is about to use.
With that order, LRU with C = K is exactly the CoSMoEs Eq. 8 policy (keep only the currently
selected experts), so its miss count equals floor(H/2) of Eq. 4 plus the K cold-start loads.

Hit rate = hits / (T*K) requests; the cache starts empty.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np


def _tokens(sel: np.ndarray) -> np.ndarray:
    """[T, K] or [B, T, K] (sequences decoded one after another) -> [T', K] ints."""
    sel = np.asarray(sel)
    if sel.ndim not in (2, 3):
        raise ValueError(f"selections must be [T, K] or [B, T, K], got shape {sel.shape}")
    return sel.reshape(-1, sel.shape[-1])


def lru_hits(sel: np.ndarray, capacity: int) -> int:
    """Hits of a least-recently-used cache holding ``capacity`` experts."""
    if capacity < 1:
        raise ValueError(f"capacity must be >= 1, got {capacity}")
    cache: OrderedDict[int, None] = OrderedDict()  # least recent first
    hits = 0
    for row in _tokens(sel).tolist():  # row: the K experts of one token
        misses = []
        for e in row:
            if e in cache:
                hits += 1
                cache.move_to_end(e)
            else:
                misses.append(e)
        for e in misses:
            if len(cache) >= capacity:
                cache.popitem(last=False)
            cache[e] = None
    return hits


def next_use(sel: np.ndarray, num_experts: int) -> np.ndarray:
    """[T, K] -> [T, E]: for token t and expert e, the first token after t that selects e (T if none)."""
    tokens = _tokens(sel)
    t = len(tokens)
    mask = np.zeros((t, num_experts), dtype=bool)  # [T, E]
    np.put_along_axis(mask, tokens, True, axis=1)
    out = np.empty((t, num_experts), dtype=np.int64)
    steps = np.arange(t)
    for e in range(num_experts):
        uses = np.append(np.flatnonzero(mask[:, e]), t)  # [U+1], sentinel T = never again
        out[:, e] = uses[np.searchsorted(uses, steps, side="right")]
    return out


def belady_hits(sel: np.ndarray, capacity: int, num_experts: int) -> int:
    """Hits of Belady's optimal offline policy: on a miss with a full cache, evict the resident
    expert whose next use lies farthest in the future (never used again = farthest of all)."""
    if capacity < 1:
        raise ValueError(f"capacity must be >= 1, got {capacity}")
    tokens = _tokens(sel).tolist()
    nxt = next_use(sel, num_experts).tolist()  # [T, E]
    cache: set[int] = set()
    hits = 0
    for t, row in enumerate(tokens):
        misses = [e for e in row if e not in cache]
        hits += len(row) - len(misses)
        future = nxt[t]
        for e in misses:
            if len(cache) >= capacity:
                # Ties (same next use) go to the lowest expert id: deterministic.
                cache.remove(max(sorted(cache), key=future.__getitem__))
            cache.add(e)
    return hits


def hit_rate_curve(sel: np.ndarray, num_experts: int) -> dict[str, list]:
    """Hit rates of LRU and Belady for cache sizes 1..E experts, over one layer's selections."""
    requests = max(1, _tokens(sel).size)
    sizes = list(range(1, num_experts + 1))
    return {
        "cache_size": sizes,
        "lru": [lru_hits(sel, c) / requests for c in sizes],
        "belady": [belady_hits(sel, c, num_experts) / requests for c in sizes],
    }
