"""quantize: bundles with int8/int4 experts and backbone, per-expert mixed precision, and verify's
quality metrics for them. Tiny CoSMoE checkpoints from the training recipe (a few steps, with their
own tokenizer), so calibration and --text run on real token ids."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import save_file

from cosmoe_export.cli import cli
from cosmoe_export.errors import CosmoeError
from cosmoe_export.quantization.mixed_precision import _lower_hull, allocate, ladder
from cosmoe_export.quantization.quantize import parse_size, role_of
from cosmoe_export.reference import TorchRuntime
from runtime_py import quant as Q
from runtime_py.bundle import Bundle
from runtime_py.config import expert_tensor_shapes, tensor_shapes
from runtime_py.errors import FormatError
from runtime_py.shards import read_file
from tests.conftest import add_tokenizer
from tests.cosmoe_export.training.test_train import make_tiny_checkpoint, write_corpus


def run(*args):
    return CliRunner().invoke(cli, list(map(str, args)))


def tree_hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def bundle_bytes(root: Path) -> int:
    return sum(f["bytes"] for f in json.loads((root / "manifest.json").read_text())["files"])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny trained-for-a-few-steps CoSMoE checkpoint (vocab 512, context 64), its float bundle,
    a calibration text and an evaluation text."""
    tmp = tmp_path_factory.mktemp("quant")
    ckpt = make_tiny_checkpoint(tmp, "moe", steps=3)
    bundle = tmp / "float"
    assert run("-q", "split", ckpt, "-o", bundle).exit_code == 0
    corpus = write_corpus(tmp / "all.txt").read_text()
    (tmp / "calib.txt").write_text(corpus[:20_000])
    (tmp / "eval.txt").write_text(corpus[20_000:40_000])
    return {"tmp": tmp, "ckpt": ckpt, "bundle": bundle, "calib": tmp / "calib.txt", "eval": tmp / "eval.txt"}


def quantize(tiny, name: str, *args) -> Path:
    out = tiny["tmp"] / name
    r = run("-q", "quantize", tiny["bundle"], "-o", out, "--force", *args)
    assert r.exit_code == 0, r.output
    return out


def verify(tiny, bundle: Path, *args) -> tuple[int, dict]:
    r = run("verify", bundle, "--reference", tiny["ckpt"], "--text", tiny["eval"], "--max-tokens", 4096,
            "--new-tokens", 4, "--json", "-", *args)
    return r.exit_code, json.loads(r.stdout[r.stdout.index("{"):])


def test_verify_of_a_model_too_large_for_memory_streams_and_reports_the_same(tiny, monkeypatch):
    """When the model does not fit (here: told so), the reference and the bundle's math hold one
    layer at a time (cosmoe_export/reference.py); every measured quantity stays what it was."""
    import cosmoe_export.release.verify as verify_module
    out = quantize(tiny, "q-stream", "--expert-scheme", "int4", "--backbone-scheme", "int8")
    gates = ("--gate", "top1_agreement=off", "--gate", "ppl_increase=off")
    code, whole = verify(tiny, out, *gates)
    monkeypatch.setattr(verify_module, "fits_in_memory", lambda nbytes: False)
    code_streamed, streamed = verify(tiny, out, *gates)
    assert code == code_streamed == 0
    assert (whole["reference_kind"], streamed["reference_kind"]) == ("cosmoe", "cosmoe-streamed")
    assert streamed["bundle_math"] == whole["bundle_math"]
    quality = ("max_abs_logit_err", "top1_agreement", "greedy_match", "kl_mean", "kl_max", "ppl", "ppl_ref",
               "vs_bundle")
    assert [{k: r[k] for k in quality} for r in streamed["results"]] == \
        [{k: r[k] for k in quality} for r in whole["results"]]


