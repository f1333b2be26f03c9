"""PyTorch backend: the backbone resident, routed experts read from their shards into reusable slots.

An expert slot is one buffer the size of an expert's tensors plus an ``Expert`` module whose
parameters are views into it. Loading expert (l, e) into a free slot is one ``readinto`` of the
shard's data section, straight into the parameters' memory (float bundles whose dtype is the
runtime's): no mmap page faults, no allocation, no copy; the budget decides how many slots exist.
Quantized shards: with ``int_kernels`` (the runner's engine) their linears keep the integers and
run on PyTorch's int8/int4 kernels (runtime_py/qlinear.py), so a resident expert costs its integer
bytes; without (``TorchRuntime``, the exporter's exact reference) they are dequantized into the slot.

Every load checks the shard's size against the manifest; its sha256 is checked on the first load of
each expert (``check_hash="always"`` on every load), from the bytes already read, so a shard that
changed on disk after the bundle was verified raises IntegrityError instead of producing tokens.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Callable
from functools import partial

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from runtime_py import qlinear, quant
from runtime_py.bundle import Bundle, FileEntry
from runtime_py.config import expert_of, expert_tensor_shapes, tensor_shapes
from runtime_py.errors import FormatError, IntegrityError
from runtime_py.model import CosmoeForCausalLM, Expert, KVCache, guess_logits, rope_inv_freq
from runtime_py.safetensors_header import Header, header_length, parse_header

ST_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "U8": torch.uint8,
             "I8": torch.int8}
HASH_CHECKS = ("first", "always", "never")


# (canonical name, shape, encoding) -> a builder of the module that computes with the stored integers
# (runtime_py/qlinear.py), or None to dequantize the tensor.
Keep = Callable[[str, tuple[int, ...], quant.Encoding], Callable[..., nn.Module] | None]


def _decode(raw: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]], dtype: torch.dtype,
            encodings: dict[str, quant.Encoding] | None, where: str,
            keep: Keep | None = None) -> dict[str, torch.Tensor | nn.Module]:
    """Check a shard's stored tensors against what the config and encodings imply; return the
    canonical tensors in ``dtype`` (quantized ones dequantized, once, here), or for the quantized
    tensors ``keep`` picks, a module computing with their integers."""
    if encodings is not None and set(encodings) != set(expected):
        extra, missing = sorted(set(encodings) - set(expected))[:3], sorted(set(expected) - set(encodings))[:3]
        raise FormatError(f"{where}: the manifest's tensor encodings do not match the model config "
                          f"(extra {extra}, missing {missing})")
    encodings = encodings or {}
    stored: dict[str, tuple[torch.dtype | None, tuple[int, ...]]] = {}  # None: any float dtype
    for name, shape in expected.items():
        enc = encodings.get(name)
        if enc is None or not enc.quantized:
            stored[name] = (None, tuple(shape))
            continue
        quant.check_encoding(enc, tuple(shape), f"{where}: {name}")
        stored.update(quant.stored_specs(name, tuple(shape), enc, dtype))
    if set(raw) != set(stored):
        extra, missing = sorted(set(raw) - set(stored))[:3], sorted(set(stored) - set(raw))[:3]
        raise FormatError(f"{where}: tensors do not match the model config (extra {extra}, missing {missing})")
    for name, (want_dtype, want_shape) in stored.items():
        t = raw[name]
        if tuple(t.shape) != want_shape:
            raise FormatError(f"{where}: {name} has shape {tuple(t.shape)}, config implies {want_shape}")
        if want_dtype is not None and t.dtype != want_dtype:
            raise FormatError(f"{where}: {name} is {t.dtype}, its encoding needs {want_dtype}")
        if want_dtype is None and not t.dtype.is_floating_point:
            raise FormatError(f"{where}: {name} is {t.dtype}, expected a float tensor")
    out = {}
    for name, shape in expected.items():
        enc = encodings.get(name)
        build = keep(name, tuple(shape), enc) if keep is not None and enc is not None and enc.quantized else None
        if build is not None:
            out[name] = build(raw[name], raw[name + quant.SCALE_SUFFIX], enc, shape[1])
        elif enc is not None and enc.quantized:
            out[name] = quant.dequantize(raw[name], raw[name + quant.SCALE_SUFFIX], enc, shape[1], dtype)
        else:
            t = raw[name]
            out[name] = t if t.dtype == dtype else t.to(dtype)
    return out


def read_safetensors(path, expected: dict[str, tuple[int, ...]], dtype: torch.dtype,
                     encodings: dict[str, quant.Encoding] | None = None,
                     keep: Keep | None = None) -> dict[str, torch.Tensor | nn.Module]:
    """Tensors of one shard (memory-mapped by safetensors), checked against the names and shapes the
    config implies; quantized ones (``encodings``) dequantized to ``dtype``."""
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = {name: f.get_tensor(name) for name in f.keys()}
    except SafetensorError as e:
        raise FormatError(f"{path}: not a valid safetensors file ({e})") from None
    return _decode(raw, expected, dtype, encodings, str(path), keep)


def _views(buf: torch.Tensor, header: Header, where: str) -> dict[str, torch.Tensor]:
    """Tensors of a shard's data section held in ``buf`` (uint8), as views (no copy)."""
    out = {}
    for name, info in header.tensors.items():
        dt = ST_DTYPES.get(info.dtype)
        if dt is None:
            raise FormatError(f"{where}: {name} has dtype {info.dtype}, which cosmoe bundles never use; "
                              "re-split the bundle")
        piece = buf[info.begin:info.end]
        if info.begin % dt.itemsize:  # misaligned for its dtype (no writer of ours does this): copy
            piece = piece.clone()
        out[name] = piece.view(dt).view(info.shape)
    return out


