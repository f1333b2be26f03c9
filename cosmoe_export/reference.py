"""The exporter's reference models: a bundle's and a source checkpoint's, in PyTorch, exactly, in
the memory of one layer when the model is larger than what this process may hold.

``TorchRuntime`` runs the runtime's PyTorch engine (runtime_py/torch_engine.py) with quantized
tensors dequantized (no integer kernels: the exact values the bundle stores) and experts loaded on
first use and kept, with no budget; ``stream_experts=True`` drops each expert when the next one is
asked for and the last when its layer has run, so a forward holds one expert at a time (a forward
without a cache loads each selected expert once per batch either way). Budgeted generation, as a
device runs it, is runtime_py.runner instead.

``source_model`` is the canonical model (runtime_py.model) of a source checkpoint, the float
reference of verify and analyze: whole when it fits in memory, else with each decoder layer's
tensors read from the checkpoint just before the layer runs and dropped after it (issue 16's
memory bound: the embedding, the head and one layer).
"""

from __future__ import annotations

import math
from functools import partial
from typing import TYPE_CHECKING

import torch

from runtime_py.bundle import Bundle
from runtime_py.expert_slots import ExpertSlots
from runtime_py.memory import give_back_large_frees, memory_available
from runtime_py.model import CosmoeForCausalLM, Expert, KVCache, dispatch_experts, rope_inv_freq
from runtime_py.torch_engine import TorchEngine

