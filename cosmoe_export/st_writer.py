"""A streaming safetensors writer.

Written by hand because the safetensors library's writers (``save_file``, ``serialize``) take every
tensor of a file at once: a backbone of a few GB would sit in memory whole. The format is small
(8-byte little-endian header length, JSON header padded with spaces to 8 bytes, raw little-endian
data) and our output is byte-identical to ``safetensors.torch.save`` for the same tensors, which
tests pin.

The writer is a state machine: the header (every name, dtype and shape) is fixed when the file
opens; tensors must then arrive exactly once each, in header order; ``close`` checks that all
came. Anything else raises, so a file is either complete or never renamed into place.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
from pathlib import Path

import torch

from runtime_py import format as fmt


class SafetensorsWriter:
    def __init__(self, path: Path, specs: dict[str, tuple[torch.dtype, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None) -> None:
        self.path = Path(path)
        self.order, blob = plan_header(specs, metadata)
        self.specs = specs
        self._hash = hashlib.sha256()
        self._file = open(self.path, "xb")  # never overwrite: callers write into fresh temp dirs
        self._next = 0
        self.bytes = 0
        self._put(len(blob).to_bytes(8, "little") + blob)

    def _put(self, data: bytes | memoryview) -> None:
        self._file.write(data)
        self._hash.update(data)
        self.bytes += len(data)

    @property
    def expected_next(self) -> str | None:
        return self.order[self._next] if self._next < len(self.order) else None

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self._file.closed:
            raise RuntimeError(f"{self.path}: write after close")
        if name != self.expected_next:
            raise RuntimeError(f"{self.path}: got {name!r}, expected {self.expected_next!r} (tensors must come "
                               "once each, in header order)")
        dtype, shape = self.specs[name]
        if tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
            raise RuntimeError(f"{self.path}: {name} is {tensor.dtype} {tuple(tensor.shape)}, "
                               f"header says {dtype} {shape}")
        # Little-endian raw bytes without an extra copy when already contiguous.
        self._put(memoryview(tensor.contiguous().view(-1).view(torch.uint8).numpy()))
        self._next += 1

    def close(self) -> str:
        """Flush, fsync and return the file's sha256. Refuses to close an incomplete file."""
        if self.expected_next is not None:
            self.abort()
            raise RuntimeError(f"{self.path}: closed before {self.expected_next!r} was written")
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        return self._hash.hexdigest()

    def abort(self) -> None:
        if not self._file.closed:
            # close() flushes, and fails again on a full disk; the file is thrown away and the error
            # being handled already says why, so a second one must not replace it.
            with contextlib.suppress(OSError):
                self._file.close()


def plan_header(specs: dict[str, tuple[torch.dtype, tuple[int, ...]]],
                metadata: dict[str, str] | None = None) -> tuple[list[str], bytes]:
    """(tensor order, padded JSON header) of a file holding ``specs``, exactly as safetensors writes it."""
    # safetensors orders tensors by dtype (see _ST_ORDER), then name.
    order = sorted(specs, key=lambda n: (-_dtype_rank(specs[n][0]), n))
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = dict(sorted(metadata.items()))
    offset = 0
    for name in order:
        dtype, shape = specs[name]
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": _st(dtype), "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    return order, blob + b" " * ((8 - len(blob) % 8) % 8)


def file_bytes(specs: dict[str, tuple[torch.dtype, tuple[int, ...]]], metadata: dict[str, str] | None = None) -> int:
    """The exact size of the file the writer makes for ``specs``, without writing it (size planning)."""
    _, blob = plan_header(specs, metadata)
    return 8 + len(blob) + sum(math.prod(s) * torch.empty((), dtype=d).element_size() for d, s in specs.values())


# safetensors sorts by its Dtype enum (declaration order), descending.
_ST_ORDER = ["BOOL", "U8", "I8", "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "F64", "I64", "U64"]


def _dtype_rank(dtype: torch.dtype) -> int:
    return _ST_ORDER.index(_st(dtype))


def _st(dtype: torch.dtype) -> str:
    known = fmt.dtype_of(dtype)
    if known is None:
        raise ValueError(f"no safetensors dtype for {dtype}")
    return known.st
