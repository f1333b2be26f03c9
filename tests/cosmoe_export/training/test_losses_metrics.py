"""Hand-worked values for CoSMoEs Eq. 2-7 and the routing metrics."""

import numpy as np
import pytest
import torch

from cosmoe_export.training.losses import bles_loss, load_balancing_loss
from runtime_py.routing_metrics import delta_uniform, expert_load, exrep, replacement_count


def test_exrep_eq4_eq5_by_hand():
    # E=4, K=2, T=4: {0,1} -> {1,0} -> {0,2} -> {2,3}: 0, then 1->2, then 0->3 (2 stays):
    # 2 replacements, and Eq. 4's H counts each twice.
    sel = np.array([[0, 1], [1, 0], [0, 2], [2, 3]])
    assert replacement_count(sel, 4) == 4
    # H_norm = floor(4/2) / (B*K*(T-1)) = 2 / (1*2*3)
    assert exrep(sel, 4) == pytest.approx(100 * 2 / 6)


def test_exrep_batched_and_extremes():
    same = np.array([[[0, 1]] * 5, [[2, 3]] * 5])
    assert exrep(same, 4) == 0.0
    flip = np.array([[0, 1], [2, 3]] * 3)
    assert exrep(flip, 4) == 100.0


def test_delta_uniform():
    assert delta_uniform(np.array([[0, 1], [2, 3]]), 4) == pytest.approx(0.0)
    # always experts 0,1 of 8: |1/2 - 1/8| * 2 + 1/8 * 6 = 1.5 -> 150 points
    assert delta_uniform(np.array([[0, 1]] * 10), 8) == pytest.approx(150.0)
    np.testing.assert_allclose(expert_load(np.array([[0, 1], [0, 2]]), 4), [0.5, 0.25, 0.25, 0.0])


def test_bles_loss_by_hand():
    # B=1, T=3, E=3, K=1, tau=1. Logits chosen so W rows are known.
    w = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.1, 0.7, 0.2]])
    logits = w.log()[None]  # softmax(log w) = w
    # S: expert 0, 1, 1 -> one replacement, H = 2, H_norm = floor(2/2)/(1*1*2) = 0.5
    # L = |0.1-0.7|+|0.8-0.2|+0 + 0+|0.7-0.8|+|0.2-0.1| = 1.4; L_norm = 1.4/(1*3)
    expected = 0.5 * 1.4 / 3
    assert float(bles_loss(logits, top_k=1)) == pytest.approx(expected, rel=1e-5)


def test_bles_loss_zero_when_selection_never_changes_and_has_gradient():
    logits = torch.randn(2, 6, 8, requires_grad=True)
    with torch.no_grad():
        logits[:, :, 3] += 20  # expert 3 always on top
        logits[:, :, 5] += 10
    assert float(bles_loss(logits, top_k=2).detach()) == 0.0
    flip = torch.randn(2, 6, 8)
    flip[:, ::2, 0] += 10
    flip[:, 1::2, 1] += 10
    flip.requires_grad_(True)
    loss = bles_loss(flip, top_k=1)
    loss.backward()
    assert float(loss.detach()) > 0 and flip.grad.abs().sum() > 0


def test_bles_matches_exrep_count():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 10, 8, generator=g)
    idx = torch.softmax(logits, -1).topk(2, dim=-1).indices.numpy()
    # With a flat W the smooth term is what it is; the count term must be ExRep / 100.
    b, t, _ = logits.shape
    l_norm = (torch.softmax(logits, -1)[:, 1:] - torch.softmax(logits, -1)[:, :-1]).abs().sum() / (b * t)
    assert float(bles_loss(logits, top_k=2)) == pytest.approx(exrep(idx, 8) / 100 * float(l_norm), rel=1e-5)


def test_load_balancing_loss_uniform_and_collapsed():
    uniform = torch.zeros(2, 16, 8)
    assert float(load_balancing_loss(uniform, top_k=2)) == pytest.approx(1.0)
    collapsed = torch.zeros(1, 16, 8)
    collapsed[..., 0] = 50
    collapsed[..., 1] = 40
    # f = 0.5 on experts 0 and 1, P ~ (1, 0): 8 * 0.5 * 1 = 4
    assert float(load_balancing_loss(collapsed, top_k=2)) == pytest.approx(4.0, rel=1e-3)
