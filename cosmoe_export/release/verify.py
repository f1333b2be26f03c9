"""``verify``: run a bundle through runtime_py and compare it with the reference checkpoint.

The reference is transformers' own model for HF sources and our canonical model for CoSMoE
checkpoints and presets. When the bundle was split to a lower precision (bf16/fp16), the
reference's weights are rounded to that precision first, so the gate measures the split and the
runtime, not the rounding the user asked for.

A quantized bundle cannot match its float reference to 1e-4, by design; what matters is how much
of the model's behaviour survives. With ``text`` verify also measures, over the text's windows, the
statistics of cosmoe_export/release/quality.py (KL divergence from the reference's next-token
distributions, perplexities and their ratio, top-1 agreement, the top token's probability change);
a quantized bundle is gated on those (cosmoe_export/release/gates.py: defaults by the bundle's
precision, overridable gate by gate) and needs a text.

Two sources of error are told apart for a quantized bundle. ``bundle_math`` is the bundle's own
math (cosmoe_export/reference.TorchRuntime: dequantized weights, fp32 activations) against the
reference: what the weights lose. Each backend's ``vs_bundle`` is its kernels against that math:
what a kernel adds. The PyTorch backend runs the bundle's math exactly unless ``torch_activations``
is "bf16" (its fast int kernels round activations to bf16, which no device does; the program
backends' kernels are the device's and are measured as they are).

``measure`` runs the backends and the reference; ``verify`` measures and gates. ``build`` stores
``measure``'s numbers and gates them itself, so that a threshold change measures nothing again.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from cosmoe_export.errors import CosmoeError
from cosmoe_export.importers.sources import Source, open_source
from cosmoe_export.reference import TorchRuntime, fits_in_memory, float_bytes, rounded, source_model
from cosmoe_export.release import gates as gating
from cosmoe_export.release.quality import TextQuality
from cosmoe_export.text import batches, encode_file, windows
from runtime_py import format as fmt
from runtime_py.backends import BACKENDS as RUNTIME_BACKENDS
from runtime_py.backends import RESIDENT_ONLY, available_backends, require_backend
from runtime_py.bundle import Bundle
from runtime_py.native import NativeRunner
from runtime_py.runner import Runner, open_runner

# Fixed prompts: encoded with the bundle's tokenizer when it has one.
PROMPTS = [
    "The expert router picks two of eight experts for every token,",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "Offloading keeps only the experts in use on the phone, and",
]
# Every backend runs through runtime_py.runner.open_runner (program backends and native need
# `cosmoe-export lower` first, native also its C++ runner).
BACKENDS = (*RUNTIME_BACKENDS, "all")
# The backend whose greedy continuations the reference checks (_reference_outputs): the first of
# these that verify runs. Fastest first (docs/BENCHMARKS.md); the PyTorch backend's exact kernels
# (torch_activations fp32) dequantize every weight in every call: at OLMoE-1B-7B's widths, 82 % of
# its decode time in a profile.
DRAFT_ORDER = ("native", "executorch", "llamacpp", "torch", "onnxruntime")


def verify(*, bundle_path: Path, reference: str, gates: dict[str, float | None] | None = None,
           **options: Any) -> dict[str, Any]:
    """``measure`` (``options`` are its keywords), then every backend's gates (cosmoe_export/release/gates.py):
    the defaults for the bundle's precision overridden by ``gates`` (None switches one off)."""
    limits = gating.thresholds(gating.precision_class(Bundle.open(bundle_path)), gates)
    # Refused before anything runs. The defaults need no text but for quantized bundles, which
    # measure refuses without one.
    for name, threshold in (gates or {}).items():
        if name in gating.ON_TEXT and threshold is not None and options.get("text") is None:
            raise CosmoeError(f"gate {name} needs --text FILE: it is measured on a text")
    measured = measure(bundle_path=bundle_path, reference=reference, **options)
    for result in measured["results"]:
        checked = gating.evaluate(result, limits)
        result["gates"] = {g["name"]: {k: g[k] for k in ("value", "op", "threshold", "passed")} for g in checked}
        result["passed"] = all(g["passed"] for g in checked)
    return {"passed": all(r["passed"] for r in measured["results"]), **measured}


