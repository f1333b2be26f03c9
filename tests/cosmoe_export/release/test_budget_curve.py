"""Which budgets the budget curve measures (cosmoe_export/release/budget_curve.budgets)."""

import pytest

from cosmoe_export.release.budget_curve import budgets


def test_every_k_when_there_are_no_more_than_the_points():
    assert budgets(2, 8, 8) == [2, 3, 4, 5, 6, 7, 8]
    assert budgets(2, 4, 8) == [2, 3, 4]
    assert budgets(8, 8, 2) == [8]  # top-k = all experts: one budget


def test_many_experts_get_the_points_spaced_geometrically_from_top_k_to_all():
    ks = budgets(8, 64, 8)  # OLMoE: 57 budgets without the spacing
    assert ks == [8, 11, 14, 20, 26, 35, 48, 64]
    ratios = [b / a for a, b in zip(ks, ks[1:], strict=False)]
    assert max(ratios) / min(ratios) < 1.4  # 64/8 = 8 = r^7: r ~ 1.35 at each step, up to rounding
    ks = budgets(8, 128, 5)  # Qwen3-30B-A3B
    assert ks[0] == 8 and ks[-1] == 128 and len(ks) == 5 and ks == sorted(set(ks))


def test_rounding_alike_gives_fewer_points_never_a_repeat():
    ks = budgets(2, 10, 8)  # 9 budgets, 8 asked: geometric steps near 2 round to the same k
    assert ks == sorted(set(ks)) and ks[0] == 2 and ks[-1] == 10 and len(ks) <= 8


def test_fewer_than_two_points_is_refused():
    with pytest.raises(ValueError, match="at least 2 points"):
        budgets(2, 8, 1)


def test_a_points_peak_rss_is_its_runners_not_the_calling_process(tiny_bles_bundle):
    """The caller holds 600 MB more than any runner of the tiny bundle needs: measured in the
    caller's process (its high-water mark reset to what it holds) every point would report it."""
    import torch

    from cosmoe_export.release.budget_curve import measure
    from runtime_py.memory import rss_bytes

    held = torch.ones(600 * 2**20 // 4)  # touched: resident
    caller_mb = rss_bytes() / 1e6
    curve = measure(bundle_path=tiny_bles_bundle, backends=["torch"], policy="lru", prompt_ids=[1, 2, 3, 4],
                    new_tokens=4, repeats=1, points=2, progress=False)
    assert [p["experts_per_layer"] for p in curve["points"]] == [2, 8]
    assert all(p["decode_tok_s"] > 0 and 0 < p["peak_rss_mb"] < caller_mb - 500 for p in curve["points"]), \
        (caller_mb, curve["points"])
    del held
