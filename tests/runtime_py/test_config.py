import math

import pytest

from cosmoe_export.importers.presets import PAPER_PARAMS, PRESETS
from runtime_py.config import CosmoeConfig, param_counts, tensor_shapes
from runtime_py.errors import ConfigError


def tiny(**kw) -> dict:
    base = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=48)
    return {**base, **kw}


def test_round_trip():
    c = CosmoeConfig.from_dict(tiny(expert_kind="wd"))
    assert CosmoeConfig.from_dict(c.to_dict()) == c
    assert c.to_dict()["model_type"] == "cosmoe"


def test_all_problems_reported_at_once():
    with pytest.raises(ConfigError) as e:
        CosmoeConfig.from_dict(tiny(num_experts_per_tok=9, hidden_size=30, bogus=1))
    # Unknown keys are reported before value checks run.
    assert "unknown keys ['bogus']" in str(e.value)
    with pytest.raises(ConfigError) as e:
        CosmoeConfig.from_dict(tiny(num_experts_per_tok=9, hidden_size=30, expert_kind="dense", num_key_value_heads=3))
    msg = str(e.value)
    for part in ("num_experts_per_tok (9) exceeds", "does not divide hidden_size", "expert_kind must be",
                 "num_key_value_heads (3) does not divide"):
        assert part in msg
    assert "\n" not in msg


@pytest.mark.parametrize("bad", [dict(hidden_size=0), dict(num_hidden_layers=-1), dict(vocab_size=True),
                                 dict(intermediate_size="big"), dict(rms_norm_eps=0.0),
                                 dict(hidden_size=1 << 20, intermediate_size=1 << 20, vocab_size=1 << 20),
                                 dict(rope_scaling={"rope_type": "yarn"})])
def test_impossible_values(bad):
    with pytest.raises(ConfigError):
        CosmoeConfig.from_dict(tiny(**bad))


def test_param_counts_by_hand():
    c = CosmoeConfig.from_dict(tiny())
    # attention: q 32x32, k/v 16x32 (2 kv heads of 8), o 32x32; two norms; router 8x32
    layer = 32 * 32 + 2 * 16 * 32 + 32 * 32 + 2 * 32 + 8 * 32
    expert = 3 * 32 * 48
    p = param_counts(c)
    assert p.per_expert == expert
    assert p.backbone == 2 * 100 * 32 + 32 + 2 * layer
    assert p.total == p.backbone + 2 * 8 * expert
    assert p.active == p.backbone + 2 * 2 * expert
    assert p.total == sum(math.prod(s) for s in tensor_shapes(c).values())


def test_wd_expert_params_eq1():
    c = CosmoeConfig.from_dict(tiny(expert_kind="wd"))  # rank defaults to hidden/2 = 16
    assert param_counts(c).per_expert == 3 * 16 * (32 + 48)


@pytest.mark.parametrize("name", sorted(PAPER_PARAMS))
def test_presets_match_paper_table1_within_1pct(name):
    p = param_counts(PRESETS[name])
    active, total = PAPER_PARAMS[name]
    assert abs(p.active / active - 1) < 0.01
    assert abs(p.total / total - 1) < 0.01


def test_an_all_moe_plan_is_no_plan():
    """A plan of only "moe" serialises as v1 did: no layer_ffns key, so v1 bundles keep their bytes."""
    c = CosmoeConfig.from_dict(tiny(layer_ffns=["moe", "moe"]))
    assert c.layer_ffns is None and c.all_moe and c.moe_layers == (0, 1)
    assert c.to_dict() == CosmoeConfig.from_dict(tiny()).to_dict()
    assert "layer_ffns" not in c.to_dict() and "dense_intermediate_size" not in c.to_dict()


def test_dense_layer_plan():
    c = CosmoeConfig.from_dict(tiny(layer_ffns=["dense", "moe"], dense_intermediate_size=40))
    assert c.moe_layers == (1,) and c.ffn_kind(0).name == "dense" and not c.ffn_kind(0).routed
    assert CosmoeConfig.from_dict(c.to_dict()) == c
    assert c.to_dict()["layer_ffns"] == ["dense", "moe"]
    shapes = tensor_shapes(c)
    assert shapes["layers.0.mlp.gate.weight"] == (40, 32) and shapes["layers.0.mlp.down.weight"] == (32, 40)
    assert not any(n.startswith(("layers.0.moe.", "layers.1.mlp.")) for n in shapes)
    p = param_counts(c)
    assert p.num_layers == 1 and p.total == sum(math.prod(s) for s in shapes.values())


@pytest.mark.parametrize("plan,extra,message", [
    (["dense", "moe", "moe"], {}, "layer_ffns lists 3 layers, num_hidden_layers is 2"),
    (["dense", "conv"], {}, "layer_ffns has unknown kinds ['conv']"),
    (["dense", "dense"], {"dense_intermediate_size": 8}, "no 'moe' layer"),
    (["dense", "moe"], {}, "dense_intermediate_size is 0"),
    ("dense", {}, "layer_ffns must be a list"),
])
def test_bad_layer_plans(plan, extra, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        CosmoeConfig.from_dict(tiny(layer_ffns=plan, **extra))