# ---- quantize -> verify, every scheme ---------------------------------------------------------------
def test_quantize_then_verify_each_scheme(tiny):
    kl = {}
    for scheme in ("int8", "int4"):
        out = quantize(tiny, f"q-{scheme}", "--expert-scheme", scheme, "--backbone-scheme", "int8")
        code, report = verify(tiny, out, "--gate", "top1_agreement=0.5", "--gate", "ppl_increase=0.5")
        assert code == 0, report
        r = report["results"][0]
        for key in ("backend", "max_abs_logit_err", "top1_agreement", "greedy_match", "passed", "kl_mean", "ppl",
                    "ppl_ref", "ppl_increase"):
            assert key in r, key
        assert report["passed"] is True and r["precision"] == scheme
        assert set(r["gates"]) == {"top1_agreement", "ppl_increase"}  # logits and greedy are not gated
        assert r["kl_mean"] > 0 and r["ppl_ref"] > 1 and report["text"]["tokens"] > 0
        kl[scheme] = r["kl_mean"]
    assert kl["int8"] < kl["int4"]


def test_verify_tells_the_bundle_math_from_the_kernels(tiny):
    """bundle_math: dequantized weights in fp32 against the reference (what the weights lose); each
    backend's vs_bundle: its kernels against that math (what they add). The torch backend runs the
    bundle's math exactly by default, its bf16 fast path adds rounding."""
    out = quantize(tiny, "q-math", "--expert-scheme", "int4", "--backbone-scheme", "int8")
    gates = ("--gate", "top1_agreement=off", "--gate", "ppl_increase=off")
    code, exact = verify(tiny, out, *gates)
    assert code == 0 and exact["torch_activations"] == "fp32"
    math_, r = exact["bundle_math"], exact["results"][0]
    for key in ("top1_agreement", "top1_agreement_stderr", "near_tie_share", "top1_agreement_decided", "kl_mean",
                "kl_mean_stderr", "kl_median", "kl_p99", "kl_max", "ppl", "ppl_ref", "ppl_ratio", "ppl_ratio_stderr",
                "ppl_increase", "delta_p"):
        assert key in math_ and key in r, key
    assert 0 < math_["kl_mean"] == r["kl_mean"] and math_["kl_median"] <= math_["kl_p99"] <= math_["kl_max"]
    assert r["vs_bundle"] == {"top1_agreement": 1.0, "kl_mean": 0.0, "kl_p99": 0.0, "kl_max": 0.0,
                              "ppl_increase": 0.0}
    code, fast = verify(tiny, out, *gates, "--torch-activations", "bf16")
    f = fast["results"][0]
    assert code == 0 and fast["torch_activations"] == "bf16" and fast["bundle_math"] == math_
    assert f["vs_bundle"]["kl_mean"] > 0 and f["kl_mean"] != math_["kl_mean"]


def test_scheme_none_is_a_float_bundle_and_passes_parity(tiny):
    out = quantize(tiny, "q-none", "--expert-scheme", "none", "--backbone-scheme", "none")
    code, report = verify(tiny, out)
    r = report["results"][0]
    assert code == 0 and r["precision"] == "float" and r["max_abs_logit_err"] <= 1e-4
    assert set(r["gates"]) == {"max_abs_logit_err", "top1_agreement", "greedy_match"}
    assert r["kl_mean"] < 1e-6 and abs(r["ppl_increase"]) < 1e-6
    assert "bundle_math" not in report and "vs_bundle" not in r  # a float bundle's math is the reference's


def test_quality_gates_fail_with_exit_1_and_need_text(tiny):
    out = quantize(tiny, "q-gate", "--expert-scheme", "int4")
    code, report = verify(tiny, out, "--gate", "kl_mean=0", "--gate", "top1_agreement=off", "--gate",
                          "ppl_increase=off")
    assert code == 1 and report["passed"] is False
    assert report["results"][0]["gates"]["kl_mean"]["passed"] is False
    r = run("verify", out, "--reference", tiny["ckpt"])
    assert r.exit_code == 2 and "pass --text FILE" in r.output
    r = run("verify", out, "--reference", tiny["ckpt"], "--text", tiny["eval"], "--gate", "speed=1")
    assert r.exit_code == 2 and "unknown gate" in r.output


