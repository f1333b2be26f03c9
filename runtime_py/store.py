"""The expert store: which (layer, expert) units are resident, within a byte budget, for every backend.

A backend gives the store a ``load(layer, expert) -> unit`` function, a ``release(unit)`` function
and the resident bytes of one unit (weights, packed copies, program or session overhead, as the
backend measured them). The store decides what to keep through a policy from POLICIES and never
holds more units than its capacity: a unit being loaded in the background already counts.

Capacity: C = (budget - backbone bytes) // unit bytes units. When C >= K * L (K = experts per token,
L = layers with routed experts: dense layers have no units and count nowhere) every layer gets a
quota of C // L units and evicts within itself ("per layer"); below that the layers share one pool.
C < K is an error: one token of one layer would not fit.

Hits and misses count requests (``get``); a unit that a prefetch had already started loading is a
hit, the time spent waiting for it is still counted in ``wait_ms``.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any

from runtime_py.errors import ConfigError

Key = tuple[int, int]  # (layer, expert)
LOAD_TIMES_KEPT = 100_000


# ----------------------------------------------------------------------------- policies
class Policy:
    """Eviction order plus two hooks. The default is LRU."""

    preload_all = False  # load every expert up front (and never evict)
    prefetch = False  # the runtime guesses the next layer's experts and calls ``store.prefetch``
    keep_only_selected = False  # CoSMoEs Eq. 8

    def __init__(self) -> None:
        self.clock = 0
        self.last_use: dict[Key, int] = {}
        self.uses: dict[Key, int] = {}

    def touch(self, key: Key) -> None:
        self.clock += 1
        self.last_use[key] = self.clock
        self.uses[key] = self.uses.get(key, 0) + 1

    def forget(self, key: Key) -> None:
        self.last_use.pop(key, None)

    def rank(self, key: Key) -> tuple:
        """Lowest rank is evicted first."""
        return (self.last_use.get(key, 0),)


class LFU(Policy):
    # Counts survive eviction (a classic in-cache LFU would forget them): an expert the router
    # favours keeps its rank after a swap-out, which is what a skewed router needs.
    def rank(self, key: Key) -> tuple:
        return (self.uses.get(key, 0), self.last_use.get(key, 0))


class Resident(Policy):
    preload_all = True


class Paper(Policy):
    """CoSMoEs Eq. 8: at every token, experts of the layer that were not selected are dropped and
    the selected ones loaded; memory holds exactly the selected K experts per layer."""

    keep_only_selected = True


class LRUPrefetch(Policy):
    """mixtral-offloading's speculative loading: layer l+1's router applied to layer l's hidden state."""

    prefetch = True


POLICIES: dict[str, Callable[[], Policy]] = {
    "resident": Resident,
    "paper": Paper,
    "lru": Policy,
    "lfu": LFU,
    "lru+prefetch": LRUPrefetch,
}


@dataclass
class StoreStats:
    requests: int = 0
    hits: int = 0
    loads: int = 0
    bytes_loaded: int = 0
    # The most recent load times (bounded: a long session must not grow without limit).
    load_ms: deque[float] = field(default_factory=lambda: deque(maxlen=LOAD_TIMES_KEPT))
    wait_ms: float = 0.0
    preloaded: int = 0  # loads done up front (policy "resident")
    prefetches: int = 0  # loads started by a prefetch
    prefetch_used: int = 0  # ... that a later request found
    resident_units_max: int = 0


@dataclass
class _Slot:
    unit: Any = None
    future: Future | None = None
    prefetched: bool = False


