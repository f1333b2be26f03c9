"""The PyTorch engine (runtime_py/engine.py): the backbone resident as a CosmoeForCausalLM without
routed experts, the routed experts read on demand into slots (runtime_py/expert_slots.py).

The backbone is read once (runtime_py/shards.py), its sha256 checked unless ``check_hash`` is
"never" (a tampered backbone must not run). With ``int_kernels`` its quantized linears and embedding
keep their integers and run on PyTorch's int kernels (runtime_py/qlinear.py), as on a device, with
``activations`` (runtime_py.backends.TORCH_ACTIVATIONS: the fast bf16 kernels, or the bundle's math exactly);
otherwise they are dequantized to ``dtype`` when they load (the exact reference the exporter needs).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial

import torch
from torch import nn

from runtime_py import qlinear, quant
from runtime_py.backends import TORCH_ACTIVATIONS
from runtime_py.bundle import Bundle
from runtime_py.config import backbone_shapes, kv_cache_bytes
from runtime_py.errors import ConfigError
from runtime_py.expert_slots import ExpertSlot, ExpertSlots
from runtime_py.model import CosmoeForCausalLM, Dispatch, KVCache, guess_logits, rope_inv_freq
from runtime_py.shards import read_shard


class TorchEngine:
    """The runner supplies the expert dispatch (budgeted store, routing metrics, prefetch); every
    layer's MoE calls it."""

    name = "torch"

    def __init__(self, bundle: Bundle, *, dispatch: Dispatch, dtype: torch.dtype = torch.float32,
                 check_hash: str = "first", int_kernels: bool = False, activations: str = "bf16") -> None:
        if activations not in TORCH_ACTIVATIONS:
            raise ConfigError(f"unknown activations {activations!r}; choose from {list(TORCH_ACTIVATIONS)}")
        self.bundle, self.config, self.dtype = bundle, bundle.config, dtype
        cfg = self.config
        with torch.device("meta"):
            model = CosmoeForCausalLM(cfg, with_experts=False)
        keep = partial(_backbone_kernel, model, dtype, activations) if int_kernels else None
        # The backbone is read once per run, so "first" checks its sha256 here.
        state = read_shard(bundle, bundle.backbone, backbone_shapes(cfg), dtype=dtype, keep=keep, check_hash=check_hash)
        modules = {n: m for n, m in state.items() if isinstance(m, nn.Module)}
        for name, module in modules.items():
            qlinear.install(model, name, module)
        if isinstance(model.embed, qlinear.QuantEmbedding) and model.lm_head is None:
            model.lm_head = _tied_head(model.embed, activations)  # the tied head multiplies by the same integers
        model.load_state_dict({n: t for n, t in state.items() if n not in modules}, assign=True, strict=True)
        model.inv_freq = rope_inv_freq(cfg)  # a buffer computed from the config, not stored
        self.model = model.eval()
        self.dispatch = dispatch
        self.backbone_bytes = _tensor_bytes(model)
        self.experts = ExpertSlots(bundle, dtype, check_hash, int_kernels, activations)
        self.unit_bytes = self.experts.unit_bytes

    @property
    def dispatch(self) -> Dispatch:
        return self._dispatch

    @dispatch.setter
    def dispatch(self, dispatch: Dispatch) -> None:
        self._dispatch = dispatch
        for layer in self.model.layers:
            if layer.routed is not None:  # dense layers route nothing
                layer.routed.dispatch = dispatch

    def load_expert(self, layer: int, expert: int) -> ExpertSlot:
        return self.experts.load(layer, expert)

    def expert_file_bytes(self, layer: int, expert: int) -> int:
        return self.bundle.experts[(layer, expert)].bytes

    def release_expert(self, slot: ExpertSlot) -> None:
        self.experts.release(slot)

    def cache_bytes(self, max_len: int) -> int:
        return kv_cache_bytes(self.config, max_len, self.dtype.itemsize)

    def new_cache(self, max_len: int) -> KVCache:
        return KVCache(self.config, 1, max_len, self.dtype)

    def guess_logits(self, layer: int, x_prev: torch.Tensor) -> torch.Tensor:
        cur, prev = self.model.layers[layer], self.model.layers[layer - 1]
        return guess_logits(cur.routed.router.weight, cur.ffn_norm.weight, prev.ffn_norm.weight, x_prev,
                            getattr(cur.ffn_norm, "bias", None), getattr(prev.ffn_norm, "bias", None),
                            cur.routed.router.bias)

    @torch.inference_mode()
    def forward(self, ids: Sequence[int], cache: KVCache, pos: int) -> torch.Tensor:
        """Tokens [T] at positions pos.. continuing ``cache`` -> logits of the last one [V] (fp32)."""
        assert cache.pos == pos, (cache.pos, pos)
        return self.model(torch.tensor([ids]), cache)[0, -1].float()

    @torch.inference_mode()
    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [B, T] -> logits [B, T, V] (fp32), one full forward without a cache."""
        return self.model(ids).float()

    def close(self) -> None:
        pass


def _backbone_kernel(model: nn.Module, dtype: torch.dtype, activations: str, name: str, shape: tuple[int, ...],
                     enc: quant.Encoding) -> Callable[..., nn.Module] | None:
    """The module that keeps backbone tensor ``name``'s integers, or None to dequantize it."""
    if name == "embed.weight":
        return partial(_quant_embedding, dtype=dtype)
    target = model.get_submodule(name.removesuffix(".weight")) if name.endswith(".weight") else None
    kernel = qlinear.kernel_for(shape, enc, activations)
    # A biased linear (Qwen2's q/k/v) stays float: the kernels have no bias input.
    if kernel is None or not isinstance(target, nn.Linear) or target.bias is not None:
        return None
    return kernel.build


def _quant_embedding(stored: torch.Tensor, scale: torch.Tensor, enc: quant.Encoding, k: int, *,
                     dtype: torch.dtype) -> qlinear.QuantEmbedding:
    return qlinear.QuantEmbedding(stored, scale, enc, k, dtype)


def _tied_head(embed: qlinear.QuantEmbedding, activations: str) -> nn.Module:
    """The output projection on the embedding's own integers; dequantized if no kernel takes them."""
    shape = (embed.stored.shape[0], embed.dim)
    kernel = qlinear.kernel_for(shape, embed.enc, activations)
    if kernel is not None:
        return kernel.build(embed.stored, embed.scale, embed.enc, embed.dim)
    head = nn.Linear(embed.dim, shape[0], bias=False, device="meta")
    weight = quant.dequantize(embed.stored, embed.scale, embed.enc, embed.dim, embed.dtype)  # [V, D]
    head.load_state_dict({"weight": weight}, assign=True)
    return head


def _tensor_bytes(model: nn.Module) -> int:
    """Bytes of every tensor the model holds (parameters, buffers and the integer modules' tensors),
    each storage counted once: the tied head shares the embedding's codes."""
    seen: dict[int, int] = {}
    for module in model.modules():
        tensors = [*module.parameters(recurse=False), *module.buffers(recurse=False),
                   *(v for v in vars(module).values() if isinstance(v, torch.Tensor))]
        for t in tensors:
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())