def test_gptq_rounding_beats_nearest_and_is_recorded(tiny):
    nearest = quantize(tiny, "r-nearest", "--expert-scheme", "int4", "--calibration", tiny["calib"],
                       "--rounding", "nearest")
    gptq = quantize(tiny, "r-gptq", "--expert-scheme", "int4", "--calibration", tiny["calib"])
    q = Bundle.open(gptq).quantization
    assert q["rounding"] == "gptq" and q["gptq"]["damp"] == 0.01 and q["calibration"]["file"] == "calib.txt"
    assert Bundle.open(nearest).quantization["rounding"] == "nearest"
    kl = {}
    for name, path in (("nearest", nearest), ("gptq", gptq)):
        code, report = verify(tiny, path, "--gate", "top1_agreement=off", "--gate", "ppl_increase=off")
        kl[name] = report["results"][0]["kl_mean"]
    assert kl["gptq"] < kl["nearest"]
    r = run("quantize", tiny["bundle"], "-o", tiny["tmp"] / "r-bad", "--rounding", "gptq")
    assert r.exit_code == 2 and "needs --calibration" in r.output


def test_two_runs_are_byte_identical(tiny):
    a = quantize(tiny, "det-a", "--expert-scheme", "int4", "--group-size", "64")
    b = quantize(tiny, "det-b", "--expert-scheme", "int4", "--group-size", "64")
    assert tree_hashes(a) == tree_hashes(b)
    a = quantize(tiny, "det-gptq-a", "--expert-scheme", "int4", "--calibration", tiny["calib"])
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # GPTQ's sums must not depend on the caller's thread count
    try:
        b = quantize(tiny, "det-gptq-b", "--expert-scheme", "int4", "--calibration", tiny["calib"])
    finally:
        torch.set_num_threads(threads)
    assert tree_hashes(a) == tree_hashes(b)
    target = str(bundle_bytes(a) + 20_000)
    a = quantize(tiny, "det-auto-a", "--expert-bits", "auto", "--calibration", tiny["calib"], "--target-size", target)
    b = quantize(tiny, "det-auto-b", "--expert-bits", "auto", "--calibration", tiny["calib"], "--target-size", target)
    assert tree_hashes(a) == tree_hashes(b)


# ---- what the bundle holds ---------------------------------------------------------------------------
def test_manifest_and_files_record_every_tensor(tiny):
    out = quantize(tiny, "q-layout", "--expert-scheme", "int4", "--backbone-scheme", "int8", "--group-size", "32")
    bundle = Bundle.open(out)
    cfg = bundle.config
    q = bundle.quantization
    assert q["experts"] == "int4" and q["backbone"] == "int8" and q["group_size"] == 32
    assert q["roles"]["router"] == "none" and q["roles"]["norm"] == "none" and q["roles"]["embedding"] == "int8"
    assert bundle.manifest["provenance"]["quantized_from"]["manifest_sha256"] == hashlib.sha256(
        (tiny["bundle"] / "manifest.json").read_bytes()).hexdigest()
    assert list(bundle.manifest) == ["format", "format_version", "model", "tokenizer", "quantization", "provenance",
                                     "files"]
    shapes = tensor_shapes(cfg)
    for f in bundle.files:
        if f.role == "tokenizer":
            assert f.tensors is None
            continue
        encodings = f.encodings()
        names = (set(expert_tensor_shapes(cfg, f.layer, f.expert)) if f.role == "expert"
                 else {n for n in shapes if ".moe.experts." not in n})
        assert set(encodings) == names
        with safe_open(str(out / f.path), "pt") as st:
            keys = set(st.keys())
            for name, e in encodings.items():
                role = role_of(name)
                if role in ("router", "norm", "bias"):
                    assert e.to_json() == {"scheme": "none", "bits": 16}  # the fixture is bf16
                    assert keys >= {name} and name + "_scale" not in keys
                    continue
                want = {"expert": ("int4", 32), "embedding": ("int8", cfg.hidden_size),
                        "head": ("int8", cfg.hidden_size)}.get(role, ("int8", shapes[name][1]))
                assert (e.scheme, e.group_size) == want, name
                for stored, (dtype, shape) in Q.stored_specs(name, shapes[name], e, torch.bfloat16).items():
                    t = st.get_tensor(stored)
                    assert (t.dtype, tuple(t.shape)) == (dtype, shape)
    # The expert shard shrinks ~8x from bf16 to int4 + bf16 scales every 32: 4.5 / 16 of the bits.
    src = Bundle.open(tiny["bundle"])
    ratio = bundle.experts[(0, 0)].bytes / src.experts[(0, 0)].bytes
    assert 4.5 / 16 < ratio < 4.5 / 16 + 0.02


