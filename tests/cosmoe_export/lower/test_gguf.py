"""lower --target gguf and the llamacpp backend: the GGUF holds the bundle's integers bit for bit
(read back with gguf-py's own dequantizers), llama.cpp runs it as our runtime runs the bundle, and
what GGUF cannot hold is refused or recorded. llama.cpp is the real one (llama-cpp-python, the
`gguf` extra the README's test command installs)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import gguf
import llama_cpp  # noqa: F401  (the test command installs it: without it these tests fail here, not skip)
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from cosmoe_export.cli import cli
from cosmoe_export.lower import gguf_target, units
from cosmoe_export.lower.gguf_target import tensors as gguf_tensors
from cosmoe_export.reference import TorchRuntime
from runtime_py.bundle import Bundle
from runtime_py.llamacpp import LlamaCppRunner
from runtime_py.runner import open_runner
from tests.conftest import COMMON, FAMILIES, make_hf_checkpoint
from tests.cosmoe_export.training.test_train import write_corpus

Q = gguf.GGMLQuantizationType


def run(*args):
    return CliRunner().invoke(cli, list(map(str, args)))


def lowered(bundle: Path) -> Path:
    r = run("-q", "lower", bundle, "--target", "gguf")
    assert r.exit_code == 0, r.output
    return bundle


def gguf_entry(bundle: Path) -> dict:
    manifest = json.loads((bundle / "manifest.json").read_text())
    return next(f for f in manifest["files"] if f.get("target") == "gguf")


def tensors(bundle: Path) -> dict[str, gguf.ReaderTensor]:
    return {t.name: t for t in gguf.GGUFReader(bundle / "gguf" / "model.gguf").tensors}


def values(t: gguf.ReaderTensor) -> torch.Tensor:
    """A GGUF tensor as fp32, by gguf-py's dequantizers (numpy shape: outermost first)."""
    return torch.from_numpy(np.ascontiguousarray(gguf.quants.dequantize(t.data, t.tensor_type))).float()


@pytest.fixture(scope="module")
def tiny(tiny_bles_bundle, tmp_path_factory):
    """tiny-bles (trained, byte-level BPE with a special token) as fp32 and quantized, each with its GGUF."""
    root = tmp_path_factory.mktemp("gguf")
    fp32 = root / "fp32"
    shutil.copytree(tiny_bles_bundle, fp32)
    out = {"fp32": lowered(fp32), "root": root}
    for name, flags in (("int4", ["--expert-scheme", "int4", "--backbone-scheme", "int4"]),
                        ("int8", ["--expert-scheme", "int8", "--backbone-scheme", "int8"]),
                        ("int4-g128", ["--expert-scheme", "int4", "--backbone-scheme", "int8", "--group-size", "128"])):
        r = run("-q", "quantize", fp32, "-o", root / name, *flags)
        assert r.exit_code == 0, r.output
        out[name] = lowered(root / name)
    return out


def prompt(bundle: Path, n: int = 48) -> list[int]:
    """``n`` real token ids: the bundle's tokenizer on text of tiny-bles' training grammar."""
    text = write_corpus(bundle.parent / "prompt.txt", chars=4_000, seed=7).read_text()
    return Tokenizer.from_file(str(bundle / "tokenizer" / "tokenizer.json")).encode(text).ids[:n]


