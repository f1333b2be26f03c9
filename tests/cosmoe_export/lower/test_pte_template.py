"""Expert and layer programs written from a template are byte for byte the programs a direct export
writes."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from cosmoe_export.importers.presets import PRESETS
from cosmoe_export.lower import pte_template, units
from runtime_py import quant
from runtime_py.config import CosmoeConfig, expert_tensor_shapes
from tests.cosmoe_export.lower.test_lower import reference, rel, run_pte

TINY = PRESETS["tiny"]  # hidden 64, intermediate 128
WD = dataclasses.replace(TINY, expert_kind="wd")  # rank 32
ODD = dataclasses.replace(TINY, hidden_size=48)  # gate/up K = 48: 1.5 groups of 32, zero-padded to 64


def expert(config: CosmoeConfig, schemes: dict[str, str], seed: int, group: int = 32) -> dict[str, units.Weight]:
    """Random expert weights, each matrix under its scheme (quant.FLOAT, 'int4' or 'int8')."""
    g = torch.Generator().manual_seed(seed)
    prefix = "layers.0.moe.experts.0."
    out: dict[str, units.Weight] = {}
    for name, shape in expert_tensor_shapes(config, 0, 0).items():
        name = name.removeprefix(prefix)
        w = torch.randn(shape, generator=g) * shape[1] ** -0.5
        enc = quant.choose_encoding(schemes[name.split(".")[0]], shape, group, "float32")
        if not enc.quantized:
            out[name] = w
            continue
        stored, scales = quant.quantize(w, enc)
        out[name] = units.QuantWeight(quant.codes(stored, enc, shape[1]), scales.float(), enc)
    return out


def uniform(scheme: str) -> dict[str, str]:
    return dict.fromkeys(("gate", "up", "down"), scheme)


CASES = {
    "fp32": (TINY, uniform(quant.FLOAT)),
    "int4-g32": (TINY, uniform("int4")),
    "int4-g32-padded-k": (ODD, uniform("int4")),
    "int8-per-channel": (TINY, uniform("int8")),
    "mixed-int4-int8-fp32": (TINY, {"gate": "int4", "up": "int8", "down": quant.FLOAT}),
    "wd-int4": (WD, uniform("int4")),
}


@pytest.mark.parametrize("case", CASES)
def test_template_writes_the_direct_export(case):
    config, schemes = CASES[case]
    first, second = expert(config, schemes, seed=1), expert(config, schemes, seed=2)
    got = pte_template.expert_pte(config, first)
    assert got == pte_template.export_expert(config, first)
    assert pte_template.expert_pte(config, first) == got  # deterministic
    assert pte_template.expert_pte(config, second) != got  # each expert gets its own weights


def test_identical_constants_share_one_entry_as_in_a_direct_export():
    """XNNPACK's store keeps one blob for equal constants (here gate == up): the template must too."""
    weights = expert(TINY, uniform(quant.FLOAT), seed=3)
    weights["up.weight"] = weights["gate.weight"].clone()
    assert pte_template.expert_pte(TINY, weights) == pte_template.export_expert(TINY, weights)


def test_templated_programs_run_with_their_own_weights(tmp_path):
    """Experts never exported directly compute their own function in the ExecuTorch runtime."""
    x = torch.randn(5, TINY.hidden_size, generator=torch.Generator().manual_seed(4))
    for seed in (5, 6):
        fp32 = expert(TINY, uniform(quant.FLOAT), seed)
        want = units.build_expert(TINY, fp32)(x).detach()
        assert rel(run_pte(pte_template.expert_pte(TINY, fp32), tmp_path, [x])[0], want) <= 1e-5
    xo = torch.randn(3, ODD.hidden_size, generator=torch.Generator().manual_seed(5))
    int4 = expert(ODD, uniform("int4"), seed=7)
    got = run_pte(pte_template.expert_pte(ODD, int4), tmp_path, [xo])[0]
    assert rel(got, reference(ODD, int4, xo, act_quant=True)) <= 1e-3


