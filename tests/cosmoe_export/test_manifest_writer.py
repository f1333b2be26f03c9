"""The one manifest writer: calls in order, validated before a byte is written, replaced atomically."""

from __future__ import annotations

import pytest

from cosmoe_export.manifest_writer import ManifestWriter
from runtime_py import format as fmt
from runtime_py.errors import FormatError

SHA = "0" * 64


def _writer() -> ManifestWriter:
    return ManifestWriter(model={"hidden_size": 8}, tokenizer=None, provenance={"source": {}, "tools": {"b": "2"}})


def _entry(path: str, **kw) -> dict:
    return {"path": path, "role": "backbone", "bytes": 1, "sha256": SHA, **kw}


def test_writes_in_the_formats_key_order(tmp_path):
    w = _writer()
    w.add_files([_entry(fmt.BACKBONE_PATH)])
    m = w.write(tmp_path, where="t")
    assert list(m) == ["format", "format_version", "model", "tokenizer", "provenance", "files"]
    assert (tmp_path / fmt.MANIFEST_NAME).read_bytes() == fmt.dumps_manifest(m)
    assert [p.name for p in tmp_path.iterdir()] == [fmt.MANIFEST_NAME]  # no temp file left


def test_refuses_out_of_order_calls(tmp_path):
    w = _writer()
    with pytest.raises(RuntimeError, match="needs its files"):
        w.write(tmp_path, where="t")
    w.add_files([_entry(fmt.BACKBONE_PATH)])
    with pytest.raises(RuntimeError, match="already added"):
        w.add_files([_entry("other")])
    w.write(tmp_path, where="t")
    for late in (lambda: w.write(tmp_path, where="t"), lambda: w.add_tools({"a": "1"})):
        with pytest.raises(RuntimeError, match="already written"):
            late()


def test_refuses_a_path_twice():
    w = ManifestWriter.updating({**_writer()._head, "files": [_entry(fmt.BACKBONE_PATH)]}, keep=lambda f: True)
    with pytest.raises(RuntimeError, match="twice"):
        w.add_files([_entry(fmt.BACKBONE_PATH)])


def test_an_invalid_manifest_is_never_written(tmp_path):
    (tmp_path / fmt.MANIFEST_NAME).write_bytes(b"old")
    w = _writer()
    w.add_files([_entry(fmt.BACKBONE_PATH, role="weights")])
    with pytest.raises(FormatError, match="t: invalid manifest at files/0/role"):
        w.write(tmp_path, where="t")
    assert (tmp_path / fmt.MANIFEST_NAME).read_bytes() == b"old"
    assert len(list(tmp_path.iterdir())) == 1


def test_updating_keeps_the_head_and_the_kept_files(tmp_path):
    old = {**_writer()._head, "files": [_entry(fmt.BACKBONE_PATH), _entry("p.pte", role="program")]}
    w = ManifestWriter.updating(old, keep=lambda f: f["role"] != "program")
    w.add_files([_entry("q.pte", role="program")])
    w.add_tools({"a": "1"})
    m = w.write(tmp_path, where="t")
    assert [f["path"] for f in m["files"]] == [fmt.BACKBONE_PATH, "q.pte"]
    assert list(m["provenance"]["tools"]) == ["a", "b"]
    assert old["provenance"]["tools"] == {"b": "2"}  # the input is not modified
