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
from cosmoe_export.reference import source_model
from cosmoe_export.release.verify import _reference_model
from tests.conftest import FAMILIES


def canonical_model(source):
    return source_model(source, streamed=False)


@pytest.mark.parametrize("layout", ["per-expert", "fused"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_canonical_logits_match_transformers(hf_checkpoint, family, layout):
    src = open_source(str(hf_checkpoint(family, layout=layout)))
    ref, kind = _reference_model(src, torch.float32, streamed=False)
    assert kind == "transformers"
    ids = torch.randint(0, src.config.vocab_size, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, whole = ref(ids).logits, canonical_model(src)(ids)
        assert (want - whole).abs().max() <= 1e-4
        # verify's reference for a model too large for memory: the same model, one layer at a time
        # (same ops on the same weights; freshly allocated tensors may take another kernel path: 1e-5)
        assert (source_model(src, streamed=True)(ids) - whole).abs().max() <= 1e-5


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
    cfg["architectures"] = ["NemotronHForCausalLM"]
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedArchitecture) as e:
        open_source(str(ckpt))
    assert "'NemotronHForCausalLM' is not supported" in str(e.value)
    assert "MixtralForCausalLM" in str(e.value) and "OlmoeForCausalLM" in str(e.value)


def test_jetmoe_is_refused_by_name_with_the_reason(tmp_path):
    """JetMoE's mixture-of-attention-heads cannot be a bundle: split says so in one line, exit 2."""
    import transformers
    config = transformers.JetMoeConfig(vocab_size=320, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                       num_key_value_heads=2, kv_channels=16, intermediate_size=48,
                                       num_local_experts=4, num_experts_per_tok=2)
    ckpt = tmp_path / "jetmoe"
    transformers.JetMoeForCausalLM(config).save_pretrained(ckpt)
    r = CliRunner().invoke(cli, ["-q", "split", str(ckpt), "-o", str(tmp_path / "out")])
    assert r.exit_code == 2 and not (tmp_path / "out").exists()
    assert "architecture 'JetMoeForCausalLM' is not supported: its attention is a mixture of experts" in r.output
    assert "refused: JetMoeForCausalLM" in CliRunner().invoke(cli, ["architectures"]).output


def test_qwen3_dense_layers_split_to_a_v2_bundle(hf_checkpoint, tmp_path):
    """mlp_only_layers=[0]: layer 0's MLP lands in the backbone, it has no expert files, and the
    manifest says so in its layer plan (format v2); an all-MoE family stays v1."""
    out = tmp_path / "bundle"
    r = CliRunner().invoke(cli, ["-q", "split", str(hf_checkpoint("qwen3_moe_dense")), "-o", str(out)])
    assert r.exit_code == 0, r.output
    m = json.loads((out / "manifest.json").read_text())
    assert m["format_version"] == 2
    assert m["model"]["layer_ffns"] == ["dense", "moe"] and m["model"]["dense_intermediate_size"] == 80
    assert {f["layer"] for f in m["files"] if f["role"] == "expert"} == {1}
    backbone = load_file(str(out / "backbone.safetensors"))
    assert backbone["layers.0.mlp.gate.weight"].shape == (80, 64)
    assert not any(k.startswith("layers.0.moe.") for k in backbone)
    r = CliRunner().invoke(cli, ["-q", "split", str(hf_checkpoint("qwen3_moe")), "-o", str(tmp_path / "v1")])
    m1 = json.loads((tmp_path / "v1" / "manifest.json").read_text())
    assert m1["format_version"] == 1 and "layer_ffns" not in m1["model"]


@pytest.mark.parametrize("only,step", [([], 2), ([2], 1), ([0, 3], 2), ([], 1)])
def test_qwen3_layer_plan_is_transformers_own(tmp_path, only, step):
    """Which layers are dense, as transformers' Qwen3MoeDecoderLayer decides it."""
    import transformers
    config = transformers.Qwen3MoeConfig(vocab_size=32, hidden_size=16, num_hidden_layers=4, num_attention_heads=2,
                                         num_key_value_heads=1, head_dim=8, intermediate_size=24,
                                         moe_intermediate_size=8, num_experts=4, num_experts_per_tok=2,
                                         mlp_only_layers=only, decoder_sparse_step=step)
    model = transformers.Qwen3MoeForCausalLM(config)
    want = ["moe" if hasattr(layer.mlp, "gate") and hasattr(layer.mlp, "experts") else "dense"
            for layer in model.model.layers]
    model.save_pretrained(tmp_path)
    cfg = open_source(str(tmp_path), hash_files=False).config
    assert list(cfg.layer_ffns or ["moe"] * 4) == want


def test_mxfp4_dequantize_matches_transformers():
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    from cosmoe_export.importers.sources import mxfp4_dequantize
    g = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 256, (3, 10, 4, 16), generator=g, dtype=torch.uint8)  # [E, R, C/32, 16]
    scales = torch.randint(118, 134, (3, 10, 4), generator=g, dtype=torch.uint8)  # [E, R, C/32]
    theirs = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)  # [E, C, R]
    assert torch.equal(mxfp4_dequantize(blocks, scales), theirs.transpose(1, 2))


def test_gpt_oss_mxfp4_checkpoint_imports_exactly(tmp_path):
    """A gpt-oss checkpoint whose experts are MXFP4 blocks (as released) imports to the same logits
    as transformers' model holding the dequantized weights, and inspect names the source precision."""
    import transformers
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    from tests.conftest import COMMON, _reinit
    _, _, extra = FAMILIES["gpt_oss"]
    config = transformers.GptOssConfig(**{**COMMON, **extra, "intermediate_size": 64})  # MXFP4 rows: 32s
    model = transformers.GptOssForCausalLM(config).eval()
    _reinit(model, 0)
    model.save_pretrained(tmp_path)
    sd = load_file(str(tmp_path / "model.safetensors"))
    g = torch.Generator().manual_seed(1)
    for layer, block in enumerate(model.model.layers):
        pre = f"model.layers.{layer}.mlp.experts."
        for name in ("gate_up_proj", "down_proj"):
            e, cols, rows = sd.pop(pre + name).shape  # x @ W: W [E, in, out]; MXFP4 rows are the outputs
            blocks = torch.randint(0, 256, (e, rows, cols // 32, 16), generator=g, dtype=torch.uint8)
            scales = torch.randint(122, 128, (e, rows, cols // 32), generator=g, dtype=torch.uint8)
            sd[pre + name + "_blocks"], sd[pre + name + "_scales"] = blocks, scales
            with torch.no_grad():
                getattr(block.mlp.experts, name).copy_(convert_moe_packed_tensors(blocks, scales, dtype=torch.float32))
    save_file(sd, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    raw = json.loads((tmp_path / "config.json").read_text())
    raw["quantization_config"] = {"quant_method": "mxfp4"}
    (tmp_path / "config.json").write_text(json.dumps(raw))
    src = open_source(str(tmp_path))
    assert src.provenance["source_precision"] == "mxfp4 experts"
    ids = torch.randint(0, src.config.vocab_size, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        err = (model(ids).logits - canonical_model(src)(ids)).abs().max()
    assert err <= 1e-4
    r = CliRunner().invoke(cli, ["inspect", str(tmp_path)])
    assert r.exit_code == 0 and "source precision: mxfp4 experts" in r.output, r.output
