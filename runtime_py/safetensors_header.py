"""A strict safetensors header reader, safe by construction, for reading shards into preallocated buffers.

A safetensors file is ``u64 little-endian N`` + ``N bytes of UTF-8 JSON`` + data. The JSON maps each
tensor name to ``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets relative to the data
start) and may hold ``"__metadata__": {str: str}``.

Everything the runtime later does with a header (seek to ``data_offset + begin``, read ``end - begin``
bytes into a buffer of ``prod(shape) * itemsize`` bytes) is checked here first, the way the safetensors
library's own ``Metadata::validate`` does: a cap on the header size before anything is allocated,
offsets that are two non-negative ints, sizes that match dtype x shape, and tensors that tile the data
section exactly, with no overlap, no gap and no byte past the end. It is stricter than the library
in three ways, because a file that needs them was not written by any honest writer: duplicate JSON
keys (the library keeps the last one silently), unknown fields in a tensor entry, and strings that are
not valid Unicode (lone surrogates) are errors. Every failure is one ``FormatError`` whose message
names the file, the problem and what to do.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass

from runtime_py.errors import FormatError

# Same cap as the safetensors library (MAX_HEADER_SIZE = 100_000_000 there): a crafted length
# must never make us allocate gigabytes before we have read a single byte of JSON.
MAX_HEADER_BYTES = 100 * 1024 * 1024
METADATA_KEY = "__metadata__"
# Bits per element of every dtype safetensors 0.8.0 knows (its `Dtype` enum). Sub-byte dtypes
# (F4, F6_*) must fill whole bytes: prod(shape) * bits % 8 == 0.
DTYPE_BITS: dict[str, int] = {
    "BOOL": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8,
    "F8_E8M0": 8, "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8, "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
    "I32": 32, "U32": 32, "F32": 32, "C64": 64, "F64": 64, "I64": 64, "U64": 64,
}
_TENSOR_FIELDS = frozenset({"dtype", "shape", "data_offsets"})
# Offsets and element counts are u64 in the spec (usize in the library); anything past that is an
# overflow there, and a sign of a crafted file here.
_U64_LIMIT = 1 << 64
_FIX = "the file is corrupt or was not written by a safetensors writer; re-export it"


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]
    begin: int  # offsets relative to the data start (Header.data_offset)
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass(frozen=True)
class Header:
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    data_offset: int  # absolute file offset of the data section: 8 + header length
    file_size: int


class _Bad(Exception):
    """Internal: a problem found while decoding JSON, turned into one FormatError by parse_header."""


def parse_header(buf: bytes, *, file_size: int, where: str) -> Header:
    """Parse and fully validate a safetensors header; ``buf`` is the file's first bytes (>= 8 + header length)."""
    n = header_length(buf, file_size=file_size, where=where)
    if len(buf) < 8 + n:
        raise FormatError(f"{where}: got {len(buf)} bytes of a {8 + n}-byte safetensors header "
                          f"(the file changed or shrank while being read); read it again or re-export it")
    raw = bytes(buf[8:8 + n])
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise FormatError(f"{where}: safetensors header is not UTF-8 (byte {e.start}); {_FIX}") from None
    try:
        doc = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constants)
    except _Bad as e:
        raise FormatError(f"{where}: safetensors header {e}; {_FIX}") from None
    except (ValueError, RecursionError) as e:  # JSONDecodeError, int digit limit, absurd nesting
        raise FormatError(f"{where}: safetensors header is not valid JSON ({_one_line(e)}); {_FIX}") from None
    if not isinstance(doc, dict):
        raise FormatError(f"{where}: safetensors header is a JSON {type(doc).__name__}, not an object; {_FIX}")

    metadata = _metadata(doc.pop(METADATA_KEY, None), where)
    tensors = {_text(name, where, "tensor name"): _tensor(name, entry, where) for name, entry in doc.items()}
    _check_layout(tensors, data_len=file_size - 8 - n, where=where)
    return Header(tensors=tensors, metadata=metadata, data_offset=8 + n, file_size=file_size)


def header_length(buf: bytes, *, file_size: int, where: str) -> int:
    """The header length N from the first 8 bytes, checked against the file size and MAX_HEADER_BYTES."""
    if file_size < 8 or len(buf) < 8:
        raise FormatError(f"{where}: {min(file_size, len(buf))} bytes is shorter than the 8-byte safetensors "
                          f"length prefix (truncated or empty file); re-export it")
    (n,) = struct.unpack("<Q", bytes(buf[:8]))
    if n > MAX_HEADER_BYTES:
        raise FormatError(f"{where}: safetensors header length {n} is above the {MAX_HEADER_BYTES}-byte cap "
                          f"(corrupt or not a safetensors file); re-export it")
    if 8 + n > file_size:
        raise FormatError(f"{where}: safetensors header length {n} reaches beyond the end of the "
                          f"{file_size}-byte file (truncated?); re-export or re-download it")
    return n


def read_header(path: str | os.PathLike) -> Header:
    """Open ``path`` and read and validate only its header (never the data)."""
    where = os.fspath(path)
    try:
        with open(path, "rb") as f:
            file_size = os.fstat(f.fileno()).st_size
            prefix = _read_exact(f, min(8, file_size))
            # Check the length before reading it, so a crafted N never turns into a huge read.
            n = header_length(prefix, file_size=file_size, where=where)
            buf = prefix + _read_exact(f, n)
    except OSError as e:
        raise FormatError(f"{where}: cannot read safetensors file ({e.strerror or e}); check the path") from None
    return parse_header(buf, file_size=file_size, where=where)