def measure(*, bundle_path: Path, reference: str, backend: str | Sequence[str] = "all", new_tokens: int = 32,
            text: Path | None = None, max_tokens: int | None = None, allow_pickle: bool = False,
            budget: int | None = None, experts_per_layer: int | None = None, policy: str = "lru",
            torch_activations: str = "fp32", progress: bool = False) -> dict[str, Any]:
    """Parity and quality of every requested backend (a name, a list of them, or "all") against the
    reference, each run through the runtime under ``budget`` (or ``experts_per_layer``) with
    ``policy``; the runtime's metrics (speed, memory, expert loads, ExRep) of the last prompt's
    generation go into each result. The reference runs once for all of them. No gates.
    A quantized bundle's report also holds ``bundle_math`` and each result its ``vs_bundle``."""
    for name in [backend] if isinstance(backend, str) else backend:
        if name not in BACKENDS:
            raise CosmoeError(f"unknown backend {name!r}; choose from {list(BACKENDS)}")
    bundle = Bundle.open(bundle_path)
    precision = gating.precision_class(bundle)
    if precision != "float" and text is None:
        raise CosmoeError(f"{bundle_path}: is quantized ({precision}); pass --text FILE so that verify can measure "
                          "perplexity and KL divergence against the float reference")
    source = open_source(reference, allow_pickle=allow_pickle, hash_files=False)
    if source.config != bundle.config:
        raise CosmoeError(f"{bundle_path}: its model config differs from {reference}'s; was it split from it?")
    dtype = fmt.dtype(bundle.backbone.dtype).torch
    text_ids = None
    if text is not None:
        ids = encode_file(bundle, text, max_tokens=max_tokens, purpose="verify --text")
        text_ids = windows(ids, bundle.config.max_position_embeddings)  # [B, T]
    # Larger than this process may hold: the reference and the bundle's math hold one layer at a time.
    streamed = not fits_in_memory(float_bytes(source))
    ref, reference_kind = _reference_model(source, dtype, streamed)
    prompts = _prompts(bundle, new_tokens)
    results = []
    names = _backends(bundle, backend)
    chunks = [] if text_ids is None else batches(text_ids, bundle.config.vocab_size)  # [b, T] each
    with_math = precision != "float"  # the bundle's own math: quantized bundles (they need a text)

    def runner(name: str) -> Runner | NativeRunner:
        budgeted = name not in RESIDENT_ONLY  # llama.cpp: every expert mapped, measured so
        return open_runner(bundle, backend=name, budget_bytes=budget if budgeted else None,
                           experts_per_layer=experts_per_layer if budgeted else None,
                           policy=policy, torch_activations=torch_activations)

    steps = new_tokens + len(chunks) * (1 + with_math) + len(names) * (len(prompts) + len(chunks))
    bar = tqdm(total=steps,
               desc="verify", unit="step", disable=not progress or None)  # None: off when stderr is not a terminal
    # The reference and the bundle's math run once for every backend, one after the other (each
    # holds a float backbone) and before any backend: their text log-probabilities wait on disk (a
    # streamed reference's forward reads the whole checkpoint; [b, T, V] is large at real vocabularies).
    with tempfile.TemporaryDirectory(prefix="cosmoe-verify-") as scratch:
        bar.set_postfix_str("reference")
        forwards = bar.n
        with runner(min(names, key=DRAFT_ORDER.index)) as drafter:  # drafts: fewer reference forwards
            wanted = _reference_outputs(ref, prompts, new_tokens, lambda ids, n: drafter.generate(ids, n).tokens,
                                        bar.update)
        bar.update(max(0, new_tokens - (bar.n - forwards)))
        lp_ref = LogProbs(ref, chunks, Path(scratch) / "reference", bar.update)
        del ref  # a streamed model's embedding and head are resident: they go before the next model comes
        lp_math, bundle_math = None, None
        if with_math:
            bar.set_postfix_str("bundle math")
            lp_math = LogProbs(TorchRuntime(bundle, stream_experts=streamed).logits, chunks,
                               Path(scratch) / "bundle-math", bar.update)
            bundle_math = _text_metrics(chunks, lp_ref, lp_math)[0]
        for name in names:
            bar.set_postfix_str(name)
            with runner(name) as run:
                results.append(_measure(name, run, bundle, prompts, wanted, new_tokens, chunks, lp_ref, precision,
                                        lp_math, bar.update))
    bar.close()
    report = {
        "bundle": str(bundle_path),
        "reference": reference,
        "reference_kind": reference_kind,
        "prompts": len(prompts),
        "new_tokens": new_tokens,
        "policy": policy,
    }
    if text is not None:
        report["text"] = {"file": str(text), "tokens": int(text_ids.numel()), "windows": int(text_ids.shape[0])}
    report["torch_activations"] = torch_activations
    if bundle_math is not None:
        report["bundle_math"] = bundle_math
    report["results"] = results
    return report


def _backends(bundle: Bundle, backend: str | Sequence[str]) -> list[str]:
    """'all': the PyTorch runtime plus every backend whose programs the bundle holds (native: when its
    runner is installed); names: each of them, or the error that says what it needs."""
    if backend == "all":
        return available_backends(bundle)
    names = [backend] if isinstance(backend, str) else list(dict.fromkeys(backend))
    for name in names:
        require_backend(bundle, name)
    return names


