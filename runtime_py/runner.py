"""Run a bundle the way a device does: the backbone resident, experts under a memory budget.

One generation loop for every backend. The backend's engine (runtime_py/engine.py is the protocol;
runtime_py/torch_engine.py, runtime_py/program_backend.py) runs embedding, attention, router and
head; at every layer it hands the routed tokens to ``Runner._dispatch`` (given to the engine when it
is made), which asks the ExpertStore (runtime_py/store.py) for each selected expert, loading and
evicting per policy, records the selection for ExRep, and (policy ``lru+prefetch``) starts loading
the next layer's guessed experts in the background.

Budget: backbone bytes (weights or loaded programs as measured, plus the KV cache for the whole
context) + expert capacity. ``experts_per_layer=N`` is backbone + N x layers x unit bytes.

``open_runner`` opens a Runner, or the backend's own runner of the same interface: NativeRunner for
``native`` (runtime_py/native.py: the C++ runner in its own process), LlamaCppRunner for ``llamacpp``
(runtime_py/llamacpp.py: llama.cpp on the bundle's GGUF).
"""

from __future__ import annotations

import dataclasses
import importlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from runtime_py import routing_metrics
from runtime_py.backends import BACKENDS
from runtime_py.bundle import Bundle
from runtime_py.engine import Engine, EngineFactory
from runtime_py.errors import ConfigError
from runtime_py.memory import parse_size, peak_rss_bytes, reset_peak_rss
from runtime_py.model import Dispatch, dispatch_experts
from runtime_py.store import POLICIES, ExpertStore, StoreStats

if TYPE_CHECKING:
    from runtime_py.llamacpp import LlamaCppRunner
    from runtime_py.native import NativeRunner

# lru+prefetch loads a guessed expert only when its guessed router probability reaches this. On
# tiny-bles the unconditional guess was right 23 % of the time (chance: 25 %) and made decoding 2x
# slower than plain LRU (docs/BENCHMARKS.md); gated at 0.3 it fires only when the router is sure.
PREFETCH_MIN_PROB = 0.3

__all__ = ["BACKENDS", "ENGINES", "POLICIES", "Generation", "Runner", "check_prompt", "open_runner", "parse_size"]


def _torch_engine(bundle: Bundle, check_hash: str, dispatch: Dispatch, torch_activations: str) -> Engine:
    from runtime_py.torch_engine import TorchEngine
    # Integers stay integers, as on a device: resident bytes and speed are the quantized ones.
    return TorchEngine(bundle, dispatch=dispatch, check_hash=check_hash, int_kernels=True,
                       activations=torch_activations)


def _program_engine(backend: str) -> EngineFactory:
    def make(bundle: Bundle, check_hash: str, dispatch: Dispatch, torch_activations: str) -> Engine:
        from runtime_py.program_backend import ProgramEngine
        # torch_activations is the PyTorch engine's: a program runs its own kernels.
        return ProgramEngine(bundle, backend, dispatch=dispatch, check_hash=check_hash)
    return make


# Backend name -> engine factory (bundle, check_hash, dispatch, torch_activations), for the backends that run in this
# process (every name of runtime_py.backends.BACKENDS but native; open_runner takes them all). Program
# backends need `cosmoe-export lower`.
ENGINES: dict[str, EngineFactory] = {
    "torch": _torch_engine,
    "executorch": _program_engine("executorch"),
    "onnxruntime": _program_engine("onnxruntime"),
}


@dataclass
class Generation:
    tokens: list[int]
    metrics: dict[str, Any]
    stopped: str  # "max_new_tokens" | "stop_token" | "context"


