"""The release report of a build: one document for every backend of a bundle (docs/REPORT.md).

``report.json`` (schema: docs/report.schema.json) holds parity, speed and memory, offloading, the
routing analysis, the memory-vs-speed curve, and every threshold with its measured value and
pass/fail; ``report.md`` is the same as tables a reviewer reads in a pull request.

Gates are evaluated here, from measurements alone, so a threshold change re-gates cached
measurements: quality gates (verify.GATE_OPS, defaults by the bundle's precision from
verify.DEFAULT_GATES) and runtime gates (RUNTIME_GATES) on every backend, plus the bundle's
integrity. A threshold whose metric was not measured fails: a gate never passes unseen.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from cosmoe_export.verify import DEFAULT_GATES, GATE_OPS
from runtime_py.bundle import Bundle

REPORT_VERSION = 1
# Runtime gates: the metric (runtime_py.runner metrics, measured by verify at the recipe's budget and
# policy) and the direction a value must keep from its threshold.
RUNTIME_GATES = {
    "decode_tok_s": ">=",
    "prefill_ms": "<=",
    "peak_rss_mb": "<=",
    "expert_load_ms_p95": "<=",
    "loads_per_token": "<=",
    "hit_rate": ">=",
    "exrep": "<=",
}
# Which section of a backend's row each measured key belongs to (the rest stays out of the report).
SECTIONS = {
    "parity": ("max_abs_logit_err", "top1_agreement", "greedy_match", "kl_mean", "ppl", "ppl_ref", "ppl_increase"),
    "runtime": ("prefill_ms", "decode_tok_s", "peak_rss_mb", "budget_bytes", "backbone_bytes", "expert_unit_bytes",
                "resident_expert_bytes_max", "expert_load_ms_p50", "expert_load_ms_p95", "policy"),
    "offloading": ("exrep", "hit_rate", "loads_per_token", "expert_loads", "expert_bytes_loaded"),
}
OPS: dict[str, Callable[[float, float], bool]] = {"<=": lambda v, t: v <= t, ">=": lambda v, t: v >= t}


# ---- gates -----------------------------------------------------------------------------------------
def thresholds(precision: str, overrides: dict[str, float | None]) -> dict[str, float]:
    """The defaults for the bundle's precision, overridden gate by gate (None switches one off)."""
    merged: dict[str, float | None] = {**DEFAULT_GATES[precision], **overrides}
    return {name: t for name, t in merged.items() if t is not None}


def gate(name: str, value: float | None, threshold: float) -> dict[str, Any]:
    op = GATE_OPS.get(name) or RUNTIME_GATES[name]
    passed = value is not None and OPS[op](value, threshold)
    return {"name": name, "op": op, "threshold": threshold, "value": value, "passed": bool(passed)}


def backend_row(result: dict[str, Any], limits: dict[str, float], programs: list[str]) -> dict[str, Any]:
    """One backend's measurements from verify, sorted into sections, with its gates evaluated."""
    row: dict[str, Any] = {"backend": result["backend"], "dtype": result["dtype"], "precision": result["precision"],
                           "programs": programs}
    for section, keys in SECTIONS.items():
        row[section] = {k: result[k] for k in keys if k in result}
    row["gates"] = [gate(name, result.get(name), t) for name, t in limits.items()]
    row["passed"] = all(g["passed"] for g in row["gates"])
    return row


# ---- the memory-vs-speed curve -----------------------------------------------------------------------
def budget_curve(*, bundle_path: Path, backends: Sequence[str], policy: str, prompt_ids: list[int],
                 new_tokens: int, repeats: int = 3, progress: bool = True) -> dict[str, Any]:
    """Decode tokens/s and loads per token at backbone + k experts per layer, k = top-k .. all experts,
    for each backend: how much memory buys how much speed. Each point is the median of ``repeats``
    generations after a warm-up (on a shared 2-core machine one run's speed varies 2-5x)."""
    from runtime_py.runner import open_runner

    bundle = Bundle.open(bundle_path)
    cfg = bundle.config
    ks = list(range(cfg.num_experts_per_tok, cfg.num_experts + 1))
    points = []
    bar = tqdm(total=len(ks) * len(backends), desc="budget curve", unit="run", disable=not progress or None)
    for backend in backends:
        for k in ks:
            with open_runner(bundle, backend=backend, experts_per_layer=k, policy=policy) as runner:
                # A short warm-up first: the first calls of a backend pay one-off costs (allocations,
                # kernel selection) that would otherwise land in the smallest budget's decode speed.
                runner.generate(prompt_ids, 2)
                runs = [runner.generate(prompt_ids, new_tokens).metrics for _ in range(repeats)]
            speeds = [m["decode_tok_s"] for m in runs if m["decode_tok_s"] is not None]
            points.append({"backend": backend, "experts_per_layer": k, "budget_bytes": runs[0]["budget_bytes"],
                           "decode_tok_s": float(np.median(speeds)) if speeds else None, "decode_tok_s_runs": speeds,
                           "loads_per_token": float(np.median([m["loads_per_token"] for m in runs])),
                           "hit_rate": float(np.median([m["hit_rate"] for m in runs])),
                           "peak_rss_mb": max(m["peak_rss_mb"] for m in runs)})
            bar.update(1)
    bar.close()
    return {"policy": policy, "prompt_tokens": len(prompt_ids), "new_tokens": new_tokens, "repeats": repeats,
            "points": points}