class ExpertSlot:
    """One resident expert: parameters (views into ``buf`` for raw slots) and the module using them."""

    def __init__(self, module: Expert, params: dict[str, torch.Tensor], buf: torch.Tensor | None,
                 layout: tuple | None) -> None:
        self.module, self.params, self.buf, self.layout = module, params, buf, layout
        self.key: tuple[int, int] | None = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)


class TorchExperts:
    """``load(layer, expert) -> ExpertSlot`` and ``release(slot)`` for runtime_py.store.ExpertStore."""

    def __init__(self, bundle: Bundle, dtype: torch.dtype, check_hash: str = "first",
                 int_kernels: bool = False) -> None:
        if check_hash not in HASH_CHECKS:
            raise FormatError(f"check_hash must be one of {HASH_CHECKS}, not {check_hash!r}")
        self.bundle, self.dtype, self.config, self.check_hash = bundle, dtype, bundle.config, check_hash
        cfg = self.config
        first = bundle.experts[(0, 0)]
        shapes = {k.removeprefix("layers.0.moe.experts.0."): s for k, s in expert_tensor_shapes(cfg, 0, 0).items()}
        # Linear weights (gate/up/down) computed on their integers (runtime_py/qlinear.py): those that
        # every expert can run on a kernel (with --expert-bits auto, experts differ in scheme).
        encodings = [{k.removeprefix(f"layers.{entry.layer}.moe.experts.{entry.expert}."): e
                      for k, e in (entry.encodings() or {}).items()}
                     for entry in bundle.experts.values()] if int_kernels else []
        # (WD experts' low-rank factors, gate.left / gate.right, are parameters, not linears: dequantized.)
        self.kernel_names = {n for n, shape in shapes.items() if n.endswith(".weight") and n.count(".") == 1
                             and encodings
                             and all(qlinear.kernel_for(shape, enc.get(n)) for enc in encodings)}
        # Raw slots: the shard's bytes are the parameters (float shard in the runtime's dtype).
        self.raw = not self.kernel_names and first.tensors is None \
            and first.dtype == str(dtype).removeprefix("torch.")
        # One unit size for the store: the largest expert (mixed int4/int8 experts are accounted as the
        # larger, so the budget holds whichever are resident).
        def resident(enc: dict[str, quant.Encoding]) -> int:
            return sum(qlinear.kernel_for(s, enc[n]).resident_bytes(s, enc[n]) if n in self.kernel_names
                       else torch.Size(s).numel() * dtype.itemsize for n, s in shapes.items())
        self.unit_bytes = max(resident(enc) for enc in encodings or [{}])
        self._free: list[ExpertSlot] = []
        self._hashed: set[tuple[int, int]] = set()
        self._lock = threading.Lock()
        self.slots_created = 0

    # -- slots
    def _new_slot(self, header: Header, layer: int, expert: int, where: str) -> ExpertSlot:
        cfg = self.config
        prefix = f"layers.{layer}.moe.experts.{expert}."
        with torch.device("meta"):
            module = Expert(cfg.hidden_size, cfg.intermediate_size, cfg.expert_kind, cfg.rank)
        if self.raw:
            buf = torch.empty(header.file_size - header.data_offset, dtype=torch.uint8)
            params = {k.removeprefix(prefix): v for k, v in _views(buf, header, where).items()}
            layout = self._layout(header, prefix)
        else:
            buf, layout = None, None
            params = {k.removeprefix(prefix): torch.empty(s, dtype=self.dtype)
                      for k, s in expert_tensor_shapes(cfg, layer, expert).items()
                      if k.removeprefix(prefix) not in self.kernel_names}
            for name in self.kernel_names:  # integer linears are installed by each load
                _install(module, name, nn.Identity())
        module.load_state_dict(params, assign=True, strict=True)
        self.slots_created += 1
        return ExpertSlot(module, params, buf, layout)

    @staticmethod
    def _layout(header: Header, prefix: str) -> tuple:
        return tuple(sorted((k.removeprefix(prefix), i.dtype, i.shape, i.begin, i.end)
                            for k, i in header.tensors.items()))

    def release(self, slot: ExpertSlot) -> None:
        slot.key = None
        with self._lock:
            self._free.append(slot)

    # -- loading
    @torch.inference_mode()  # also on the prefetch thread: slots are inference tensors
    def load(self, layer: int, expert: int) -> ExpertSlot:
        entry: FileEntry = self.bundle.experts[(layer, expert)]
        path = self.bundle.checked_path(entry)  # size check, every load
        where = str(path)
        with open(path, "rb", buffering=0) as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            n = header_length(head, file_size=size, where=where)
            head += f.read(n)
            header = parse_header(head, file_size=size, where=where)
            prefix = f"layers.{layer}.moe.experts.{expert}."
            expected = expert_tensor_shapes(self.config, layer, expert)
            with self._lock:
                slot = self._free.pop() if self._free else None
            if slot is None:
                slot = self._new_slot(header, layer, expert, where)
            try:
                if self.raw and slot.layout == self._layout(header, prefix):
                    target = slot.buf
                else:
                    target = torch.empty(size - header.data_offset, dtype=torch.uint8)
                got = f.readinto(target.numpy())
                if got != target.numel():
                    raise IntegrityError(f"{where}: read {got} of {target.numel()} data bytes; the file changed "
                                         "while loading")
                if self.check_hash == "always" or (self.check_hash == "first" and (layer, expert) not in self._hashed):
                    self._check_hash(entry, head, target, where)
                if target is not slot.buf:
                    decoded = _decode(_views(target, header, where), expected, self.dtype, entry.encodings(), where,
                                      partial(self._keep, prefix) if self.kernel_names else None)
                    for k, t in decoded.items():
                        if isinstance(t, nn.Module):
                            _install(slot.module, k.removeprefix(prefix), t)
                        else:
                            slot.params[k.removeprefix(prefix)].copy_(t)
                elif self.raw:  # raw read: still check that the header is what the config implies
                    _decode({k: torch.empty(i.shape, dtype=ST_DTYPES[i.dtype], device="meta")
                             for k, i in header.tensors.items()}, expected, self.dtype, None, where)
            except BaseException:
                self.release(slot)
                raise
        slot.key = (layer, expert)
        return slot

    def _keep(self, prefix: str, name: str, shape: tuple[int, ...], enc: quant.Encoding):
        return qlinear.kernel_for(shape, enc).build if name.removeprefix(prefix) in self.kernel_names else None

    def _check_hash(self, entry: FileEntry, head: bytes, data: torch.Tensor, where: str) -> None:
        h = hashlib.sha256(head)
        h.update(data.numpy().data)
        if h.hexdigest() != entry.sha256:
            raise IntegrityError(f"{where}: sha256 differs from the manifest; the shard changed after the "
                                 "bundle was written. Rebuild it or run `cosmoe-export verify --integrity`")
        self._hashed.add((entry.layer, entry.expert))


