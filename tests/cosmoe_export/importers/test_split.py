"""split: byte-identical rebuilds, atomic output, pickle policy, bad tensors, our own WD checkpoints."""

from __future__ import annotations

import hashlib
import json
import os
import pickle

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from cosmoe_export.cli import cli
from cosmoe_export.errors import CheckpointError
from cosmoe_export.importers.sources import open_source
from cosmoe_export.importers.split import split
from runtime_py.bundle import Bundle
from runtime_py.config import CosmoeConfig
from runtime_py.model import CosmoeForCausalLM


def tree_hashes(root):
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def run(*args):
    return CliRunner().invoke(cli, list(map(str, args)))


def test_rebuild_is_byte_identical(hf_checkpoint, tmp_path):
    ckpt = hf_checkpoint("qwen2_moe")
    a, b = tmp_path / "a", tmp_path / "nested" / "b"
    b.parent.mkdir()
    assert run("-q", "split", ckpt, "-o", a).exit_code == 0
    assert run("-q", "split", ckpt, "-o", b).exit_code == 0
    assert tree_hashes(a) == tree_hashes(b)
    manifest = json.loads((a / "manifest.json").read_text())
    assert [f["path"] for f in manifest["files"]][:3] == [
        "backbone.safetensors", "experts/layer_000/expert_000.safetensors", "experts/layer_000/expert_001.safetensors"]
    assert manifest["provenance"]["source"]["architecture"] == "Qwen2MoeForCausalLM"
    assert {"python", "torch", "safetensors", "transformers", "cosmoe-export"} <= set(manifest["provenance"]["tools"])


def test_bundle_layout_and_manifest_entries(tmp_path):
    out = tmp_path / "b"
    assert run("-q", "split", "tiny", "-o", out).exit_code == 0
    bundle = Bundle.open(out)
    cfg = bundle.config
    assert len(bundle.experts) == cfg.num_hidden_layers * cfg.num_experts
    for (layer, e), entry in bundle.experts.items():
        path = out / entry.path
        assert entry.path == f"experts/layer_{layer:03d}/expert_{e:03d}.safetensors"
        assert path.stat().st_size == entry.bytes
        assert hashlib.sha256(path.read_bytes()).hexdigest() == entry.sha256
        with safe_open(str(path), "pt") as f:
            assert all(k.startswith(f"layers.{layer}.moe.experts.{e}.") for k in f.keys())
    with safe_open(str(out / "backbone.safetensors"), "pt") as f:
        assert not any(".moe.experts." in k for k in f.keys())
        assert "layers.0.moe.router.weight" in f.keys()
    assert bundle.verify_integrity() == []


def test_existing_out_refused_unless_force(tmp_path):
    out = tmp_path / "b"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    r = run("-q", "split", "tiny", "-o", out)
    assert r.exit_code == 2 and "already exists; pass --force" in r.output
    assert (out / "keep.txt").read_text() == "precious"
    assert run("-q", "split", "tiny", "-o", out, "--force").exit_code == 0
    assert not (out / "keep.txt").exists() and (out / "manifest.json").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["b"]


def test_nan_weights_fail_and_leave_nothing(hf_checkpoint, tmp_path):
    ckpt = hf_checkpoint("mixtral")
    sd = load_file(str(ckpt / "model.safetensors"))
    sd["model.layers.1.block_sparse_moe.experts.2.w2.weight"][0, 0] = float("nan")
    save_file(sd, str(ckpt / "model.safetensors"), metadata={"format": "pt"})
    out = tmp_path / "out"
    r = run("-q", "split", ckpt, "-o", out)
    assert r.exit_code == 2
    assert "model.safetensors: model.layers.1.block_sparse_moe.experts.2.w2.weight: contains NaN" in r.output
    assert len(r.output.strip().splitlines()) == 1 and "Traceback" not in r.output
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_pickle_refused_then_weights_only(hf_checkpoint, tmp_path):
    ckpt = hf_checkpoint("mixtral")
    sd = load_file(str(ckpt / "model.safetensors"))
    (ckpt / "model.safetensors").unlink()
    torch.save(sd, ckpt / "pytorch_model.bin")
    r = run("-q", "split", ckpt, "-o", tmp_path / "o")
    assert r.exit_code == 2 and "pickle checkpoints can run code" in r.output and "--allow-pickle" in r.output
    assert run("-q", "split", ckpt, "-o", tmp_path / "o", "--allow-pickle").exit_code == 0
    assert run("verify", tmp_path / "o", "--reference", ckpt, "--allow-pickle").exit_code == 0


class _Boom:
    def __reduce__(self):
        return (os.system, ("touch /tmp/cosmoe-pwned",))


