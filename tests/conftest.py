"""Tiny checkpoints made with the transformers classes themselves (nothing is downloaded)."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]

# Every family feature is switched on somewhere: GQA and llama3 rope (Mixtral), shared expert,
# q/k/v bias and un-renormalised top-k (Qwen2-MoE), per-head q/k norm and renormalised top-k
# (Qwen3-MoE), whole-projection q/k norm and clip_qkv (OLMoE), a dense first layer beside MoE ones
# (Qwen3-MoE mlp_only_layers: layer plan moe/dense, format v2).
COMMON = dict(vocab_size=320, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=128, num_experts_per_tok=2, tie_word_embeddings=False)
FAMILIES = {
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(
        intermediate_size=96, num_local_experts=4,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 64})),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", dict(
        moe_intermediate_size=48, shared_expert_intermediate_size=80, num_experts=4, norm_topk_prob=False,
        intermediate_size=80)),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(
        moe_intermediate_size=48, num_experts=6, norm_topk_prob=True, head_dim=24)),
    "qwen3_moe_dense": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(
        moe_intermediate_size=48, num_experts=6, norm_topk_prob=True, head_dim=24, mlp_only_layers=[0],
        intermediate_size=80)),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", dict(
        intermediate_size=48, num_experts=4, norm_topk_prob=False, clip_qkv=3.0)),
    # OLMoE as released (OLMoE-1B-7B: no clip_qkv, as many kv heads as heads): what llama.cpp's olmoe computes.
    "olmoe_mha": ("OlmoeConfig", "OlmoeForCausalLM", dict(
        intermediate_size=48, num_experts=4, norm_topk_prob=False, num_key_value_heads=4)),
    # Multipliers far from 1 so that a missed one shows; the shared variant's fused shared MLP.
    "granitemoe": ("GraniteMoeConfig", "GraniteMoeForCausalLM", dict(
        intermediate_size=48, num_local_experts=4, embedding_multiplier=3.0, residual_multiplier=0.5,
        attention_multiplier=0.2, logits_scaling=2.5)),
    "granitemoeshared": ("GraniteMoeSharedConfig", "GraniteMoeSharedForCausalLM", dict(
        intermediate_size=48, num_local_experts=4, shared_intermediate_size=80, embedding_multiplier=3.0,
        residual_multiplier=0.5, attention_multiplier=0.2, logits_scaling=2.5, tie_word_embeddings=True)),
    # q/k norm after RoPE, shared MLP.
    "hunyuan_moe": ("HunYuanMoEV1Config", "HunYuanMoEV1ForCausalLM", dict(
        intermediate_size=48, num_experts=4, moe_topk=2, head_dim=16)),
    # Interleaved RoPE, dense layer 0, shared experts, correction bias.
    "ernie4_5_moe": ("Ernie4_5_MoeConfig", "Ernie4_5_MoeForCausalLM", dict(
        intermediate_size=80, moe_intermediate_size=48, moe_num_experts=4, moe_num_shared_experts=1,
        moe_layer_start_index=1, moe_layer_interval=1)),
    # LayerNorm with biases, q/k/v/o and head biases, sparsemixer routing (eps large enough that
    # several experts stay in its softmax).
    "phimoe": ("PhimoeConfig", "PhimoeForCausalLM", dict(
        intermediate_size=48, num_local_experts=4, attention_bias=True, lm_head_bias=True,
        router_jitter_noise=0.3)),
    # Partial RoPE, q/k norm, dense layer 0, sigmoid router with groups, scaling and correction bias.
    "glm4_moe": ("Glm4MoeConfig", "Glm4MoeForCausalLM", dict(
        intermediate_size=80, moe_intermediate_size=48, n_routed_experts=8, n_shared_experts=1,
        first_k_dense_replace=1, n_group=2, topk_group=1, use_qk_norm=True, head_dim=16,
        routed_scaling_factor=1.8)),
    # Sliding (window 5) and full layers, sinks, biases everywhere, clamped SwiGLU (a limit low
    # enough that the clamp acts), YaRN; its fused experts are transposed and interleaved.
    "gpt_oss": ("GptOssConfig", "GptOssForCausalLM", dict(
        intermediate_size=48, num_local_experts=4, head_dim=16, sliding_window=5, swiglu_limit=1.5)),
    # gpt-oss with its released clamp (7, llama.cpp's constant) and YaRN: as released (truncate false), and
    # with YaRN's correction range rounded to whole dims, as llama.cpp computes it.
    "gpt_oss_released": ("GptOssConfig", "GptOssForCausalLM", dict(
        intermediate_size=48, num_local_experts=4, head_dim=16, sliding_window=5)),
    "gpt_oss_rounded_yarn": ("GptOssConfig", "GptOssForCausalLM", dict(
        intermediate_size=48, num_local_experts=4, head_dim=16, sliding_window=5, rope_parameters={
            "rope_type": "yarn", "rope_theta": 150000.0, "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
            "original_max_position_embeddings": 4096, "truncate": True})),
    # Latent attention with q direct (V2-Lite) and through q_lora_rank (V3), interleaved RoPE, value
    # heads narrower than key heads, dense layer 0, shared expert; V2: group-limited softmax by each
    # group's best, not renormalised, YaRN with mscale_all_dim; V3: sigmoid, groups and correction bias.
    "deepseek_v2": ("DeepseekV2Config", "DeepseekV2ForCausalLM", dict(
        num_key_value_heads=4, intermediate_size=80, moe_intermediate_size=48, n_routed_experts=8, n_shared_experts=1,
        first_k_dense_replace=1, kv_lora_rank=32, q_lora_rank=None, qk_nope_head_dim=16, qk_rope_head_dim=8,
        v_head_dim=12, topk_method="group_limited_greedy", n_group=4, topk_group=2, routed_scaling_factor=1.5,
        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                         "original_max_position_embeddings": 32, "beta_fast": 32, "beta_slow": 1, "mscale": 0.707,
                         "mscale_all_dim": 0.707})),
    # DeepSeek-V2-Lite's routing (greedy: no groups), its YaRN with mscale_all_dim, q direct.
    "deepseek_v2_lite": ("DeepseekV2Config", "DeepseekV2ForCausalLM", dict(
        num_key_value_heads=4, intermediate_size=80, moe_intermediate_size=48, n_routed_experts=8, n_shared_experts=1,
        first_k_dense_replace=1, kv_lora_rank=32, q_lora_rank=None, qk_nope_head_dim=16, qk_rope_head_dim=8,
        v_head_dim=12, topk_method="greedy", routed_scaling_factor=1.5,
        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                         "original_max_position_embeddings": 32, "beta_fast": 32, "beta_slow": 1, "mscale": 0.707,
                         "mscale_all_dim": 0.707})),
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM", dict(
        num_key_value_heads=4, intermediate_size=80, moe_intermediate_size=48, n_routed_experts=8, n_shared_experts=1,
        first_k_dense_replace=1, kv_lora_rank=32, q_lora_rank=24, qk_nope_head_dim=16, qk_rope_head_dim=8,
        v_head_dim=12, n_group=2, topk_group=1, norm_topk_prob=True, routed_scaling_factor=2.5, rope_interleave=True)),
    # Short-convolution layers around an attention one (with conv biases), dense layer 0, the sigmoid
    # router with its expert bias and scaling.
    "lfm2_moe": ("Lfm2MoeConfig", "Lfm2MoeForCausalLM", dict(
        num_hidden_layers=3, layer_types=["conv", "full_attention", "conv"], conv_L_cache=3, conv_bias=True,
        intermediate_size=80, moe_intermediate_size=48, num_experts=8, num_dense_layers=1, routed_scaling_factor=1.7)),
    # LFM2-MoE as released (no conv biases, routed_scaling_factor 1): what llama.cpp's lfm2moe computes.
    "lfm2_moe_released": ("Lfm2MoeConfig", "Lfm2MoeForCausalLM", dict(
        num_hidden_layers=3, layer_types=["conv", "full_attention", "conv"], conv_L_cache=3,
        intermediate_size=80, moe_intermediate_size=48, num_experts=8, num_dense_layers=1)),
    # Gated DeltaNet layers (value heads twice the key heads) around a gated full-attention one with
    # partial RoPE; zero-centred norms; a gated shared expert. 6 experts: with 8, this seed's routers
    # had near-ties on the test prompt (2nd and 3rd probability 1.5e-4 apart) that int8 rounding
    # flips, which no quantization bound can absorb (0.005 apart at the closest with 6).
    # Qwen3.5-MoE's DeltaNet with key and value heads of one width, as released (128 and 128): what
    # llama.cpp's qwen35moe holds; value heads twice the key heads still.
    "qwen3_5_moe_released": ("Qwen3_5MoeTextConfig", "Qwen3_5MoeForCausalLM", dict(
        num_hidden_layers=3, layer_types=["linear_attention", "full_attention", "linear_attention"], head_dim=16,
        moe_intermediate_size=48, shared_expert_intermediate_size=80, num_experts=6, linear_num_key_heads=2,
        linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=16, linear_conv_kernel_dim=4)),
    "qwen3_5_moe": ("Qwen3_5MoeTextConfig", "Qwen3_5MoeForCausalLM", dict(
        num_hidden_layers=3, layer_types=["linear_attention", "full_attention", "linear_attention"], head_dim=16,
        moe_intermediate_size=48, shared_expert_intermediate_size=80, num_experts=6, linear_num_key_heads=2,
        linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=12, linear_conv_kernel_dim=4)),
}


def _reinit(model: torch.nn.Module, seed: int) -> None:
    """transformers' std-0.02 init makes experts nearly invisible in the logits, so a wrongly mapped
    expert could still pass a 1e-4 gate. Re-draw every weight at fan-in scale, norms near 1."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        # GLM, DeepSeek-V3 and LFM2 keep their correction bias as a buffer: drawn too, or the tests would never see it.
        biases = [(n, b) for n, b in model.named_buffers() if n.endswith(("e_score_correction_bias", "expert_bias"))]
        for name, p in sorted([*model.named_parameters(), *biases]):
            if p.dim() == 1 and "norm" in name:
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif p.dim() == 1:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
            else:
                std = 1.0 if "embed" in name else p.shape[-1] ** -0.5
                p.copy_(std * torch.randn(p.shape, generator=g))