class Runner:
    def __init__(self, bundle: Bundle, *, backend: str = "torch", budget_bytes: int | None = None,
                 experts_per_layer: int | None = None, policy: str = "lru", check_hash: str = "first",
                 prefetch_min_prob: float = PREFETCH_MIN_PROB, torch_activations: str = "bf16") -> None:
        if backend not in ENGINES:
            raise ConfigError(f"unknown backend {backend!r}; choose from {list(ENGINES)}")
        if policy not in POLICIES:
            raise ConfigError(f"unknown policy {policy!r}; choose from {list(POLICIES)}")
        if budget_bytes is not None and experts_per_layer is not None:
            raise ConfigError("give a budget or experts per layer, not both")
        reset_peak_rss()  # the peak of this run, not of whatever the process did before
        self.bundle, self.config, self.backend, self.policy = bundle, bundle.config, backend, policy
        cfg = self.config
        # The dispatch runs through self.store, made below once the engine has measured its units.
        self.engine: Engine = ENGINES[backend](bundle, check_hash, self._dispatch, torch_activations)
        self.kv_bytes = self.engine.cache_bytes(cfg.max_position_embeddings)
        self.backbone_bytes = self.engine.backbone_bytes + self.kv_bytes
        self.expert_unit_bytes = self.engine.unit_bytes
        # Budgets count the layers with routed experts only: a dense layer's MLP is in the backbone.
        layers, experts, k = len(cfg.moe_layers), cfg.num_experts, cfg.num_experts_per_tok
        self.min_budget_bytes = self.backbone_bytes + k * self.expert_unit_bytes
        self.resident_budget_bytes = self.backbone_bytes + layers * experts * self.expert_unit_bytes
        if experts_per_layer is not None:
            if not k <= experts_per_layer <= experts:
                raise ConfigError(f"{bundle.root}: experts per layer must be between top-k {k} and {experts}, "
                                  f"not {experts_per_layer}")
            budget_bytes = self.backbone_bytes + experts_per_layer * layers * self.expert_unit_bytes
        if budget_bytes is None:
            budget_bytes = self.resident_budget_bytes
        if budget_bytes < self.min_budget_bytes:
            raise ConfigError(
                f"{bundle.root}: budget {budget_bytes / 1e6:,.1f} MB is below the minimum "
                f"{self.min_budget_bytes / 1e6:,.1f} MB for {backend} (backbone and KV cache "
                f"{self.backbone_bytes / 1e6:,.1f} MB + {k} experts of {self.expert_unit_bytes / 1e6:,.2f} MB); "
                "raise --budget")
        self.budget_bytes = budget_bytes
        self.store = ExpertStore(layers=layers, experts=experts, top_k=k, unit_bytes=self.expert_unit_bytes,
                                 capacity_bytes=budget_bytes - self.backbone_bytes, policy=policy,
                                 load=self.engine.load_expert, release=self.engine.release_expert,
                                 file_bytes=self.engine.expert_file_bytes,
                                 where=str(bundle.root), layer_ids=cfg.moe_layers)
        # While generate runs: each layer's expert selections, one [K] array per token, in order.
        self._selections: list[list[np.ndarray]] | None = None
        self.prefetch_min_prob = prefetch_min_prob

    # ------------------------------------------------------------------ the MoE step
    def _dispatch(self, layer: int, x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """x [N, D], weights/idx [N, K] -> y [N, D] through the store."""
        selected = torch.unique(idx).tolist()
        if self._selections is not None:
            self._selections[layer].extend(idx.numpy().copy())  # N rows of [K]
        store = self.store
        store.begin_layer(layer, selected)
        # The guess reads layer l+1's router: only when l+1 has one (not past the last layer, not dense).
        if store.policy.prefetch and layer + 1 in self.config.moe_layers:
            probs = torch.softmax(self.engine.guess_logits(layer + 1, x), -1).mean(0)  # [E]
            top_p, top = torch.topk(probs, self.config.num_experts_per_tok)  # [K] x2
            # Only confident guesses: a wrong one costs a load and evicts a unit that may be needed.
            sure = top[top_p >= self.prefetch_min_prob].tolist()
            if sure:
                store.prefetch(layer + 1, sure)
        # Resident experts first: a miss may evict, and must not evict one this layer still needs.
        order = sorted(selected, key=lambda e: not store.is_resident(layer, e))
        return dispatch_experts(lambda e: store.get(layer, e), x, weights, idx, order)

    # ------------------------------------------------------------------ public API
    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [B, T] -> logits [B, T, V] (fp32), for parity checks."""
        return self.engine.logits(ids)

    def check_prompt(self, prompt_ids: Sequence[int], max_new_tokens: int) -> list[int]:
        return check_prompt(self.bundle, prompt_ids, max_new_tokens)

    def generate(self, prompt_ids: Sequence[int], max_new_tokens: int, *, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int = 0, stop_ids: Sequence[int] = (),
                 on_token: Callable[[int], None] | None = None) -> Generation:
        cfg = self.config
        ids = self.check_prompt(prompt_ids, max_new_tokens)
        ctx = cfg.max_position_embeddings
        if temperature < 0 or not 0 < top_p <= 1:
            raise ConfigError("temperature must be >= 0 and top_p in (0, 1]")
        gen = torch.Generator().manual_seed(seed)
        stop = set(stop_ids)
        self._selections = [[] for _ in range(cfg.num_hidden_layers)]
        st = self.store.stats
        before = dataclasses.replace(st)  # counters at the start of this call
        cache = self.engine.new_cache(ctx)
        with torch.inference_mode():
            t0 = time.perf_counter()
            logits = self.engine.forward(ids, cache, 0)
            prefill_ms = (time.perf_counter() - t0) * 1e3
            prefilled = dataclasses.replace(st)
            out: list[int] = []
            stopped = "max_new_tokens"
            decode_s, steps = 0.0, 0
            while True:
                tok = _sample(logits, temperature, top_p, gen)
                out.append(tok)
                if on_token is not None:
                    on_token(tok)
                if tok in stop:
                    stopped = "stop_token"
                    break
                if len(out) >= max_new_tokens:
                    break
                pos = len(ids) + len(out) - 1
                if pos >= ctx:  # the KV cache never grows past the context
                    stopped = "context"
                    break
                t = time.perf_counter()
                logits = self.engine.forward([tok], cache, pos)
                decode_s += time.perf_counter() - t
                steps += 1
        metrics = self._metrics(before, prefilled, prefill_ms, decode_s, steps, len(ids))
        self._selections = None
        return Generation(out, metrics, stopped)

    def _metrics(self, before: StoreStats, prefilled: StoreStats, prefill_ms: float, decode_s: float, steps: int,
                 prompt_tokens: int) -> dict[str, Any]:
        """This call's numbers (the store's counters since ``before``; decode ones since ``prefilled``),
        plus the store's lifetime peak."""
        st = self.store.stats
        sel = self._selections
        e = self.config.num_experts
        recent = min(st.loads - before.loads, len(st.load_ms))  # this call's loads (the newest, deque-bounded)
        decode_requests = st.requests - prefilled.requests
        load_ms = np.asarray(list(st.load_ms)[len(st.load_ms) - recent:] or [0.0])
        return {
            "backend": self.backend,
            "policy": self.policy,
            "prompt_tokens": prompt_tokens,
            "new_tokens": steps + 1,
            "prefill_ms": prefill_ms,
            "decode_tok_s": steps / decode_s if decode_s > 0 else None,
            "peak_rss_mb": peak_rss_bytes() / 1e6,
            "budget_bytes": self.budget_bytes,
            "backbone_bytes": self.backbone_bytes,
            "expert_unit_bytes": self.expert_unit_bytes,
            "resident_expert_bytes_max": self.store.stats.resident_units_max * self.expert_unit_bytes,
            "expert_loads": st.loads - before.loads,
            "expert_bytes_loaded": st.bytes_loaded - before.bytes_loaded,
            "expert_load_ms_p50": float(np.percentile(load_ms, 50)),
            "expert_load_ms_p95": float(np.percentile(load_ms, 95)),
            "hit_rate": (st.hits - before.hits) / (st.requests - before.requests) if st.requests > before.requests
            else 1.0,
            "decode_hit_rate": (st.hits - prefilled.hits) / decode_requests if decode_requests else 1.0,
            # CoSMoEs Eq. 5 per layer over the whole sequence, averaged over layers (as `analyze`).
            "exrep": float(np.mean([routing_metrics.exrep(np.stack(sel[i]), e) for i in self.config.moe_layers]))
            if sel[self.config.moe_layers[0]] else 0.0,
            "loads_per_token": (st.loads - prefilled.loads) / steps if steps else 0.0,
            "prefetches": st.prefetches - before.prefetches,
            "prefetch_used": st.prefetch_used - before.prefetch_used,
            "prefetch_wait_ms": st.wait_ms - before.wait_ms,
        }

    def close(self) -> None:
        self.store.close()
        self.engine.close()

    def __enter__(self) -> Runner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def check_prompt(bundle: Bundle, prompt_ids: Sequence[int], max_new_tokens: int) -> list[int]:
    """The prompt as ints, or ConfigError when it cannot run: empty, ids outside the vocabulary,
    no room left in the context."""
    cfg, where = bundle.config, bundle.root
    ids = [int(t) for t in prompt_ids]
    if not ids:
        raise ConfigError(f"{where}: the prompt is empty; give at least one token")
    if any(not 0 <= t < cfg.vocab_size for t in ids):
        raise ConfigError(f"{where}: prompt token ids must be in [0, {cfg.vocab_size})")
    if len(ids) >= cfg.max_position_embeddings:
        raise ConfigError(f"{where}: the prompt has {len(ids)} tokens and the model's context is "
                          f"{cfg.max_position_embeddings}; shorten the prompt")
    if max_new_tokens < 1:
        raise ConfigError(f"{where}: max_new_tokens must be at least 1")
    return ids


