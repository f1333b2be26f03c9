"""Lowered units against the canonical PyTorch modules, for every target and precision, and a
decode loop over the lowered units against the PyTorch runtime (the cut is right)."""

from __future__ import annotations

import dataclasses
import hashlib
import json

import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner

from cosmoe_export.cli import cli
from cosmoe_export.lower import executorch_target, units
from cosmoe_export.lower.stage import TARGETS
from runtime_py import quant
from runtime_py.bundle import Bundle
from runtime_py.config import CosmoeConfig
from runtime_py.model import Expert
from runtime_py.torch_backend import TorchRuntime

CFG = CosmoeConfig(vocab_size=200, hidden_size=96, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                   intermediate_size=160, max_position_embeddings=64)
WD = dataclasses.replace(CFG, expert_kind="wd", wd_rank=48)


def random_expert(config: CosmoeConfig, scheme: str, group: int = 32, seed: int = 0) -> dict[str, units.Weight]:
    g = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in Expert(config.hidden_size, config.intermediate_size,
                                                         config.expert_kind, config.rank).state_dict().items()}
    out: dict[str, units.Weight] = {}
    for name, shape in shapes.items():
        w = torch.randn(shape, generator=g) * shape[1] ** -0.5
        if scheme == "none":
            out[name] = w
            continue
        enc = quant.choose_encoding(scheme, shape, group, "float32")
        stored, scales = quant.quantize(w, enc)
        out[name] = units.QuantWeight(quant.codes(stored, enc, shape[1]), scales.float(), enc)
    return out


def reference(config, weights, x, act_quant=False):
    """The expert on the bundle's (dequantized) weights; with act_quant, inputs of every matmul are
    fake-quantized per token (int8, asymmetric) with torchao's own primitives, as 8da{4,8}w does."""
    from torchao.quantization.quant_primitives import (
        MappingType,
        choose_qparams_affine,
        dequantize_affine,
        quantize_affine,
    )

    def lin(a, w):
        if act_quant:
            block = (1, a.shape[1])
            s, z = choose_qparams_affine(a, MappingType.ASYMMETRIC, block, torch.int8, -128, 127)
            a = dequantize_affine(quantize_affine(a, block, s, z, torch.int8, -128, 127), block, s, z,
                                  torch.int8, -128, 127)
        return torch.nn.functional.linear(a, w)

    w = units.dequantized(weights)
    def proj(a, m):
        return lin(lin(a, w[f"{m}.right"]), w[f"{m}.left"]) if config.expert_kind == "wd" else lin(a, w[f"{m}.weight"])
    return proj(torch.nn.functional.silu(proj(x, "gate")) * proj(x, "up"), "down")


def run_pte(data: bytes, tmp_path, inputs):
    from executorch.runtime import Runtime
    path = tmp_path / f"{hashlib.sha256(data).hexdigest()[:12]}.pte"
    path.write_bytes(data)
    return Runtime.get().load_program(str(path)).load_method("forward").execute(list(inputs))


def run_onnx(data: bytes, inputs: dict):
    sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    return sess.run(None, {k: v.numpy() for k, v in inputs.items()})


