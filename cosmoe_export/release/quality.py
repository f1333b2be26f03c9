"""Quality of a model's next-token distributions against a reference's, over a text, with the
statistics llama.cpp's ``llama-perplexity --kl-divergence`` reports (one number each, so a gate
can name it):

    top1_agreement (± stderr)    the share of positions where both argmaxes agree ("same top p")
    near_tie_share, top1_agreement_decided
                                 the share of positions whose reference top-2 probabilities are
                                 within TIE_MARGIN (any rounding may flip those), and the agreement
                                 on the others: a small model's flat distributions put most flips
                                 in the first (docs/QUANTIZATION.md), which top-1 alone cannot show
    kl_mean (± stderr), kl_median, kl_p99, kl_max
                                 KL(reference || model) per position, nats
    ppl, ppl_ref, ppl_ratio (± stderr), ppl_increase
                                 perplexities on the text's next tokens; the ratio is exp of the mean
                                 per-token log ratio and its uncertainty the delta method's on that
                                 mean, as llama.cpp computes it
    delta_p                      p_model - p_reference of the reference's top token per position
                                 (mean, rms, min, p1 ... p99, max). llama.cpp takes the text's next
                                 token instead; the reference's top token is what a greedy device
                                 emits, so this is the change that decides a flip.

Positions are accumulated chunk by chunk and summarised once; nothing here knows which runtime
produced the log-probabilities.
"""

from __future__ import annotations

import math

import torch

TIE_MARGIN = 0.01  # p1 - p2 of the reference below this: a near-tie
SLICE = 512  # positions whose [V] distributions are compared at a time
DELTA_P_QUANTILES = {"min": 0.0, "p1": 0.01, "p5": 0.05, "p25": 0.25, "median": 0.5, "p75": 0.75, "p95": 0.95,
                     "p99": 0.99, "max": 1.0}


class TextQuality:
    """``add`` every chunk's log-probabilities, then ``summary()``."""

    def __init__(self) -> None:
        self._kl: list[torch.Tensor] = []  # [t] per slice of positions, float64
        self._same: list[torch.Tensor] = []  # [t] bool
        self._tie: list[torch.Tensor] = []  # [t] bool
        self._dp: list[torch.Tensor] = []  # [t] float64
        self._nll_ref: list[torch.Tensor] = []  # [n] next-token NLLs, float64
        self._nll: list[torch.Tensor] = []

    def add(self, lp_ref: torch.Tensor, lp: torch.Tensor, ids: torch.Tensor) -> None:
        """lp_ref, lp [b, T, V] log-probabilities at each position of ids [b, T]. Taken ``SLICE``
        positions at a time, in the order of [b, T]: every statistic is per position, and at a 50k
        vocabulary and 4k context each [b, T, V] temporary would be 0.8 GB."""
        for row in range(ids.shape[0]):
            for start in range(0, ids.shape[1], SLICE):
                end = start + SLICE
                self._add(lp_ref[row, start:end], lp[row, start:end], ids[row, start:end + 1])

    def _add(self, lp_ref: torch.Tensor, lp: torch.Tensor, ids: torch.Tensor) -> None:
        """lp_ref, lp [t, V] at t positions; ids [t] or [t + 1]: their tokens and the next one."""
        kl = (lp_ref.exp() * (lp_ref - lp)).sum(-1)  # [t]
        top = lp_ref.argmax(-1, keepdim=True)  # [t, 1]
        self._kl.append(kl.double())
        self._same.append(top[:, 0] == lp.argmax(-1))
        p2 = lp_ref.topk(2, -1).values.exp()  # [t, 2]
        self._tie.append(p2[:, 0] - p2[:, 1] < TIE_MARGIN)
        self._dp.append((lp.gather(-1, top).exp() - lp_ref.gather(-1, top).exp()).double()[:, 0])
        if len(ids) > 1:
            target = ids[1:, None]  # [n, 1]: position i predicts token i + 1
            n = len(target)
            self._nll_ref.append(-lp_ref[:n].gather(-1, target).double()[:, 0])
            self._nll.append(-lp[:n].gather(-1, target).double()[:, 0])

    def summary(self) -> dict[str, float | dict[str, float]]:
        kl, same, dp = torch.cat(self._kl), torch.cat(self._same).double(), torch.cat(self._dp)
        tie = torch.cat(self._tie)
        n = kl.numel()
        top1 = float(same.mean())
        out: dict[str, float | dict[str, float]] = {
            "top1_agreement": top1, "top1_agreement_stderr": math.sqrt(top1 * (1 - top1) / max(1, n - 1)),
            "near_tie_share": float(tie.double().mean()),
            "top1_agreement_decided": float(same[~tie].mean()) if bool((~tie).any()) else 1.0,
            "kl_mean": float(kl.mean()), "kl_mean_stderr": _stderr(kl),
            "kl_median": float(kl.quantile(0.5)), "kl_p99": float(kl.quantile(0.99)), "kl_max": float(kl.max()),
        }
        if self._nll:
            nll, nll_ref = torch.cat(self._nll), torch.cat(self._nll_ref)
            log_ratio = nll - nll_ref  # [N]: ln(PPL / PPL_ref) is its mean
            ratio = math.exp(float(log_ratio.mean()))
            out.update({"ppl": math.exp(float(nll.mean())), "ppl_ref": math.exp(float(nll_ref.mean())),
                        "ppl_ratio": ratio, "ppl_ratio_stderr": ratio * _stderr(log_ratio),
                        "ppl_increase": ratio - 1.0})
        qs = dp.quantile(torch.tensor(list(DELTA_P_QUANTILES.values()), dtype=torch.float64))
        out["delta_p"] = {"mean": float(dp.mean()), "rms": float(dp.square().mean().sqrt()),
                          **{name: float(q) for name, q in zip(DELTA_P_QUANTILES, qs, strict=True)}}
        return out


def _stderr(x: torch.Tensor) -> float:
    """Standard error of the mean of x [N]."""
    return float(x.std() / math.sqrt(x.numel())) if x.numel() > 1 else 0.0
