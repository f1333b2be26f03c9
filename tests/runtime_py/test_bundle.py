"""The bundle reader refuses anything that is not a complete, in-bounds v1 bundle."""

from __future__ import annotations

import json
import os

import pytest
from click.testing import CliRunner

from cosmoe_export.cli import cli
from cosmoe_export.reference import TorchRuntime
from runtime_py import format as fmt
from runtime_py.bundle import Bundle
from runtime_py.config import backbone_shapes
from runtime_py.errors import FormatError, IntegrityError
from runtime_py.shards import read_shard


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("b") / "tiny"
    assert CliRunner().invoke(cli, ["-q", "split", "tiny", "-o", str(out)]).exit_code == 0
    return out


def copy_with_manifest(src, dst, edit):
    import shutil
    shutil.copytree(src, dst)
    m = json.loads((dst / "manifest.json").read_text())
    edit(m)
    (dst / "manifest.json").write_text(json.dumps(m))
    return dst


@pytest.mark.parametrize("path,message", [
    ("/etc/passwd", "is absolute"),
    ("../outside.safetensors", "leaves the bundle"),
    ("experts/../../x", "leaves the bundle"),
])
def test_paths_must_stay_inside(bundle_dir, tmp_path, path, message):
    def edit(m):
        m["files"][1]["path"] = path
    d = copy_with_manifest(bundle_dir, tmp_path / "b", edit)
    with pytest.raises(FormatError, match=message):
        Bundle.open(d)


def test_symlink_escaping_the_bundle(bundle_dir, tmp_path):
    d = copy_with_manifest(bundle_dir, tmp_path / "b", lambda m: None)
    target = d / "experts/layer_000/expert_000.safetensors"
    outside = tmp_path / "outside.safetensors"
    os.replace(target, outside)
    os.symlink(outside, target)
    with pytest.raises(FormatError, match="resolves outside the bundle"):
        Bundle.open(d)


def test_newer_format_version(bundle_dir, tmp_path):
    newer = fmt.FORMAT_VERSION + 1
    d = copy_with_manifest(bundle_dir, tmp_path / "b", lambda m: m.update(format_version=newer))
    with pytest.raises(FormatError, match=f"format version {newer} is newer .* upgrade cosmoe-export"):
        Bundle.open(d)


def test_all_moe_bundles_stay_v1(bundle_dir):
    m = Bundle.open(bundle_dir).manifest
    assert m["format_version"] == 1 and fmt.LAYER_PLAN_KEY not in m["model"]


def test_a_layer_plan_needs_format_v2(bundle_dir, tmp_path):
    def edit(m):
        m["model"].update(layer_ffns=["moe", "moe"])  # claims a plan, says v1
    d = copy_with_manifest(bundle_dir, tmp_path / "b", edit)
    with pytest.raises(FormatError, match="layer_ffns needs format version 2, the manifest says 1"):
        Bundle.open(d)


def test_dense_layer_must_not_list_experts(bundle_dir, tmp_path):
    """A v2 plan that makes layer 0 dense while the files still list its experts: refused."""
    def edit(m):
        m["format_version"] = 2
        m["model"].update(layer_ffns=["dense", "moe"], dense_intermediate_size=32)
    d = copy_with_manifest(bundle_dir, tmp_path / "b", edit)
    with pytest.raises(FormatError, match="expert files listed for layers without routed experts"):
        Bundle.open(d)


def test_schema_errors_name_the_key(bundle_dir, tmp_path):
    def edit(m):
        m["files"][3]["sha256"] = "xyz"
    d = copy_with_manifest(bundle_dir, tmp_path / "b", edit)
    with pytest.raises(FormatError, match="files/3/sha256"):
        Bundle.open(d)


def test_missing_expert_entry(bundle_dir, tmp_path):
    d = copy_with_manifest(bundle_dir, tmp_path / "b", lambda m: m["files"].pop(5))
    with pytest.raises(FormatError, match="do not cover every"):
        Bundle.open(d)