# ---- the document ------------------------------------------------------------------------------------
def make_report(*, recipe: dict[str, Any], bundle: dict[str, Any], integrity: list[str], verify: dict[str, Any],
                limits: dict[str, float], routing: dict[str, Any] | None, curve: dict[str, Any] | None,
                plots: list[str], stages: dict[str, Any], tools: dict[str, str]) -> dict[str, Any]:
    programs = bundle.pop("programs_by_backend")
    rows = [backend_row(r, limits, programs.get(r["backend"], [])) for r in verify["results"]]
    integrity_gate = {"name": "integrity", "op": "==", "threshold": 0, "value": len(integrity),
                      "passed": not integrity}
    report: dict[str, Any] = {
        "report_version": REPORT_VERSION,
        "passed": integrity_gate["passed"] and all(r["passed"] for r in rows),
        "recipe": recipe,
        "bundle": {**bundle, "integrity": {"problems": integrity, "gate": integrity_gate}},
        "verify": {k: verify[k] for k in ("reference", "reference_kind", "prompts", "new_tokens", "text",
                                          "budget", "experts_per_layer", "policy") if k in verify},
        "thresholds": limits,
        "backends": rows,
        "routing": routing,
        "budget_curve": curve,
        "plots": plots,
        "stages": stages,
        "tools": tools,
    }
    return report


def failed_gates(report: dict[str, Any]) -> list[str]:
    """'backend gate value op threshold' for every failed gate."""
    out = []
    g = report["bundle"]["integrity"]["gate"]
    if not g["passed"]:
        out.append(f"integrity: {g['value']} file(s) differ from the manifest")
    for row in report["backends"]:
        for g in row["gates"]:
            if not g["passed"]:
                value = "not measured" if g["value"] is None else _num(g["value"])
                out.append(f"{row['backend']} {g['name']}: {value}, needs {g['op']} {_num(g['threshold'])}")
    return out