# Draft: a backend's greedy continuation of a prefix, ``n`` tokens long.
Draft = Callable[[list[int], int], list[int]]


def _reference_outputs(ref: torch.nn.Module, prompts: list[list[int]], new_tokens: int,
                       draft: Draft | None = None,
                       step: Callable[[], Any] = lambda: None) -> list[tuple[torch.Tensor, list[int]]]:
    """For each prompt: the reference's logits [1, T, V] over it and its greedy tokens, by full
    recomputation (no cache, so independent of any runtime's KV cache).

    A streamed reference reads the whole checkpoint in every forward, so forwards are what to save.
    All prompts go through each forward together, right-padded (causal: padding changes no earlier
    position). With ``draft``, each forward also checks a draft continuation of every prefix at once,
    speculative decoding's way: where the draft agrees with the reference's argmax so far, the
    reference's next token at that position is its free-running one, so a forward accepts the
    agreeing run plus the reference's own next token. The tokens are the reference's free-running
    greedy tokens whatever the drafts say; the drafts decide only how many forwards it takes (one
    per token without them, one in all for a draft that never disagrees)."""
    tokens: list[list[int]] = [[] for _ in prompts]
    logits: list[torch.Tensor | None] = [None] * len(prompts)
    with torch.inference_mode():
        while True:
            todo = [i for i, t in enumerate(tokens) if len(t) < new_tokens or logits[i] is None]
            if not todo:
                return [(lg, t) for lg, t in zip(logits, tokens, strict=True)]
            step()
            drafts = {i: draft(prompts[i] + tokens[i], new_tokens - len(tokens[i]))
                      if draft is not None and len(tokens[i]) < new_tokens else [] for i in todo}
            seqs = [prompts[i] + tokens[i] + drafts[i] for i in todo]
            width = max(map(len, seqs))
            batch = torch.tensor([s + [0] * (width - len(s)) for s in seqs])  # [b, T]
            out = _logits(ref, batch)  # [b, T, V]
            for row, i in enumerate(todo):
                start = len(prompts[i])
                if logits[i] is None:
                    logits[i] = out[row:row + 1, :start].clone()  # [1, T, V]
                picks = out[row, start + len(tokens[i]) - 1:len(seqs[row])].argmax(-1).tolist()
                # picks holds one more than the draft: the reference's token after the whole draft.
                agree = next((k for k, d in enumerate(drafts[i]) if d != picks[k]), len(drafts[i]))
                tokens[i] += picks[:agree + 1][:new_tokens - len(tokens[i])]


def _measure(backend: str, runtime: Runner | NativeRunner, bundle: Bundle, prompts: list[list[int]],
             wanted: list[tuple[torch.Tensor, list[int]]], new_tokens: int, chunks: list[torch.Tensor],
             lp_ref: LogProbs, precision: str, lp_math: LogProbs | None,
             step: Callable[[], Any] = lambda: None) -> dict[str, Any]:
    """One backend's row of the report: parity on the prompts (and the text's ``chunks``, against the
    reference's log-probabilities and the bundle's math's when given), its loads."""
    max_err, agree, positions, greedy_equal = 0.0, 0, 0, 0
    with torch.inference_mode():
        for ids, (want, ref_tokens) in zip(prompts, wanted, strict=True):
            step()
            x = torch.tensor([ids])
            got = runtime.logits(x)  # [1, T, V], as want
            max_err = max(max_err, float((want - got).abs().max()))
            agree += int((want.argmax(-1) == got.argmax(-1)).sum())
            positions += x.shape[1]
            generation = runtime.generate(ids, new_tokens)
            got_tokens = generation.tokens
            greedy_equal += sum(a == b for a, b in zip(ref_tokens, got_tokens, strict=True))
    result: dict[str, Any] = {
        "backend": backend,
        "dtype": bundle.backbone.dtype,
        "precision": precision,
        "max_abs_logit_err": max_err,
        "top1_agreement": agree / positions,
        "greedy_match": greedy_equal / (new_tokens * len(prompts)),
    }
    if chunks:
        # Over the text, top-1 agreement counts many more positions than the prompts: it replaces theirs.
        quality, vs_bundle = _text_metrics(chunks, lp_ref, _log_probs(runtime.logits, chunks, step), lp_math)
        result.update(quality)
        if vs_bundle is not None:
            result["vs_bundle"] = {k: vs_bundle[k] for k in VS_BUNDLE}
    result.update({k: v for k, v in generation.metrics.items() if k != "backend"})
    return result


