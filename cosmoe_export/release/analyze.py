"""``analyze``: run a checkpoint or bundle over a text and report how it routes.

The text is tokenised with the model's own tokenizer.json and cut into non-overlapping windows of
the model's context (the tail that does not fill a window is dropped). Per layer and overall:

- perplexity over the windows (each position predicts the next token inside its window);
- ExRep (CoSMoEs Eq. 4-5, percent) and ΔUniform: ``runtime_py.routing_metrics``;
- expert loads per token under CoSMoEs Eq. 8 (keep only the selected experts), ``eq8_loads_per_token``:
  the experts that enter the selection from one token to the next, |S_t \\ S_{t-1}| = floor(H/2) / (B*(T-1));
- hit rate of a per-layer expert cache of 1..E experts, LRU and the Belady optimum, decoding the
  windows one after another token by token (``cosmoe_export.release.cache_sim``).

Shape legend: B windows, T tokens per window, K active experts, E experts, L layers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from cosmoe_export.errors import CosmoeError
from cosmoe_export.release import cache_sim
from cosmoe_export.text import encode_with, windows
from runtime_py import format as fmt
from runtime_py import routing_metrics
from runtime_py.config import CosmoeConfig
from runtime_py.format import MANIFEST_NAME
from runtime_py.model import CosmoeForCausalLM

FORWARD_BATCH = 8  # windows per forward pass
HEAD_ROWS = 512  # positions per call of the output head


@dataclass
class Loaded:
    model: CosmoeForCausalLM
    config: CosmoeConfig
    tokenizer_path: Path | None
    kind: str  # "checkpoint" | "bundle"


def load(path: str) -> Loaded:
    """A bundle directory (manifest.json) through the runtime with lazy experts, else a checkpoint."""
    return _load(path)


def selection_map_layer(config: CosmoeConfig, requested: int | None, owner: object) -> int:
    """The layer whose selections the selection map shows: the requested one, which must route
    (a dense layer of the plan picks no experts), else the middle MoE layer."""
    moe = config.moe_layers
    if requested is None:
        return moe[len(moe) // 2]
    if requested not in moe:
        raise CosmoeError(f"{owner}: layer {requested} is not an MoE layer of this model (MoE layers: "
                          f"{', '.join(map(str, moe))})")
    return requested


def _load(path: str) -> Loaded:
    """A bundle's model (its experts dropped after each layer runs) or a checkpoint's canonical
    model (streamed layer by layer when it does not fit in memory): analyze runs full forwards
    without a cache, so either holds one layer's experts at a time (cosmoe_export/reference.py)."""
    from cosmoe_export.reference import TorchRuntime, source_model
    p = Path(path)
    if (p / MANIFEST_NAME).is_file():
        from runtime_py.bundle import Bundle
        runtime = TorchRuntime(Bundle.open(p), stream_experts=True)
        tok_dir = runtime.bundle.tokenizer_dir
        return Loaded(runtime.model, runtime.config, tok_dir / fmt.TOKENIZER_FILE if tok_dir else None, "bundle")
    from cosmoe_export.importers.sources import open_source
    source = open_source(path, hash_files=False)
    tok = next((f for f in source.tokenizer_files if f.name == fmt.TOKENIZER_FILE), None)
    return Loaded(source_model(source), source.config, tok, "checkpoint")


@torch.inference_mode()
def run_routing(model: CosmoeForCausalLM, ids: torch.Tensor) -> tuple[list[np.ndarray], float]:
    """ids [B, T] -> (selections of each MoE layer by layer id, each [B, T, K]; mean next-token NLL
    in nats). Dense layers of the layer plan route nothing and have no entry."""
    picked: dict[int, list[np.ndarray]] = {layer: [] for layer in model.config.moe_layers}
    nll_sum, count = 0.0, 0
    moes = [layer.routed for layer in model.layers if layer.routed is not None]
    for chunk in ids.split(FORWARD_BATCH):
        b, t = chunk.shape
        for m in moes:  # the observer sees idx [N, K] with N = b*t, window-major
            m.observer = lambda layer, idx, b=b, t=t: picked[layer].append(idx.view(b, t, -1).numpy().copy())
        try:
            x, _ = model.hidden(chunk)  # [b, t, D]
        finally:
            for m in moes:
                m.observer = None
        # Position i predicts token i+1. The head runs HEAD_ROWS positions at a time: the whole
        # batch's logits would be b x t x V (6.6 GB in fp32 for 8 windows of 4,096 at a 50k vocabulary).
        rows, targets = x[:, :-1].flatten(0, 1), chunk[:, 1:].flatten()  # [b*(t-1), D], [b*(t-1)]
        for r, y in zip(rows.split(HEAD_ROWS), targets.split(HEAD_ROWS), strict=True):
            nll_sum += float(F.cross_entropy(model.head(r).float(), y, reduction="sum"))
        count += b * (t - 1)
    return {layer: np.concatenate(p) for layer, p in picked.items()}, nll_sum / max(1, count)