# ---- bit for bit ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name, qtype", [("int4", Q.Q4_0), ("int8", Q.Q8_0), ("int4-g128", Q.Q4_0)])
def test_the_bundles_integers_are_q4_0_and_q8_0_exactly(tiny, name, qtype):
    """Every quantized weight, read back through gguf-py's Q4_0/Q8_0 dequantizers, equals the bundle's
    codes x scales exactly: experts stacked [E, N, K] per layer, q/k rows in llama.cpp's RoPE order."""
    bundle = Bundle.open(tiny[name])
    cfg = bundle.config
    got = tensors(tiny[name])
    backbone = units.backbone_weights(bundle)
    for layer in range(cfg.num_hidden_layers):
        experts = [units.expert_weights(bundle, layer, e) for e in range(cfg.num_experts)]
        for ours, theirs in (("gate", "ffn_gate_exps"), ("up", "ffn_up_exps"), ("down", "ffn_down_exps")):
            t = got[f"blk.{layer}.{theirs}.weight"]
            assert t.tensor_type == qtype
            want = torch.stack([x[f"{ours}.weight"].dequantize() for x in experts])  # [E, N, K]
            assert torch.equal(values(t), want), (layer, ours)
        for ours, theirs, heads in (("q", "attn_q", cfg.num_attention_heads), ("k", "attn_k", cfg.num_key_value_heads),
                                    ("v", "attn_v", 0), ("o", "attn_output", 0)):
            w = backbone[f"layers.{layer}.attn.{ours}.weight"]
            want = w.dequantize()
            if heads:  # HF's half-split rotary rows -> interleaved pairs (convert_hf_to_gguf.py's permute)
                d = want.shape[0] // heads // 2
                want = want.reshape(heads, 2, d, -1).swapaxes(1, 2).reshape(want.shape)
            t = got[f"blk.{layer}.{theirs}.weight"]
            expect = qtype if name != "int4-g128" else Q.Q8_0  # that bundle's backbone is int8
            assert t.tensor_type == expect and torch.equal(values(t), want), (layer, ours)
    for ours, theirs in (("embed.weight", "token_embd.weight"), ("lm_head.weight", "output.weight")):
        assert torch.equal(values(got[theirs]), backbone[ours].dequantize())
    entry = gguf_entry(tiny[name])
    assert entry["gguf"]["fallbacks"] == [] and entry["gguf"]["architecture"] == "llama"
    assert entry["precision"].startswith(qtype.name)


def test_the_same_bundle_gives_the_same_gguf_bytes(tiny, tmp_path):
    again = tmp_path / "again"
    shutil.copytree(tiny["int4"], again)
    lowered(again)
    assert (again / "gguf/model.gguf").read_bytes() == (tiny["int4"] / "gguf/model.gguf").read_bytes()
    assert gguf_entry(again) == gguf_entry(tiny["int4"])


# ---- llama.cpp runs it as our runtime does --------------------------------------------------------
def test_fp32_on_llamacpp_matches_the_runtime_and_its_greedy_tokens(tiny):
    bundle = Bundle.open(tiny["fp32"])
    ids = prompt(tiny["fp32"])
    with open_runner(bundle, backend="torch", torch_activations="fp32") as ours, LlamaCppRunner(bundle) as theirs:
        want, got = ours.logits(torch.tensor([ids])), theirs.logits(torch.tensor([ids]))
        assert (want - got).abs().max() < 1e-4
        generation = theirs.generate(ids[:8], 64)
        assert generation.tokens == ours.generate(ids[:8], 64).tokens
        assert generation.metrics["decode_tok_s"] > 0 and generation.metrics["peak_rss_mb"] > 0


@pytest.mark.parametrize("family, arch", [("mixtral", "llama"), ("qwen2_moe", "qwen2moe"), ("qwen3_moe", "qwen3moe"),
                                          ("olmoe_mha", "olmoe"), ("granitemoe", "granitemoe"),
                                          ("granitemoeshared", "granitemoe"), ("hunyuan_moe", "hunyuan-moe"),
                                          ("ernie4_5_moe", "ernie4_5-moe"), ("glm4_moe", "glm4moe"),
                                          ("gpt_oss_rounded_yarn", "gpt-oss"),
                                          ("deepseek_v2_lite", "deepseek2"), ("deepseek_v3", "deepseek2"),
                                          ("lfm2_moe_released", "lfm2moe"), ("qwen3_5_moe_released", "qwen35moe")])
