"""The BlES sweep's levers (issue 18): router z-loss, BlES warm-up, load-balancing schedule, tau.
Their defaults must leave training bit-for-bit as it was when the fixtures were trained."""

from __future__ import annotations

import argparse
import json
import math
import runpy

import pytest
import torch
import torch.nn.functional as F

from cosmoe_export.training import train as T
from cosmoe_export.training.losses import bles_loss, linear_ramp, load_balancing_loss, router_z_loss
from tests.cosmoe_export.training.test_train import MODELS, ROOT, write_corpus


def test_router_z_loss_by_hand():
    # B=1, T=2, E=3: logsumexp(0, 0, 0) = log 3; logsumexp(1, 2, 3) = 3 + log(1 + e^-1 + e^-2).
    logits = torch.tensor([[[0.0, 0.0, 0.0], [1.0, 2.0, 3.0]]])
    z0, z1 = math.log(3), 3 + math.log(1 + math.exp(-1) + math.exp(-2))
    assert float(router_z_loss(logits)) == pytest.approx((z0 ** 2 + z1 ** 2) / 2, rel=1e-6)
    # The mean is over all B*T tokens: a batch of two copies has the same loss.
    assert float(router_z_loss(logits.repeat(2, 1, 1))) == pytest.approx(float(router_z_loss(logits)), rel=1e-6)


def test_router_z_loss_penalises_large_logits_and_has_gradient():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 8, generator=g)
    assert float(router_z_loss(10 * logits)) > float(router_z_loss(logits))
    x = logits.clone().requires_grad_(True)
    router_z_loss(x).backward()
    # d/dx lse(x)^2 = 2 lse(x) softmax(x) / (B*T)
    lse = torch.logsumexp(logits, -1, keepdim=True)
    torch.testing.assert_close(x.grad, 2 * lse * torch.softmax(logits, -1) / 10)


def test_linear_ramp_values():
    assert [linear_ramp(s, 0.0, 1.0, 4) for s in (0, 1, 2, 3, 4, 100)] == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    assert [linear_ramp(s, 0.1, 0.01, 9) for s in (0, 9)] == [0.1, 0.01]
    assert linear_ramp(3, 0.02, 0.1, 6) == pytest.approx(0.06)
    assert linear_ramp(0, 0.0, 0.7, 0) == 0.7  # no ramp: the end value from the first step


def test_schedules_at_steps():
    tc = T.TrainConfig(variant="bles", steps=101, bles_weight=2.0, bles_warmup=40, lb_weight=0.1, lb_weight_end=0.01)
    assert [T.bles_weight_at(s, tc) for s in (0, 10, 20, 40, 100)] == [0.0, 0.5, 1.0, 2.0, 2.0]
    assert T.lb_weight_at(0, tc) == 0.1 and T.lb_weight_at(100, tc) == 0.01
    assert T.lb_weight_at(50, tc) == pytest.approx(0.055)


def test_defaults_are_the_constants():
    tc = T.TrainConfig(variant="bles", bles_weight=0.5)
    assert (tc.z_weight, tc.bles_warmup, tc.lb_weight_end, tc.bles_tau) == (0.0, 0, None, 1.0)
    for step in (0, 1, 49, 50, 1499):
        # The same float objects' values, not merely close: the loss is bit-for-bit as before.
        assert T.bles_weight_at(step, tc) == 0.5 and T.lb_weight_at(step, tc) == 0.01


def test_lever_validation():
    with pytest.raises(ValueError, match="warmup"):
        T.TrainConfig(variant="moe", bles_warmup=10)
    for bad in (dict(bles_tau=0.0), dict(z_weight=-1.0), dict(lb_weight_end=-0.1)):
        with pytest.raises(ValueError, match=">"):
            T.TrainConfig(variant="bles", bles_weight=1.0, **bad)


@pytest.mark.parametrize("variant", T.VARIANTS)
def test_shipped_recipe_json_round_trips(variant):
    """A rebuild of a committed fixture writes the train section of its recipe.json unchanged."""
    train = json.loads((MODELS / f"tiny-{variant}" / "recipe.json").read_text())["train"]
    assert T.train_config_dict(T.TrainConfig(**train)) == train
    assert "z_weight" not in train  # the fixtures predate the levers
    assert T.train_config_dict(T.TrainConfig(variant="moe", z_weight=1e-3))["z_weight"] == 1e-3


