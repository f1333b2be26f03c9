"""Training-time losses: sequence-level load balancing and CoSMoEs' Block-wise Expert Selection.

router_logits [B, T, E] per layer; K active experts per token.
"""

from __future__ import annotations

import torch


def load_balancing_loss(router_logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """Sequence-level auxiliary loss (Switch/DeepSeek form, per sequence then averaged):
    E * sum_e f_e * P_e, f_e the fraction of this sequence's top-k slots given to expert e,
    P_e its mean router probability. Equals 1.0 (times K/K) for perfectly uniform routing.

    router_logits [B, T, E] -> scalar
    """
    b, t, e = router_logits.shape
    probs = torch.softmax(router_logits.float(), dim=-1)  # [B, T, E]
    idx = probs.topk(top_k, dim=-1).indices  # [B, T, K]
    counts = torch.zeros(b, e, device=probs.device).scatter_add_(
        1, idx.reshape(b, -1), torch.ones(b, t * top_k, device=probs.device))  # [B, E]
    f = counts / (t * top_k)  # [B, E]
    p = probs.mean(dim=1)  # [B, E]
    return (e * (f * p).sum(dim=-1)).mean()


def bles_loss(router_logits: torch.Tensor, top_k: int, tau: float = 1.0) -> torch.Tensor:
    """Block-wise Expert Selection loss, CoSMoEs Eq. 2-7.

    router_logits R [B, T, E] -> scalar.
    """
    b, t, e = router_logits.shape
    if t < 2:
        return router_logits.new_zeros(())
    w = torch.softmax(tau * router_logits.float(), dim=-1)  # Eq. 2: W = softmax(tau R)  [B, T, E]
    idx = w.topk(top_k, dim=-1).indices  # Eq. 3: S = top-k(W)  [B, T, K]
    s = torch.zeros_like(w).scatter_(-1, idx, 1.0)  # [B, T, E] 0/1, no gradient
    h = (s[:, 1:] - s[:, :-1]).abs().sum()  # Eq. 4: every replacement counted twice
    h_norm = torch.floor(h / 2) / (b * top_k * (t - 1))  # Eq. 5
    l_sum = (w[:, 1:] - w[:, :-1]).abs().sum()  # Eq. 6: L = sum |W[t+1] - W[t]|
    l_norm = l_sum / (b * t)  # Eq. 6 normalised
    return h_norm * l_norm  # Eq. 7: the count scales the smooth, differentiable distance


def router_z_loss(router_logits: torch.Tensor) -> torch.Tensor:
    """Router z-loss (ST-MoE, Zoph et al. 2022): mean over tokens of logsumexp(logits)^2.

    ST-MoE adds it for numerical stability; here it is a lever because it keeps router logits
    small, and large logits saturate the router softmax, through which the load-balancing and
    BlES gradients reach the router. It names no expert: it sees a token's logits only through
    their logsumexp.

    router_logits [B, T, E] -> scalar
    """
    z = torch.logsumexp(router_logits.float(), dim=-1)  # [B, T]
    return (z ** 2).mean()


def linear_ramp(step: int, start: float, end: float, steps: int) -> float:
    """Linear schedule: ``start`` at step 0, ``end`` from step ``steps`` on; ``steps <= 0`` means
    ``end`` from the first step (no ramp). Returns ``end`` exactly once the ramp is over, so a
    weight at the end of its ramp multiplies the loss by the very same float as a constant one."""
    if steps <= 0 or step >= steps:
        return end
    return start + (end - start) * (step / steps)