def write_json(report: dict[str, Any], path: Path) -> None:
    path.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def markdown(report: dict[str, Any]) -> str:
    """report.md: what a reviewer reads in a pull request."""
    r, b = report, report["bundle"]
    verdict = "PASS" if r["passed"] else "FAIL"
    q = b.get("quantization")
    precision = (f"experts {q['experts']}, backbone {q['backbone']}, int4 group {q['group_size']}, "
                 f"rounding {q['rounding']}" if q else f"float ({b['dtype']})")
    lines = [f"# Release report: {r['recipe']['name']} — {verdict}", "",
             f"- bundle: `{b['path']}`, {b['files']} files, {b['bytes'] / 1e6:,.2f} MB, {precision}; "
             f"programs: {', '.join(b['targets']) or 'none'}",
             f"- source: `{b['source']}`; reference: `{r['verify'].get('reference')}`",
             f"- recipe: `{r['recipe']['file']}` (sha256 `{r['recipe']['sha256'][:12]}…`)",
             f"- integrity: every file re-hashed against the manifest: {_integrity(b['integrity']['problems'])}"]
    text = r["verify"].get("text")
    if text:
        lines.append(f"- verification text: {text['tokens']:,} tokens in {text['windows']} windows "
                     f"(sha256 `{text.get('sha256', '')[:12]}…`)")
    lines += ["", "## Gates", "", "| backend | gate | measured | threshold | result |", "|---|---|---:|---|---|"]
    for row in r["backends"]:
        for g in row["gates"]:
            value = "not measured" if g["value"] is None else _num(g["value"])
            lines.append(f"| {row['backend']} | {g['name']} | {value} | {g['op']} {_num(g['threshold'])} | "
                         f"{'pass' if g['passed'] else '**FAIL**'} |")
    lines += ["", "## Parity with the reference", "",
              "| backend | programs | max abs logit err | top-1 agreement | greedy match | KL (nats) | ppl | ppl ref "
              "| Δppl |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for row in r["backends"]:
        p = row["parity"]
        dppl = f"{100 * p['ppl_increase']:+.2f} %" if "ppl_increase" in p else "—"
        lines.append(f"| {row['backend']} | {', '.join(row['programs']) or 'torch'} | "
                     f"{_get(p, 'max_abs_logit_err', '.2e')} | {_get(p, 'top1_agreement', '.4f')} | "
                     f"{_get(p, 'greedy_match', '.3f')} | {_get(p, 'kl_mean', '.5f')} | {_get(p, 'ppl', '.2f')} | "
                     f"{_get(p, 'ppl_ref', '.2f')} | {dppl} |")
    lines += ["", f"## Speed, memory and offloading (policy {r['verify'].get('policy', '—')}, "
              f"budget: {_budget(r['verify'])})", "",
              "| backend | budget MB | prefill ms | decode tok/s | peak RSS MB | expert MB max | load ms p50 / p95 | "
              "ExRep % | hit rate | loads/token |", "|---|---:|---:|---:|---:|---:|---|---:|---:|---:|"]
    for row in r["backends"]:
        m, o = row["runtime"], row["offloading"]
        lines.append(f"| {row['backend']} | {_get(m, 'budget_bytes', 'MB')} | {_get(m, 'prefill_ms', '.1f')} | "
                     f"{_get(m, 'decode_tok_s', '.1f')} | {_get(m, 'peak_rss_mb', '.0f')} | "
                     f"{_get(m, 'resident_expert_bytes_max', 'MB')} | {_get(m, 'expert_load_ms_p50', '.2f')} / "
                     f"{_get(m, 'expert_load_ms_p95', '.2f')} | {_get(o, 'exrep', '.1f')} | "
                     f"{_get(o, 'hit_rate', '.3f')} | {_get(o, 'loads_per_token', '.2f')} |")
    curve = r.get("budget_curve")
    if curve:
        backends = list(dict.fromkeys(p["backend"] for p in curve["points"]))
        lines += ["", f"## Memory buys speed (policy {curve['policy']}, {curve['new_tokens']} new tokens)", "",
                  "| experts per layer | "
                  + " | ".join(f"{x} budget MB | {x} tok/s | {x} loads/token" for x in backends) + " |",
                  "|---:|" + "---:|---:|---:|" * len(backends)]
        for k in sorted({p["experts_per_layer"] for p in curve["points"]}):
            cells = []
            for x in backends:
                p = next(p for p in curve["points"] if p["backend"] == x and p["experts_per_layer"] == k)
                cells.append(f"{_get(p, 'budget_bytes', 'MB')} | {_get(p, 'decode_tok_s', '.1f')} | "
                             f"{_get(p, 'loads_per_token', '.2f')}")
            lines.append(f"| {k} | " + " | ".join(cells) + " |")
    routing = r.get("routing")
    if routing:
        lines += ["", f"## Routing (`analyze`, {routing['tokens']:,} tokens)", "",
                  "| layer | ExRep % | ΔUniform | loads/token (Eq. 8) |", "|---:|---:|---:|---:|"]
        for p in routing["per_layer"]:
            lines.append(f"| {p['layer']} | {p['exrep']:.2f} | {p['delta_uniform']:.2f} | {p['loads_per_token']:.3f} |")
        lines.append(f"| all | {routing['exrep']:.2f} | {routing['delta_uniform']:.2f} | "
                     f"{routing['loads_per_token']:.3f} |")
    if r["plots"]:
        lines += ["", "## Plots", ""] + [f"![{Path(p).stem}]({p})" for p in r["plots"]]
    lines += ["", "## Stages", "", "| stage | status | seconds |", "|---|---|---:|"]
    for name, s in r["stages"].items():
        lines.append(f"| {name} | {s['status']} | {s['seconds']:.1f} |")
    return "\n".join(lines) + "\n"


def _get(d: dict[str, Any], key: str, fmt: str) -> str:
    v = d.get(key)
    if v is None:
        return "—"
    if fmt == "MB":
        return f"{v / 1e6:,.2f}"
    return format(v, fmt)


def _budget(v: dict[str, Any]) -> str:
    if v.get("budget"):
        return str(v["budget"])
    if v.get("experts_per_layer"):
        return f"backbone + {v['experts_per_layer']} experts per layer"
    return "every expert resident"


def _integrity(problems: list[str]) -> str:
    return "no differences" if not problems else "DIFFERENCES: " + "; ".join(problems)


def _num(v: float) -> str:
    return f"{v:.4g}"