def test_each_family_runs_on_its_llamacpp_architecture(family, arch, tmp_path):
    """Mixtral (GQA, Llama-3 RoPE scaling as rope_freqs), Qwen2-MoE (gated shared expert, q/k/v biases,
    top-k not renormalised), Qwen3-MoE (per-head q/k norms, head_dim 24 != hidden / heads), OLMoE
    (q/k norms over the whole projection, top-k not renormalised), Granite (its four multipliers far
    from 1; the shared variant's ungated shared MLP, a tied head), HunYuan (q/k norms per head after
    RoPE, an ungated shared MLP), ERNIE 4.5 (a dense layer before the MoE one, the correction bias,
    interleaved RoPE, an ungated shared expert), GLM-4.5 (a dense layer first, the sigmoid router with
    a correction bias and groups, routed scaling, partial RoPE, per-head q/k norms), gpt-oss (attention
    sinks, sliding and full layers, router and expert biases, the clamped SwiGLU, YaRN), DeepSeek-V2-Lite
    (latent attention with q direct, greedy softmax routing not renormalised, YaRN's mscale_all_dim in the
    softmax scale) and V3 (q through q_lora_rank, the sigmoid router with groups and a correction bias),
    LFM2-MoE (short gated convolutions around an attention layer, a dense layer first, the sigmoid router
    with its expert bias and scaling), Qwen3.5-MoE (Gated DeltaNet layers with twice as many value heads as
    key heads around a full-attention one with its output gate, partial RoPE, a gated shared expert)."""
    out = tmp_path / "bundle"
    assert run("-q", "split", make_hf_checkpoint(family, tmp_path / "ckpt"), "-o", out).exit_code == 0
    lowered(out)
    assert gguf_entry(out)["gguf"]["architecture"] == arch
    bundle = Bundle.open(out)
    ids = torch.tensor([[5, 17, 99, 3, 250, 42, 7, 7, 300, 1]])
    with open_runner(bundle, backend="torch", torch_activations="fp32") as ours, LlamaCppRunner(bundle) as theirs:
        assert (ours.logits(ids) - theirs.logits(ids)).abs().max() < 1e-4
        assert theirs.generate(ids[0].tolist(), 64).tokens == ours.generate(ids[0].tolist(), 64).tokens


@pytest.mark.parametrize("name", ["int4", "int8"])
def test_q4_0_and_q8_0_on_llamacpp_against_the_bundles_math(tiny, name):
    """llama.cpp multiplies Q4_0/Q8_0 weights by activations it rounds to 8 bits per block of 32 (its
    vec_dot_type Q8_0), so its logits differ from the bundle's math (the same weights, fp32
    activations) by that rounding, where fp32 agrees to 1e-5: over 128 positions of tiny-bles, at
    most 0.165 (int4) and 0.184 (int8) in logits up to 15, top-1 the same at 98.4 % and 96.9 %."""
    bundle = Bundle.open(tiny[name])
    ids = torch.tensor([prompt(tiny[name], 128)])
    with LlamaCppRunner(bundle) as theirs:
        got = theirs.logits(ids)
    want = TorchRuntime(bundle).logits(ids)
    err = float((want - got).abs().max())
    agree = float((want.argmax(-1) == got.argmax(-1)).float().mean())
    assert err < 0.25 and agree >= 0.95, (err, agree)


# ---- tokenizers ------------------------------------------------------------------------------------
HELD_OUT = ("def router(token, k=2):\n    \"\"\"Pick the experts.\"\"\"\n"
            "    return top_k(token) + 1 # ünïcödé ✓ 123456\n")


def test_the_byte_level_tokenizer_tokenizes_as_tokenizers_does(tiny):
    bundle = Bundle.open(tiny["fp32"])
    tok = Tokenizer.from_file(str(tiny["fp32"] / "tokenizer" / "tokenizer.json"))
    text = write_corpus(tiny["root"] / "held.txt", chars=3_000, seed=3).read_text() + HELD_OUT
    with LlamaCppRunner(bundle) as runner:
        assert runner._llm.tokenize(text.encode(), add_bos=False, special=False) == tok.encode(text).ids
    assert gguf_entry(tiny["fp32"])["gguf"]["tokenizer"] == "gpt2 (gpt-2)"


LLAMA3_SPLIT = next(p for p, name in gguf_target.SPLIT_PRE.items() if name == "llama-bpe")


