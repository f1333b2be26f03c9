"""Reading a bundle's tensor files: one reader for every stage, one check against the config.

``read_shard(bundle, entry, expected, ...)`` is how the PyTorch engine reads its backbone, the program
engine its routers, and the exporter's ``quantize`` and ``lower`` every shard: the size (and, when
due, sha256) check of runtime_py/bundle.py, the strict header reader (runtime_py/safetensors_header.py),
``check_tensors`` and ``decode``. The PyTorch engine's expert slots (runtime_py/expert_slots.py) read
a shard's bytes themselves, straight into a slot, and use the same ``check_tensors`` and ``decode``.

``check_tensors`` is the one place that says which tensors a file must hold: exactly the canonical
tensors the config implies (``expected``), each float in a float dtype, or, where the manifest's
encodings quantize it, its codes and scales in the dtypes and shapes of runtime_py/quant.py.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from runtime_py import format as fmt
from runtime_py import quant
from runtime_py.bundle import Bundle, FileEntry
from runtime_py.errors import FormatError
from runtime_py.safetensors_header import Header, read_header

Shapes = dict[str, tuple[int, ...]]  # canonical name -> shape (runtime_py.config.tensor_shapes)
# (canonical name, shape, encoding) -> a builder of what stands for a quantized tensor instead of its
# dequantized values, called as builder(stored codes, scales, encoding, K): a module computing with
# the integers (runtime_py/qlinear.py), the codes as they are (lower); None dequantizes the tensor.
Keep = Callable[[str, tuple[int, ...], quant.Encoding], Callable[..., Any] | None]


def torch_dtype(st: str, name: str, where: str) -> torch.dtype:
    """The torch dtype of a header's safetensors dtype string."""
    d = fmt.st_dtype(st)
    if d is None:
        raise FormatError(f"{where}: {name} has dtype {st}, which cosmoe bundles never use; re-split the bundle")
    return d.torch


def check_tensors(header: Header, expected: Shapes, encodings: dict[str, quant.Encoding] | None,
                  where: str) -> None:
    """Raise FormatError unless the file's tensors are exactly what ``expected`` (the config) and
    ``encodings`` (the manifest; None: a float bundle) imply: names, shapes and dtypes."""
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
        stored.update(quant.stored_specs(name, tuple(shape), enc, torch.float32))  # codes and scales only
    have = header.tensors
    if set(have) != set(stored):
        extra, missing = sorted(set(have) - set(stored))[:3], sorted(set(stored) - set(have))[:3]
        raise FormatError(f"{where}: tensors do not match the model config (extra {extra}, missing {missing})")
    for name, (want_dtype, want_shape) in stored.items():
        info = have[name]
        if info.shape != want_shape:
            raise FormatError(f"{where}: {name} has shape {info.shape}, config implies {want_shape}")
        dtype = torch_dtype(info.dtype, name, where)
        if want_dtype is not None and dtype != want_dtype:
            raise FormatError(f"{where}: {name} is {dtype}, its encoding needs {want_dtype}")
        if want_dtype is None and not dtype.is_floating_point:
            raise FormatError(f"{where}: {name} is {dtype}, expected a float tensor")


def decode(raw: dict[str, torch.Tensor], expected: Shapes, dtype: torch.dtype,
           encodings: dict[str, quant.Encoding] | None, keep: Keep | None = None) -> dict[str, Any]:
    """The canonical tensors of checked stored tensors (``raw``, by stored name): floats in ``dtype``,
    quantized ones dequantized to ``dtype`` (once, here), or what ``keep``'s builder makes of them."""
    encodings = encodings or {}
    out: dict[str, Any] = {}
    for name, shape in expected.items():
        enc = encodings.get(name)
        if enc is None or not enc.quantized:
            t = raw[name]
            out[name] = t if t.dtype == dtype else t.to(dtype)
            continue
        build = keep(name, tuple(shape), enc) if keep is not None else None
        if build is not None:
            out[name] = build(raw[name], raw[name + quant.SCALE_SUFFIX], enc, shape[1])
        else:
            out[name] = quant.dequantize(raw[name], raw[name + quant.SCALE_SUFFIX], enc, shape[1], dtype)
    return out


def tensor_views(buf: torch.Tensor, header: Header, where: str) -> dict[str, torch.Tensor]:
    """Tensors of a shard's data section held in ``buf`` (uint8), as views (no copy)."""
    out = {}
    for name, info in header.tensors.items():
        dt = torch_dtype(info.dtype, name, where)
        piece = buf[info.begin:info.end]
        if info.begin % dt.itemsize:  # misaligned for its dtype (no writer of ours does this): copy
            piece = piece.clone()
        out[name] = piece.view(dt).view(info.shape)
    return out


def read_file(path: str | os.PathLike, expected: Shapes, dtype: torch.dtype,
              encodings: dict[str, quant.Encoding] | None = None, *, keep: Keep | None = None,
              names: Iterable[str] | None = None) -> dict[str, Any]:
    """``read_shard`` for a file outside a bundle (its size and hash unchecked): the header read
    strictly and checked (``check_tensors``), then the tensors memory-mapped by safetensors and
    decoded; ``names``: only these canonical tensors (the whole file is checked all the same)."""
    where = os.fspath(path)
    check_tensors(read_header(path), expected, encodings, where)
    wanted = {n: expected[n] for n in (expected if names is None else names)}
    scaled = {n for n in wanted if encodings and encodings[n].quantized}
    try:
        with safe_open(where, framework="pt") as f:
            raw = {n: f.get_tensor(n) for n in [*wanted, *(n + quant.SCALE_SUFFIX for n in scaled)]}
    except SafetensorError as e:
        raise FormatError(f"{where}: not a valid safetensors file ({e}); re-split the bundle") from None
    return decode(raw, wanted, dtype, encodings, keep)


def read_shard(bundle: Bundle, entry: FileEntry, expected: Shapes, *, dtype: torch.dtype,
               keep: Keep | None = None, names: Iterable[str] | None = None,
               check_hash: str = "first") -> dict[str, Any]:
    """Canonical name -> tensor of one of the bundle's files, checked against the manifest (size;
    sha256 as ``check_hash`` says, runtime_py.bundle.HASH_CHECKS) and the config (``check_tensors``);
    quantized tensors dequantized to ``dtype`` unless ``keep`` builds something else for them."""
    path = bundle.hashed_path(entry, check_hash)
    return read_file(path, expected, dtype, entry.encodings(), keep=keep, names=names)
