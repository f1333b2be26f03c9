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
from cosmoe_export.lower import executorch_target, onnx_target, units
from cosmoe_export.lower.targets import TARGETS
from cosmoe_export.reference import TorchRuntime
from runtime_py import quant
from runtime_py.backends import native_binary
from runtime_py.bundle import Bundle
from runtime_py.config import CosmoeConfig
from runtime_py.model import Attention, Expert, LayerCache, RMSNorm, rope_cos_sin, rope_inv_freq
from runtime_py.program_backend import layer_masks

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


@pytest.fixture
def exact_onnx(monkeypatch):
    """MatMulNBits at accuracy_level 0 (fp32 compute): the tests that prove the packing is the
    bundle's own compare exactly; the lowered default (int8 compute) is tested beside them."""
    monkeypatch.setattr(onnx_target, "ACCURACY_LEVEL", {"int4": 0, "int8": 0})


@pytest.mark.parametrize("scheme,group", QUANT)
@pytest.mark.parametrize("config", [CFG, WD], ids=["standard", "wd"])
def test_onnx_matmulnbits_computes_the_bundle_weights(config, scheme, group, exact_onnx):
    weights = random_expert(config, scheme, group)
    x = torch.randn(4, config.hidden_size, generator=torch.Generator().manual_seed(2))
    got = run_onnx(TARGETS["onnx"].expert(config, weights), {"x": x})[0]
    # MatMulNBits dequantizes exactly to the bundle's weights and accumulates in fp32.
    assert rel(got, reference(config, weights, x)) <= 1e-5


@pytest.mark.parametrize("scheme,group", [("int4", 32), ("int8", 32)])
def test_onnx_experts_compute_in_int8_by_default(scheme, group):
    """The lowered default: every MatMulNBits says accuracy_level 4 (ONNX Runtime quantizes the
    activations per block to int8, as XNNPACK's 8da kernels do), within XNNPACK's bound of the
    float-activation function, and the program's precision label says so."""
    import onnx
    weights = random_expert(CFG, scheme, group)
    data = TARGETS["onnx"].expert(CFG, weights)
    nodes = [n for n in onnx.load_from_string(data).graph.node if n.op_type == "MatMulNBits"]
    assert len(nodes) == 3 and all({a.name: a.i for a in n.attribute}["accuracy_level"] == 4 for n in nodes)
    assert TARGETS["onnx"].precision(weights) == f"matmulnbits-{scheme}-acc4"
    x = torch.randn(4, CFG.hidden_size, generator=torch.Generator().manual_seed(2))
    err = rel(run_onnx(data, {"x": x})[0], reference(CFG, weights, x))
    assert 1e-6 < err <= 0.1  # not the exact path, and as close as ExecuTorch's 8da (test below)


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


def test_hidden_not_a_multiple_of_the_group(tmp_path, exact_onnx):
    """wearable-moe's hidden 432 is 13.5 groups of 32: codes and inputs are zero-padded for XNNPACK;
    MatMulNBits takes a short last block as it is."""
    config = dataclasses.replace(CFG, hidden_size=80)
    weights = random_expert(config, "int4", 32)
    x = torch.randn(3, 80, generator=torch.Generator().manual_seed(4))
    assert rel(run_onnx(TARGETS["onnx"].expert(config, weights), {"x": x})[0], reference(config, weights, x)) <= 1e-5
    got = run_pte(TARGETS["executorch"].expert(config, weights), tmp_path, [x])[0]
    assert rel(got, reference(config, weights, x, act_quant=True)) <= 1e-3


@pytest.fixture
def lowered(lowered_tiny):
    return lowered_tiny  # conftest: the tiny preset lowered to every target, once per session