def rel(a, b) -> float:
    return float((torch.as_tensor(a) - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("config", [CFG, WD], ids=["standard", "wd"])
def test_fp32_expert_units(config, tmp_path):
    weights = random_expert(config, "none")
    x = torch.randn(5, config.hidden_size, generator=torch.Generator().manual_seed(1))
    want = units.build_expert(config, units.dequantized(weights))(x).detach()
    et = run_pte(TARGETS["executorch"].expert(config, weights), tmp_path, [x])[0]
    onnx = run_onnx(TARGETS["onnx"].expert(config, weights), {"x": x})[0]
    assert rel(et, want) <= 1e-5
    assert rel(onnx, want) <= 1e-5
    assert rel(et[:1], want[:1]) <= 1e-5  # one program serves any token count (decode and prefill)


QUANT = [("int4", 32), ("int4", 64), ("int4", 128), ("int8", 32)]


@pytest.mark.parametrize("scheme,group", QUANT)
@pytest.mark.parametrize("config", [CFG, WD], ids=["standard", "wd"])
def test_onnx_matmulnbits_computes_the_bundle_weights(config, scheme, group):
    weights = random_expert(config, scheme, group)
    x = torch.randn(4, config.hidden_size, generator=torch.Generator().manual_seed(2))
    got = run_onnx(TARGETS["onnx"].expert(config, weights), {"x": x})[0]
    # MatMulNBits dequantizes exactly to the bundle's weights and accumulates in fp32.
    assert rel(got, reference(config, weights, x)) <= 1e-5


@pytest.mark.parametrize("scheme,group", QUANT)
@pytest.mark.parametrize("config", [CFG, WD], ids=["standard", "wd"])
def test_executorch_8da_uses_the_bundle_integers(config, scheme, group, tmp_path):
    weights = random_expert(config, scheme, group)
    x = torch.randn(4, config.hidden_size, generator=torch.Generator().manual_seed(3))
    got = run_pte(TARGETS["executorch"].expert(config, weights), tmp_path, [x])[0]
    # Same function as the bundle's weights once XNNPACK's forced dynamic int8 activation
    # quantization is applied to the reference too; against plain float activations the
    # difference is that re-quantization (a few percent, docs/LOWERING.md).
    assert rel(got, reference(config, weights, x, act_quant=True)) <= 1e-3
    assert rel(got, reference(config, weights, x)) <= 0.1


def test_hidden_not_a_multiple_of_the_group(tmp_path):
    """wearable-moe's hidden 432 is 13.5 groups of 32: codes and inputs are zero-padded for XNNPACK;
    MatMulNBits takes a short last block as it is."""
    config = dataclasses.replace(CFG, hidden_size=80)
    weights = random_expert(config, "int4", 32)
    x = torch.randn(3, 80, generator=torch.Generator().manual_seed(4))
    assert rel(run_onnx(TARGETS["onnx"].expert(config, weights), {"x": x})[0], reference(config, weights, x)) <= 1e-5
    got = run_pte(TARGETS["executorch"].expert(config, weights), tmp_path, [x])[0]
    assert rel(got, reference(config, weights, x, act_quant=True)) <= 1e-3


@pytest.fixture(scope="module")
def lowered(tmp_path_factory):
    out = tmp_path_factory.mktemp("lw") / "tiny"
    runner = CliRunner()
    assert runner.invoke(cli, ["-q", "split", "tiny", "-o", str(out)]).exit_code == 0
    r = runner.invoke(cli, ["-q", "lower", str(out), "--target", "all"])
    assert r.exit_code == 0, r.output
    return out


def test_manifest_lists_every_program(lowered):
    bundle = Bundle.open(lowered)
    cfg = bundle.config
    programs = [f for f in bundle.files if f.role == "program"]
    for target in ("executorch", "onnx"):
        mine = [f for f in programs if f.target == target]
        assert sum(f.unit == "expert" for f in mine) == cfg.num_hidden_layers * cfg.num_experts
        assert sum(f.unit == "layer" for f in mine) == cfg.num_hidden_layers
        assert {f.unit for f in mine} == {"embed", "layer", "head", "expert"}
    assert bundle.verify_integrity() == []
    tools = bundle.manifest["provenance"]["tools"]
    assert {"executorch", "torchao", "onnx"} <= set(tools)


def test_lowering_is_deterministic(lowered, tmp_path):
    again = tmp_path / "again"
    runner = CliRunner()
    assert runner.invoke(cli, ["-q", "split", "tiny", "-o", str(again)]).exit_code == 0
    assert runner.invoke(cli, ["-q", "lower", str(again)]).exit_code == 0
    a = json.loads((lowered / "manifest.json").read_text())["files"]
    b = json.loads((again / "manifest.json").read_text())["files"]
    assert a == b  # paths, sizes and sha256 of every program


@pytest.mark.parametrize("backend", ["executorch", "onnxruntime"])
def test_decode_over_lowered_units_matches_pytorch_runtime(lowered, backend):
    from runtime_py.program_backend import ProgramRuntime
    bundle = Bundle.open(lowered)
    runtime = ProgramRuntime(bundle, backend)
    ids = torch.tensor([[5, 17, 99, 3, 250, 42, 7, 7]])
    got = runtime.logits(ids)
    want = TorchRuntime(bundle).logits(ids)
    assert float((got - want).abs().max()) <= 1e-4
    assert torch.equal(got.argmax(-1), want.argmax(-1))
    assert runtime.greedy(ids, 12) == TorchRuntime(bundle).greedy(ids, 12)
    assert 0 < runtime.loads <= bundle.config.num_hidden_layers * bundle.config.num_experts


def test_verify_runs_every_backend_in_the_bundle(lowered, tmp_path):
    r = CliRunner().invoke(cli, ["verify", str(lowered), "--reference", "tiny", "--json", str(tmp_path / "r.json")])
    assert r.exit_code == 0, r.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert [x["backend"] for x in report["results"]] == ["torch", "executorch", "onnxruntime"]
    for res in report["results"]:
        assert res["max_abs_logit_err"] <= 1e-4 and res["greedy_match"] == 1.0 and res["passed"]
    r = CliRunner().invoke(cli, ["verify", str(lowered), "--reference", "tiny", "--backend", "onnxruntime"])
    assert r.exit_code == 0 and "executorch" not in r.output


def test_verify_asks_for_lower_when_programs_are_missing(tmp_path):
    out = tmp_path / "b"
    assert CliRunner().invoke(cli, ["-q", "split", "tiny", "-o", str(out)]).exit_code == 0
    r = CliRunner().invoke(cli, ["verify", str(out), "--reference", "tiny", "--backend", "executorch"])
    assert r.exit_code == 2 and "cosmoe-export lower" in r.output


def test_executorch_layer_with_bundle_integers(tmp_path):
    """A quantized backbone's attention runs on its own int8 codes (8da8w) in the layer program."""
    config = dataclasses.replace(CFG, attention_bias=True)  # biases stay float beside the codes
    g = torch.Generator().manual_seed(5)
    with torch.device("meta"):
        names = {k: tuple(v.shape) for k, v in units.LayerUnit(config).state_dict().items()}
    floats, raw = {}, {}
    for name, shape in names.items():
        w = torch.randn(shape, generator=g) * (shape[-1] ** -0.5 if len(shape) == 2 else 0.1)
        if name.endswith("norm.weight"):
            w = 1 + w
        canonical = "layers.0." + (name.replace("router", "moe.router"))
        if len(shape) == 2 and name.startswith("attn."):
            enc = quant.choose_encoding("int8", shape, 32, "float32")
            stored, scales = quant.quantize(w, enc)
            raw[canonical] = units.QuantWeight(quant.codes(stored, enc, shape[1]), scales.float(), enc)
            floats["layers.0." + name.replace("router", "moe.router")] = raw[canonical].dequantize()
        else:
            raw[canonical] = floats[canonical] = w
    unit = units.build_layer(config, floats, 0)
    inputs = units.layer_example_inputs(config)
    inputs = (torch.randn(inputs[0].shape, generator=g), *inputs[1:])
    want = unit(*inputs)
    assert executorch_target.use_bundle_integers(unit, units.layer_linears(config, 0), raw)
    assert isinstance(unit.attn.q, executorch_target.QLinear)
    got = run_pte(executorch_target.to_pte(unit, inputs), tmp_path, list(inputs))
    for a, b in zip(got, want, strict=True):
        assert rel(a, b) <= 0.05  # the dynamic int8 activation quantization XNNPACK adds
