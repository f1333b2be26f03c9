"""The tiny-model recipe: tokenizer, a few training steps, deterministic checkpoints that the
exporter reads. Never retrains the shipped models; it only checks that they load."""

from __future__ import annotations

import json
import random
import runpy
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from cosmoe_export.importers.sources import open_source
from cosmoe_export.training import train as T
from runtime_py.config import param_counts, tensor_shapes

ROOT = Path(__file__).resolve().parents[3]
MODELS = ROOT / "recipes" / "models"


def write_corpus(out: Path, chars: int = 60_000, seed: int = 0) -> Path:
    """A small synthetic Python-like corpus from a seeded grammar: fixed for a given seed (the
    tests must not drift when the repository's files change), learnable in a few steps, and varied
    enough to fill a 512-token BPE vocabulary."""
    rng = random.Random(seed)
    syllables = ["ex", "pert", "rou", "ter", "to", "ken", "lay", "er", "ca", "che", "blo", "ck", "sha", "rd",
                 "wei", "ght", "mer", "ge", "vic", "tion", "spl", "it", "que", "ry"]
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 3))) for _ in range(300)]
    parts, size = [], 0
    while size < chars:
        f, a, b, c = (rng.choice(words) for _ in range(4))
        part = (f"def {f}({a}, {b}={rng.randint(0, 99)}):\n    \"\"\"Return the {c} of {a}.\"\"\"\n"
                f"    return {a}.{c}({b}) + {rng.randint(0, 9)}\n\n")
        parts.append(part)
        size += len(part)
    out.write_text("".join(parts)[:chars])
    return out


def make_tiny_checkpoint(tmp: Path, variant: str = "bles", *, steps: int = 3, seed: int = 0,
                         name: str | None = None) -> Path:
    """A few steps of the recipe on a small corpus: vocab 512, context 64, batch 2."""
    torch.set_num_threads(1)
    corpus = write_corpus(tmp / "corpus.txt")
    tok = T.train_tokenizer([corpus], 512)
    ids = T.encode_corpus(tok, [corpus])
    eot = tok.token_to_id(T.EOT)
    config = T.tiny_config(variant, vocab_size=tok.get_vocab_size(), bos_token_id=eot, eos_token_id=eot, context=64)
    tc = T.TrainConfig(variant=variant, seed=seed, steps=steps, batch_size=2, warmup=2,
                       bles_weight=1.0 if variant == "bles" else 0.0)
    result = T.train(config, ids, tc, log_every=1)
    out = tmp / (name or f"tiny-{variant}")
    T.save_checkpoint(out, result.model, tok, recipe={"train": T.train_config_dict(tc), "log": result.log})
    return out


def test_tokenizer_byte_level_round_trip(tmp_path):
    tok = T.train_tokenizer([write_corpus(tmp_path / "c.txt")], 512)
    assert tok.get_vocab_size() == 512
    assert tok.token_to_id(T.EOT) == 0
    # Bytes never seen in the corpus still encode (byte alphabet), and decoding is lossless.
    for s in ["def f(x):\n    return x ** 2  # squared\n", "naïve café ✓ 数", "  leading spaces\ttabs\n\n"]:
        assert tok.decode(tok.encode(s).ids) == s
    assert tok.decode([0, *tok.encode("hi").ids], skip_special_tokens=False).startswith(T.EOT)


def test_wd_is_parameter_aligned_with_moe():
    moe = T.tiny_config("moe", vocab_size=4096, bos_token_id=0, eos_token_id=0)
    wd = T.tiny_config("wd", vocab_size=4096, bos_token_id=0, eos_token_id=0)
    assert wd.expert_kind == "wd" and moe.expert_kind == "standard"
    assert param_counts(wd).per_expert == param_counts(moe).per_expert == 3 * 128 * 256
    assert param_counts(wd).total == param_counts(moe).total


def test_bles_weight_only_for_bles():
    with pytest.raises(ValueError, match="bles variant only"):
        T.TrainConfig(variant="moe", bles_weight=1.0)
    with pytest.raises(ValueError, match="variant"):
        T.TrainConfig(variant="dense")


def test_training_lowers_the_loss(tmp_path):
    torch.set_num_threads(1)
    corpus = write_corpus(tmp_path / "c.txt")
    tok = T.train_tokenizer([corpus], 512)
    ids = T.encode_corpus(tok, [corpus])
    config = T.tiny_config("bles", vocab_size=512, bos_token_id=0, eos_token_id=0, context=64)
    tc = T.TrainConfig(variant="bles", steps=30, batch_size=4, warmup=5, bles_weight=1.0)
    log = T.train(config, ids, tc, log_every=10).log
    assert [e["step"] for e in log] == [10, 20, 30]
    assert {"ce", "lb", "bles", "total"} <= set(log[0])
    assert log[-1]["ce"] < log[0]["ce"] - 0.5


@pytest.mark.parametrize("variant", T.VARIANTS)
def test_checkpoint_loads_as_source(tmp_path, variant):
    ckpt = make_tiny_checkpoint(tmp_path, variant)
    src = open_source(str(ckpt))
    assert src.config.expert_kind == ("wd" if variant == "wd" else "standard")
    assert src.config.bos_token_id == src.config.eos_token_id == 0
    assert list(src.plan) == list(tensor_shapes(src.config))
    assert {p.name for p in src.tokenizer_files} == {"tokenizer.json", "tokenizer_config.json"}
    with safe_open(str(ckpt / T.WEIGHTS_NAME), framework="pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}


def test_rebuild_is_byte_identical(tmp_path):
    for d in "abc":
        (tmp_path / d).mkdir()
    a, b = make_tiny_checkpoint(tmp_path / "a"), make_tiny_checkpoint(tmp_path / "b")
    c = make_tiny_checkpoint(tmp_path / "c", seed=1)
    names = sorted(p.name for p in a.iterdir())
    assert names == ["config.json", "model.safetensors", "recipe.json", "tokenizer.json", "tokenizer_config.json"]
    for n in names:
        assert (a / n).read_bytes() == (b / n).read_bytes(), n
    assert (a / T.WEIGHTS_NAME).read_bytes() != (c / T.WEIGHTS_NAME).read_bytes()


def test_recipe_script(tmp_path, monkeypatch):
    corpus = write_corpus(tmp_path / "c.txt")
    out = tmp_path / "m"
    argv = ["train_tiny.py", "--variant", "wd", "--corpus", str(corpus), "--out", str(out), "--steps", "2",
            "--batch-size", "1", "--vocab-size", "512", "--context", "32"]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(ROOT / "recipes" / "train_tiny.py"), run_name="__main__")
    assert exit_info.value.code == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["CosmoeForCausalLM"] and cfg["expert_kind"] == "wd"
    assert json.loads((out / "recipe.json").read_text())["train"]["steps"] == 2


@pytest.mark.parametrize("variant", T.VARIANTS)
def test_shipped_models_load(variant):
    """The committed fixture models (never retrained here) load and match their recipe."""
    path = MODELS / f"tiny-{variant}"
    assert path.is_dir(), f"{path} is missing: the fixture models are committed, never built by tests"
    src = open_source(str(path), hash_files=False)
    recipe = json.loads((path / "recipe.json").read_text())
    assert recipe["train"]["variant"] == variant
    assert src.config == T.tiny_config(variant, vocab_size=src.config.vocab_size, bos_token_id=0, eos_token_id=0,
                                       context=recipe["context"])
    assert (recipe["train"]["bles_weight"] > 0) == (variant == "bles")