def test_manifest_lists_every_program(lowered):
    bundle = Bundle.open(lowered)
    cfg = bundle.config
    programs = [f for f in bundle.files if f.role == "program"]
    for target in ("executorch", "onnx"):
        mine = [f for f in programs if f.target == target]
        assert sum(f.unit == "expert" for f in mine) == cfg.num_hidden_layers * cfg.num_experts
        assert sum(f.unit == "layer" for f in mine) == cfg.num_hidden_layers
        assert {f.unit for f in mine} == {"embed", "layer", "head", "expert"}
        # Experts too take at most a prefill chunk: ExecuTorch plans their buffers for it.
        assert {f.max_tokens for f in mine} == {units.max_tokens(cfg)}
    assert bundle.verify_integrity() == []
    tools = bundle.manifest["provenance"]["tools"]
    assert {"executorch", "torchao", "onnx"} <= set(tools)


# Determinism (a fresh split lowered again writes the same bytes) is checked together with the
# job count: tests/cosmoe_export/test_parallel.py::test_lower_same_bytes_for_every_job_count.


@pytest.mark.parametrize("backend", ["executorch", "onnxruntime"])
def test_decode_over_lowered_units_matches_pytorch_runtime(lowered, backend):
    from runtime_py.runner import Runner
    bundle = Bundle.open(lowered)
    runtime = Runner(bundle, backend=backend)
    ids = torch.tensor([[5, 17, 99, 3, 250, 42, 7, 7]])
    got = runtime.logits(ids)
    want = TorchRuntime(bundle).logits(ids)
    assert float((got - want).abs().max()) <= 1e-4
    assert torch.equal(got.argmax(-1), want.argmax(-1))
    generation = runtime.generate(ids[0].tolist(), 12)
    assert generation.tokens == TorchRuntime(bundle).greedy(ids, 12)
    assert 0 < generation.metrics["expert_loads"] <= bundle.config.num_hidden_layers * bundle.config.num_experts


def test_verify_runs_every_backend_in_the_bundle(lowered, tmp_path):
    r = CliRunner().invoke(cli, ["verify", str(lowered), "--reference", "tiny", "--json", str(tmp_path / "r.json")])
    assert r.exit_code == 0, r.output
    report = json.loads((tmp_path / "r.json").read_text())
    native = ["native"] if native_binary() is not None else []  # the C++ runner, when it is installed
    assert [x["backend"] for x in report["results"]] == ["torch", "executorch", "onnxruntime", *native]
    for res in report["results"]:
        assert res["max_abs_logit_err"] <= 1e-4 and res["greedy_match"] == 1.0 and res["passed"]
    r = CliRunner().invoke(cli, ["verify", str(lowered), "--reference", "tiny", "--backend", "onnxruntime"])
    assert r.exit_code == 0 and "executorch" not in r.output


def test_verify_asks_for_lower_when_programs_are_missing(tmp_path):
    out = tmp_path / "b"
    assert CliRunner().invoke(cli, ["-q", "split", "tiny", "-o", str(out)]).exit_code == 0
    r = CliRunner().invoke(cli, ["verify", str(out), "--reference", "tiny", "--backend", "executorch"])
    assert r.exit_code == 2 and "cosmoe-export lower" in r.output


def quantized(w: torch.Tensor, scheme: str, group: int) -> units.QuantWeight:
    enc = quant.choose_encoding(scheme, tuple(w.shape), group, "float32")
    stored, scales = quant.quantize(w, enc)
    return units.QuantWeight(quant.codes(stored, enc, w.shape[1]), scales.float(), enc)


def random_layer(config: CosmoeConfig, scheme: str = "none", group: int = 32, seed: int = 5):
    """Canonical weights of layer 0: (floats, raw); raw holds QuantWeight for the attention and
    shared-expert matrices under ``scheme`` (router and shared-expert gate stay float, as in
    quantize), floats their dequantized values."""
    g = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        names = {k: tuple(v.shape) for k, v in units.LayerUnit(config).state_dict().items()}
    floats, raw = {}, {}
    for name, shape in names.items():
        w = torch.randn(shape, generator=g) * (shape[-1] ** -0.5 if len(shape) == 2 else 0.1)
        if name.endswith("norm.weight"):
            w = 1 + w
        canonical = "layers.0." + name.replace("router", "moe.router").replace("shared", "moe.shared")
        if scheme != "none" and len(shape) == 2 and not name.startswith(("router", "shared_gate")):
            raw[canonical] = quantized(w, scheme, group)
            floats[canonical] = raw[canonical].dequantize()
        else:
            raw[canonical] = floats[canonical] = w
    return floats, raw


