"""The llamacpp backend: a bundle's GGUF (``cosmoe-export lower --target gguf``) run by llama.cpp
through llama-cpp-python, behind Runner's interface (runtime_py/runner.py), so ``verify`` gates
llama.cpp as it gates our runtimes.

llama.cpp memory-maps the whole file and keeps every expert: there is no expert budget or policy
to give it. Its KV cache is kept in the bundle's float dtype (llama.cpp's default is f16), so a
float32 bundle's parity measures the weights' arithmetic, not a rounded cache. Decoding is
Runner's loop: llama.cpp computes the logits, runtime_py samples them (the same greedy and
nucleus sampling for every backend). llama-cpp-python is the optional ``gguf`` extra
(scripts/install.sh); without it this backend is not available.
"""

from __future__ import annotations

import ctypes
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from runtime_py.backends import require_backend
from runtime_py.bundle import Bundle, FileEntry
from runtime_py.errors import ConfigError
from runtime_py.memory import peak_rss_bytes, reset_peak_rss
from runtime_py.runner import PREFETCH_MIN_PROB, Generation, _sample, check_prompt

# The bundle's float dtype -> ggml's type of the KV cache (ggml.h enum ggml_type).
KV_TYPES = {"float32": 0, "float16": 1, "bfloat16": 30}


def gguf_entry(bundle: Bundle) -> FileEntry:
    return next(f for f in bundle.files if f.role == "program" and f.target == "gguf")


class LlamaCppRunner:
    """Runner's public interface over llama.cpp in this process."""

    backend = "llamacpp"

    def __init__(self, bundle: Bundle, *, budget_bytes: int | None = None, experts_per_layer: int | None = None,
                 policy: str = "lru", check_hash: str = "first", prefetch_min_prob: float = PREFETCH_MIN_PROB,
                 threads: int | None = None) -> None:
        require_backend(bundle, "llamacpp")
        if budget_bytes is not None or experts_per_layer is not None:
            raise ConfigError(f"{bundle.root}: llama.cpp maps every expert of its GGUF and takes no expert budget; "
                              "run the llamacpp backend without --budget / --experts-per-layer")
        import llama_cpp

        reset_peak_rss()  # the peak of this run, as Runner's
        self.bundle, self.config, self.policy = bundle, bundle.config, policy
        self._llama_cpp = llama_cpp
        self.entry = gguf_entry(bundle)
        self.path = bundle.hashed_path(self.entry, check_hash)
        self.threads = threads or len(os.sched_getaffinity(0))
        self.kv_type = KV_TYPES[bundle.backbone.dtype]
        self._llm = self._open(self.config.max_position_embeddings, logits_all=False)
        # Everything is resident: the file is the budget.
        self.budget_bytes = self.backbone_bytes = self.entry.bytes
        self.expert_unit_bytes = 0

    def _open(self, n_ctx: int, *, logits_all: bool) -> Any:
        return self._llama_cpp.Llama(str(self.path), n_ctx=n_ctx, n_batch=min(n_ctx, 512), n_threads=self.threads,
                                     n_threads_batch=self.threads, logits_all=logits_all, type_k=self.kv_type,
                                     type_v=self.kv_type, seed=0, verbose=False)

    # ------------------------------------------------------------------ public API (as Runner's)
    def check_prompt(self, prompt_ids: Sequence[int], max_new_tokens: int) -> list[int]:
        return check_prompt(self.bundle, prompt_ids, max_new_tokens)

    def generate(self, prompt_ids: Sequence[int], max_new_tokens: int, *, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int = 0, stop_ids: Sequence[int] = (),
                 on_token: Callable[[int], None] | None = None) -> Generation:
        ids = self.check_prompt(prompt_ids, max_new_tokens)
        if temperature < 0 or not 0 < top_p <= 1:
            raise ConfigError("temperature must be >= 0 and top_p in (0, 1]")
        ctx = self.config.max_position_embeddings
        gen = torch.Generator().manual_seed(seed)
        stop = set(stop_ids)
        llm = self._llm
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(ids)
        logits = self._last_logits()
        prefill_ms = (time.perf_counter() - t0) * 1e3
        out: list[int] = []
        stopped = "max_new_tokens"
        decode_s, steps = 0.0, 0
        while True:  # Runner.generate's loop, step for step
            tok = _sample(logits, temperature, top_p, gen)
            out.append(tok)
            if on_token is not None:
                on_token(tok)
            if tok in stop:
                stopped = "stop_token"
                break
            if len(out) >= max_new_tokens:
                break
            if len(ids) + len(out) - 1 >= ctx:
                stopped = "context"
                break
            t = time.perf_counter()
            llm.eval([tok])
            logits = self._last_logits()
            decode_s += time.perf_counter() - t
            steps += 1
        return Generation(out, self._metrics(prefill_ms, decode_s, steps, len(ids)), stopped)

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [B, T] -> logits [B, T, V] (fp32), for parity checks: a context that keeps every position's
        logits, sized to the rows (one for the decode loop would hold n_ctx x V floats)."""
        if ids.dim() != 2:
            raise ValueError(f"ids must be [B, T], not {list(ids.shape)}")
        b, t = ids.shape
        v = self.config.vocab_size
        llm = self._open(max(t, 8), logits_all=True)
        out = torch.empty(b, t, v)  # each row copied straight from llama.cpp's scores
        try:
            for r, row in enumerate(ids.tolist()):
                if any(not 0 <= tok < v for tok in row):
                    raise ConfigError(f"{self.bundle.root}: token ids must be in [0, {v})")
                llm.reset()
                llm.eval(row)
                out[r] = torch.from_numpy(np.ascontiguousarray(llm.scores[:t, :v], dtype=np.float32))  # [T, V]
        finally:
            llm.close()
        return out  # [B, T, V]

    def close(self) -> None:
        self._llm.close()

    def __enter__(self) -> LlamaCppRunner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ internals
    def _last_logits(self) -> torch.Tensor:
        """The last evaluated position's logits [V] (a context without logits_all keeps only those)."""
        ptr = self._llama_cpp.llama_get_logits_ith(self._llm.ctx, -1)
        v = self.config.vocab_size
        return torch.from_numpy(np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)), (v,)).copy())

    def _metrics(self, prefill_ms: float, decode_s: float, steps: int, prompt_tokens: int) -> dict[str, Any]:
        """Runner's keys that mean something for llama.cpp: no store, so no loads, hits or prefetches."""
        return {
            "backend": self.backend,
            "prompt_tokens": prompt_tokens,
            "new_tokens": steps + 1,
            "prefill_ms": prefill_ms,
            "decode_tok_s": steps / decode_s if decode_s > 0 else None,
            "peak_rss_mb": peak_rss_bytes() / 1e6,
            "budget_bytes": self.budget_bytes,
            "backbone_bytes": self.backbone_bytes,
            "threads": self.threads,
            "gguf_precision": self.entry.precision,
        }
