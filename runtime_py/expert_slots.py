"""The PyTorch engine's routed experts: a pool of reusable slots that shards are read into.

An expert slot is one buffer the size of an expert's tensors plus an ``Expert`` module whose
parameters are views into it. Loading expert (l, e) into a free slot is one ``readinto`` of the
shard's data section, straight into the parameters' memory (float bundles whose dtype is the
runtime's): no mmap page faults, no allocation, no copy; the budget decides how many slots exist.
Quantized shards: with ``int_kernels`` (the runner's engine) their linears keep the integers and
run on PyTorch's int8/int4 kernels (runtime_py/qlinear.py), so a resident expert costs its integer
bytes; without (the exporter's exact reference) they are dequantized into the slot.

Every load checks the shard's size against the manifest and its header against the config
(runtime_py/shards.py); its sha256 when due (runtime_py/bundle.py: the first load of each expert,
or every load), from the bytes already read, so a shard that changed on disk after the bundle was
verified raises IntegrityError instead of producing tokens.
"""

from __future__ import annotations

import hashlib
import os
import threading
from functools import partial

import torch
from torch import nn

from runtime_py import qlinear, quant
from runtime_py.bundle import Bundle, FileEntry
from runtime_py.config import expert_tensor_shapes
from runtime_py.errors import IntegrityError
from runtime_py.model import Expert, routed_expert
from runtime_py.safetensors_header import Header, header_length, parse_header
from runtime_py.shards import check_tensors, decode, tensor_views


class ExpertSlot:
    """One resident expert: parameters (views into ``buf`` for raw slots) and the module using them."""

    def __init__(self, module: Expert, params: dict[str, torch.Tensor], buf: torch.Tensor | None,
                 layout: tuple | None) -> None:
        self.module, self.params, self.buf, self.layout = module, params, buf, layout
        self.key: tuple[int, int] | None = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)


class ExpertSlots:
    """``load(layer, expert) -> ExpertSlot`` and ``release(slot)`` for runtime_py.store.ExpertStore;
    ``unit_bytes``: what one resident expert holds."""

    def __init__(self, bundle: Bundle, dtype: torch.dtype, check_hash: str = "first",
                 int_kernels: bool = False, activations: str = "bf16") -> None:
        self.bundle, self.dtype, self.config, self.check_hash = bundle, dtype, bundle.config, check_hash
        self.activations = activations
        cfg = self.config
        first = bundle.experts[(cfg.moe_layers[0], 0)]  # layer 0 may be dense (no experts)
        shapes = {k.removeprefix("layers.0.moe.experts.0."): s for k, s in expert_tensor_shapes(cfg, 0, 0).items()}
        # Linear weights (gate/up/down) computed on their integers (runtime_py/qlinear.py): those that
        # every expert can run on a kernel (with --expert-bits auto, experts differ in scheme).
        encodings = [{k.removeprefix(f"layers.{entry.layer}.moe.experts.{entry.expert}."): e
                      for k, e in (entry.encodings() or {}).items()}
                     for entry in bundle.experts.values()] if int_kernels else []
        # (WD experts' low-rank factors, gate.left / gate.right, are parameters, not linears: dequantized.)
        # A biased linear (gpt-oss's experts) stays float: the kernels have no bias input.
        self.kernel_names = {n for n, shape in shapes.items() if n.endswith(".weight") and n.count(".") == 1
                             and n.replace(".weight", ".bias") not in shapes and encodings
                             and all(qlinear.kernel_for(shape, enc.get(n), activations) for enc in encodings)}
        # Raw slots: the shard's bytes are the parameters (float shard in the runtime's dtype).
        self.raw = not self.kernel_names and first.tensors is None \
            and first.dtype == str(dtype).removeprefix("torch.")
        # One unit size for the store: the largest expert (mixed int4/int8 experts are accounted as the
        # larger, so the budget holds whichever are resident).
        def resident(enc: dict[str, quant.Encoding]) -> int:
            return sum(qlinear.kernel_for(s, enc[n], activations).resident_bytes(s, enc[n]) if n in self.kernel_names
                       else torch.Size(s).numel() * dtype.itemsize for n, s in shapes.items())
        self.unit_bytes = max(resident(enc) for enc in encodings or [{}])
        self._free: list[ExpertSlot] = []
        self._lock = threading.Lock()
        self.slots_created = 0

    # -- slots
    def _new_slot(self, header: Header, layer: int, expert: int, where: str) -> ExpertSlot:
        cfg = self.config
        prefix = f"layers.{layer}.moe.experts.{expert}."
        with torch.device("meta"):
            module = routed_expert(cfg)
        if self.raw:
            buf = torch.empty(header.file_size - header.data_offset, dtype=torch.uint8)
            params = {k.removeprefix(prefix): v for k, v in tensor_views(buf, header, where).items()}
            layout = self._layout(header, prefix)
        else:
            buf, layout = None, None
            params = {k.removeprefix(prefix): torch.empty(s, dtype=self.dtype)
                      for k, s in expert_tensor_shapes(cfg, layer, expert).items()
                      if k.removeprefix(prefix) not in self.kernel_names}
            for name in self.kernel_names:  # integer linears are installed by each load
                qlinear.install(module, name, nn.Identity())
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
            expected, encodings = expert_tensor_shapes(self.config, layer, expert), entry.encodings()
            check_tensors(header, expected, encodings, where)
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
                if self.bundle.hash_due(entry, self.check_hash):
                    h = hashlib.sha256(head)
                    h.update(target.numpy().data)
                    self.bundle.check_sha256(entry, h.hexdigest())
                if target is not slot.buf:
                    decoded = decode(tensor_views(target, header, where), expected, self.dtype, encodings,
                                     partial(self._keep, prefix) if self.kernel_names else None)
                    for k, t in decoded.items():
                        if isinstance(t, nn.Module):
                            qlinear.install(slot.module, k.removeprefix(prefix), t)
                        else:
                            slot.params[k.removeprefix(prefix)].copy_(t)
            except BaseException:
                self.release(slot)
                raise
        slot.key = (layer, expert)
        return slot

    def _keep(self, prefix: str, name: str, shape: tuple[int, ...], enc: quant.Encoding):
        return (qlinear.kernel_for(shape, enc, self.activations).build if name.removeprefix(prefix) in self.kernel_names
                else None)