def layer_call(config: CosmoeConfig, t: int, pos: int, seed: int = 6, s: int | None = None):
    """Inputs of a layer program for T tokens at positions pos..pos+T-1, the runtime's way: S cache
    slots (by default the filled prefix, max(pos, 1)) holding random keys/values in slots < pos
    (zeros after), and the masks showing the written slots and, among the new keys, each token
    itself and the ones before it (runtime_py.program_backend.layer_masks)."""
    g = torch.Generator().manual_seed(seed)
    s = max(pos, 1) if s is None else s
    gk, dh = config.num_key_value_heads, config.head_size
    x = torch.randn(1, t, config.hidden_size, generator=g)
    cos, sin = rope_cos_sin(rope_inv_freq(config), torch.arange(pos, pos + t), torch.float32)  # [T, Dh] x2
    k_cache, v_cache = torch.zeros(1, gk, s, dh), torch.zeros(1, gk, s, dh)
    k_cache[:, :, :pos], v_cache[:, :, :pos] = torch.randn(2, 1, gk, pos, dh, generator=g)
    return (x, cos, sin, *layer_masks(pos, t, s), k_cache, v_cache)


def canonical_layer(config: CosmoeConfig, floats: dict, inputs: tuple, pos: int):
    """The layer program's outputs from runtime_py.model's own modules (Attention with its LayerCache
    at ``pos``): base, xn, router logits, k_new, v_new."""
    x, cos, sin, _, _, k_cache, v_cache = inputs
    sd = {k.removeprefix("layers.0."): v for k, v in floats.items()}
    attn = Attention(config)
    attn.load_state_dict({k.removeprefix("attn."): v for k, v in sd.items() if k.startswith("attn.")})
    norm1, norm2 = RMSNorm(config.hidden_size, config.rms_norm_eps), RMSNorm(config.hidden_size, config.rms_norm_eps)
    norm1.weight.data, norm2.weight.data = sd["attn_norm.weight"], sd["ffn_norm.weight"]
    t = x.shape[1]
    room = torch.zeros(1, config.num_key_value_heads, pos + t, config.head_size)  # [1, G, pos+T, Dh]
    cache = LayerCache(room.clone(), room.clone())
    cache.k[:, :, :pos], cache.v[:, :, :pos] = k_cache[:, :, :pos], v_cache[:, :, :pos]
    with torch.no_grad():
        h = x + attn(norm1(x), cos, sin, cache, pos)  # [1, T, D]
        xn = norm2(h).reshape(t, -1)  # [T, D]
        logits = torch.nn.functional.linear(xn, sd["moe.router.weight"])  # [T, E]
        base = h
        if config.shared_expert_intermediate_size:
            shared = Expert(config.hidden_size, config.shared_expert_intermediate_size)
            shared.load_state_dict({k.removeprefix("moe.shared."): v for k, v in sd.items()
                                    if k.startswith("moe.shared.")})
            gate = torch.sigmoid(torch.nn.functional.linear(xn, sd["moe.shared_gate.weight"]))
            base = h + (gate * shared(xn)).view(1, t, -1)
    return base, xn, logits, cache.k[:, :, pos:pos + t], cache.v[:, :, pos:pos + t]


def lower_layer(target: str, config: CosmoeConfig, floats: dict, raw: dict) -> bytes:
    """One layer program the way the stage writes it: built on floats, the bundle's integers swapped in."""
    unit = units.build_layer(config, floats, 0)
    TARGETS[target].backbone_integers(unit, units.layer_linears(config, 0), raw)
    return TARGETS[target].module(unit, units.layer_example_inputs(config), units.layer_dynamic_shapes(config),
                                  units.LAYER_INPUTS, units.LAYER_OUTPUTS)


def run_layer(target: str, data: bytes, tmp_path, inputs: tuple) -> list:
    if target == "executorch":
        return run_pte(data, tmp_path, list(inputs))
    return run_onnx(data, dict(zip(units.LAYER_INPUTS, inputs, strict=True)))


