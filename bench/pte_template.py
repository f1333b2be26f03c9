"""Seconds per ExecuTorch expert program: direct export (torch.export + XNNPACK) vs the template.

    .venv/bin/python bench/pte_template.py [--direct 2] [--templated 8]

For the tiny preset and a wearable-moe expert (hidden 432, intermediate 1280), fp32 and int4 (G = 32,
K = 432 zero-padded to 448): the mean over --direct experts exported directly, the one-off template
build, and the mean over --templated experts written from it. One JSON line per case; each line
also says whether the template wrote the same bytes as the direct export for every direct expert.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from cosmoe_export.importers.presets import PRESETS
from cosmoe_export.lower import pte_template, units
from runtime_py import quant
from runtime_py.config import CosmoeConfig, expert_tensor_shapes


def random_expert(config: CosmoeConfig, scheme: str, seed: int) -> dict[str, units.Weight]:
    g = torch.Generator().manual_seed(seed)
    out: dict[str, units.Weight] = {}
    for name, shape in expert_tensor_shapes(config, 0, 0).items():
        w = torch.randn(shape, generator=g) * shape[1] ** -0.5
        enc = quant.choose_encoding(scheme, shape, 32, "float32")
        if enc.quantized:
            stored, scales = quant.quantize(w, enc)
            w = units.QuantWeight(quant.codes(stored, enc, shape[1]), scales.float(), enc)
        out[name.removeprefix("layers.0.moe.experts.0.")] = w
    return out


def timed(fn, *args) -> tuple[float, bytes]:
    t = time.perf_counter()
    data = fn(*args)
    return time.perf_counter() - t, data


def case(preset: str, scheme: str, n_direct: int, n_templated: int) -> dict:
    config = PRESETS[preset]
    experts = [random_expert(config, scheme, seed) for seed in range(max(n_direct, n_templated) + 1)]
    direct = [timed(pte_template.export_expert, config, w) for w in experts[:n_direct]]
    build_s, _ = timed(pte_template.expert_pte, config, experts[-1])  # first of its layout: builds the template
    templated = [timed(pte_template.expert_pte, config, w) for w in experts[:n_templated]]
    return {"preset": preset, "precision": "fp32" if scheme == quant.FLOAT else f"{scheme}-g32",
            "bytes": len(templated[0][1]), "direct_s_per_expert": sum(s for s, _ in direct) / n_direct,
            "template_build_s": build_s, "template_s_per_expert": sum(s for s, _ in templated) / n_templated,
            "identical": all(d == t for (_, d), (_, t) in zip(direct, templated, strict=False))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--direct", type=int, default=2, help="experts exported directly per case")
    p.add_argument("--templated", type=int, default=8, help="experts written from the template per case")
    a = p.parse_args()
    # One export first: imports and one-off setup (seconds) are no expert's cost.
    pte_template.export_expert(PRESETS["tiny"], random_expert(PRESETS["tiny"], quant.FLOAT, seed=999))
    for preset in ("tiny", "wearable-moe"):
        for scheme in (quant.FLOAT, "int4"):
            print(json.dumps(case(preset, scheme, a.direct, a.templated)), flush=True)


if __name__ == "__main__":
    main()