def test_float_manifest_keys_are_unchanged(tiny):
    m = json.loads((tiny["bundle"] / "manifest.json").read_text())
    assert list(m) == ["format", "format_version", "model", "tokenizer", "provenance", "files"]
    for f in m["files"]:
        assert set(f) <= {"path", "role", "bytes", "sha256", "dtype", "layer", "expert"}


def test_wd_experts_and_groups_wider_than_the_rank(tmp_path):
    ckpt = make_tiny_checkpoint(tmp_path, "wd", steps=2)
    src, out = tmp_path / "wd", tmp_path / "wd-q"
    assert run("-q", "split", ckpt, "-o", src).exit_code == 0
    assert run("-q", "quantize", src, "-o", out, "--expert-scheme", "int4", "--group-size", "128").exit_code == 0
    bundle = Bundle.open(out)
    enc = bundle.experts[(0, 0)].encodings()
    # left [F, r=64]: one group of 128 covers the whole row; right [r, D=128]: one full group
    assert enc["layers.0.moe.experts.0.gate.left"].group_size == 128
    with safe_open(str(out / bundle.experts[(0, 0)].path), "pt") as f:
        scale = f.get_tensor("layers.0.moe.experts.0.gate.left_scale")
    assert tuple(scale.shape) == (bundle.config.intermediate_size, 1)
    logits = TorchRuntime(bundle).logits(torch.tensor([[1, 2, 3, 4]]))
    assert torch.isfinite(logits).all()


def test_quantized_bundle_loads_fewer_bytes(tiny):
    q = quantize(tiny, "q-bytes", "--expert-scheme", "int4")
    ids = torch.tensor([list(range(1, 40))])
    loaded = {}
    for name, path in (("float", tiny["bundle"]), ("int4", q)):
        rt = TorchRuntime(Bundle.open(path))
        rt.logits(ids)
        loaded[name] = rt.store.bytes_loaded / rt.store.loads
    assert loaded["int4"] < 0.3 * loaded["float"]