# GQA (4 query heads, 2 kv heads), a shared expert and attention biases: every path of the layer unit.
LAYER_CFG = dataclasses.replace(CFG, shared_expert_intermediate_size=64, attention_bias=True)


@pytest.mark.parametrize("target", ["executorch", "onnx"])
def test_layer_program_takes_1_to_max_tokens(target, tmp_path):
    """One program per layer for prefill and decode: T = 5 mid-sequence, T = 1, and T = max from 0,
    against runtime_py.model's attention with its KV cache."""
    floats, raw = random_layer(LAYER_CFG)
    data = lower_layer(target, LAYER_CFG, floats, raw)
    p = units.max_tokens(LAYER_CFG)
    s = LAYER_CFG.max_position_embeddings
    # (T, pos, S): the runtime passes the filled prefix; the whole context works too.
    for t, pos, slots in ((5, 7, None), (1, 12, None), (p, 0, None), (1, 0, None), (1, 12, s), (3, s - 3, None)):
        inputs = layer_call(LAYER_CFG, t, pos, s=slots)
        got = run_layer(target, data, tmp_path, inputs)
        want = canonical_layer(LAYER_CFG, floats, inputs, pos)
        for name, a, b in zip(units.LAYER_OUTPUTS, got, want, strict=True):
            assert tuple(a.shape) == tuple(b.shape), (t, pos, name)
            assert rel(a, b) <= 1e-5, (t, pos, name, rel(a, b))


def float_initializer_sizes(data: bytes) -> set[int]:
    import onnx
    model = onnx.load_from_string(data)
    return {int(torch.tensor(list(i.dims)).prod()) for i in model.graph.initializer if i.data_type == 1}


def contrib_ops(data: bytes) -> list[str]:
    import onnx
    return [n.op_type for n in onnx.load_from_string(data).graph.node if n.domain == onnx_target.MS_DOMAIN]


@pytest.mark.parametrize("scheme,group", [("int4", 32), ("int8", 32)])
def test_onnx_quantized_layer_runs_on_the_bundle_integers(scheme, group, exact_onnx):
    """MatMulNBits from the bundle's codes, no fp32 copy of any quantized matrix, same function as the
    dequantized weights (T = 5)."""
    floats, raw = random_layer(LAYER_CFG, scheme, group)
    data = lower_layer("onnx", LAYER_CFG, floats, raw)
    quantized_sizes = {w.codes.numel() for w in raw.values() if isinstance(w, units.QuantWeight)}
    assert contrib_ops(data) == ["MatMulNBits"] * sum(isinstance(w, units.QuantWeight) for w in raw.values())
    assert not quantized_sizes & float_initializer_sizes(data)
    inputs = layer_call(LAYER_CFG, 5, 3)
    for a, b in zip(run_layer("onnx", data, None, inputs), canonical_layer(LAYER_CFG, floats, inputs, 3), strict=True):
        assert rel(a, b) <= 1e-5


@pytest.mark.parametrize("scheme,group,tied", [("int4", 32, False), ("int8", 32, False), ("int4", 64, True)])
def test_onnx_quantized_embed_and_head(scheme, group, tied, exact_onnx):
    """GatherBlockQuantized and MatMulNBits on the bundle's table and head (hidden 80: a short last
    group at 32 and 64); a tied head multiplies by the embedding's own integers."""
    config = dataclasses.replace(CFG, hidden_size=80, tie_word_embeddings=tied)
    g = torch.Generator().manual_seed(7)
    table = quantized(torch.randn(config.vocab_size, 80, generator=g) * 0.1, scheme, group)
    raw = {"embed.weight": table, "norm.weight": 1 + 0.1 * torch.randn(80, generator=g)}
    if not tied:
        raw["lm_head.weight"] = quantized(torch.randn(config.vocab_size, 80, generator=g) * 0.1, scheme, group)
    floats = units.dequantized(raw)
    target, t = TARGETS["onnx"], units.token_dim(config)

    embed = units.build_embed(config, floats)
    want_embed = embed(torch.tensor([[3, 0, 199, 7]])).detach()
    assert target.backbone_integers(embed, units.embed_tables(config), raw) == f"gatherblockquantized-{scheme}"
    data = target.module(embed, (torch.zeros(1, 2, dtype=torch.long),), ({1: t},), ["ids"], ["x"])
    assert contrib_ops(data) == ["GatherBlockQuantized"] and table.codes.numel() not in float_initializer_sizes(data)
    assert rel(run_onnx(data, {"ids": torch.tensor([[3, 0, 199, 7]])})[0], want_embed) == 0  # code * scale, exact

    head = units.build_head(config, floats)
    x = torch.randn(1, 5, 80, generator=g)
    want_head = head(x).detach()
    assert target.backbone_integers(head, units.head_linears(config), raw) == f"matmulnbits-{scheme}-acc0"
    data = target.module(head, (torch.zeros(1, 2, 80),), ({1: t},), ["x"], ["logits"])
    assert contrib_ops(data) == ["MatMulNBits"]
    assert rel(run_onnx(data, {"x": x})[0], want_head) <= 1e-5