def test_one_template_per_layout(monkeypatch):
    built = []
    monkeypatch.setattr(pte_template, "_TEMPLATES", {})
    monkeypatch.setattr(pte_template, "build_template", lambda config, lay: built.append(lay) or object())
    monkeypatch.setattr(pte_template, "write", lambda template, weights: b"")
    for seed in (8, 9):
        pte_template.expert_pte(TINY, expert(TINY, uniform("int8"), seed))
    pte_template.expert_pte(TINY, expert(TINY, uniform("int4"), seed=8))
    pte_template.expert_pte(ODD, expert(ODD, uniform("int4"), seed=8))
    assert len(built) == 3


def test_a_template_refuses_weights_of_another_layout():
    int8 = expert(TINY, uniform("int8"), seed=10)
    pte_template.expert_pte(TINY, int8)  # builds the template unless an earlier test did
    template = next(t for key, t in pte_template._TEMPLATES.items() if key[-1] == pte_template.layout(int8))
    with pytest.raises(pte_template.TemplateError):
        pte_template.write(template, expert(TINY, uniform("int4"), seed=10))


def layer(config: CosmoeConfig, scheme: str, seed: int, layer_index: int = 0) -> dict[str, units.Weight]:
    """Random weights of one layer program (names relative to the layer), matrices under ``scheme``."""
    from cosmoe_export.lower import layer_weights
    from runtime_py.config import backbone_shapes
    g = torch.Generator().manual_seed(seed)
    out: dict[str, units.Weight] = {}
    for name, shape in backbone_shapes(config).items():
        w = torch.randn(shape, generator=g) * (shape[-1] ** -0.5 if len(shape) == 2 else 0.5)
        enc = quant.choose_encoding(scheme, shape, 32, "float32")
        if enc.quantized and len(shape) == 2 and ".attn." in name:  # the attention's matrices
            stored, scales = quant.quantize(w, enc)
            w = units.QuantWeight(quant.codes(stored, enc, shape[1]), scales.float(), enc)
        out[name] = w
    return layer_weights(config, out, layer_index)


# The constant kinds a layer program holds: linears in XNNPACK's data (float and int8), the norms'
# weights in constant buffers (per-head q/k norms too), attention biases.
LAYER_CASES = {
    "fp32": (TINY, quant.FLOAT),
    "int8-qk-norm-biases": (dataclasses.replace(TINY, qk_norm="head", attention_bias=True), "int8"),
}


@pytest.mark.parametrize("case", LAYER_CASES)
def test_layer_template_writes_the_direct_export(case, monkeypatch):
    """Layer programs written from the template are the direct export's bytes, and layers of one kind
    and layout share one template (two exports to build it, none per layer)."""
    from cosmoe_export.lower import layer_export
    from cosmoe_export.lower.targets import TARGETS
    config, scheme = LAYER_CASES[case]
    monkeypatch.setattr(pte_template, "_TEMPLATES", {})
    export = layer_export(TARGETS["executorch"], config, 0)
    first, second = layer(config, scheme, seed=1), layer(config, scheme, seed=2)
    calls = []
    counted = lambda w: calls.append(1) or export(w)  # noqa: E731
    got = pte_template.layer_pte(config, 0, first, counted)
    assert pte_template.layer_pte(config, 0, second, counted)[0] != got[0]
    assert len(calls) == 2  # the template's own two exports
    assert got == export(first)
    assert None not in pte_template._TEMPLATES.values()


def test_equal_layer_tensors_are_exported_directly(monkeypatch):
    """A direct export stores equal constants once (all-ones norms of a fresh model): the template
    cannot stand for that layout, so such a layer is exported directly."""
    from cosmoe_export.lower import layer_export
    from cosmoe_export.lower.targets import TARGETS
    monkeypatch.setattr(pte_template, "_TEMPLATES", {})  # earlier lowering in this process may have built it
    export = layer_export(TARGETS["executorch"], TINY, 0)
    weights = layer(TINY, quant.FLOAT, seed=3)
    weights["ffn_norm.weight"] = weights["attn_norm.weight"].clone()
    calls = []
    got = pte_template.layer_pte(TINY, 0, weights, lambda w: calls.append(1) or export(w))
    assert got == export(weights) and len(calls) == 3  # two for the template, then this layer directly
