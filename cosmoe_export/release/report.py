"""The release report of a build: one document for every backend of a bundle (docs/REPORT.md).

``report.json`` (schema: docs/report.schema.json) holds parity, speed and memory, offloading, the
routing analysis, the memory-vs-speed curve, and every threshold with its measured value and
pass/fail; ``report.md`` is the same as tables a reviewer reads in a pull request.

This module formats; it evaluates nothing. The gates (cosmoe_export/release/gates.py: quality and runtime
gates on every backend, plus the bundle's integrity) come evaluated by ``build`` from the stored
measurements, so a threshold change re-gates cached measurements.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

REPORT_VERSION = 1
# Which section of a backend's row each measured key belongs to (the rest stays out of the report).
SECTIONS = {
    "parity": ("max_abs_logit_err", "top1_agreement", "greedy_match", "kl_mean", "ppl", "ppl_ref", "ppl_increase",
               # cosmoe_export/release/quality.py's statistics, and what the kernels add to the bundle's math
               "top1_agreement_stderr", "near_tie_share", "top1_agreement_decided", "kl_mean_stderr", "kl_median",
               "kl_p99", "kl_max", "ppl_ratio", "ppl_ratio_stderr", "delta_p", "vs_bundle"),
    "runtime": ("prefill_ms", "decode_tok_s", "peak_rss_mb", "budget_bytes", "backbone_bytes", "expert_unit_bytes",
                "resident_expert_bytes_max", "expert_load_ms_p50", "expert_load_ms_p95", "policy"),
    "offloading": ("exrep", "hit_rate", "loads_per_token", "expert_loads", "expert_bytes_loaded"),
}


def backend_row(result: dict[str, Any], gates: list[dict[str, Any]], programs: list[str]) -> dict[str, Any]:
    """One backend's measurements from verify, sorted into sections, with its evaluated gates."""
    row: dict[str, Any] = {"backend": result["backend"], "dtype": result["dtype"], "precision": result["precision"],
                           "programs": programs}
    for section, keys in SECTIONS.items():
        row[section] = {k: result[k] for k in keys if k in result}
    row["gates"] = gates
    row["passed"] = all(g["passed"] for g in gates)
    return row


# ---- the document ------------------------------------------------------------------------------------
def make_report(*, recipe: dict[str, Any], bundle: dict[str, Any], integrity: list[str],
                integrity_gate: dict[str, Any], verify: dict[str, Any], limits: dict[str, float],
                gates: list[list[dict[str, Any]]], routing: dict[str, Any] | None, curve: dict[str, Any] | None,
                plots: list[str], stages: dict[str, Any], tools: dict[str, str]) -> dict[str, Any]:
    """``gates``: each of verify's results' evaluated gates, in order; ``limits``: the thresholds in force."""
    programs = bundle.pop("programs_by_backend")
    rows = [backend_row(r, g, programs.get(r["backend"], [])) for r, g in zip(verify["results"], gates, strict=True)]
    report: dict[str, Any] = {
        "report_version": REPORT_VERSION,
        "passed": integrity_gate["passed"] and all(r["passed"] for r in rows),
        "recipe": recipe,
        "bundle": {**bundle, "integrity": {"problems": integrity, "gate": integrity_gate}},
        "verify": {k: verify[k] for k in ("reference", "reference_kind", "prompts", "new_tokens", "text",
                                          "budget", "experts_per_layer", "policy", "torch_activations",
                                          "bundle_math") if k in verify},
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
    lines += _quality_table(r)
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
            lines.append(f"| {p['layer']} | {p['exrep']:.2f} | {p['delta_uniform']:.2f} | "
                         f"{p['eq8_loads_per_token']:.3f} |")
        lines.append(f"| all | {routing['exrep']:.2f} | {routing['delta_uniform']:.2f} | "
                     f"{routing['eq8_loads_per_token']:.3f} |")
    if r["plots"]:
        lines += ["", "## Plots", ""] + [f"![{Path(p).stem}]({p})" for p in r["plots"]]
    lines += ["", "## Stages", "", "| stage | status | seconds |", "|---|---|---:|"]
    for name, s in r["stages"].items():
        lines.append(f"| {name} | {s['status']} | {s['seconds']:.1f} |")
    return "\n".join(lines) + "\n"


def _quality_table(r: dict[str, Any]) -> list[str]:
    """The text's statistics (cosmoe_export/release/quality.py), the bundle's math first: what the
    weights lose, then each backend's kernels, and what those add to that math."""
    rows = [("bundle math", r["verify"]["bundle_math"], None)] if "bundle_math" in r["verify"] else []
    rows += [(row["backend"], row["parity"], row["parity"].get("vs_bundle")) for row in r["backends"]
             if "kl_median" in row["parity"]]
    if not rows:
        return []
    lines = ["", f"## Quality on the text (torch backend: {r['verify'].get('torch_activations', '—')} activations)", "",
             "| run | top-1 | top-1 decided | near-ties | KL mean | KL median | KL p99 | KL max | PPL ratio | Δp mean "
             "| Δp rms | Δp p1 / p99 | kernels vs bundle math: top-1 | KL mean |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|"]
    for name, q, vs in rows:
        dp = q["delta_p"]
        lines.append(f"| {name} | {q['top1_agreement']:.4f} ± {q['top1_agreement_stderr']:.4f} | "
                     f"{q['top1_agreement_decided']:.4f} | {100 * q['near_tie_share']:.1f} % | "
                     f"{q['kl_mean']:.2e} ± {q['kl_mean_stderr']:.1e} | {q['kl_median']:.2e} | {q['kl_p99']:.2e} | "
                     f"{q['kl_max']:.2e} | {q['ppl_ratio']:.4f} ± {q['ppl_ratio_stderr']:.4f} | "
                     f"{100 * dp['mean']:+.3f} % | {100 * dp['rms']:.3f} % | "
                     f"{100 * dp['p1']:+.2f} / {100 * dp['p99']:+.2f} % | "
                     + (f"{vs['top1_agreement']:.4f} | {vs['kl_mean']:.2e} |" if vs else "— | — |"))
    return lines


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