def test_nbits_modules_compute_the_dequantized_weights():
    """The eager path of the custom ops unpacks what the ONNX graph gets: the packing is the bundle's."""
    g = torch.Generator().manual_seed(8)
    for scheme, group in (("int4", 32), ("int4", 128), ("int8", 32)):
        w = quantized(torch.randn(24, 80, generator=g), scheme, group)
        x = torch.randn(3, 80, generator=g)
        assert torch.allclose(onnx_target.NBitsLinear(w)(x), x @ w.dequantize().T, atol=1e-5)
        ids = torch.tensor([[0, 23, 5]])
        assert torch.equal(onnx_target.NBitsEmbedding(w)(ids), w.dequantize()[ids])


def test_executorch_layer_with_bundle_integers(tmp_path):
    """A quantized backbone's attention and shared expert run on their own codes (8da4w here; 8da8w
    is the same QLinear) in the layer program, with T dynamic."""
    for scheme, label in (("int8", "8da8w"), ("int4", "8da4w")):
        floats, raw = random_layer(LAYER_CFG, scheme, 32)
        unit = units.build_layer(LAYER_CFG, floats, 0)
        assert TARGETS["executorch"].backbone_integers(unit, units.layer_linears(LAYER_CFG, 0), raw) == label
        assert isinstance(unit.attn.q, executorch_target.QLinear)
        assert isinstance(unit.shared.down, executorch_target.QLinear)
    data = TARGETS["executorch"].module(unit, units.layer_example_inputs(LAYER_CFG),
                                        units.layer_dynamic_shapes(LAYER_CFG), units.LAYER_INPUTS,
                                        units.LAYER_OUTPUTS)
    for t, pos in ((5, 7), (1, 12)):
        inputs = layer_call(LAYER_CFG, t, pos)
        got = run_pte(data, tmp_path, list(inputs))
        for a, b in zip(got, canonical_layer(LAYER_CFG, floats, inputs, pos), strict=True):
            assert rel(a, b) <= 0.05  # the dynamic int8 activation quantization XNNPACK adds


def test_quantized_onnx_lowering_is_deterministic(tmp_path):
    runner = CliRunner()
    assert runner.invoke(cli, ["-q", "split", "tiny", "-o", str(tmp_path / "f")]).exit_code == 0
    files = []
    for name in ("a", "b"):
        out = tmp_path / name
        r = runner.invoke(cli, ["-q", "quantize", str(tmp_path / "f"), "-o", str(out), "--expert-scheme", "int4",
                                "--backbone-scheme", "int4"])
        assert r.exit_code == 0, r.output
        assert runner.invoke(cli, ["-q", "lower", str(out), "--target", "onnx"]).exit_code == 0
        files.append([f for f in json.loads((out / "manifest.json").read_text())["files"] if f["role"] == "program"])
    assert files[0] == files[1]
    precisions = {f["unit"]: f["precision"] for f in files[0]}
    assert precisions == {"embed": "gatherblockquantized-int4", "layer": "matmulnbits-int4-acc4",
                          "head": "matmulnbits-int4-acc4", "expert": "matmulnbits-int4-acc4"}


