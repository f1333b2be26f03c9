"""Per-layer expert cache simulators: how many expert loads a cache of C experts saves when the
model decodes token by token.

The request stream of one layer is its selection sequence ``sel [T, K]`` read row by row: token
t's K experts in routing order, then token t+1's. A request hits when the expert is resident;
otherwise the expert is loaded and, when the cache is full, one resident expert is evicted first.
The runtime's budgeted store will use the same policies (LRU online, Belady as the bound no
online policy can beat).

With C >= K the order inside a token does not matter for LRU, and LRU with C = K is exactly the
CoSMoEs Eq. 8 policy (keep only the currently selected experts).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def request_stream(sel: np.ndarray) -> list[int]:
    """[T, K] (or [B, T, K], sequences one after another) -> [T*K] expert ids in decode order."""
    return [int(e) for e in np.asarray(sel).reshape(-1)]


def lru_hit_counts(requests: Sequence[int], max_capacity: int) -> list[int]:
    """Hits of an LRU cache for every capacity 1..max_capacity, in one pass (Mattson's stack
    algorithm: a request hits in every LRU cache larger than its stack distance, the number of
    distinct experts used since its last use).

    -> hits[c - 1] for capacity c
    """
    stack: list[int] = []  # most recent first
    at_distance = [0] * max_capacity  # requests whose stack distance is d
    for e in requests:
        try:
            d = stack.index(e)
        except ValueError:
            d = -1  # first use: a miss at every capacity
        if d >= 0:
            del stack[d]
            if d < max_capacity:
                at_distance[d] += 1
        stack.insert(0, e)
    hits, total = [], 0
    for d in range(max_capacity):
        total += at_distance[d]
        hits.append(total)
    return hits


def lru_hits(requests: Sequence[int], capacity: int) -> int:
    return lru_hit_counts(requests, capacity)[-1]


def belady_hits(requests: Sequence[int], capacity: int) -> int:
    """Hits of Belady's optimal offline policy: on a miss with a full cache, evict the resident
    expert whose next request lies farthest in the future (never requested again = infinitely far)."""
    if capacity < 1:
        raise ValueError(f"capacity must be >= 1, got {capacity}")
    n = len(requests)
    next_use = [n] * n  # index of the next request of the same expert; n = never
    last: dict[int, int] = {}
    for i in range(n - 1, -1, -1):
        next_use[i] = last.get(requests[i], n)
        last[requests[i]] = i
    resident: dict[int, int] = {}  # expert -> index of its next request
    hits = 0
    for i, e in enumerate(requests):
        if e in resident:
            hits += 1
        elif len(resident) >= capacity:
            del resident[max(resident, key=resident.__getitem__)]
        resident[e] = next_use[i]
    return hits


def hit_rate_curve(sel: np.ndarray, num_experts: int) -> dict[str, list[float]]:
    """Hit rates of LRU and Belady for cache sizes 1..E experts, over one layer's selections."""
    reqs = request_stream(sel)
    n = max(1, len(reqs))
    lru = lru_hit_counts(reqs, num_experts)
    return {
        "cache_size": list(range(1, num_experts + 1)),
        "lru": [h / n for h in lru],
        "belady": [belady_hits(reqs, c) / n for c in range(1, num_experts + 1)],
    }
