"""Property-based tests: the safetensors header reader and the manifest validator either accept an
input as valid or raise our own named error, never another exception; and where the safetensors
library accepts a file, our header reader agrees with it on every name, dtype, shape and byte."""

from __future__ import annotations

import json
import math
import os
import shutil
import struct

import pytest
import safetensors
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from safetensors.torch import save

from runtime_py.bundle import Bundle, validate_manifest
from runtime_py.errors import CosmoeError, FormatError
from runtime_py.safetensors_header import DTYPE_BITS, MAX_HEADER_BYTES, parse_header, read_header


def one_line(e: Exception, where: str) -> None:
    """Every error the readers raise is one line that starts with the file (or bundle) it is about."""
    assert "\n" not in str(e) and str(e).startswith(where), str(e)


FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# ---- strategies ------------------------------------------------------------------------------------


@st.composite
def tensor_dicts(draw) -> dict[str, dict]:
    """Tensors of every safetensors dtype: name -> {dtype, shape, data}."""
    names = draw(st.lists(st.text(max_size=12).filter(lambda s: s != "__metadata__"), max_size=6, unique=True))
    out = {}
    for name in names:
        dtype = draw(st.sampled_from(sorted(DTYPE_BITS)))
        shape = draw(st.lists(st.integers(0, 5), max_size=3))
        bits = math.prod(shape) * DTYPE_BITS[dtype]
        assume(bits % 8 == 0)  # sub-byte dtypes must fill whole bytes
        out[name] = {"dtype": dtype, "shape": shape, "data": draw(st.binary(min_size=bits // 8, max_size=bits // 8))}
    return out


@st.composite
def safetensors_files(draw) -> tuple[bytes, dict, dict | None]:
    """A file laid out like any writer might: tensors in a drawn order, optional metadata and padding."""
    tensors = draw(tensor_dicts())
    metadata = draw(st.none() | st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=3))
    header, data = {}, b""
    if metadata is not None:
        header["__metadata__"] = metadata
    for name in draw(st.permutations(sorted(tensors))):
        t = tensors[name]
        offsets = [len(data), len(data) + len(t["data"])]
        header[name] = {"dtype": t["dtype"], "shape": t["shape"], "data_offsets": offsets}
        data += t["data"]
    text = json.dumps(header, ensure_ascii=draw(st.booleans())).encode() + b" " * draw(st.integers(0, 7))
    return with_header(text, data), tensors, metadata


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12)


def with_header(text: bytes, data: bytes = b"") -> bytes:
    return struct.pack("<Q", len(text)) + text + data


def library_view(buf: bytes) -> dict[str, tuple[str, tuple[int, ...], bytes]] | None:
    """What the safetensors library reads from ``buf``, or None if it refuses it."""
    try:
        return {name: (t["dtype"], tuple(t["shape"]), bytes(t["data"])) for name, t in safetensors.deserialize(buf)}
    except Exception:  # the library's own error types vary by version; refusing is all we need
        return None


def our_view(buf: bytes) -> dict[str, tuple[str, tuple[int, ...], bytes]]:
    h = parse_header(buf, file_size=len(buf), where="x.safetensors")
    at = h.data_offset
    return {name: (t.dtype, t.shape, buf[at + t.begin:at + t.end]) for name, t in h.tensors.items()}


# ---- the safetensors header reader -----------------------------------------------------------------


@FAST
@given(case=safetensors_files())
def test_header_agrees_with_safetensors_on_valid_files(case):
    buf, tensors, metadata = case
    lib = library_view(buf)
    assert lib == {name: (t["dtype"], tuple(t["shape"]), t["data"]) for name, t in tensors.items()}
    assert our_view(buf) == lib
    h = parse_header(buf, file_size=len(buf), where="x")
    assert h.metadata == (metadata or {})
    assert h.data_offset + sum(t.nbytes for t in h.tensors.values()) == h.file_size


@FAST
@given(tensors=st.dictionaries(st.text(max_size=8), st.sampled_from(
    [torch.float32, torch.bfloat16, torch.float16, torch.int8, torch.uint8, torch.int64, torch.bool]), max_size=5),
    shape=st.lists(st.integers(0, 4), max_size=3))
def test_header_reads_what_the_library_writes(tensors, shape):
    """The library's own writer (ordering by dtype, 8-byte padding) read back by parse_header."""
    buf = save({name: torch.zeros(shape, dtype=dtype) for name, dtype in tensors.items()}, metadata={"format": "pt"})
    assert our_view(buf) == library_view(buf)


@FAST
@given(case=safetensors_files(), cuts=st.lists(st.tuples(st.integers(0, 10**6), st.binary(max_size=4)),
                                             min_size=1, max_size=4))
def test_mutated_files_never_accepted_when_the_library_refuses(case, cuts):
    """Random splices into a valid file: we raise FormatError or agree with the library exactly."""
    buf = bytearray(case[0])
    for pos, repl in cuts:
        pos %= len(buf) + 1
        buf[pos:pos + len(repl) // 2 + 1] = repl
    buf = bytes(buf)
    try:
        ours = our_view(buf)
    except FormatError as e:
        one_line(e, "x")
        return
    assert ours == library_view(buf)


@FAST
@given(st.binary(max_size=200))
def test_header_any_bytes(buf):
    try:
        parse_header(buf, file_size=len(buf), where="x")
    except FormatError as e:
        one_line(e, "x")


@FAST
@given(doc=st.dictionaries(st.text(max_size=8), json_values, max_size=4) | json_values, data=st.binary(max_size=16))
def test_header_any_json(doc, data):
    buf = with_header(json.dumps(doc).encode(), data)
    try:
        h = parse_header(buf, file_size=len(buf), where="x")
    except FormatError as e:
        one_line(e, "x")
        return
    assert library_view(buf) is not None  # never laxer than the library
    assert sum(t.nbytes for t in h.tensors.values()) == len(data)


@FAST
@given(entry=st.fixed_dictionaries({"dtype": st.sampled_from(["F32", "U8", "F4", "F6_E2M3"]) | json_values,
                                    "shape": st.lists(st.integers(-2, 2**66), max_size=3) | json_values,
                                    "data_offsets": st.lists(st.integers(-2, 2**66), max_size=3) | json_values}),
       data=st.binary(max_size=16))
def test_header_any_tensor_entry(entry, data):
    buf = with_header(json.dumps({"t": entry}).encode(), data)
    try:
        parse_header(buf, file_size=len(buf), where="x")
    except FormatError as e:
        one_line(e, "x")
        return
    assert library_view(buf) is not None


@pytest.mark.parametrize("text, problem", [
    (b'{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}',
     "twice"),
    (b'{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1],"x":1}}', "unknown"),
    (b'{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"__metadata__":{"k":1}}', "not a string"),
    (b'{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"__metadata__":{"k":"\\ud800"}}', "not valid Unicode"),
    (b'{"a":{"dtype":"U8","shape":[true],"data_offsets":[0,1]}}', "shape"),
    (b'{"a":{"dtype":"U8","shape":[1],"data_offsets":[1,0]}}', "begin > end"),
    (b'{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1.0]}}', "two non-negative ints"),
    (b'{"a":{"dtype":"U8","shape":[4294967296,4294967296],"data_offsets":[0,1]}}', "overflows"),
    (b'{"a":{"dtype":"F4","shape":[3],"data_offsets":[0,1]}}', "whole number of bytes"),
    (b'{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"b":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}',
     "overlap"),
    (b'{"a":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}}', "gap"),
    (b'\xff{}', "not UTF-8"),
    (b'[' * 100_000, "not valid JSON"),
    (b'{"a":NaN}', "NaN"),
])
def test_header_named_problems(text, problem):
    buf = with_header(text, b"\0\0")
    with pytest.raises(FormatError, match=problem) as e:
        parse_header(buf, file_size=len(buf), where="x")
    one_line(e.value, "x")


def test_read_header_checks_length_before_reading(tmp_path):
    p = tmp_path / "big.safetensors"
    p.write_bytes(struct.pack("<Q", MAX_HEADER_BYTES + 1) + b"{}")
    with pytest.raises(FormatError, match="cap"):
        read_header(p)
    p.write_bytes(struct.pack("<Q", 1000) + b"{}")
    with pytest.raises(FormatError, match="beyond the end"):
        read_header(p)
    with pytest.raises(FormatError, match="cannot read"):
        read_header(tmp_path / "absent.safetensors")


# ---- the manifest validator ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory):
    from cosmoe_export.importers.sources import open_source
    from cosmoe_export.importers.split import split
    out = tmp_path_factory.mktemp("props") / "bundle"
    split(source=open_source("tiny"), out=out, dtype=None, force=False, progress=False)
    return out


@FAST
@given(manifest=json_values)
def test_validate_manifest_any_json(manifest):
    try:
        validate_manifest(manifest, where="m.json")
    except FormatError as e:
        one_line(e, "m.json")


def _paths(doc, prefix=()):
    yield prefix
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            yield from _paths(v, prefix + (i,))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(data=st.data())
def test_bundle_open_mutated_manifest(tiny_bundle, data, tmp_path_factory):
    """A real manifest with one value replaced by arbitrary JSON: Bundle.open accepts it or raises CosmoeError."""
    manifest = json.loads((tiny_bundle / "manifest.json").read_text())
    where = data.draw(st.sampled_from(list(_paths(manifest))[1:]))
    node = manifest
    for key in where[:-1]:
        node = node[key]
    node[where[-1]] = data.draw(json_values)
    root = tmp_path_factory.mktemp("m") / "b"
    shutil.copytree(tiny_bundle, root, copy_function=os.link)  # hard links: no bytes copied
    (root / "manifest.json").unlink()
    (root / "manifest.json").write_text(json.dumps(manifest))
    try:
        Bundle.open(root)
    except CosmoeError as e:
        one_line(e, str(root))


@FAST
@given(raw=st.binary(max_size=300) | st.text(max_size=300).map(str.encode))
def test_bundle_open_any_manifest_bytes(raw, tmp_path_factory):
    root = tmp_path_factory.mktemp("raw")
    (root / "manifest.json").write_bytes(raw)
    try:
        Bundle.open(root)
    except CosmoeError as e:
        one_line(e, str(root))


@pytest.mark.parametrize("raw", [b"[" * 100_000, b'{"format": 1' + b"0" * 5000 + b"}", b'{"a": NaN}'])
def test_bundle_open_hostile_json(raw, tmp_path):
    (tmp_path / "manifest.json").write_bytes(raw)
    with pytest.raises(FormatError) as e:
        Bundle.open(tmp_path)
    one_line(e.value, str(tmp_path))