class TorchEngine:
    """The backbone as a CosmoeForCausalLM without routed experts; the runner plugs its expert
    dispatch (budgeted store, routing metrics, prefetch) into every layer."""

    name = "torch"

    def __init__(self, bundle: Bundle, *, dtype: torch.dtype = torch.float32, check_hash: str = "first",
                 int_kernels: bool = False) -> None:
        """``int_kernels``: quantized linears and embeddings keep their integers and run on PyTorch's
        int kernels (runtime_py/qlinear.py), as on a device; otherwise they are dequantized to
        ``dtype`` when they load (the exact reference the exporter's tools need)."""
        self.bundle, self.config, self.dtype = bundle, bundle.config, dtype
        cfg = self.config
        expected = {n: s for n, s in tensor_shapes(cfg).items() if expert_of(n) is None}
        # The backbone is read once per run: check its sha256 too (a tampered backbone must not run).
        path = bundle.hashed_path(bundle.backbone) if check_hash != "never" else bundle.checked_path(bundle.backbone)
        with torch.device("meta"):
            model = CosmoeForCausalLM(cfg, with_experts=False)
        keep = partial(_backbone_kernel, model, dtype) if int_kernels else None
        state = read_safetensors(path, expected, dtype, bundle.backbone.encodings(), keep)
        modules = {n: m for n, m in state.items() if isinstance(m, nn.Module)}
        for name, module in modules.items():
            _install(model, name, module)
        if isinstance(model.embed, qlinear.QuantEmbedding) and model.lm_head is None:
            model.lm_head = _tied_head(model.embed)  # the tied head multiplies by the same integers
        model.load_state_dict({n: t for n, t in state.items() if n not in modules}, assign=True, strict=True)
        model.inv_freq = rope_inv_freq(cfg)  # a buffer computed from the config, not stored
        self.model = model.eval()
        self.backbone_bytes = _tensor_bytes(model)
        self.experts = TorchExperts(bundle, dtype, check_hash, int_kernels)
        self.unit_bytes = self.experts.unit_bytes

    def set_dispatch(self, dispatch) -> None:
        for layer in self.model.layers:
            layer.moe.dispatch = dispatch

    def load_expert(self, layer: int, expert: int) -> ExpertSlot:
        return self.experts.load(layer, expert)

    def expert_file_bytes(self, layer: int, expert: int) -> int:
        return self.bundle.experts[(layer, expert)].bytes

    def release_expert(self, slot: ExpertSlot) -> None:
        self.experts.release(slot)

    def cache_bytes(self, max_len: int) -> int:
        cfg = self.config
        return 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * max_len * cfg.head_size * self.dtype.itemsize

    def new_cache(self, max_len: int) -> KVCache:
        return KVCache(self.config, 1, max_len, self.dtype)

    def guess_logits(self, layer: int, x_prev: torch.Tensor) -> torch.Tensor:
        cur, prev = self.model.layers[layer], self.model.layers[layer - 1]
        return guess_logits(cur.moe.router.weight, cur.ffn_norm.weight, prev.ffn_norm.weight, x_prev)

    @torch.inference_mode()
    def forward(self, ids: list[int], cache: KVCache, pos: int) -> torch.Tensor:
        """Tokens [T] at positions pos.. continuing ``cache`` -> logits of the last one [V] (fp32)."""
        assert cache.pos == pos, (cache.pos, pos)
        return self.model(torch.tensor([ids]), cache)[0, -1].float()

    @torch.inference_mode()
    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [B, T] -> logits [B, T, V] (fp32), one full forward without a cache."""
        return self.model(ids).float()

    def close(self) -> None:
        pass


def _install(root: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` where canonical tensor ``name`` (``...q.weight``) lives in ``root``."""
    parent, _, attr = name.removesuffix(".weight").rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, attr, module)


