"""``verify``: run a bundle through runtime_py and compare it with the reference checkpoint.

The reference is transformers' own model for HF sources and our canonical model for CoSMoE
checkpoints and presets. When the bundle was split to a lower precision (bf16/fp16), the
reference's weights are rounded to that precision first, so the gate measures the split and the
runtime, not the rounding the user asked for.

A quantized bundle cannot match its float reference to 1e-4, by design; what matters is how much
of the model's behaviour survives. With ``text`` verify also measures, over the text's windows,
the mean KL divergence of the next-token distributions from the reference's (``kl_mean``, nats),
both perplexities (``ppl``, ``ppl_ref``) and top-1 agreement; a quantized bundle is gated on those
(cosmoe_export/release/gates.py: defaults by the bundle's precision, overridable gate by gate) and needs a text.

``measure`` runs the backends and the reference; ``verify`` measures and gates. ``build`` stores
``measure``'s numbers and gates them itself, so that a threshold change measures nothing again.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from cosmoe_export.errors import CosmoeError
from cosmoe_export.importers.sources import Source, open_source
from cosmoe_export.release import gates as gating
from cosmoe_export.text import batches, encode_file, windows
from runtime_py import format as fmt
from runtime_py.backends import BACKENDS as RUNTIME_BACKENDS
from runtime_py.backends import available_backends, require_backend
from runtime_py.bundle import Bundle
from runtime_py.model import CosmoeForCausalLM
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
            progress: bool = False) -> dict[str, Any]:
    """Parity and quality of every requested backend (a name, a list of them, or "all") against the
    reference, each run through the runtime under ``budget`` (or ``experts_per_layer``) with
    ``policy``; the runtime's metrics (speed, memory, expert loads, ExRep) of the last prompt's
    generation go into each result. The reference runs once for all of them. No gates."""
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
    ref = _reference_model(source, dtype)
    prompts = _prompts(bundle, new_tokens)
    results = []
    names = _backends(bundle, backend)
    windows_n = 0 if text_ids is None else len(batches(text_ids, bundle.config.vocab_size))
    bar = tqdm(total=len(names) * (len(prompts) + windows_n), desc="verify", unit="step",
               disable=not progress or None)  # None: off when stderr is not a terminal
    for name in names:
        bar.set_postfix_str(name)
        with open_runner(bundle, backend=name, budget_bytes=budget, experts_per_layer=experts_per_layer,
                         policy=policy) as runner:
            results.append(_measure(name, runner, bundle, ref, prompts, new_tokens, text_ids, precision,
                                    bar.update))
    bar.close()
    report = {
        "bundle": str(bundle_path),
        "reference": reference,
        "reference_kind": "transformers" if source.reference_is_transformers else "cosmoe",
        "prompts": len(prompts),
        "new_tokens": new_tokens,
        "policy": policy,
    }
    if text is not None:
        report["text"] = {"file": str(text), "tokens": int(text_ids.numel()), "windows": int(text_ids.shape[0])}
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


def _measure(backend: str, runtime: Runner | NativeRunner, bundle: Bundle, ref: torch.nn.Module,
             prompts: list[list[int]], new_tokens: int, text_ids: torch.Tensor | None, precision: str,
             step: Callable[[], Any] = lambda: None) -> dict[str, Any]:
    """One backend's row of the report: parity on the prompts (and the text), its loads."""
    max_err, agree, positions, greedy_equal = 0.0, 0, 0, 0
    with torch.inference_mode():
        for ids in prompts:
            step()
            x = torch.tensor([ids])
            want = _logits(ref, x)  # [1, T, V]
            got = runtime.logits(x)  # [1, T, V]
            max_err = max(max_err, float((want - got).abs().max()))
            agree += int((want.argmax(-1) == got.argmax(-1)).sum())
            positions += x.shape[1]
            ref_tokens = _reference_greedy(ref, ids, new_tokens)
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
    if text_ids is not None:
        # Over the text, top-1 agreement counts many more positions than the prompts: it replaces theirs.
        result.update(_text_metrics(ref, runtime, text_ids, bundle.config.vocab_size, step))
    result.update({k: v for k, v in generation.metrics.items() if k != "backend"})
    return result


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    out = model(ids)
    return (out.logits if hasattr(out, "logits") else out).float()


def _text_metrics(ref: torch.nn.Module, runtime: Any, ids: torch.Tensor, vocab: int,
                  step: Callable[[], Any] = lambda: None) -> dict[str, float]:
    """ids [B, T] windows -> KL(ref || bundle) per position (mean, nats), top-1 agreement, perplexities."""
    kl_sum, agree, positions, nll_ref, nll_got, predicted = 0.0, 0, 0, 0.0, 0.0, 0
    with torch.inference_mode():
        for chunk in batches(ids, vocab):
            step()
            b, t = chunk.shape
            lp_ref = F.log_softmax(_logits(ref, chunk), -1)  # [b, T, V]
            lp_got = F.log_softmax(runtime.logits(chunk), -1)  # [b, T, V]
            kl_sum += float((lp_ref.exp() * (lp_ref - lp_got)).sum(-1).double().sum())
            agree += int((lp_ref.argmax(-1) == lp_got.argmax(-1)).sum())
            positions += b * t
            if t > 1:
                target = chunk[:, 1:, None]  # [b, T-1, 1]
                nll_ref -= float(lp_ref[:, :-1].gather(-1, target).double().sum())
                nll_got -= float(lp_got[:, :-1].gather(-1, target).double().sum())
                predicted += b * (t - 1)
    ppl, ppl_ref = math.exp(nll_got / max(1, predicted)), math.exp(nll_ref / max(1, predicted))
    return {"top1_agreement": agree / positions, "kl_mean": kl_sum / positions, "ppl": ppl, "ppl_ref": ppl_ref,
            "ppl_increase": ppl / ppl_ref - 1.0}


def _reference_model(source: Source, dtype: torch.dtype) -> torch.nn.Module:
    def rounded(t: torch.Tensor) -> torch.Tensor:
        return t.to(dtype).to(torch.float32)

    if source.reference_is_transformers:
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()
        model = AutoModelForCausalLM.from_pretrained(str(source.path), dtype=torch.float32)
        if dtype != torch.float32:
            with torch.no_grad():
                for p in model.parameters():
                    p.copy_(rounded(p))
        return model.eval()
    with torch.device("meta"):
        model = CosmoeForCausalLM(source.config)
    model.load_state_dict({k: rounded(v) for k, v in source.state_dict().items()}, assign=True, strict=True)
    from runtime_py.model import rope_inv_freq
    model.inv_freq = rope_inv_freq(source.config)
    return model.eval()


def _reference_greedy(model: torch.nn.Module, ids: list[int], new_tokens: int) -> list[int]:
    """Greedy decoding by full recomputation (no cache): independent of the runtime's KV cache."""
    seq = list(ids)
    for _ in range(new_tokens):
        out = model(torch.tensor([seq]))
        logits = out.logits if hasattr(out, "logits") else out
        seq.append(int(logits[0, -1].argmax()))
    return seq[len(ids):]


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