# A dense layer of the plan (Qwen3-MoE mlp_only_layers): layer 0 dense, layer 1 MoE.
DENSE_CFG = dataclasses.replace(CFG, num_hidden_layers=2, layer_ffns=("dense", "moe"), dense_intermediate_size=112)


def random_dense_layer(config: CosmoeConfig, seed: int = 5) -> dict[str, torch.Tensor]:
    """Canonical float weights of dense layer 0 (attention, norms, the MLP)."""
    g = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        names = {k: tuple(v.shape) for k, v in units.LayerUnit(config, 0).state_dict().items()}
    assert {n for n in names if n.startswith("mlp.")} == {"mlp.gate.weight", "mlp.up.weight", "mlp.down.weight"}
    assert not any(n.startswith(("router", "shared")) for n in names)
    out = {}
    for name, shape in names.items():
        w = torch.randn(shape, generator=g) * (shape[-1] ** -0.5 if len(shape) == 2 else 0.1)
        out["layers.0." + name] = 1 + w if name.endswith("norm.weight") else w
    return out


@pytest.mark.parametrize("target", ["executorch", "onnx"])
def test_dense_layer_program_computes_its_mlp(target, tmp_path):
    """A dense layer's program returns base = h + MLP(xn) and zero router logits, in the five
    outputs every layer program has, against runtime_py.model's DenseMLP."""
    from runtime_py.model import DenseMLP
    floats = random_dense_layer(DENSE_CFG)
    data = lower_layer(target, DENSE_CFG, floats, floats)
    mlp = DenseMLP(DENSE_CFG, 0)
    mlp.load_state_dict({k.removeprefix("layers.0.mlp."): v for k, v in floats.items() if ".mlp." in k})
    for t, pos in ((5, 7), (1, 12), (1, 0)):
        inputs = layer_call(DENSE_CFG, t, pos)
        got = run_layer(target, data, tmp_path, inputs)
        sd = {**floats, "layers.0.moe.router.weight": torch.zeros(DENSE_CFG.num_experts, DENSE_CFG.hidden_size)}
        h, xn, _, k_new, v_new = canonical_layer(DENSE_CFG, sd, inputs, pos)
        with torch.no_grad():
            base = h + mlp(xn)[0].view(1, t, -1)
        want = (base, xn, torch.zeros(t, DENSE_CFG.num_experts), k_new, v_new)
        for name, a, b in zip(units.LAYER_OUTPUTS, got, want, strict=True):
            assert tuple(a.shape) == tuple(b.shape), (t, pos, name)
            err = float((torch.as_tensor(a) - b).abs().max())  # logits are zeros: absolute, scaled by the output
            assert err <= 1e-5 * max(1.0, float(b.abs().max())), (t, pos, name, err)


@pytest.mark.parametrize("backend", ["executorch", "onnxruntime"])
def test_dense_layers_over_lowered_units_match_pytorch_runtime(lowered_dense, backend):
    """The whole plan lowered: one layer program per layer (the dense one with its MLP), experts for
    the MoE layer only; logits and greedy tokens as the PyTorch runtime, under a budget too."""
    from runtime_py.runner import Runner
    bundle = Bundle.open(lowered_dense)
    experts = {(f.target, f.layer) for f in bundle.files if f.unit == "expert"}
    assert experts == {("executorch", 1), ("onnx", 1)}
    ids = torch.tensor([[5, 17, 99, 3, 250, 42, 7, 7]])
    want, greedy = TorchRuntime(bundle).logits(ids), TorchRuntime(bundle).greedy(ids, 12)
    runtime = Runner(bundle, backend=backend)
    assert float((runtime.logits(ids) - want).abs().max()) <= 1e-4
    assert runtime.generate(ids[0].tolist(), 12).tokens == greedy
    budgeted = Runner(bundle, backend=backend, experts_per_layer=2, policy="lru+prefetch")
    assert budgeted.generate(ids[0].tolist(), 12).tokens == greedy