# Backends with a runner of their own, Runner's interface over another engine: name -> (module, class).
# Imported when opened: llama_cpp is optional, and the C++ runner needs no torch engine.
OWN_RUNNERS = {"native": ("runtime_py.native", "NativeRunner"),  # the C++ runner, a process per call
               "llamacpp": ("runtime_py.llamacpp", "LlamaCppRunner")}  # llama.cpp on the bundle's GGUF


def open_runner(bundle: Bundle, *, backend: str = "torch", **options: Any) -> Runner | NativeRunner | LlamaCppRunner:
    """A runner of ``bundle`` on any backend of runtime_py.backends.BACKENDS: Runner for the engines
    of this process, or the backend's own runner (OWN_RUNNERS, the same interface).
    ``options``: Runner's keywords (budget_bytes, experts_per_layer, policy, check_hash, prefetch_min_prob,
    torch_activations: the PyTorch engine's, runtime_py.backends.TORCH_ACTIVATIONS; the other backends run
    their programs' kernels)."""
    if backend in OWN_RUNNERS:
        module, name = OWN_RUNNERS[backend]
        options.pop("torch_activations", None)
        return getattr(importlib.import_module(module), name)(bundle, **options)
    if backend not in ENGINES:
        raise ConfigError(f"unknown backend {backend!r}; choose from {list(BACKENDS)}")
    return Runner(bundle, backend=backend, **options)


def _sample(logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator) -> int:
    """Greedy when temperature is 0, else nucleus sampling: logits [V] -> token id."""
    if temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / temperature, -1)  # [V]
    sorted_p, order = torch.sort(probs, descending=True)  # [V] x2
    keep = sorted_p.cumsum(0) - sorted_p < top_p  # the smallest prefix whose mass reaches top_p
    sorted_p = torch.where(keep, sorted_p, torch.zeros_like(sorted_p))
    return int(order[torch.multinomial(sorted_p / sorted_p.sum(), 1, generator=gen)])
