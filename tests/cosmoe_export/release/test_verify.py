"""cosmoe_export/release/verify.py's reference greedy: a streamed reference reads the whole
checkpoint in every forward (issue 16), so verify checks drafts in each forward and batches its
prompts; the tokens must stay the reference's free-running greedy tokens whatever the drafts."""

from __future__ import annotations

import random

import torch

from cosmoe_export.importers.sources import open_source
from cosmoe_export.reference import source_model
from cosmoe_export.release.verify import DRAFT_ORDER, _reference_outputs, log_softmax_
from runtime_py.backends import BACKENDS


def _free_running(model, ids: list[int], n: int) -> list[int]:
    """Greedy by full recomputation, one forward per token: what the reference's tokens mean."""
    seq = list(ids)
    with torch.inference_mode():
        for _ in range(n):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    return seq[len(ids):]


def test_reference_greedy_is_the_free_running_greedy_whatever_the_drafts(hf_checkpoint):
    source = open_source(str(hf_checkpoint("mixtral")), hash_files=False)
    ref = source_model(source, streamed=True)
    vocab, n = source.config.vocab_size, 12
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, vocab, (length,), generator=g).tolist() for length in (3, 7, 12)]
    want = {tuple(p): _free_running(ref, p, n) for p in prompts}
    passes = []  # the streamed model's passes over the checkpoint
    ref.layers[0].register_forward_pre_hook(lambda m, a: passes.append(1))

    def perfect(prefix: list[int], k: int) -> list[int]:
        prompt = next(p for p in want if tuple(prefix[:len(p)]) == p)
        return want[prompt][len(prefix) - len(prompt):][:k]

    rng = random.Random(0)
    drafts = {
        "none": None,
        "perfect": perfect,
        "random": lambda prefix, k: [rng.randrange(vocab) for _ in range(k)],
        "right for 3 tokens, then wrong": lambda prefix, k: perfect(prefix, 3) + [vocab - 1 - t for t in
                                                                               perfect(prefix, k)[3:]],
    }
    forwards, steps = {}, []
    for name, draft in drafts.items():
        passes.clear()
        steps.clear()
        got = _reference_outputs(ref, prompts, n, draft, lambda: steps.append(1))
        assert len(steps) == len(passes), name  # one step per forward
        forwards[name] = len(steps)
        assert [tokens for _, tokens in got] == [want[tuple(p)] for p in prompts], name
        for (logits, _), p in zip(got, prompts, strict=True):  # the prompt's own logits, padded or not
            with torch.inference_mode():
                torch.testing.assert_close(logits, ref(torch.tensor([p])), rtol=1e-5, atol=1e-5)
    # all prompts in every forward: one per token without drafts, one in all with a draft never wrong
    assert forwards["none"] == n and forwards["perfect"] == 1
    assert forwards["right for 3 tokens, then wrong"] == n // 4  # each forward: 3 drafted + 1 of its own
    assert 1 <= forwards["random"] <= n


def test_every_backend_can_draft():
    assert sorted(DRAFT_ORDER) == sorted(BACKENDS)  # a new backend must be ranked


def test_log_softmax_in_place_equals_log_softmax():
    """verify overwrites a window's logits with their log-probabilities, a few positions at a time."""
    logits = torch.randn(2, 37, 1000, generator=torch.Generator().manual_seed(0)) * 10
    want = torch.nn.functional.log_softmax(logits, -1)
    got = log_softmax_(logits, rows=5)  # 74 positions: 14 slices of 5 and one of 4
    assert got.data_ptr() == logits.data_ptr() and torch.equal(got, want)