def test_malicious_pickle_never_runs(hf_checkpoint, tmp_path):
    ckpt = hf_checkpoint("mixtral")
    (ckpt / "model.safetensors").unlink()
    with open(ckpt / "pytorch_model.bin", "wb") as f:
        pickle.dump({"x": _Boom()}, f)
    if os.path.exists("/tmp/cosmoe-pwned"):
        os.unlink("/tmp/cosmoe-pwned")
    r = run("-q", "split", ckpt, "-o", tmp_path / "o", "--allow-pickle")
    assert r.exit_code == 2 and "weights-only unpickler" in r.output
    assert not os.path.exists("/tmp/cosmoe-pwned")


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_low_precision_split_verifies(tmp_path, dtype):
    out = tmp_path / "b"
    assert run("-q", "split", "tiny", "-o", out, "--dtype", dtype).exit_code == 0
    assert Bundle.open(out).backbone.dtype == {"bf16": "bfloat16", "fp16": "float16"}[dtype]
    r = run("verify", out, "--reference", "tiny")
    assert r.exit_code == 0, r.output


def test_own_wd_checkpoint_with_shared_expert(tmp_path):
    """Our canonical format as a source: WD experts (Eq. 1), a shared expert, q/k norm."""
    cfg = CosmoeConfig(vocab_size=200, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, intermediate_size=64, expert_kind="wd", wd_rank=16,
                       shared_expert_intermediate_size=32, qk_norm="head", max_position_embeddings=96)
    torch.manual_seed(0)
    model = CosmoeForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, p.shape[-1] ** -0.5 if p.dim() > 1 else 0.3).add_(1.0 if p.dim() == 1 else 0.0)
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps(cfg.to_dict()))
    save_file(model.state_dict(), str(ckpt / "model.safetensors"))
    src = open_source(str(ckpt))
    assert src.config == cfg and not src.reference_is_transformers
    assert run("-q", "split", ckpt, "-o", tmp_path / "b").exit_code == 0
    with safe_open(str(tmp_path / "b/experts/layer_001/expert_007.safetensors"), "pt") as f:
        assert sorted(f.keys()) == sorted(f"layers.1.moe.experts.7.{m}.{s}" for m in ("gate", "up", "down")
                                          for s in ("left", "right"))
        assert list(f.get_tensor("layers.1.moe.experts.7.gate.left").shape) == [64, 16]
    r = run("verify", tmp_path / "b", "--reference", ckpt)
    assert r.exit_code == 0, r.output


def test_preset_weights_are_generated_per_tensor():
    src = open_source("tiny")
    a = src.plan["layers.1.moe.experts.3.up.weight"].load()
    b = open_source("tiny").plan["layers.1.moe.experts.3.up.weight"].load()
    assert torch.equal(a, b)
    assert not torch.equal(a, src.plan["layers.1.moe.experts.4.up.weight"].load())


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint directory or preset"):
        open_source(str(tmp_path / "nope"))
    (tmp_path / "f.txt").write_text("x")
    with pytest.raises(CheckpointError, match="expected a checkpoint directory"):
        open_source(str(tmp_path / "f.txt"))
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json: not valid JSON"):
        open_source(str(tmp_path / "d"))


def test_split_function_rejects_out_of_order_writes(tmp_path):
    from cosmoe_export.st_writer import SafetensorsWriter
    w = SafetensorsWriter(tmp_path / "x.safetensors", {"a": (torch.float32, (2,)), "b": (torch.float32, (1,))})
    with pytest.raises(RuntimeError, match="expected 'a'"):
        w.write("b", torch.zeros(1))
    w.write("a", torch.zeros(2))
    with pytest.raises(RuntimeError, match="closed before 'b'"):
        w.close()


def test_split_api_returns_counts(tmp_path):
    res = split(source=open_source("tiny"), out=tmp_path / "b", progress=False)
    assert res.files == 1 + 2 * 8 + 1  # backbone + experts + manifest


def test_tokenizer_passes_through_and_verify_uses_it(hf_checkpoint, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    ckpt = hf_checkpoint("mixtral")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(["the expert router picks two of eight experts"] * 20,
                            trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(ckpt / "tokenizer.json"))
    out = tmp_path / "b"
    assert run("-q", "split", ckpt, "-o", out).exit_code == 0
    bundle = Bundle.open(out)
    # generation_config.json (stop tokens) travels with the tokenizer files
    assert bundle.manifest["tokenizer"] == {"files": ["tokenizer/tokenizer.json", "tokenizer/generation_config.json"]}
    assert (out / "tokenizer/tokenizer.json").read_bytes() == (ckpt / "tokenizer.json").read_bytes()
    from cosmoe_export.release.verify import PROMPTS, _prompts
    assert _prompts(bundle, 32)[0] == tok.encode(PROMPTS[0]).ids
    assert run("verify", out, "--reference", ckpt).exit_code == 0
