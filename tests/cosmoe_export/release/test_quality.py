"""verify's text statistics (cosmoe_export/release/quality.py) against hand computations."""

from __future__ import annotations

import math

import pytest
import torch

from cosmoe_export.release.quality import DELTA_P_QUANTILES, TextQuality


def _lp(probs: list[list[float]]) -> torch.Tensor:
    return torch.tensor([probs], dtype=torch.float64).log()  # [1, T, V]


def test_a_model_equal_to_its_reference():
    lp = torch.log_softmax(torch.randn(2, 6, 11, generator=torch.Generator().manual_seed(0)), -1)
    q = TextQuality()
    q.add(lp, lp.clone(), torch.randint(0, 11, (2, 6), generator=torch.Generator().manual_seed(1)))
    s = q.summary()
    assert s["top1_agreement"] == 1.0 and s["top1_agreement_stderr"] == 0.0 and s["top1_agreement_decided"] == 1.0
    assert s["kl_mean"] == s["kl_max"] == s["kl_p99"] == 0.0
    assert s["ppl_ratio"] == 1.0 and s["ppl_increase"] == 0.0 and s["ppl_ratio_stderr"] == 0.0
    assert s["ppl"] == s["ppl_ref"] > 1
    assert set(s["delta_p"]) == {"mean", "rms", *DELTA_P_QUANTILES} and not any(s["delta_p"].values())


def test_statistics_by_hand():
    ref = _lp([[0.7, 0.3], [0.2, 0.8], [0.502, 0.498]])
    got = _lp([[0.6, 0.4], [0.2, 0.8], [0.49, 0.51]])
    ids = torch.tensor([[0, 1, 0]])  # position 0 predicts 1, position 1 predicts 0
    q = TextQuality()
    q.add(ref, got, ids)
    s = q.summary()
    kl0 = 0.7 * math.log(0.7 / 0.6) + 0.3 * math.log(0.3 / 0.4)
    kl2 = 0.502 * math.log(0.502 / 0.49) + 0.498 * math.log(0.498 / 0.51)
    assert s["kl_mean"] == pytest.approx((kl0 + kl2) / 3, rel=1e-5)
    assert s["kl_max"] == pytest.approx(max(kl0, kl2), rel=1e-5) and s["kl_median"] == pytest.approx(kl2, rel=1e-5)
    # Position 2's top token flips, and it is the only near-tie (0.502 - 0.498 < 0.01).
    assert s["top1_agreement"] == pytest.approx(2 / 3) and s["near_tie_share"] == pytest.approx(1 / 3)
    assert s["top1_agreement_decided"] == 1.0
    # delta_p: the reference's top token (0, 1, 0) in the model minus in the reference.
    dp = [0.6 - 0.7, 0.0, 0.49 - 0.502]
    assert s["delta_p"]["mean"] == pytest.approx(sum(dp) / 3, rel=1e-5)
    assert s["delta_p"]["min"] == pytest.approx(-0.1, rel=1e-5) and s["delta_p"]["max"] == pytest.approx(0.0, abs=1e-7)
    assert s["delta_p"]["rms"] == pytest.approx(math.sqrt(sum(d * d for d in dp) / 3), rel=1e-5)
    # Perplexity over the two predicted tokens: position 0 -> token 1, position 1 -> token 0.
    d = [math.log(0.3 / 0.4), math.log(0.2 / 0.2)]  # nll - nll_ref per token
    assert s["ppl_ref"] == pytest.approx(math.exp(-(math.log(0.3) + math.log(0.2)) / 2), rel=1e-5)
    assert s["ppl_ratio"] == pytest.approx(math.exp(sum(d) / 2), rel=1e-5)
    assert s["ppl_increase"] == pytest.approx(s["ppl_ratio"] - 1, abs=1e-12)
    std = math.sqrt(sum((x - sum(d) / 2) ** 2 for x in d) / 1)  # sample standard deviation
    assert s["ppl_ratio_stderr"] == pytest.approx(s["ppl_ratio"] * std / math.sqrt(2), rel=1e-5)


def test_chunks_accumulate_as_one_text():
    g = torch.Generator().manual_seed(3)
    ref, got = (torch.log_softmax(torch.randn(4, 5, 9, generator=g), -1) for _ in range(2))
    ids = torch.randint(0, 9, (4, 5), generator=g)
    whole, parts = TextQuality(), TextQuality()
    whole.add(ref, got, ids)
    parts.add(ref[:1], got[:1], ids[:1])
    parts.add(ref[1:], got[1:], ids[1:])
    a, b = whole.summary(), parts.summary()
    assert a.keys() == b.keys()
    for k in a:
        if k == "delta_p":
            assert a[k] == pytest.approx(b[k])
        else:
            assert a[k] == pytest.approx(b[k]), k


def test_positions_taken_in_slices_give_the_statistics_of_all_at_once(monkeypatch):
    """add() compares SLICE positions at a time (bounded temporaries at real vocabularies): the
    summary must be that of comparing every position at once."""
    from cosmoe_export.release import quality
    g = torch.Generator().manual_seed(3)
    chunks = []
    for b, t in ((2, 37), (1, 5), (3, 1)):
        ids = torch.randint(0, 50, (b, t), generator=g)
        ref = torch.log_softmax(torch.randn(b, t, 50, generator=g) * 3, -1)
        chunks.append((ref, torch.log_softmax(ref + 0.3 * torch.randn(b, t, 50, generator=g), -1), ids))
    summaries = []
    for size in (10_000, 8, 1):
        monkeypatch.setattr(quality, "SLICE", size)
        q = quality.TextQuality()
        for ref, lp, ids in chunks:
            q.add(ref, lp, ids)
        summaries.append(q.summary())
    assert summaries[0] == summaries[1] == summaries[2]
