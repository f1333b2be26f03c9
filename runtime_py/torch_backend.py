"""PyTorch backend: the backbone resident, each routed expert read from its shard the first time
the router selects it (memory-mapped through safetensors, no copy for fp32 bundles; quantized
shards are dequantized to the runtime's dtype as they load).

The budgeted store and its eviction policies come with the runtime issue; this store keeps what
it loaded and counts loads, bytes and load times so that verify can report them.
"""

from __future__ import annotations

import time
from functools import partial

import torch
from safetensors import SafetensorError, safe_open

from runtime_py import quant
from runtime_py.bundle import Bundle
from runtime_py.config import expert_of, expert_tensor_shapes, tensor_shapes
from runtime_py.errors import FormatError
from runtime_py.model import CosmoeForCausalLM, Expert, KVCache, rope_inv_freq


def read_safetensors(path, expected: dict[str, tuple[int, ...]], dtype: torch.dtype,
                     encodings: dict[str, quant.Encoding] | None = None) -> dict[str, torch.Tensor]:
    """Tensors of one shard, checked against the names and shapes the config implies.

    ``encodings`` (quantized bundles) says how each canonical tensor is stored; quantized ones are
    checked entry by entry (codes and scales, dtypes and shapes) and dequantized to ``dtype`` here,
    once, when the shard loads: bench/quant_kernels.py measured PyTorch's int8/int4 CPU kernels 5-15x
    slower than fp32 F.linear for one token, and dequantizing costs about what their own repacking does.
    """
    if encodings is not None and set(encodings) != set(expected):
        extra, missing = sorted(set(encodings) - set(expected))[:3], sorted(set(expected) - set(encodings))[:3]
        raise FormatError(f"{path}: the manifest's tensor encodings do not match the model config "
                          f"(extra {extra}, missing {missing})")
    encodings = encodings or {}
    stored: dict[str, tuple[torch.dtype | None, tuple[int, ...]]] = {}  # None: any float dtype
    for name, shape in expected.items():
        enc = encodings.get(name)
        if enc is None or not enc.quantized:
            stored[name] = (None, tuple(shape))
            continue
        quant.check_encoding(enc, tuple(shape), f"{path}: {name}")
        stored.update(quant.stored_specs(name, tuple(shape), enc, dtype))
    try:
        with safe_open(str(path), framework="pt") as f:
            names = set(f.keys())
            if names != set(stored):
                extra, missing = sorted(names - set(stored))[:3], sorted(set(stored) - names)[:3]
                raise FormatError(f"{path}: tensors do not match the model config (extra {extra}, missing {missing})")
            raw = {}
            for name, (want_dtype, want_shape) in stored.items():
                t = f.get_tensor(name)
                if tuple(t.shape) != want_shape:
                    raise FormatError(f"{path}: {name} has shape {tuple(t.shape)}, config implies {want_shape}")
                if want_dtype is not None and t.dtype != want_dtype:
                    raise FormatError(f"{path}: {name} is {t.dtype}, its encoding needs {want_dtype}")
                raw[name] = t
    except SafetensorError as e:
        raise FormatError(f"{path}: not a valid safetensors file ({e})") from None
    out = {}
    for name, shape in expected.items():
        enc = encodings.get(name)
        if enc is not None and enc.quantized:
            out[name] = quant.dequantize(raw[name], raw[name + quant.SCALE_SUFFIX], enc, shape[1], dtype)
        else:
            t = raw[name]
            out[name] = t if t.dtype == dtype else t.to(dtype)
    return out


class ExpertStore:
    """Loads expert (layer, e) on first use and keeps it. Counts what it did."""

    def __init__(self, bundle: Bundle, dtype: torch.dtype) -> None:
        self.bundle, self.dtype, self.config = bundle, dtype, bundle.config
        self.resident: dict[tuple[int, int], Expert] = {}
        self.loads = 0
        self.bytes_loaded = 0
        self.load_ms: list[float] = []

    def get(self, layer: int, expert: int) -> Expert:
        key = (layer, expert)
        module = self.resident.get(key)
        if module is None:
            module = self._load(layer, expert)
            self.resident[key] = module
        return module

    def _load(self, layer: int, expert: int) -> Expert:
        t0 = time.perf_counter()
        entry = self.bundle.experts[(layer, expert)]
        path = self.bundle.checked_path(entry)
        cfg = self.config
        shapes = expert_tensor_shapes(cfg, layer, expert)
        tensors = read_safetensors(path, shapes, self.dtype, entry.encodings())
        prefix = f"layers.{layer}.moe.experts.{expert}."
        with torch.device("meta"):
            module = Expert(cfg.hidden_size, cfg.intermediate_size, cfg.expert_kind, cfg.rank)
        module.load_state_dict({k.removeprefix(prefix): v for k, v in tensors.items()}, assign=True, strict=True)
        self.loads += 1
        self.bytes_loaded += entry.bytes
        self.load_ms.append((time.perf_counter() - t0) * 1e3)
        return module


class TorchRuntime:
    """A bundle ready to run: ``logits(ids)`` and ``greedy(ids, n)``."""

    def __init__(self, bundle: Bundle, dtype: torch.dtype = torch.float32) -> None:
        self.bundle, self.config, self.dtype = bundle, bundle.config, dtype
        cfg = self.config
        expected = {n: s for n, s in tensor_shapes(cfg).items() if expert_of(n) is None}
        state = read_safetensors(bundle.checked_path(bundle.backbone), expected, dtype, bundle.backbone.encodings())
        with torch.device("meta"):
            model = CosmoeForCausalLM(cfg, with_experts=False)
        model.load_state_dict(state, assign=True, strict=True)
        model.inv_freq = rope_inv_freq(cfg)  # a buffer computed from the config, not stored
        self.store = ExpertStore(bundle, dtype)
        for i, layer in enumerate(model.layers):
            layer.moe.expert_lookup = partial(self.store.get, i)
        self.model = model.eval()

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
            nxt = int(logits[0, -1].argmax())
            out.append(nxt)
            if len(out) == new_tokens:
                break
            logits = self.model(torch.tensor([[nxt]]), cache)
        return out
