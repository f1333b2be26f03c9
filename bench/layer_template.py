"""Seconds per ExecuTorch layer program at OLMoE-1B-7B's widths: direct export vs the layer template.

    .venv/bin/python bench/layer_template.py

Random weights, int8 attention (per channel), 4 layers of one kind: a direct export of layer 0, then
each layer written from the template (layer 0's call builds it: two exports with synthetic weights);
checks that layer 0's templated program is the direct export's bytes.
"""

import time, torch
from runtime_py.config import CosmoeConfig, backbone_shapes
from cosmoe_export.lower import units, layer_export, layer_weights, pte_template
from cosmoe_export.lower.targets import TARGETS
from runtime_py import quant
cfg = CosmoeConfig(vocab_size=1000, hidden_size=2048, num_hidden_layers=4, num_attention_heads=16, num_key_value_heads=16,
                   intermediate_size=1024, num_experts=64, num_experts_per_tok=8, qk_norm="full", max_position_embeddings=4096)
g = torch.Generator().manual_seed(0)
bb = {}
for n, s in backbone_shapes(cfg).items():
    w = torch.randn(s, generator=g) * 0.02
    if ".attn." in n and len(s) == 2:
        enc = quant.choose_encoding("int8", s, 32, "float32"); st, sc = quant.quantize(w, enc)
        w = units.QuantWeight(quant.codes(st, enc, s[1]), sc.float(), enc)
    bb[n] = w
et = TARGETS["executorch"]
t = time.perf_counter(); direct = layer_export(et, cfg, 0)(layer_weights(cfg, bb, 0)); td = time.perf_counter() - t
print(f"direct export, one int8-attention layer at OLMoE widths: {td:.1f} s")
for l in range(4):
    t = time.perf_counter(); data, _ = pte_template.layer_pte(cfg, l, layer_weights(cfg, bb, l), layer_export(et, cfg, l))
    print(f"layer {l} from the template: {time.perf_counter() - t:.2f} s" + (" (template built)" if l == 0 else ""))
    if l == 0: assert data == direct[0]
print("layer 0 equals the direct export")
