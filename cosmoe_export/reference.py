"""The exporter's reference model of a bundle: the whole bundle in PyTorch, exactly.

``TorchRuntime`` runs the runtime's PyTorch engine (runtime_py/torch_engine.py) with quantized
tensors dequantized (no integer kernels: the exact values the bundle stores) and experts loaded on
first use and kept, with no budget. The stages that walk the model layer by layer (calibration and
quantize, analyze, the benchmarks) use it and decide themselves when to drop experts
(``store.evict``). Budgeted generation, as a device runs it, is runtime_py.runner instead.
"""

from __future__ import annotations

from functools import partial

import torch

from runtime_py.bundle import Bundle
from runtime_py.expert_slots import ExpertSlots
from runtime_py.model import Expert, KVCache, dispatch_experts
from runtime_py.torch_engine import TorchEngine


class KeepAll:
    """Loads expert (layer, e) on first use and keeps it until ``evict``."""

    def __init__(self, experts: ExpertSlots) -> None:
        self._experts = experts
        self._modules: dict[tuple[int, int], Expert] = {}
        self.loads = 0
        self.bytes_loaded = 0

    @property
    def resident(self) -> list[tuple[int, int]]:
        """The (layer, expert) loaded and not evicted, in load order."""
        return list(self._modules)

    def get(self, layer: int, expert: int) -> Expert:
        module = self._modules.get((layer, expert))
        if module is None:
            slot = self._experts.load(layer, expert)
            # An evicted module must take its memory with it, so this slot never returns to the pool.
            module = self._modules[(layer, expert)] = slot.module
            self.loads += 1
            self.bytes_loaded += self._experts.bundle.experts[(layer, expert)].bytes
        return module

    def evict(self, layer: int, expert: int) -> None:
        """Drop (layer, expert) if it is loaded: its memory is freed with the last reference to it."""
        self._modules.pop((layer, expert), None)


class TorchRuntime:
    """The whole bundle in PyTorch with experts loaded on first use and kept: ``logits(ids)``,
    ``greedy(ids, n)``, ``model`` and ``store`` for the exporter's layer-by-layer tools."""

    def __init__(self, bundle: Bundle, dtype: torch.dtype = torch.float32) -> None:
        self.engine = TorchEngine(bundle, dispatch=self._dispatch, dtype=dtype)
        self.bundle, self.config, self.dtype, self.model = bundle, bundle.config, dtype, self.engine.model
        self.store = KeepAll(self.engine.experts)

    def _dispatch(self, layer: int, x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """x [N, D], weights/idx [N, K] -> y [N, D], every selected expert from the store."""
        return dispatch_experts(partial(self.store.get, layer), x, weights, idx)

    @torch.inference_mode()
    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [B, T] -> logits [B, T, V] (fp32), one full forward without a cache."""
        return self.model(ids).float()

    @torch.inference_mode()
    def greedy(self, ids: torch.Tensor, new_tokens: int) -> list[int]:
        """Prefill ``ids [1, T]`` then decode token by token with the KV cache."""
        cache = KVCache(self.config, 1, ids.shape[1] + new_tokens, self.dtype)
        logits = self.model(ids, cache)
        out = []
        for _ in range(new_tokens):
            out.append(int(logits[0, -1].argmax()))
            if len(out) == new_tokens:
                break
            logits = self.model(torch.tensor([[out[-1]]]), cache)
        return out