def _split_bpe(text: Path) -> Tokenizer:
    """Llama 3's pre-tokenizer: its regex, then bytes (ByteLevel without its own regex)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(pattern=Regex(LLAMA3_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train([str(text)], trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tok


def _sentencepiece_bpe(text: Path) -> Tokenizer:
    """SentencePiece-style BPE: Metaspace words, byte fallback for anything outside the vocabulary."""
    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    byte_tokens = [f"<0x{i:02X}>" for i in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=318, special_tokens=byte_tokens, show_progress=False)
    tok.train([str(text)], trainer)
    return tok


@pytest.mark.parametrize("make, label", [(_split_bpe, "gpt2 (llama-bpe)"), (_sentencepiece_bpe, "llama")])
def test_other_tokenizers_tokenize_as_tokenizers_does(make, label, tmp_path):
    corpus = write_corpus(tmp_path / "corpus.txt", chars=20_000)
    ckpt = make_hf_checkpoint("mixtral", tmp_path / "ckpt")
    tok = make(corpus)
    tok.save(str(ckpt / "tokenizer.json"))
    out = tmp_path / "bundle"
    assert run("-q", "split", ckpt, "-o", out).exit_code == 0
    lowered(out)
    assert gguf_entry(out)["gguf"]["tokenizer"] == label
    text = write_corpus(tmp_path / "held.txt", chars=2_000, seed=5).read_text()
    with LlamaCppRunner(Bundle.open(out)) as runner:
        assert runner._llm.tokenize(text.encode(), add_bos=False, special=False) == tok.encode(text).ids


# ---- what GGUF cannot hold -------------------------------------------------------------------------
# What each family the GGUF output refuses is refused for: a feature its llama.cpp graph does not compute,
# a graph that computes something else (Phi-MoE), or the llama.cpp architecture that runs the family and
# that this target does not write yet.
REFUSED = {"olmoe": "it has clip_qkv",  # llama.cpp's olmoe graph does not clamp
           "qwen3_moe_dense": "layer_ffns dense/moe",  # its qwen3moe has a router in every layer
           "deepseek_v2": "it has expert groups scored by 'max'",  # llama.cpp's: the sum of the best two
           "lfm2_moe": "it has routed_scaling_factor, conv_bias",  # llama.cpp: no conv biases, no scaling
           "gpt_oss": "it has swiglu_limit 1.5",  # llama.cpp's gpt-oss clamps at 7, a constant
           "phimoe": "'phimoe', whose graph routes by a renormalised softmax top-k, not by Phi-MoE's sparsemixer",
           # llama.cpp's qwen35moe holds a DeltaNet state of [Dv, Dv] per head
           "qwen3_5_moe": "it has DeltaNet key heads of 16 dims and value heads of 12"}


@pytest.mark.parametrize("family", REFUSED)
def test_gguf_refuses_by_name_and_writes_nothing(family, tmp_path):
    out = tmp_path / "bundle"
    assert run("-q", "split", make_hf_checkpoint(family, tmp_path / "ckpt"), "-o", out).exit_code == 0
    before = (out / "manifest.json").read_bytes()
    r = run("lower", out, "--target", "gguf")
    assert r.exit_code == 2
    line = r.output.strip().splitlines()[-1]
    assert line.startswith(f"error: {out}: {FAMILIES[family][1]}") and REFUSED[family] in line, line
    assert (out / "manifest.json").read_bytes() == before and not (out / "gguf").exists()


def test_rows_not_a_multiple_of_32_fall_back_to_an_exact_float_and_say_so(tmp_path):
    """Hidden 48 (as the paper's 432): GGUF blocks are 32 wide, so every tensor with 48 columns is
    written as F16 where its values are exact in it, else F32 (llama.cpp's own quantizer falls back to
    F16 and rounds); the experts' down projection has 96 columns and stays Q4_0. The manifest and
    `inspect` list each fallback; llama.cpp still matches the bundle's math."""
    import transformers
    config = transformers.MixtralConfig(**{**COMMON, **FAMILIES["mixtral"][2], "hidden_size": 48})
    model = transformers.MixtralForCausalLM(config).eval()
    ckpt = tmp_path / "ckpt"
    model.save_pretrained(ckpt)
    fp32, q4 = tmp_path / "fp32", tmp_path / "q4"
    assert run("-q", "split", ckpt, "-o", fp32).exit_code == 0
    r = run("-q", "quantize", fp32, "-o", q4, "--expert-scheme", "int4", "--backbone-scheme", "int4")
    assert r.exit_code == 0, r.output
    lowered(q4)
    info = gguf_entry(q4)["gguf"]
    fell = {f["tensor"]: f for f in info["fallbacks"]}
    assert "blk.0.ffn_gate_exps.weight" in fell and "blk.0.ffn_down_exps.weight" not in fell
    assert all(f["type"] in ("F16", "F32") and "row length 48 is not a multiple of 32" in f["why"]
               for f in fell.values())
    got = tensors(q4)
    assert got["blk.0.ffn_down_exps.weight"].tensor_type == Q.Q4_0
    bundle = Bundle.open(q4)
    for name, t in got.items():  # every value exact, whatever the type
        if name.startswith("blk.0.ffn_gate_exps"):
            want = torch.stack([units.expert_weights(bundle, 0, e)["gate.weight"].dequantize()
                                for e in range(bundle.config.num_experts)])
            assert torch.equal(values(t), want)
    r = run("inspect", q4)
    assert r.exit_code == 0 and "gguf" in r.output and "blk.0.ffn_gate_exps.weight" in r.output, r.output
    ids = torch.tensor([[5, 17, 99, 3, 250, 42, 7, 7, 300, 1]])
    with LlamaCppRunner(bundle) as theirs:
        got_logits = theirs.logits(ids)
    assert (TorchRuntime(bundle).logits(ids) - got_logits).abs().max() < 0.25


# ---- verify and the release report -----------------------------------------------------------------
def test_verify_gates_llamacpp_as_every_backend(tiny, tmp_path):
    report = tmp_path / "r.json"
    r = run("verify", tiny["fp32"], "--reference", Path(__file__).parents[3] / "recipes/models/tiny-bles",
            "--backend", "llamacpp", "--new-tokens", "16", "--json", report)
    assert r.exit_code == 0, r.output
    (result,) = json.loads(report.read_text())["results"]
    assert result["backend"] == "llamacpp" and result["passed"]
    assert result["max_abs_logit_err"] < 1e-4 and result["greedy_match"] == 1.0
    assert result["decode_tok_s"] > 0 and result["peak_rss_mb"] > 0
    assert "llamacpp" in r.output and "PASS" in r.output


def test_llamacpp_takes_no_budget_and_needs_the_gguf(tiny, tmp_path):
    r = run("run", tiny["fp32"], "--prompt-ids", "1,2,3", "--backend", "llamacpp", "--experts-per-layer", "4")
    assert r.exit_code == 2 and "takes no expert budget" in r.output
    fresh = tmp_path / "fresh"
    assert run("-q", "quantize", tiny["fp32"], "-o", fresh, "--expert-scheme", "int8").exit_code == 0
    r = run("run", fresh, "--prompt-ids", "1,2,3", "--backend", "llamacpp")
    assert r.exit_code == 2 and "--target gguf" in r.output


def test_gpt_oss_as_released_says_what_llamacpp_computes_otherwise(tmp_path):
    """gpt-oss's own config has YaRN with truncate false, and llama.cpp rounds YaRN's correction range
    to whole dims (with it rounded, gpt_oss_rounded_yarn above matches to 1e-4): the manifest and
    `inspect` say so, and llama.cpp's logits differ from ours by that much, no more. Measured over our
    64 greedy tokens after a 10-token prompt (74 positions, logits up to 4.2): at most 0.035, top-1
    the same at 98.6 %, KL 1.2e-05 (greedy decoding parts at token 18: random weights leave margins
    that small)."""
    out = tmp_path / "bundle"
    assert run("-q", "split", make_hf_checkpoint("gpt_oss_released", tmp_path / "ckpt"), "-o", out).exit_code == 0
    lowered(out)
    (difference,) = gguf_entry(out)["gguf"]["differences"]
    assert difference.startswith("YaRN: llama.cpp rounds the correction range")
    r = run("inspect", out)
    assert r.exit_code == 0 and "llama.cpp computes otherwise: YaRN" in r.output, r.output
    bundle = Bundle.open(out)
    prompt_ids = [5, 17, 99, 3, 250, 42, 7, 7, 300, 1]
    with open_runner(bundle, backend="torch", torch_activations="fp32") as ours, LlamaCppRunner(bundle) as theirs:
        ids = torch.tensor([prompt_ids + ours.generate(prompt_ids, 64).tokens])
        want, got = ours.logits(ids), theirs.logits(ids)
    err = float((want - got).abs().max())
    agree = float((want.argmax(-1) == got.argmax(-1)).float().mean())
    p, q = torch.log_softmax(want, -1), torch.log_softmax(got, -1)
    kl = float((p.exp() * (p - q)).sum(-1).mean())
    assert 1e-4 < err < 0.1 and agree >= 0.95 and kl < 1e-4, (err, agree, kl)  # the rounding shows, and no more


def test_latent_attentions_kv_b_is_split_as_llamacpp_absorbs_it(tmp_path):
    """DeepSeek's kv_b [H * (nope + v), latent], int8: attn_v_b keeps each head's value rows as Q8_0 bit
    for bit; attn_k_b is each head's key rows transposed, so its blocks cannot be kv_b's: floats that hold
    every value exactly, recorded as a fallback. llama.cpp runs it near the bundle's math."""
    fp32, q8 = tmp_path / "fp32", tmp_path / "q8"
    assert run("-q", "split", make_hf_checkpoint("deepseek_v3", tmp_path / "ckpt"), "-o", fp32).exit_code == 0
    r = run("-q", "quantize", fp32, "-o", q8, "--expert-scheme", "int8", "--backbone-scheme", "int8")
    assert r.exit_code == 0, r.output
    lowered(q8)
    bundle = Bundle.open(q8)
    cfg = bundle.config
    heads, nope, v = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.v_head_dim
    got = tensors(q8)
    fell = {f["tensor"]: f for f in gguf_entry(q8)["gguf"]["fallbacks"]}
    for layer in range(cfg.num_hidden_layers):
        kv_b = units.backbone_weights(bundle)[f"layers.{layer}.attn.kv_b.weight"].dequantize()
        kv_b = kv_b.reshape(heads, nope + v, -1)  # [H, nope + v, latent]
        v_b, k_b = got[f"blk.{layer}.attn_v_b.weight"], got[f"blk.{layer}.attn_k_b.weight"]
        assert v_b.tensor_type == Q.Q8_0 and torch.equal(values(v_b), kv_b[:, nope:])
        assert torch.equal(values(k_b), kv_b[:, :nope].transpose(1, 2))
        assert "transposed for llama.cpp's MLA" in fell[f"blk.{layer}.attn_k_b.weight"]["why"]
    ids = torch.tensor([[5, 17, 99, 3, 250, 42, 7, 7, 300, 1]])
    with LlamaCppRunner(bundle) as theirs:
        got_logits = theirs.logits(ids)
    assert (TorchRuntime(bundle).logits(ids) - got_logits).abs().max() < 0.25


def test_qwen3_5s_reordered_tensors_keep_their_integers_where_their_rows_move(tmp_path, monkeypatch):
    """int8 Qwen3.5-MoE: q and its output gate interleaved per head, and the DeltaNet's value heads
    reordered by rows, stay Q8_0 (rows move whole); out_proj's columns move, so it is floats that hold
    every value, recorded as a fallback. The same file written with every tensor as exact floats holds
    the same values, and llama.cpp runs that one as our runtime runs the bundle (1e-4): the reordering
    is right on quantized weights too. (On the Q8_0 file llama.cpp's 8-bit activations, through the
    DeltaNet's gates, move logits by up to 2.4 here, top-1 0.90: measured, not gated.)"""
    fp32, q8, exact = tmp_path / "fp32", tmp_path / "q8", tmp_path / "exact"
    ckpt = make_hf_checkpoint("qwen3_5_moe_released", tmp_path / "ckpt")
    assert run("-q", "split", ckpt, "-o", fp32).exit_code == 0
    r = run("-q", "quantize", fp32, "-o", q8, "--expert-scheme", "int8", "--backbone-scheme", "int8")
    assert r.exit_code == 0, r.output
    shutil.copytree(q8, exact)
    lowered(q8)
    got = tensors(q8)
    fell = {f["tensor"]: f["why"] for f in gguf_entry(q8)["gguf"]["fallbacks"]}
    assert got["blk.1.attn_q.weight"].tensor_type == Q.Q8_0 and got["blk.0.attn_qkv.weight"].tensor_type == Q.Q8_0
    assert "value-head columns reordered" in fell["blk.0.ssm_out.weight"]
    monkeypatch.setattr(gguf_tensors, "_blocks", lambda w: None)  # every quantized tensor as exact floats
    lowered(exact)
    floats = tensors(exact)
    assert floats["blk.1.attn_q.weight"].tensor_type in (Q.F16, Q.F32)
    for name, t in got.items():
        assert torch.equal(values(t), values(floats[name])), name
    bundle = Bundle.open(exact)
    ids = torch.tensor([[5, 17, 99, 3, 250, 42, 7, 7, 300, 1]])
    with LlamaCppRunner(bundle) as theirs:
        got_logits = theirs.logits(ids)
    assert (TorchRuntime(bundle).logits(ids) - got_logits).abs().max() < 1e-4
