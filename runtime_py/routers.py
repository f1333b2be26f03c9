"""Routers: how one MoE layer's router logits become its experts and their weights.

Registered by the name in ``CosmoeConfig.router`` (runtime_py/config.py ROUTERS). Every backend
routes with these functions (the lowered layer programs return raw logits; runtime_native/src/
router.cpp is the same math in C++), so a router is written once per runtime.

Shapes: N tokens, E experts, K experts per token, G groups of E/G experts.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from runtime_py.config import CosmoeConfig

# (logits [N, E], score bias [E] or None, config) -> (weights [N, K] fp32, expert ids [N, K])
Router = Callable[[torch.Tensor, torch.Tensor | None, CosmoeConfig], tuple[torch.Tensor, torch.Tensor]]


def _choose(scores: torch.Tensor, bias: torch.Tensor | None, config: CosmoeConfig) -> torch.Tensor:
    """Expert ids [N, K]: the top-k of scores [N, E] plus the selection-only bias, among the
    experts of the topk_group best groups (a group's score, config.group_score: the sum of its two
    best experts, as DeepSeek-V3 and transformers' Glm4MoeTopkRouter, or its best one, as
    DeepSeek-V2's group_limited_greedy). Without a bias and groups, plain top-k."""
    choice = scores if bias is None else scores + bias.float()  # [N, E]
    g = config.n_group
    if g > 1:
        n, e = choice.shape
        grouped = choice.view(n, g, e // g)  # [N, G, E/G]
        group_scores = (grouped.amax(dim=-1) if config.group_score == "max"
                        else grouped.topk(2, dim=-1).values.sum(dim=-1))  # [N, G]
        keep = torch.zeros_like(group_scores).scatter_(1, group_scores.topk(config.topk_group, dim=-1).indices, 1)
        choice = choice.masked_fill(~keep.bool().repeat_interleave(e // g, dim=1), float("-inf"))  # [N, E]
    return torch.topk(choice, config.num_experts_per_tok, dim=-1).indices


def softmax_router(logits: torch.Tensor, bias: torch.Tensor | None,
                   config: CosmoeConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over E in fp32, the top-k kept (Mixtral, Qwen, OLMoE, Granite, HunYuan, ERNIE); weights
    renormalised to sum to 1 when norm_topk_prob. ERNIE's bias only picks the experts: the weights
    are the unbiased probabilities (modeling_ernie4_5_moe.py Ernie4_5_MoeTopKRouter)."""
    probs = torch.softmax(logits.float(), dim=-1)  # [N, E]
    if bias is None and config.n_group == 1:
        weights, idx = torch.topk(probs, config.num_experts_per_tok, dim=-1)  # [N, K]
    else:
        idx = _choose(probs, bias, config)
        weights = probs.gather(1, idx)
    if config.norm_topk_prob:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return _scaled(weights, config), idx


def sigmoid_router(logits: torch.Tensor, bias: torch.Tensor | None,
                   config: CosmoeConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Independent sigmoid scores (DeepSeek-V3, GLM-4-MoE, LFM2), chosen with the bias and groups,
    weights from the unbiased scores, renormalised (plus topk_norm_eps, as transformers) when
    norm_topk_prob."""
    scores = torch.sigmoid(logits.float())  # [N, E]
    idx = _choose(scores, bias, config)
    weights = scores.gather(1, idx)  # [N, K]
    if config.norm_topk_prob:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + config.topk_norm_eps)
    return _scaled(weights, config), idx


def sparsemixer_router(logits: torch.Tensor, bias: torch.Tensor | None,
                       config: CosmoeConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Phi-MoE's sparsemixer at inference (modeling_phimoe.py sparsemixer, training=False), top-2:
    the best expert, weighted by its softmax among the experts whose score is within
    2 * eps (relative) of it; then the same over the scores without it."""
    scores = logits.float()  # [N, E]
    eps = config.sparsemixer_eps
    weights, ids = [], []
    masked = scores
    for _ in range(2):
        best, idx = masked.max(dim=-1, keepdim=True)  # [N, 1] x2
        factor = scores.abs().clamp(min=best)
        gates = masked.masked_fill((best - scores) / factor > 2 * eps, float("-inf"))  # [N, E]
        weights.append(torch.softmax(gates, dim=-1).gather(-1, idx))
        ids.append(idx)
        masked = torch.scatter(scores, -1, idx, float("-inf"))  # without the first choice
    return _scaled(torch.cat(weights, dim=-1), config), torch.cat(ids, dim=-1)  # [N, 2] x2


def _scaled(weights: torch.Tensor, config: CosmoeConfig) -> torch.Tensor:
    scale = config.routed_scaling_factor
    return weights if scale == 1.0 else weights * scale


ROUTERS: dict[str, Router] = {"softmax": softmax_router, "sigmoid": sigmoid_router, "sparsemixer": sparsemixer_router}


def route(logits: torch.Tensor, config: CosmoeConfig,
          bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [N, E] -> weights [N, K] fp32, expert ids [N, K], by the config's router."""
    return ROUTERS[config.router](logits, bias, config)