def _logits(model: Callable[[torch.Tensor], Any], ids: torch.Tensor) -> torch.Tensor:
    """ids [b, T] -> fp32 logits [b, T, V], a tensor the caller may overwrite (a fresh one from every
    model and runtime here)."""
    out = model(ids)
    return (out.logits if hasattr(out, "logits") else out).float().contiguous()


# What a backend's kernels add to the bundle's math, in its result's ``vs_bundle``.
VS_BUNDLE = ("top1_agreement", "kl_mean", "kl_p99", "kl_max", "ppl_increase")


class LogProbs:
    """A model's log-probabilities [b, T, V] at every position of the text's batches, computed once
    and written to ``directory``; iterating reads them back mapped, a batch at a time."""

    def __init__(self, model: Callable[[torch.Tensor], Any], chunks: list[torch.Tensor], directory: Path,
                 step: Callable[[], Any] = lambda: None) -> None:
        directory.mkdir()
        self.paths = []
        for i, lp in enumerate(_log_probs(model, chunks, step)):
            self.paths.append(directory / f"{i}.pt")
            torch.save(lp, self.paths[-1])

    def __iter__(self) -> Iterator[torch.Tensor]:
        for path in self.paths:
            yield torch.load(path, mmap=True)


def _log_probs(model: Callable[[torch.Tensor], Any], chunks: list[torch.Tensor],
               step: Callable[[], Any] = lambda: None) -> Iterator[torch.Tensor]:
    with torch.inference_mode():
        for chunk in chunks:
            step()
            yield log_softmax_(_logits(model, chunk))  # [b, T, V]


def log_softmax_(logits: torch.Tensor, rows: int = 512) -> torch.Tensor:
    """log_softmax over the last dim written over ``logits`` itself, ``rows`` positions at a time: a
    window's [T, V] is 0.8 GB at 4,096 positions of a 50k vocabulary, and a second one is not needed.
    Each row's values are those of F.log_softmax (rows are independent)."""
    flat = logits.view(-1, logits.shape[-1])  # [b*T, V]
    for part in flat.split(rows):
        part.copy_(F.log_softmax(part, -1))
    return logits


def _text_metrics(chunks: list[torch.Tensor], lp_ref: Iterable[torch.Tensor], lp: Iterable[torch.Tensor],
                  lp_math: Iterable[torch.Tensor] | None = None) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The text's batches ``chunks`` [b, T] with the log-probabilities [b, T, V] of the reference, the
    model under test and the bundle's math (or None) at each -> (the model against the reference,
    against the bundle's math or None): cosmoe_export/release/quality.py's statistics."""
    quality, vs_math = TextQuality(), TextQuality() if lp_math is not None else None
    maths = iter(lp_math) if lp_math is not None else None
    for chunk, ref, got in zip(chunks, lp_ref, lp, strict=True):
        quality.add(ref, got, chunk)
        if vs_math is not None:
            vs_math.add(next(maths), got, chunk)
    return quality.summary(), None if vs_math is None else vs_math.summary()


def _reference_model(source: Source, dtype: torch.dtype, streamed: bool) -> tuple[torch.nn.Module, str]:
    """(the float reference, its kind for the report). transformers' model where the importer uses
    one and it fits in memory; else our canonical model, which the importer tests prove equal to
    it, streamed layer by layer when it does not fit (cosmoe_export/reference.py)."""
    if source.reference_is_transformers and not streamed:
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()
        model = AutoModelForCausalLM.from_pretrained(str(source.path), dtype=torch.float32)
        if dtype != torch.float32:
            with torch.no_grad():
                for p in model.parameters():
                    p.copy_(rounded(p, dtype))
        return model.eval(), "transformers"
    return source_model(source, dtype, streamed), "cosmoe-streamed" if streamed else "cosmoe"


def _prompts(bundle: Bundle, new_tokens: int) -> list[list[int]]:
    cfg = bundle.config
    limit = cfg.max_position_embeddings - new_tokens
    if limit < 2:
        raise CosmoeError(f"{bundle.root}: context {cfg.max_position_embeddings} is too short "
                          f"for {new_tokens} new tokens")
    tok_dir = bundle.tokenizer_dir
    if tok_dir is not None and (tok_dir / fmt.TOKENIZER_FILE).is_file():
        from tokenizers import Tokenizer
        tok = Tokenizer.from_file(str(tok_dir / fmt.TOKENIZER_FILE))
        encoded = [tok.encode(p).ids[:limit] for p in PROMPTS]
        if all(len(e) >= 2 and max(e) < cfg.vocab_size for e in encoded):
            return encoded
    # No usable tokenizer (random test checkpoints): fixed pseudo-random ids, same every run.
    g = torch.Generator().manual_seed(1234)
    return [torch.randint(0, cfg.vocab_size, (min(n, limit),), generator=g).tolist() for n in (5, 12, 24)]
