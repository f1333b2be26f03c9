"""Gates: which measured number must stay on which side of which threshold, as plain data.

``verify`` measures and gates its own run; ``build`` gates the measurements its verify stage
stored (thresholds are input to no stage, so a threshold change re-gates without measuring
again); ``report`` formats what was gated. No torch and no model code here: a recipe's reader
checks its gate names against this module.

A gate is ``{"name", "op", "threshold", "value", "passed"}``. A threshold whose metric was not
measured fails (value None): a gate never passes unseen.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Mapping
from typing import Any

from cosmoe_export.errors import CosmoeError
from runtime_py.backends import RESIDENT_ONLY

# Quality gates: verify's parity with the reference. Name -> how the value must compare with the threshold.
QUALITY = {"max_abs_logit_err": "<=", "top1_agreement": ">=", "greedy_match": ">=", "kl_mean": "<=",
           "ppl_increase": "<="}
# The quality gates measured on verify's text only (top-1 agreement falls back to the prompts).
ON_TEXT = ("kl_mean", "ppl_increase")
# Runtime gates: runtime_py.runner's metrics, measured by verify at the recipe's budget and policy.
# They have no defaults: a recipe sets them for the device class it targets.
RUNTIME = {"decode_tok_s": ">=", "prefill_ms": "<=", "peak_rss_mb": "<=", "expert_load_ms_p95": "<=",
           "loads_per_token": "<=", "hit_rate": ">=", "exrep": "<="}
OPS: dict[str, str] = {**QUALITY, **RUNTIME}  # every gate a recipe or `verify --gate` may set
# The runtime gates of an expert store: a backend that maps every expert itself (llama.cpp,
# runtime_py.backends.RESIDENT_ONLY) has no loads, hits or routing to measure, so they are not its gates.
STORE_GATES = ("expert_load_ms_p95", "loads_per_token", "hit_rate", "exrep")
COMPARE: dict[str, Callable[[float, float], bool]] = {"<=": operator.le, ">=": operator.ge}
OFF = "off"  # a threshold of "off" (recipe value, `--gate NAME=off`) switches a default gate off

# Thresholds by the bundle's precision (its fewest-bit tensor, precision_class). float: the
# foundation issue's parity gates. int8 / int4: docs/QUANTIZATION.md's quality targets (ppl within
# +0.5 % / +3 % of the float reference, top-1 agreement >= 99 % / 95 %). A quantized bundle's greedy
# continuation drifts after its first flipped token and its logits are off by design, so neither
# is gated there.
DEFAULTS: dict[str, dict[str, float]] = {
    "float": {"max_abs_logit_err": 1e-4, "top1_agreement": 1.0, "greedy_match": 1.0},
    "int8": {"top1_agreement": 0.99, "ppl_increase": 0.005},
    "int4": {"top1_agreement": 0.95, "ppl_increase": 0.03},
}
INTEGRITY = "integrity"  # one more gate of a build: files that differ from the manifest, must be 0


def precision_class(bundle: Any) -> str:
    """'float', or the scheme of a runtime_py Bundle's fewest-bit quantized tensor ('int8', 'int4')."""
    bits = [enc.bits for f in bundle.files for enc in (f.encodings() or {}).values() if enc.quantized]
    return "float" if not bits else "int4" if min(bits) <= 4 else "int8"


def thresholds(precision: str, overrides: Mapping[str, float | None] | None = None) -> dict[str, float]:
    """The defaults for ``precision``, overridden gate by gate (None switches one off)."""
    overrides = overrides or {}
    unknown = sorted(set(overrides) - set(OPS))
    if unknown:
        raise CosmoeError(f"unknown gate(s) {unknown}; gates are {list(OPS)}")
    merged: dict[str, float | None] = {**DEFAULTS[precision], **overrides}
    return {name: t for name, t in merged.items() if t is not None}


def check(name: str, value: float | None, threshold: float) -> dict[str, Any]:
    op = OPS[name]
    passed = value is not None and COMPARE[op](value, threshold)
    return {"name": name, "op": op, "threshold": threshold, "value": value, "passed": bool(passed)}


def evaluate(measured: Mapping[str, Any], limits: Mapping[str, float]) -> list[dict[str, Any]]:
    """Every threshold of ``limits`` against one backend's measurements (a resident-only backend's:
    every one but STORE_GATES)."""
    resident_only = measured.get("backend") in RESIDENT_ONLY
    return [check(name, measured.get(name), t) for name, t in limits.items()
            if not (resident_only and name in STORE_GATES)]


def integrity(problems: list[str]) -> dict[str, Any]:
    return {"name": INTEGRITY, "op": "==", "threshold": 0, "value": len(problems), "passed": not problems}