def _read_exact(f, n: int) -> bytes:
    chunks, got = [], 0
    while got < n:
        chunk = f.read(n - got)
        if not chunk:  # the file shrank under us; parse_header reports the short buffer
            break
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise _Bad(f"has the key {_short(key)} twice (a reader would silently pick one)")
        out[key] = value
    return out


def _no_constants(name: str):
    raise _Bad(f"contains the non-JSON constant {name}")


def _text(value: str, where: str, what: str) -> str:
    # json.loads lets "\ud800" through as a lone surrogate: not Unicode, cannot be encoded back.
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise FormatError(f"{where}: safetensors {what} {_short(value)} is not valid Unicode; {_FIX}") from None
    return value


def _metadata(meta: object, where: str) -> dict[str, str]:
    if meta is None:  # the library accepts "__metadata__": null as "no metadata"
        return {}
    if not isinstance(meta, dict):
        raise FormatError(f"{where}: safetensors {METADATA_KEY} is a JSON {type(meta).__name__}, "
                          f"not an object of strings; {_FIX}")
    for key, value in meta.items():
        if not isinstance(value, str):
            raise FormatError(f"{where}: safetensors {METADATA_KEY}[{_short(key)}] is a JSON "
                              f"{type(value).__name__}, not a string; {_FIX}")
        _text(key, where, "metadata key")
        _text(value, where, "metadata value")
    return dict(meta)


def _tensor(name: str, entry: object, where: str) -> TensorInfo:
    what = f"{where}: safetensors tensor {_short(name)}"
    if not isinstance(entry, dict):
        raise FormatError(f"{what} is a JSON {type(entry).__name__}, not an object; {_FIX}")
    if set(entry) != _TENSOR_FIELDS:
        missing, extra = sorted(_TENSOR_FIELDS - set(entry)), sorted(map(_short, set(entry) - _TENSOR_FIELDS))
        raise FormatError(f"{what} has fields missing {missing} / unknown {extra} "
                          f"(expected exactly dtype, shape, data_offsets); {_FIX}")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPE_BITS:
        raise FormatError(f"{what} has unknown dtype {_short(dtype)} (known: {', '.join(DTYPE_BITS)}); {_FIX}")
    if not isinstance(shape, list) or not all(_is_int(d) and 0 <= d < _U64_LIMIT for d in shape):
        raise FormatError(f"{what} has shape {_short(shape)}: not a list of ints in [0, 2**64); {_FIX}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) and o >= 0 for o in offsets)):
        raise FormatError(f"{what} has data_offsets {_short(offsets)}: not two non-negative ints; {_FIX}")
    begin, end = offsets
    if begin >= _U64_LIMIT or end >= _U64_LIMIT:
        raise FormatError(f"{what} has data_offsets {offsets} past 2**64 (arithmetic overflow); {_FIX}")
    if begin > end:
        raise FormatError(f"{what} has data_offsets [{begin}, {end}] with begin > end; {_FIX}")
    # Multiply with an early stop so a crafted shape of huge dims never builds a giant int.
    count = 1
    for d in shape:
        count *= d
        if count >= _U64_LIMIT:
            raise FormatError(f"{what} has shape {_short(shape)} whose element count overflows u64; {_FIX}")
    bits = count * DTYPE_BITS[dtype]
    if bits % 8:
        raise FormatError(f"{what}: {count} x {dtype} is {bits} bits, not a whole number of bytes; {_FIX}")
    if bits // 8 != end - begin:
        raise FormatError(f"{what}: {dtype} {tuple(shape)} needs {bits // 8} bytes but data_offsets "
                          f"[{begin}, {end}] hold {end - begin}; {_FIX}")
    return TensorInfo(dtype=dtype, shape=tuple(shape), begin=begin, end=end)


def _check_layout(tensors: dict[str, TensorInfo], *, data_len: int, where: str) -> None:
    """The tensors must tile [0, data_len) exactly: no overlap, no gap, nothing past the end (like safetensors)."""
    expected, prev = 0, None
    for name, info in sorted(tensors.items(), key=lambda kv: (kv[1].begin, kv[1].end, kv[0])):
        if info.begin < expected:
            raise FormatError(f"{where}: safetensors tensors {_short(prev)} and {_short(name)} overlap "
                              f"(byte {info.begin} < {expected}); {_FIX}")
        if info.begin > expected:
            raise FormatError(f"{where}: safetensors data has a gap of {info.begin - expected} bytes before "
                              f"tensor {_short(name)} (bytes {expected}..{info.begin} belong to no tensor); {_FIX}")
        expected, prev = info.end, name
    if expected != data_len:
        problem = "reach past the end of the file (truncated?)" if expected > data_len else "leave trailing bytes"
        raise FormatError(f"{where}: safetensors tensors cover {expected} data bytes but the file holds "
                          f"{data_len}: they {problem}; {_FIX}")


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _short(x: object, limit: int = 80) -> str:
    # repr() escapes newlines, so a crafted name can never break the one-line message.
    text = repr(x)
    return text if len(text) <= limit else text[:limit] + "..."


def _one_line(e: BaseException) -> str:
    return _short(str(e), 120).strip("'\"")


def data_bytes(header: Header) -> int:
    """Size of the data section; by validation equal to the sum of the tensors' byte sizes."""
    return header.file_size - header.data_offset

