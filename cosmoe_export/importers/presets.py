"""Named model presets: the CoSMoEs paper's Table 1 MoE models, plus a tiny one for tests.

Generic sizes live in ``CosmoeConfig``; here are only literal numbers and where they come from.

Table 1 gives layers, heads and hidden size, and the parameter counts; it gives neither the
expert FFN width nor the vocabulary. We take Llama-3's tokenizer (vocabulary 128,256, untied
input and output embeddings: the paper's models are Llama-3 style), then solve for the rest:
    active = B + 2 * L * X,  total = B + 8 * L * X   (8 experts, top-2)
where X is one expert's parameters in one layer and B the backbone (embeddings, attention,
norms, routers). Two equations give X from (total - active) / (6 L), and B must then equal
active - 2 L X, which fixes the attention layout (multi-head vs grouped-query).

Targets (``PAPER_PARAMS``) are CoSMoEs Table 1 (active / total): phone MoE 1.37B / 3.75B,
phone WD 1.42B / 3.65B, wearable MoE 188M / 377M, wearable WD 188M / 377M. Every preset is within
1 % of both (tested). Run ``cosmoe-export inspect PRESET`` to see the counts and their distance
from these targets.
"""

from __future__ import annotations

from runtime_py.config import CosmoeConfig

LLAMA3_VOCAB = 128_256
# Llama 3.2's RoPE: theta 500k, llama3 scaling for long context.
LLAMA3_ROPE = dict(rope_theta=500000.0, rope_scaling={
    "rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192})
PAPER_COMMON = dict(vocab_size=LLAMA3_VOCAB, num_experts=8, num_experts_per_tok=2, norm_topk_prob=True,
                    max_position_embeddings=2048, rms_norm_eps=1e-5, tie_word_embeddings=False,
                    bos_token_id=128000, eos_token_id=128001, **LLAMA3_ROPE)

PRESETS: dict[str, CosmoeConfig] = {
    # 24 layers, 18 heads, hidden 1440 (Table 1). Multi-head attention (18 kv heads): with it
    # B = 2*128256*1440 + 24*(4*1440^2 + 2*1440) + 1440 + 24*8*1440 = 568.8M, and
    # X = (3.75B - 1.37B) / (6*24) = 16.5M = 3*1440*F  ->  F = 3826, rounded to 3840 (a multiple
    # of 128 for kernels). Result: 1.365B active / 3.754B total.
    "phone-moe": CosmoeConfig(hidden_size=1440, num_hidden_layers=24, num_attention_heads=18,
                              num_key_value_heads=18, intermediate_size=3840, **PAPER_COMMON),
    # 26 layers, 20 heads, hidden 1600 (Table 1), WD experts with rank r = hidden/2 = 800.
    # Multi-head attention: B = 2*128256*1600 + 26*(4*1600^2 + 2*1600) + 1600 + 26*8*1600 = 677.1M,
    # and active - B = 1.42B - 677M = 2LX fits; one WD expert per layer is
    # X = (3.65B - 1.42B)/(6*26) = 14.29M = 3 * r * (1600 + F)  ->  F = 4356, rounded to 4352.
    # Result: 1.420B active / 3.648B total.
    "phone-wd": CosmoeConfig(hidden_size=1600, num_hidden_layers=26, num_attention_heads=20,
                             num_key_value_heads=20, intermediate_size=4352, expert_kind="wd", **PAPER_COMMON),
    # 19 layers, 8 heads, hidden 432 (Table 1), multi-head. B = 2*128256*432 + 19*(4*432^2 + ...)
    # = 125.0M; X = (377M - 188M)/(6*19) = 1.658M = 3*432*F -> F = 1279, rounded to 1280.
    # Result: 188.1M active / 377.2M total.
    "wearable-moe": CosmoeConfig(hidden_size=432, num_hidden_layers=19, num_attention_heads=8,
                                 num_key_value_heads=8, intermediate_size=1280, **PAPER_COMMON),
    # 32 layers, 10 heads, hidden 400 (Table 1), WD rank 200, multi-head: B = 2*128256*400 +
    # 32*(4*400^2 + ...) = 123.2M. The two counts disagree slightly on X: the total gives
    # X = (377M - 188M)/(6*32) = 0.984M, the active (188M - B)/(2*32) = 1.013M; with
    # X = 3*200*(400 + F), F = 1264 (a multiple of 16) sits between them.
    # Result: 187.1M active / 378.8M total.
    "wearable-wd": CosmoeConfig(hidden_size=400, num_hidden_layers=32, num_attention_heads=10,
                                num_key_value_heads=10, intermediate_size=1264, expert_kind="wd", **PAPER_COMMON),
    # Not from the paper: a model small enough to split and verify in seconds (README demo, tests).
    "tiny": CosmoeConfig(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=128, num_experts=8, num_experts_per_tok=2,
                         max_position_embeddings=256, **LLAMA3_ROPE),
}

# (active, total) parameters of CoSMoEs Table 1.
PAPER_PARAMS: dict[str, tuple[int, int]] = {
    "phone-moe": (1_370_000_000, 3_750_000_000),
    "phone-wd": (1_420_000_000, 3_650_000_000),
    "wearable-moe": (188_000_000, 377_000_000),
    "wearable-wd": (188_000_000, 377_000_000),
}


def get_preset(name: str) -> CosmoeConfig | None:
    return PRESETS.get(name)