def eq8_loads_per_token(sel: np.ndarray, num_experts: int) -> float:
    """Expert loads per token under CoSMoEs Eq. 8, from the selections alone: every replacement (counted
    twice by Eq. 4) is one load. Not the runtime's ``loads_per_token``, which counts the loads a store
    made under its budget and policy."""
    b, t, _ = sel.shape
    return (routing_metrics.replacement_count(sel, num_experts) // 2) / (b * (t - 1)) if t > 1 else 0.0


def routing_report(model: CosmoeForCausalLM,
                   batch: torch.Tensor) -> tuple[dict[str, Any], dict[int, np.ndarray]]:
    """batch [B, T] -> (report, selections of each MoE layer [B, T, K]); the numbers only, no
    provenance. ``per_layer`` and the means are over the MoE layers."""
    cfg = model.config
    sels, nll = run_routing(model, batch)  # MoE layer -> [B, T, K]
    e, k = cfg.num_experts, cfg.num_experts_per_tok
    per_layer = []
    for layer, sel in sels.items():
        curve = cache_sim.hit_rate_curve(sel, e)
        per_layer.append({
            "layer": layer,
            "exrep": routing_metrics.exrep(sel, e),
            "delta_uniform": routing_metrics.delta_uniform(sel, e),
            "eq8_loads_per_token": eq8_loads_per_token(sel, e),
            "expert_load": [round(float(x), 6) for x in routing_metrics.expert_load(sel, e)],
            "hit_rate_lru": curve["lru"],
            "hit_rate_belady": curve["belady"],
        })
    sizes = list(range(1, e + 1))
    report: dict[str, Any] = {
        "tokens": int(batch.numel()),
        "windows": int(batch.shape[0]),
        "window_tokens": int(batch.shape[1]),
        "num_experts": e,
        "top_k": k,
        "perplexity": math.exp(nll),
        # Every MoE layer has the same denominator B*K*(T-1), so the mean over layers is the pooled ratio.
        "exrep": float(np.mean([p["exrep"] for p in per_layer])),
        "delta_uniform": float(np.mean([p["delta_uniform"] for p in per_layer])),
        "eq8_loads_per_token": float(sum(p["eq8_loads_per_token"] for p in per_layer)),  # all layers together
        "hit_rate_curve": {
            "cache_size": sizes,
            "lru": [float(np.mean([p["hit_rate_lru"][c - 1] for p in per_layer])) for c in sizes],
            "belady": [float(np.mean([p["hit_rate_belady"][c - 1] for p in per_layer])) for c in sizes],
        },
        "per_layer": per_layer,
    }
    return report, sels


def analyze(*, path: str, text: Path, max_tokens: int | None = None, plots: Path | None = None,
            plot_layer: int | None = None) -> dict[str, Any]:
    loaded = load(path)
    cfg = loaded.config
    ids = encode_with(loaded.tokenizer_path, text, vocab_size=cfg.vocab_size, max_tokens=max_tokens,
                      purpose="analyze", owner=path)
    batch = windows(ids, cfg.max_position_embeddings)  # [B, T]
    numbers, sels = routing_report(loaded.model, batch)
    report = {"model": str(path), "kind": loaded.kind, "text": str(text), **numbers}
    if plots is not None:
        from cosmoe_export.release import analyze_plots
        layer = selection_map_layer(cfg, plot_layer, path)
        report["plots"] = [str(p) for p in analyze_plots.write_all(plots, report, sels[layer][0], layer)]
    return report