def _backbone_kernel(model: nn.Module, dtype: torch.dtype, name: str, shape: tuple[int, ...],
                     enc: quant.Encoding) -> Callable[..., nn.Module] | None:
    """The module that keeps backbone tensor ``name``'s integers, or None to dequantize it."""
    if name == "embed.weight":
        return partial(_quant_embedding, dtype=dtype)
    target = model.get_submodule(name.removesuffix(".weight")) if name.endswith(".weight") else None
    kernel = qlinear.kernel_for(shape, enc)
    # A biased linear (Qwen2's q/k/v) stays float: the kernels have no bias input.
    if kernel is None or not isinstance(target, nn.Linear) or target.bias is not None:
        return None
    return kernel.build


def _quant_embedding(stored: torch.Tensor, scale: torch.Tensor, enc: quant.Encoding, k: int, *,
                     dtype: torch.dtype) -> qlinear.QuantEmbedding:
    return qlinear.QuantEmbedding(stored, scale, enc, k, dtype)


def _tied_head(embed: qlinear.QuantEmbedding) -> nn.Module:
    """The output projection on the embedding's own integers; dequantized if no kernel takes them."""
    shape = (embed.stored.shape[0], embed.dim)
    kernel = qlinear.kernel_for(shape, embed.enc)
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