def test_truncated_shard_never_loads(bundle_dir, tmp_path):
    d = copy_with_manifest(bundle_dir, tmp_path / "b", lambda m: None)
    shard = d / "experts/layer_001/expert_002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-8])
    bundle = Bundle.open(d)
    assert any("expert_002" in p for p in bundle.verify_integrity())
    runtime = TorchRuntime(bundle)
    with pytest.raises(IntegrityError, match="bytes on disk, manifest says"):
        runtime.store.get(1, 2)


def test_edited_shard_fails_integrity(bundle_dir, tmp_path):
    d = copy_with_manifest(bundle_dir, tmp_path / "b", lambda m: None)
    shard = d / "backbone.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert Bundle.open(d).verify_integrity() == [f"{shard}: sha256 differs from the manifest; the file was modified"]


def test_not_a_bundle(tmp_path):
    with pytest.raises(FormatError, match="manifest.json: missing"):
        Bundle.open(tmp_path)
    (tmp_path / "manifest.json").write_bytes(b"\xff\xfe")
    with pytest.raises(FormatError, match="not valid UTF-8 JSON"):
        Bundle.open(tmp_path)


def test_runtime_loads_experts_only_when_selected(bundle_dir):
    import torch
    runtime = TorchRuntime(Bundle.open(bundle_dir))
    assert runtime.store.loads == 0
    runtime.logits(torch.tensor([[1, 2, 3]]))
    cfg = runtime.config
    assert 0 < runtime.store.loads <= cfg.num_hidden_layers * cfg.num_experts
    assert runtime.store.loads == len(runtime.store.resident)
    layer, expert = runtime.store.resident[0]
    runtime.store.evict(layer, expert)  # the exporter's tools drop what they are done with
    assert (layer, expert) not in runtime.store.resident
    runtime.store.get(layer, expert)
    assert runtime.store.loads == len(runtime.store.resident) + 1


def test_one_hash_check_for_every_reader(bundle_dir, tmp_path):
    """A backbone changed after the bundle was written (same size): the engine and read_shard (quantize,
    lower) refuse it with the same line, once per open bundle as a first-load check; never skips it."""
    import torch
    d = copy_with_manifest(bundle_dir, tmp_path / "b", lambda m: None)
    shard = d / "backbone.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0x01
    shard.write_bytes(bytes(data))
    bundle = Bundle.open(d)

    def read(**kw):
        return read_shard(bundle, bundle.backbone, backbone_shapes(bundle.config), dtype=torch.float32, **kw)
    with pytest.raises(IntegrityError) as engine:
        TorchRuntime(bundle)
    with pytest.raises(IntegrityError) as reader:
        read()
    assert str(engine.value) == str(reader.value) == (
        f"{shard}: sha256 differs from the manifest; the file changed after the bundle was written. "
        "Rebuild it or run `cosmoe-export verify --integrity`")
    assert read(check_hash="never")["norm.weight"].shape == (bundle.config.hidden_size,)
    with pytest.raises(FormatError, match="check_hash must be one of"):
        read(check_hash="sometimes")


def test_reader_checks_tensors_against_the_config(bundle_dir, tmp_path):
    """The one check: a shard whose tensors are not what the config implies never loads."""
    import hashlib

    from safetensors.torch import load_file, save_file
    rel = "experts/layer_001/expert_002.safetensors"
    d = copy_with_manifest(bundle_dir, tmp_path / "b", lambda m: None)
    tensors = load_file(d / rel)
    name = next(iter(tensors))
    tensors[name] = tensors[name][:, :-1].contiguous()
    save_file(tensors, str(d / rel), metadata={"format": "pt"})
    m = json.loads((d / "manifest.json").read_text())  # the manifest vouches for it: only the config can tell
    entry = next(f for f in m["files"] if f["path"] == rel)
    entry["bytes"], entry["sha256"] = (d / rel).stat().st_size, hashlib.sha256((d / rel).read_bytes()).hexdigest()
    (d / "manifest.json").write_text(json.dumps(m))
    runtime = TorchRuntime(Bundle.open(d))
    with pytest.raises(FormatError, match=f"{name} has shape .*, config implies"):
        runtime.store.get(1, 2)