# ---- mixed precision ---------------------------------------------------------------------------------
def test_mixed_precision_meets_the_size_target(tiny):
    low = bundle_bytes(quantize(tiny, "mp-low", "--expert-scheme", "int4", "--group-size", "128"))
    int4 = bundle_bytes(quantize(tiny, "mp-int4", "--expert-scheme", "int4"))
    int8 = bundle_bytes(quantize(tiny, "mp-int8", "--expert-scheme", "int8"))
    for target in (int4, (int4 + int8) // 2, int8):
        out = quantize(tiny, f"mp-{target}", "--expert-bits", "auto", "--calibration", tiny["calib"],
                       "--target-size", target, "--calibration-tokens", 4096)
        total = bundle_bytes(out)
        assert low <= total <= target
        bundle = Bundle.open(out)
        mp = bundle.quantization["mixed_precision"]
        assert mp["bundle_bytes"] == total and mp["target_bytes"] == target
        assert [lv["name"] for lv in mp["levels"]] == ["int4/g128", "int4/g64", "int4/g32", "int8"]
        assert sum(mp["counts"].values()) == len(mp["experts"]) == len(bundle.experts)
        assert bundle.quantization["rounding"] == "gptq"  # --calibration given: GPTQ by default
        assert bundle.quantization["calibration"]["file"] == "calib.txt"
        assert bundle.quantization["calibration"]["tokens"] == 4096
        for rec in mp["experts"]:
            enc = bundle.experts[(rec["layer"], rec["expert"])].encodings()
            e = next(iter(enc.values()))
            assert (e.scheme if e.scheme == "int8" else f"int4/g{e.group_size}") == rec["level"]
            assert len(rec["error"]) == 4 and rec["error"][3] < rec["error"][0]  # int8 beats int4/g128
        for layer in range(bundle.config.num_hidden_layers):
            loads = [r["load"] for r in mp["experts"] if r["layer"] == layer]
            assert abs(sum(loads) - 1) < 1e-4
        if target == int8:
            assert mp["counts"]["int8"] == len(bundle.experts)
        if target == (int4 + int8) // 2:
            assert 0 < mp["counts"]["int8"] < len(bundle.experts)
    r = run("-q", "quantize", tiny["bundle"], "-o", tiny["tmp"] / "mp-small", "--expert-bits", "auto",
            "--calibration", tiny["calib"], "--target-size", low - 1)
    assert r.exit_code == 2 and "below the smallest bundle possible" in r.output
    assert not (tiny["tmp"] / "mp-small").exists()


def test_allocate_takes_the_best_error_per_byte_first():
    error = np.array([[10.0, 1.0], [5.0, 4.0], [8.0, 0.0]])
    cost = np.array([[1, 3]] * 3)
    assert allocate(error, cost, 3 + 2).tolist() == [1, 0, 0]  # gains per byte 4.5, 0.5, 4
    assert allocate(error, cost, 3 + 4).tolist() == [1, 0, 1]
    assert allocate(error, cost, 9).tolist() == [1, 1, 1]
    with pytest.raises(CosmoeError, match="size target too small"):
        allocate(error, cost, 2)


def test_lower_hull_skips_dominated_and_concave_levels():
    cost = np.array([1, 2, 3, 4])
    assert _lower_hull(cost, np.array([10.0, 9.5, 2.0, 1.0])) == [0, 2, 3]  # level 1 lies above 0 -> 2
    assert _lower_hull(cost, np.array([10.0, 11.0, 5.0, 5.0])) == [0, 2]  # more bytes, no less error
    assert [lv.name for lv in ladder(64)] == ["int4/g128", "int4/g64", "int8"]


# ---- bad input ---------------------------------------------------------------------------------------
def test_cli_refuses_bad_combinations(tiny):
    out = tiny["tmp"] / "bad"
    cases = [
        (("--expert-bits", "auto", "--expert-scheme", "int4", "--calibration", tiny["calib"], "--target-size", "1MB"),
         "exclude each other"),
        (("--expert-bits", "auto", "--target-size", "1MB"), "needs --calibration"),
        (("--target-size", "1MB"), "only applies with --expert-bits auto"),
        (("--expert-bits", "auto", "--calibration", tiny["calib"], "--target-size", "lots"), "cannot read size"),
    ]
    for args, match in cases:
        r = run("quantize", tiny["bundle"], "-o", out, *args)
        assert r.exit_code == 2 and match in r.output, r.output
    q = quantize(tiny, "q-again", "--expert-scheme", "int8")
    r = run("quantize", q, "-o", out)
    assert r.exit_code == 2 and "already quantized" in r.output
    assert not out.exists()


def test_parse_size():
    assert parse_size("300MB") == 300_000_000
    assert parse_size("2.5MB") == 2_500_000
    assert parse_size("1GiB") == 2**30
    assert parse_size("123456") == 123456
    assert parse_size("64 kib") == 65536
    for bad in ("", "MB", "1.2.3MB", "5 parsecs", "-3MB"):
        with pytest.raises(CosmoeError):
            parse_size(bad)


def test_reader_checks_codes_scales_and_encodings(tmp_path):
    shapes = {"a.weight": (4, 64), "n.weight": (64,)}
    e4 = Q.choose_encoding("int4", (4, 64), 32, "float32")
    encodings = {"a.weight": e4, "n.weight": Q.float_encoding("float32")}
    packed, scale = Q.quantize(torch.randn(4, 64), e4)
    good = {"a.weight": packed, "a.weight_scale": scale, "n.weight": torch.ones(64)}
    path = tmp_path / "good.safetensors"
    save_file(good, str(path))
    out = read_file(path, shapes, torch.float32, encodings)
    assert torch.equal(out["a.weight"], Q.dequantize(packed, scale, e4, 64))
    cases = {
        "codes-dtype": ({**good, "a.weight": packed.view(torch.int8)}, "its encoding needs torch.uint8"),
        "no-scale": ({k: v for k, v in good.items() if k != "a.weight_scale"}, "missing ['a.weight_scale']"),
        "scale-shape": ({**good, "a.weight_scale": scale[:, :1].contiguous()}, "a.weight_scale has shape"),
        "float-as-int": ({**good, "n.weight": torch.ones(64, dtype=torch.int32)}, "is torch.int32, expected a float"),
    }
    for name, (tensors, match) in cases.items():
        p = tmp_path / f"{name}.safetensors"
        save_file(tensors, str(p))
        with pytest.raises(FormatError, match=re.escape(match)):
            read_file(p, shapes, torch.float32, encodings)
    with pytest.raises(FormatError, match="encodings do not match"):
        read_file(path, shapes, torch.float32, {"a.weight": e4})


def test_bundle_refuses_mixed_float_and_quantized_entries(tiny, tmp_path):
    q = quantize(tiny, "q-manifest", "--expert-scheme", "int8")
    m = json.loads((q / "manifest.json").read_text())
    del m["files"][1]["tensors"]
    (q / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(FormatError, match="lacks per-tensor encodings"):
        Bundle.open(q)


def test_quantize_help_has_examples_and_inspect_shows_the_schemes(tiny):
    r = run("quantize", "--help")
    assert r.exit_code == 0 and "Examples:" in r.output and "--expert-bits" in r.output
    q = quantize(tiny, "q-inspect", "--expert-scheme", "int4", "--group-size", "64")
    r = run("inspect", q, "--json")
    assert json.loads(r.output)["quantization"] == {"experts": "int4", "backbone": "int8", "group_size": 64,
                                                    "rounding": "nearest"}
    assert "quantized: experts int4, backbone int8, int4 group 64" in run("inspect", q).output


def test_golden_manifest_records_and_shard_header(tmp_path):
    """Pin the bytes a reader depends on: the manifest's records and a quantized shard's header."""
    src, out = tmp_path / "tiny", tmp_path / "tiny-q4"
    assert run("-q", "split", "tiny", "-o", src).exit_code == 0
    assert run("-q", "quantize", src, "-o", out, "--expert-scheme", "int4", "--group-size", "64").exit_code == 0
    text = (out / "manifest.json").read_text()
    assert text.endswith("}\n") and '\n  "quantization": {\n    "experts": "int4",' in text
    m = json.loads(text)
    assert m["quantization"] == {"experts": "int4", "backbone": "int8", "group_size": 64, "rounding": "nearest",
                                 "roles": {"expert": "int4", "router": "none", "norm": "none", "bias": "none",
                                           "embedding": "int8", "head": "int8", "attention": "int8",
                                           "shared_expert": "int8"}}
    q4 = {"scheme": "int4", "bits": 4, "group_size": 64, "scale_dtype": "bfloat16"}
    entry = m["files"][16]
    assert list(entry) == ["path", "bytes", "sha256", "dtype", "role", "layer", "expert", "tensors"]
    assert entry["tensors"] == {f"layers.1.moe.experts.7.{n}.weight": q4 for n in ("gate", "up", "down")}
    assert list(m["files"][0]["tensors"].items())[:2] == [
        ("embed.weight", {"scheme": "int8", "bits": 8, "group_size": 64, "scale_dtype": "bfloat16"}),
        ("layers.0.attn_norm.weight", {"scheme": "none", "bits": 32})]
    data = (out / entry["path"]).read_bytes()
    n = int.from_bytes(data[:8], "little")
    p = "layers.1.moe.experts.7"
    header = ('{"__metadata__":{"format":"pt"},'
              f'"{p}.down.weight_scale":{{"dtype":"BF16","shape":[64,2],"data_offsets":[0,256]}},'
              f'"{p}.gate.weight_scale":{{"dtype":"BF16","shape":[128,1],"data_offsets":[256,512]}},'
              f'"{p}.up.weight_scale":{{"dtype":"BF16","shape":[128,1],"data_offsets":[512,768]}},'
              f'"{p}.down.weight":{{"dtype":"U8","shape":[64,64],"data_offsets":[768,4864]}},'
              f'"{p}.gate.weight":{{"dtype":"U8","shape":[128,32],"data_offsets":[4864,8960]}},'
              f'"{p}.up.weight":{{"dtype":"U8","shape":[128,32],"data_offsets":[8960,13056]}}}}')
    assert data[8:8 + n].decode().rstrip(" ") == header and n % 8 == 0
    assert len(data) == entry["bytes"] == 8 + n + 13056


def test_gptq_and_mixed_precision_over_a_plan_with_dense_layers(hf_checkpoint, tmp_path):
    """GLM-4-MoE with a dense layer 0: GPTQ rounds the dense MLP with the backbone (its Hessians from
    the calibration walk) and the experts of the MoE layer only; --expert-bits auto decides for the
    MoE layer's experts and records them by their layer."""
    text = tmp_path / "calib.txt"
    text.write_text("the router picks two experts for every token; a dense layer has none\n" * 60)
    ckpt = add_tokenizer(hf_checkpoint("glm4_moe"), text)
    out = tmp_path / "bundle"
    assert run("-q", "split", ckpt, "-o", out).exit_code == 0
    want = TorchRuntime(Bundle.open(out)).logits(torch.tensor([[5, 17, 99, 3, 250, 42]]))
    gptq = tmp_path / "gptq"
    r = run("-q", "quantize", out, "-o", gptq, "--expert-scheme", "int4", "--calibration", text)
    assert r.exit_code == 0, r.output
    bundle = Bundle.open(gptq)
    assert bundle.quantization["rounding"] == "gptq" and set(bundle.experts) == {(1, e) for e in range(8)}
    assert bundle.backbone.encodings()["layers.0.mlp.down.weight"].scheme == "int8"
    assert bundle.quantization["roles"]["dense_mlp"] == "int8"
    got = TorchRuntime(bundle).logits(torch.tensor([[5, 17, 99, 3, 250, 42]]))
    assert float((got - want).abs().max()) <= 0.75 * float(want.abs().max())
    sizes = [sum(f.bytes for f in Bundle.open(run_quantize(out, tmp_path / s, s)).files) for s in ("int4", "int8")]
    mp = tmp_path / "mp"
    r = run("-q", "quantize", out, "-o", mp, "--expert-bits", "auto", "--calibration", text,
            "--target-size", sum(sizes) // 2)
    assert r.exit_code == 0, r.output
    record = Bundle.open(mp).quantization["mixed_precision"]
    assert {(x["layer"], x["expert"]) for x in record["experts"]} == {(1, e) for e in range(8)}
    assert record["bundle_bytes"] <= sum(sizes) // 2


def run_quantize(bundle: Path, out: Path, scheme: str) -> Path:
    r = run("-q", "quantize", bundle, "-o", out, "--expert-scheme", scheme)
    assert r.exit_code == 0, r.output
    return out