def old_losses(model, window, tc, step=0):
    """``losses`` as it was when the fixtures were trained (before the levers), the reference."""
    top_k = model.config.num_experts_per_tok
    logits, router = model(window[:, :-1], return_router_logits=True)
    ce = F.cross_entropy(logits.flatten(0, 1).float(), window[:, 1:].flatten())
    lb = torch.stack([load_balancing_loss(r, top_k) for r in router]).mean()
    out = {"ce": ce, "lb": lb}
    total = ce + tc.lb_weight * lb
    if tc.bles_weight:
        bl = torch.stack([bles_loss(r, top_k, tc.bles_tau) for r in router]).mean()
        out["bles"] = bl
        total = total + tc.bles_weight * bl
    out["total"] = total
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    torch.set_num_threads(1)
    corpus = write_corpus(tmp_path_factory.mktemp("c") / "c.txt")
    tok = T.train_tokenizer([corpus], 512)
    return T.encode_corpus(tok, [corpus])


def run(ids, **kw):
    config = T.tiny_config("bles", vocab_size=512, bos_token_id=0, eos_token_id=0, context=32)
    tc = T.TrainConfig(variant="bles", steps=4, batch_size=2, warmup=2, bles_weight=1.0, **kw)
    result = T.train(config, ids, tc, log_every=1)
    return result.model.state_dict(), result.log


def same(a, b) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


def test_defaults_train_bit_for_bit_as_before(data, monkeypatch):
    new, new_log = run(data)
    monkeypatch.setattr(T, "losses", old_losses)
    old, old_log = run(data)
    assert same(new, old) and new_log == old_log


def test_each_lever_changes_training(data):
    base, base_log = run(data)
    tau, tau_log = run(data, bles_tau=4.0)  # tau reaches the BlES loss through train()
    assert tau_log[0]["bles"] != base_log[0]["bles"] and not same(tau, base)
    z, z_log = run(data, z_weight=1e-2)
    assert "z" in z_log[0] and "z" not in base_log[0] and not same(z, base)
    assert z_log[0]["total"] > base_log[0]["total"]  # same first batch and init: the extra term adds
    warm, warm_log = run(data, bles_warmup=3)
    # Step 0 has BlES weight 0: its total is ce + lb_weight * lb only.
    assert warm_log[0]["total"] == pytest.approx(warm_log[0]["ce"] + 0.01 * warm_log[0]["lb"], abs=2e-4)
    assert not same(warm, base)
    lb, _ = run(data, lb_weight_end=1.0)
    assert not same(lb, base)


def test_sweep_configs_and_rows():
    sweep = runpy.run_path(str(ROOT / "recipes" / "sweep_bles.py"))
    assert sweep["lb_schedule"]("0.01") == (0.01, None) and sweep["lb_schedule"]("0.1:0.01") == (0.1, 0.01)

    args = argparse.Namespace(steps=[300], lb_weight=[(0.01, None)], z_weight=[0.0], weights=[0, 1], tau=[1, 4],
                              bles_warmup=[0, 50], seed=0)
    todo = sweep["configs"](args)
    # one moe run, then the 2 x 2 BlES settings
    assert [(tc.variant, tc.bles_tau, tc.bles_warmup) for tc in todo] == [
        ("moe", 1.0, 0), ("bles", 1, 0), ("bles", 1, 50), ("bles", 4, 0), ("bles", 4, 50)]
    common = dict(steps=300, seed=0, lb_weight=0.01, lb_weight_end=None, z_weight=0.0, bles_tau=2.0,
                  bles_warmup=0, lru_hit_rate_half=0.5, train_log={"bles": 0.01})
    moe = dict(common, bles_weight=0.0, perplexity=100.0, exrep=60.0, delta_uniform=40.0)
    bles = dict(common, bles_weight=1.0, perplexity=104.0, exrep=20.0, delta_uniform=50.0)
    assert sweep["format_row"](bles, moe).endswith("| 3.00× | 1.25× | +4.0 % |")
    assert sweep["format_row"](moe, moe).endswith("| – | – | – |")
