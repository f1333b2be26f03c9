"""Every supported architecture: tiny checkpoint -> split -> verify, logits within 1e-4 of transformers."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from cosmoe_export.cli import cli
from cosmoe_export.errors import CheckpointError, UnsupportedArchitecture
from cosmoe_export.importers.sources import open_source
from cosmoe_export.release.verify import _reference_model
from runtime_py.model import CosmoeForCausalLM, rope_inv_freq
from tests.conftest import FAMILIES


def canonical_model(source):
    with torch.device("meta"):
        m = CosmoeForCausalLM(source.config)
    m.load_state_dict(source.state_dict(), assign=True, strict=True)
    m.inv_freq = rope_inv_freq(source.config)
    return m.eval()


@pytest.mark.parametrize("layout", ["per-expert", "fused"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_canonical_logits_match_transformers(hf_checkpoint, family, layout):
    src = open_source(str(hf_checkpoint(family, layout=layout)))
    ref = _reference_model(src, torch.float32)
    ids = torch.randint(0, src.config.vocab_size, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        err = (ref(ids).logits - canonical_model(src)(ids)).abs().max()
    assert err <= 1e-4


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_split_then_verify_passes(hf_checkpoint, tmp_path, family):
    ckpt = hf_checkpoint(family)
    out = tmp_path / "bundle"
    runner = CliRunner()
    r = runner.invoke(cli, ["-q", "split", str(ckpt), "-o", str(out)])
    assert r.exit_code == 0, r.output
    r = runner.invoke(cli, ["verify", str(out), "--reference", str(ckpt), "--json", str(tmp_path / "r.json")])
    assert r.exit_code == 0, r.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["passed"] is True and report["reference_kind"] == "transformers"
    res = report["results"][0]
    assert res["max_abs_logit_err"] <= 1e-4
    assert res["top1_agreement"] == 1.0 and res["greedy_match"] == 1.0
    assert {"backend", "max_abs_logit_err", "top1_agreement", "greedy_match", "passed"} <= set(res)


def test_verify_fails_on_a_tampered_expert(hf_checkpoint, tmp_path):
    """The gate can fail: swap two experts' weights in the bundle (same sizes, different function)."""
    ckpt = hf_checkpoint("mixtral")
    out = tmp_path / "bundle"
    runner = CliRunner()
    assert runner.invoke(cli, ["-q", "split", str(ckpt), "-o", str(out)]).exit_code == 0
    a, b = out / "experts/layer_000/expert_000.safetensors", out / "experts/layer_000/expert_001.safetensors"
    ta, tb = load_file(str(a)), load_file(str(b))
    save_file({k: tb[k.replace("experts.0.", "experts.1.")] for k in ta}, str(a), metadata={"format": "pt"})
    # As it stands the shard no longer matches its manifest hash: the runtime refuses to run it.
    r = runner.invoke(cli, ["verify", str(out), "--reference", str(ckpt)])
    assert r.exit_code == 2 and "sha256 differs" in r.output, r.output
    # A converter that wrote the wrong expert consistently (manifest and file agree): parity catches it.
    manifest = json.loads((out / "manifest.json").read_text())
    for f in manifest["files"]:
        if f["path"] == "experts/layer_000/expert_000.safetensors":
            f["sha256"] = hashlib.sha256(a.read_bytes()).hexdigest()
    (out / "manifest.json").write_text(json.dumps(manifest))
    r = runner.invoke(cli, ["verify", str(out), "--reference", str(ckpt)])
    assert r.exit_code == 1, r.output
    assert "FAIL" in r.output


def test_sharded_checkpoint_with_index(hf_checkpoint, tmp_path):
    ckpt = hf_checkpoint("qwen2_moe", max_shard_size="60KB")
    assert (ckpt / "model.safetensors.index.json").exists()
    assert len(list(ckpt.glob("*.safetensors"))) > 1
    out = tmp_path / "b"
    runner = CliRunner()
    assert runner.invoke(cli, ["-q", "split", str(ckpt), "-o", str(out)]).exit_code == 0
    assert runner.invoke(cli, ["verify", str(out), "--reference", str(ckpt)]).exit_code == 0


def test_index_disagreeing_with_shards(hf_checkpoint):
    ckpt = hf_checkpoint("qwen3_moe", max_shard_size="60KB")
    idx = json.loads((ckpt / "model.safetensors.index.json").read_text())
    key = next(iter(idx["weight_map"]))
    shards = sorted(set(idx["weight_map"].values()))
    idx["weight_map"][key] = next(s for s in shards if s != idx["weight_map"][key])
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(idx))
    with pytest.raises(CheckpointError, match="disagrees with its shard files"):
        open_source(str(ckpt))


def _rewrite(ckpt, fn):
    sd = load_file(str(ckpt / "model.safetensors"))
    save_file(fn(sd), str(ckpt / "model.safetensors"), metadata={"format": "pt"})


def test_missing_extra_and_misshapen_tensors(hf_checkpoint):
    ckpt = hf_checkpoint("olmoe")
    orig = load_file(str(ckpt / "model.safetensors"))
    key = "model.layers.1.mlp.experts.3.down_proj.weight"

    _rewrite(ckpt, lambda sd: {k: v for k, v in sd.items() if k != key})
    with pytest.raises(CheckpointError, match="tensors missing"):
        open_source(str(ckpt))
    _rewrite(ckpt, lambda sd: {**orig, "model.layers.0.mlp.extra.weight": torch.zeros(2)})
    with pytest.raises(CheckpointError, match="unexpected tensors.*extra"):
        open_source(str(ckpt))
    _rewrite(ckpt, lambda sd: {**orig, key: torch.zeros(3, 3)})
    with pytest.raises(CheckpointError, match=r"has shape \[3, 3\], the config implies"):
        open_source(str(ckpt))
    _rewrite(ckpt, lambda sd: {**orig, key: orig[key].to(torch.int32)})
    with pytest.raises(CheckpointError, match="dtype I32"):
        open_source(str(ckpt))


def test_unknown_architecture_lists_supported(hf_checkpoint):
    ckpt = hf_checkpoint("mixtral")
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["architectures"] = ["DeepseekV3ForCausalLM"]
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedArchitecture) as e:
        open_source(str(ckpt))
    assert "'DeepseekV3ForCausalLM' is not supported" in str(e.value)
    assert "MixtralForCausalLM" in str(e.value) and "OlmoeForCausalLM" in str(e.value)
