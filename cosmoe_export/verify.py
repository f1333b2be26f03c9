"""``verify``: run a bundle through runtime_py and compare it with the reference checkpoint.

The reference is transformers' own model for HF sources and our canonical model for CoSMoE
checkpoints and presets. When the bundle was split to a lower precision (bf16/fp16), the
reference's weights are rounded to that precision first, so the gate measures the split and the
runtime, not the rounding the user asked for.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cosmoe_export.errors import CosmoeError
from cosmoe_export.sources import Source, open_source
from runtime_py.bundle import Bundle
from runtime_py.model import CosmoeForCausalLM
from runtime_py.torch_backend import TorchRuntime

# Fixed prompts: encoded with the bundle's tokenizer when it has one.
PROMPTS = [
    "The expert router picks two of eight experts for every token,",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "Offloading keeps only the experts in use on the phone, and",
]
BACKENDS = ("torch",)


@dataclass(frozen=True)
class Gates:
    """Defaults for fp32 parity (the foundation issue); recipes override them later."""

    max_abs_logit_err: float = 1e-4
    min_top1_agreement: float = 1.0
    min_greedy_match: float = 1.0


def verify(*, bundle_path: Path, reference: str, backend: str = "torch", new_tokens: int = 32,
           gates: Gates = Gates(), allow_pickle: bool = False) -> dict[str, Any]:
    if backend not in BACKENDS:
        raise CosmoeError(f"backend {backend!r} is not available yet; choose from {list(BACKENDS)}")
    bundle = Bundle.open(bundle_path)
    source = open_source(reference, allow_pickle=allow_pickle, hash_files=False)
    if source.config != bundle.config:
        raise CosmoeError(f"{bundle_path}: its model config differs from {reference}'s; was it split from it?")
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[bundle.backbone.dtype]
    ref = _reference_model(source, dtype)
    runtime = TorchRuntime(bundle)
    prompts = _prompts(bundle, new_tokens)

    max_err, agree, positions, greedy_equal = 0.0, 0, 0, 0
    with torch.inference_mode():
        for ids in prompts:
            x = torch.tensor([ids])
            want = ref(x)
            want = (want.logits if hasattr(want, "logits") else want).float()  # [1, T, V]
            got = runtime.logits(x)  # [1, T, V]
            max_err = max(max_err, float((want - got).abs().max()))
            agree += int((want.argmax(-1) == got.argmax(-1)).sum())
            positions += x.shape[1]
            ref_tokens = _reference_greedy(ref, ids, new_tokens)
            got_tokens = runtime.greedy(x, new_tokens)
            greedy_equal += sum(a == b for a, b in zip(ref_tokens, got_tokens, strict=True))
    store = runtime.store
    result: dict[str, Any] = {
        "backend": backend,
        "dtype": bundle.backbone.dtype,
        "max_abs_logit_err": max_err,
        "top1_agreement": agree / positions,
        "greedy_match": greedy_equal / (new_tokens * len(prompts)),
        "expert_loads": store.loads,
        "expert_bytes_loaded": store.bytes_loaded,
    }
    result["gates"] = {
        "max_abs_logit_err": _gate(max_err, "<=", gates.max_abs_logit_err),
        "top1_agreement": _gate(result["top1_agreement"], ">=", gates.min_top1_agreement),
        "greedy_match": _gate(result["greedy_match"], ">=", gates.min_greedy_match),
    }
    result["passed"] = all(g["passed"] for g in result["gates"].values())
    return {
        "passed": result["passed"],
        "bundle": str(bundle_path),
        "reference": reference,
        "reference_kind": "transformers" if source.reference_is_transformers else "cosmoe",
        "prompts": len(prompts),
        "new_tokens": new_tokens,
        "results": [result],
    }


def _gate(value: float, op: str, threshold: float) -> dict[str, Any]:
    ok = value <= threshold if op == "<=" else value >= threshold
    return {"value": value, "op": op, "threshold": threshold, "passed": bool(ok)}


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
    if tok_dir is not None and (tok_dir / "tokenizer.json").is_file():
        from tokenizers import Tokenizer
        tok = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
        encoded = [tok.encode(p).ids[:limit] for p in PROMPTS]
        if all(len(e) >= 2 and max(e) < cfg.vocab_size for e in encoded):
            return encoded
    # No usable tokenizer (random test checkpoints): fixed pseudo-random ids, same every run.
    g = torch.Generator().manual_seed(1234)
    return [torch.randint(0, cfg.vocab_size, (min(n, limit),), generator=g).tolist() for n in (5, 12, 24)]