class _KeepAll:
    """Loads expert (layer, e) on first use and keeps it until the caller pops it from ``resident``:
    for the exporter's tools (calibration, analysis) that walk the model layer by layer and decide
    themselves what to drop. Budgeted generation goes through runtime_py.runner instead."""

    def __init__(self, experts: TorchExperts) -> None:
        self._experts = experts
        self.resident: dict[tuple[int, int], Expert] = {}
        self.loads = 0
        self.bytes_loaded = 0

    def get(self, layer: int, expert: int) -> Expert:
        module = self.resident.get((layer, expert))
        if module is None:
            slot = self._experts.load(layer, expert)
            # A popped module must take its memory with it, so this slot never returns to the pool.
            module = self.resident[(layer, expert)] = slot.module
            self.loads += 1
            self.bytes_loaded += self._experts.bundle.experts[(layer, expert)].bytes
        return module


class TorchRuntime:
    """The whole bundle in PyTorch with experts loaded on first use and kept: ``logits(ids)``,
    ``greedy(ids, n)``, ``model`` and ``store`` for the exporter's layer-by-layer tools."""

    def __init__(self, bundle: Bundle, dtype: torch.dtype = torch.float32) -> None:
        self.engine = TorchEngine(bundle, dtype=dtype)
        self.bundle, self.config, self.dtype, self.model = bundle, bundle.config, dtype, self.engine.model
        self.store = _KeepAll(self.engine.experts)
        for i, layer in enumerate(self.model.layers):
            layer.moe.expert_lookup = partial(self.store.get, i)

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