if TYPE_CHECKING:
    from cosmoe_export.importers.sources import Source


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

    def __init__(self, bundle: Bundle, dtype: torch.dtype = torch.float32, stream_experts: bool = False) -> None:
        self.engine = TorchEngine(bundle, dispatch=self._dispatch, dtype=dtype)
        self.bundle, self.config, self.dtype, self.model = bundle, bundle.config, dtype, self.engine.model
        self.store = KeepAll(self.engine.experts)
        self.stream_experts = stream_experts
        if stream_experts:
            give_back_large_frees()
            for i, layer in enumerate(self.model.layers):
                layer.register_forward_hook(lambda module, args, out, i=i: self.evict_layer(i))

    def evict_layer(self, layer: int) -> None:
        """Drop every loaded expert of ``layer``."""
        for key in self.store.resident:
            if key[0] == layer:
                self.store.evict(*key)

    def _dispatch(self, layer: int, x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """x [N, D], weights/idx [N, K] -> y [N, D], every selected expert from the store."""
        return dispatch_experts(partial(self._expert, layer), x, weights, idx)

    def _expert(self, layer: int, e: int) -> Expert:
        if self.stream_experts:
            # dispatch_experts runs one expert at a time, each once for all its tokens: the one
            # asked for before is done, so a streamed layer holds one expert, not all it routes to.
            self.evict_layer(layer)
        return self.store.get(layer, e)

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


# ---- a source checkpoint's canonical model ---------------------------------------------------------
def fits_in_memory(nbytes: int) -> bool:
    """Whether a model of ``nbytes`` may be held whole: at most half of what is available, since
    the runtime under test and the activations need the rest."""
    return 2 * nbytes <= memory_available()


def float_bytes(source: Source) -> int:
    """The source's weights in fp32, as the reference holds them."""
    return 4 * sum(math.prod(t.shape) for t in source.plan.values())


def rounded(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` rounded to ``dtype`` (the bundle's storage dtype) and back to fp32: the reference starts
    from the numbers the bundle stores."""
    return t.to(dtype).to(torch.float32)


def source_model(source: Source, dtype: torch.dtype = torch.float32,
                 streamed: bool | None = None) -> CosmoeForCausalLM:
    """The source's canonical model in fp32, each weight first rounded to ``dtype`` (the bundle's
    storage dtype, so that the reference and the bundle start from the same numbers). ``streamed``:
    None decides by ``fits_in_memory``. A streamed model holds the embedding, the final norm and
    the head; every forward reads each decoder layer's tensors from the checkpoint when the layer
    starts and drops them when it ends (a routed expert's when the MoE asks for it, dropped when it
    asks for the next), so one forward of a batch is one pass over the checkpoint."""
    def read(name: str) -> torch.Tensor:
        # A copy, and the file's map dropped at once: a tensor viewing a mapped shard would keep the
        # whole shard mapped (and charged to a data limit) for as long as the tensor lives.
        t = rounded(source.plan[name].load(), dtype).clone()
        source.release()
        return t

    if streamed is None:
        streamed = not fits_in_memory(float_bytes(source))
    with torch.device("meta"):
        model = CosmoeForCausalLM(source.config)
    model.inv_freq = rope_inv_freq(source.config)  # computed from the config, never stored
    if not streamed:
        model.load_state_dict({k: rounded(v, dtype) for k, v in source.state_dict().items()}, assign=True,
                              strict=True)
        return model.eval()
    give_back_large_frees()
    local: list[dict[str, str]] = [{} for _ in model.layers]  # per layer: name in the layer -> in the checkpoint
    experts: list[dict[int, dict[str, str]]] = [{} for _ in model.layers]  # per layer, per expert: likewise
    resident = {}
    for name in source.plan:
        if name.startswith("layers."):
            _, i, rest = name.split(".", 2)
            if rest.startswith(EXPERTS):
                e, inner = rest.removeprefix(EXPERTS).split(".", 1)
                experts[int(i)].setdefault(int(e), {})[inner] = name
            else:
                local[int(i)][rest] = name
        else:
            resident[name] = read(name)
    model.load_state_dict(resident, assign=True, strict=False)
    for layer, names, by_expert in zip(model.layers, local, experts, strict=True):
        layer.register_forward_pre_hook(lambda module, args, names=names: _fill(
            module, {k: read(n) for k, n in names.items()}))
        layer.register_forward_hook(lambda module, args, out, names=list(names): _empty(module, names))
        if by_expert:
            moe = layer.routed
            assert moe is not None
            moe.expert_lookup = partial(_read_expert, moe, by_expert, read)
            layer.register_forward_hook(lambda module, args, out, moe=moe: _empty_experts(moe))
    return model.eval()


# A routed expert's tensors in a decoder layer: layers.L.moe.experts.E.*
EXPERTS = "moe.experts."


def _read_expert(moe: torch.nn.Module, names: dict[int, dict[str, str]], read, e: int) -> torch.nn.Module:
    """Expert e of a streamed layer, read from the checkpoint when the MoE asks for it. dispatch_experts
    runs one expert at a time, each once for all its tokens, so the one before is done: a streamed
    layer holds one expert, not the 64 x 3 matrices of an OLMoE layer (1.6 GB in fp32)."""
    _empty_experts(moe)
    expert = moe.experts[e]
    _fill(expert, {k: read(n) for k, n in names[e].items()})
    return expert


def _empty_experts(moe: torch.nn.Module) -> None:
    for expert in moe.experts:
        if any(not p.is_meta for p in expert.parameters()):
            _empty(expert, [n for n, _ in expert.named_parameters()])


def _fill(module: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Every weight of ``module`` from ``tensors`` but a layer's routed experts (read one at a time).
    (A forward pre-hook must return None: anything else would replace the layer's arguments.)"""
    missing, unexpected = module.load_state_dict(tensors, assign=True, strict=False)
    if unexpected or any(not k.startswith(EXPERTS) for k in missing):
        raise RuntimeError(f"streamed reference: missing {missing}, unexpected {unexpected}")


def _empty(module: torch.nn.Module, names: list[str]) -> None:
    """Put the weights ``names`` of ``module`` back on the meta device: their memory goes with the last reference."""
    module.load_state_dict({n: torch.empty(module.get_parameter(n).shape, device="meta") for n in names},
                           assign=True, strict=False)