class ExpertStore:
    def __init__(self, *, layers: int, experts: int, top_k: int, unit_bytes: int, capacity_bytes: int,
                 policy: str, load: Callable[[int, int], Any], release: Callable[[Any], None],
                 file_bytes: Callable[[int, int], int] | None = None, where: str = "expert store",
                 layer_ids: Sequence[int] | None = None) -> None:
        """``layers``: how many layers have routed experts; ``layer_ids``: their indices (default
        0..layers-1; a plan with dense layers skips theirs)."""
        if policy not in POLICIES:
            raise ConfigError(f"unknown policy {policy!r}; choose from {list(POLICIES)}")
        self.layer_ids = tuple(range(layers) if layer_ids is None else layer_ids)
        if len(self.layer_ids) != layers:
            raise ConfigError(f"{where}: {len(self.layer_ids)} layer ids for {layers} layers with experts")
        self.layers, self.experts, self.top_k = layers, experts, top_k
        self.unit_bytes = unit_bytes
        self.capacity = min(capacity_bytes // unit_bytes, layers * experts)  # units
        self.policy = POLICIES[policy]()
        if self.capacity < top_k:
            raise ConfigError(f"{where}: the budget leaves room for {self.capacity} expert(s) of "
                              f"{unit_bytes:,} bytes; one layer needs {top_k}")
        if self.policy.keep_only_selected and self.capacity < top_k * layers:
            raise ConfigError(f"{where}: policy 'paper' keeps {top_k} experts in each of {layers} layers "
                              f"({top_k * layers} units); the budget holds {self.capacity}")
        if self.policy.preload_all and self.capacity < layers * experts:
            raise ConfigError(f"{where}: policy 'resident' needs room for all {layers * experts} experts; "
                              f"the budget holds {self.capacity}")
        self.quota = self.capacity // layers if self.capacity >= top_k * layers else None
        self._load, self._release = load, release
        self._file_bytes = file_bytes or (lambda layer, expert: unit_bytes)  # bytes a load reads
        self._slots: dict[Key, _Slot] = {}
        self._pinned: set[Key] = set()
        self._lock = threading.Lock()
        self._stats_lock = threading.Lock()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="expert-prefetch") if self.policy.prefetch else None
        self.stats = StoreStats()
        if self.policy.preload_all:
            for layer in self.layer_ids:
                for e in range(experts):
                    self._slots[(layer, e)] = _Slot(unit=self._timed_load((layer, e)))
                    self.stats.preloaded += 1
            self._note_size()

    # ------------------------------------------------------------------ accounting
    @property
    def resident_units(self) -> int:
        return len(self._slots)

    def _note_size(self) -> None:
        n = len(self._slots)
        assert n <= self.capacity, f"store holds {n} units, capacity {self.capacity}"  # the invariant
        self.stats.resident_units_max = max(self.stats.resident_units_max, n)

    def is_resident(self, layer: int, expert: int) -> bool:
        return (layer, expert) in self._slots

    # ------------------------------------------------------------------ the runtime's calls
    def begin_layer(self, layer: int, selected: Iterable[int]) -> None:
        """The router chose ``selected`` for this layer (all tokens of this call)."""
        if not self.policy.keep_only_selected:
            return
        keep = set(selected)
        with self._lock:
            for key in [k for k in self._slots if k[0] == layer and k[1] not in keep]:
                self._evict(key)

    def get(self, layer: int, expert: int) -> Any:
        """The unit of (layer, expert), loading it (and evicting per policy) when it is not resident."""
        key = (layer, expert)
        with self._lock:
            self.stats.requests += 1
            slot = self._slots.get(key)
            if slot is not None:
                self.stats.hits += 1
                if slot.prefetched:
                    self.stats.prefetch_used += 1
                    slot.prefetched = False
            else:
                self._make_room(layer, exclude=set())
                slot = self._slots[key] = _Slot()
                self._note_size()
            self.policy.touch(key)
            self._pinned.add(key)
            future = slot.future
        try:
            if future is not None:
                t = time.perf_counter()
                slot.unit = future.result()
                self.stats.wait_ms += (time.perf_counter() - t) * 1e3
                slot.future = None
            elif slot.unit is None:
                slot.unit = self._timed_load(key)
        except BaseException:
            with self._lock:
                self._slots.pop(key, None)
            raise
        finally:
            with self._lock:
                self._pinned.discard(key)
        return slot.unit

    def prefetch(self, layer: int, experts: Iterable[int]) -> None:
        """Start loading these units in the background if they are missing and room can be made
        without evicting a unit in use or another of this guess."""
        if self._pool is None or layer not in self.layer_ids:
            return
        guess = [(layer, int(e)) for e in experts]
        with self._lock:
            for key in guess:
                if key in self._slots:
                    continue
                if not self._make_room(layer, exclude=set(guess), required=False):
                    return
                slot = self._slots[key] = _Slot(prefetched=True)
                slot.future = self._pool.submit(self._timed_load, key)
                self.stats.prefetches += 1
                self._note_size()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        with self._lock:
            for key in list(self._slots):
                self._evict(key)

    # ------------------------------------------------------------------ internals
    def _timed_load(self, key: Key) -> Any:
        t = time.perf_counter()
        unit = self._load(*key)
        ms = (time.perf_counter() - t) * 1e3
        with self._stats_lock:  # not self._lock: get() may hold that while it waits for this load
            self.stats.loads += 1
            self.stats.bytes_loaded += self._file_bytes(*key)
            self.stats.load_ms.append(ms)
        return unit

    def _make_room(self, layer: int, *, exclude: set[Key], required: bool = True) -> bool:
        """Evict until one more unit of ``layer`` fits. Caller holds the lock."""
        while True:
            if self.quota is not None:
                pool = [k for k in self._slots if k[0] == layer]
                full = len(pool) >= self.quota
            else:
                pool = list(self._slots)
                full = len(pool) >= self.capacity
            if not full:
                return True
            free = [k for k in pool if k not in self._pinned and k not in exclude]
            in_flight = [k for k in free if self._slots[k].future is not None and not self._slots[k].future.done()]
            candidates = [k for k in free if k not in in_flight]
            if not candidates and in_flight and required:
                # Only wrong guesses still loading: wait for one (it then becomes evictable).
                wait([self._slots[k].future for k in in_flight], return_when=FIRST_COMPLETED)
                continue
            if not candidates:
                if required:
                    raise ConfigError(f"expert store: no unit of layer {layer} can be evicted "
                                      f"(capacity {self.capacity} units, all in use)")
                return False
            self._evict(min(candidates, key=self.policy.rank))

    def _evict(self, key: Key) -> None:
        slot = self._slots.pop(key)
        self.policy.forget(key)
        if slot.future is not None and slot.future.exception() is None:  # a finished, unused prefetch
            slot.unit = slot.future.result()
        if slot.unit is not None:
            self._release(slot.unit)