def make_hf_checkpoint(family: str, out: Path, *, layout: str = "per-expert", max_shard_size: str | None = None,
                       seed: int = 0) -> Path:
    import transformers
    cfg_cls, model_cls, extra = FAMILIES[family]
    config = getattr(transformers, cfg_cls)(**{**COMMON, **extra})
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config).eval()
    _reinit(model, seed)
    out.mkdir(parents=True, exist_ok=True)
    if layout == "per-expert":
        kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
        model.save_pretrained(out, **kwargs)
    else:  # fused 3-D expert tensors, exactly as transformers keeps them in memory
        config.architectures = [model_cls]
        config.save_pretrained(out)
        tied = {"lm_head.weight"} if config.tie_word_embeddings else set()  # save_pretrained drops it too
        save_file({k: v.contiguous() for k, v in model.state_dict().items() if k not in tied},
                  str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def add_tokenizer(ckpt: Path, text: Path, vocab_size: int = 300) -> Path:
    """Give a tiny checkpoint a byte-level BPE tokenizer.json trained on ``text`` (ids < its vocab),
    for the stages that read text: calibration, analyze."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel()
    tok.train([str(text)], trainers.BpeTrainer(vocab_size=vocab_size,
                                               initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(ckpt / "tokenizer.json"))
    return ckpt


@pytest.fixture
def hf_checkpoint(tmp_path):
    def make(family: str, **kw) -> Path:
        return make_hf_checkpoint(family, tmp_path / f"{family}-{kw.get('layout', 'per-expert')}", **kw)
    return make


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


# ---- the session's shared bundles -------------------------------------------------------------------
# scripts/test.sh runs the tests on every core (pytest-xdist, --dist load): any test on any worker, so a
# module fixture is built by each worker that runs one of its file's tests, and a fixture that writes
# outside its temporary directory must take a lock (test_native_malformed's sanitizer build does). The
# session fixtures below are used by several files, so the workers share one build of each
# (pytest-xdist's documented pattern: a lock in the run's common temporary directory); run without
# xdist they are built once as before. (--dist loadgroup would keep a file on one worker, but
# pytest-xdist 3.8 marks the groups through Item._nodeid, which pytest 9 no longer reads: it ran as
# --dist load, and two workers once configured one CMake build directory at the same time.)
def _once(tmp_path_factory, key: str, build: Callable[[Path], Path]) -> Path:
    """What ``build(directory)`` returns, built once per test run whatever the number of workers."""
    from filelock import FileLock

    base = tmp_path_factory.getbasetemp()
    root = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "shared"
    root.mkdir(exist_ok=True)
    done = root / f"{key}.done"  # holds the result's path, written once the build is whole
    with FileLock(str(root / f"{key}.lock")):
        if not done.exists():
            shutil.rmtree(root / key, ignore_errors=True)
            (root / key).mkdir()
            done.write_text(str(build(root / key)))
    return Path(done.read_text())


def _run_cli(*args: str) -> None:
    from click.testing import CliRunner

    from cosmoe_export.cli import cli

    r = CliRunner().invoke(cli, ["-q", *map(str, args)])
    assert r.exit_code == 0, r.output


@pytest.fixture(scope="session")
def lowered_tiny(tmp_path_factory) -> Path:
    """The `tiny` preset split and lowered to every target, once per test session (lowering is the
    slow step). Tests must not modify it; copy it first."""
    def build(root: Path) -> Path:
        _run_cli("split", "tiny", "-o", root / "tiny")
        _run_cli("lower", root / "tiny", "--target", "all")
        return root / "tiny"
    return _once(tmp_path_factory, "lowered", build)


@pytest.fixture(scope="session")
def tiny_bles_bundle(tmp_path_factory) -> Path:
    """The committed trained fixture recipes/models/tiny-bles (bf16) split to fp32, with its tokenizer."""
    def build(root: Path) -> Path:
        _run_cli("split", ROOT / "recipes/models/tiny-bles", "-o", root / "tiny-bles", "--dtype", "fp32")
        return root / "tiny-bles"
    return _once(tmp_path_factory, "bundles", build)


@pytest.fixture(scope="session")
def lowered_dense(tmp_path_factory) -> Path:
    """GLM-4-MoE with a dense first layer (and its sigmoid router, score bias, groups, partial RoPE),
    split and lowered to every target, once per session."""
    def build(root: Path) -> Path:
        _run_cli("split", make_hf_checkpoint("glm4_moe", root / "ckpt"), "-o", root / "bundle")
        _run_cli("lower", root / "bundle", "--target", "all")
        return root / "bundle"
    return _once(tmp_path_factory, "lowered-dense", build)
