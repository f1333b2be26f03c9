"""Seconds per ExecuTorch layer program at OLMoE-1B-7B's widths: direct export vs the layer template.

    .venv/bin/python bench/layer_template.py

Random weights, int8 attention (per channel), 4 layers of one kind: a direct export of layer 0, then
each layer written from the template (layer 0's call builds it: two exports with synthetic weights);
checks that layer 0's templated program is the direct export's bytes.
"""

from __future__ import annotations

import time

import torch

from cosmoe_export.lower import layer_export, layer_weights, pte_template, units
from cosmoe_export.lower.targets import TARGETS
from runtime_py import quant
from runtime_py.config import CosmoeConfig, backbone_shapes

OLMOE = CosmoeConfig(vocab_size=1000, hidden_size=2048, num_hidden_layers=4, num_attention_heads=16,
                     num_key_value_heads=16, intermediate_size=1024, num_experts=64, num_experts_per_tok=8,
                     qk_norm="full", max_position_embeddings=4096)


def backbone(config: CosmoeConfig) -> dict[str, units.Weight]:
    g = torch.Generator().manual_seed(0)
    out: dict[str, units.Weight] = {}
    for name, shape in backbone_shapes(config).items():
        w = torch.randn(shape, generator=g) * 0.02
        if ".attn." in name and len(shape) == 2:
            enc = quant.choose_encoding("int8", shape, 32, "float32")
            stored, scales = quant.quantize(w, enc)
            w = units.QuantWeight(quant.codes(stored, enc, shape[1]), scales.float(), enc)
        out[name] = w
    return out


def main() -> None:
    cfg, et = OLMOE, TARGETS["executorch"]
    weights = backbone(cfg)
    t = time.perf_counter()
    direct = layer_export(et, cfg, 0)(layer_weights(cfg, weights, 0))[0]
    print(f"direct export, one int8-attention layer at OLMoE widths: {time.perf_counter() - t:.1f} s")
    for layer in range(cfg.num_hidden_layers):
        t = time.perf_counter()
        data, _ = pte_template.layer_pte(cfg, layer, layer_weights(cfg, weights, layer), layer_export(et, cfg, layer))
        note = " (template built)" if layer == 0 else ""
        print(f"layer {layer} from the template: {time.perf_counter() - t:.2f} s{note}")
        if layer == 0 and data != direct:
            raise SystemExit("layer 0's templated program differs from its direct export")
    print("layer 0 equals the direct export")


if __name__ == "__main__":
    main()
