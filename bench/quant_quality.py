"""Benchmark: quality vs bytes of every quantization scheme on one model (docs/QUANTIZATION.md).

For a float bundle and the checkpoint it was split from, it writes one quantized bundle per row
(cosmoe_export.quantization.quantize, the same code as the CLI) and verifies it against the checkpoint on the
evaluation text (cosmoe_export.release.verify): perplexity, its change, mean KL divergence, top-1
agreement, expert selections that change, and the bytes of the bundle and of one expert file.
The mixed-precision row gets the byte size of the all-int4 g32 row as its target. Prints a
Markdown table; --json keeps every number.

    .venv/bin/python bench/quant_quality.py --checkpoint recipes/models/tiny-bles --bundle /tmp/tiny-bles \
        --text ../shared/data/wikitext-2/test.txt --calibration ../shared/data/wikitext-2/valid.txt \
        --workdir /tmp/qq --json qq.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cosmoe_export.quantization.quantize import Calibration, QuantConfig, quantize  # noqa: E402
from cosmoe_export.release.verify import verify  # noqa: E402
from runtime_py.bundle import Bundle  # noqa: E402

# (row name, experts, backbone, group size, rounding)
ROWS = [
    ("int8 / int8, nearest", "int8", "int8", 32, "nearest"),
    ("int8 / int8, gptq", "int8", "int8", 32, "gptq"),
    ("int4 g32 / int8, nearest", "int4", "int8", 32, "nearest"),
    ("int4 g32 / int8, gptq", "int4", "int8", 32, "gptq"),
    ("int4 g64 / int8, gptq", "int4", "int8", 64, "gptq"),
    ("int4 g128 / int8, gptq", "int4", "int8", 128, "gptq"),
    ("auto @ int4 g32 size / int8, nearest", "auto", "int8", 32, "nearest"),
    ("auto @ int4 g32 size / int8, gptq", "auto", "int8", 32, "gptq"),
]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="The float reference the bundle was split from.")
    ap.add_argument("--bundle", type=Path, required=True, help="Its float bundle (cosmoe-export split).")
    ap.add_argument("--text", type=Path, required=True, help="Evaluation text.")
    ap.add_argument("--calibration", type=Path, required=True, help="Calibration text (GPTQ, auto).")
    ap.add_argument("--calibration-tokens", type=int, default=16384)
    ap.add_argument("--max-tokens", type=int, default=None, help="Evaluation tokens (default: all).")
    ap.add_argument("--workdir", type=Path, required=True)
    ap.add_argument("--rows", nargs="+", default=None, help="Only rows whose name contains one of these.")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    args.workdir.mkdir(parents=True, exist_ok=True)
    calibration = Calibration(args.calibration, args.calibration_tokens)
    src = Bundle.open(args.bundle)
    rows = []

    def measure(name: str, path: Path, seconds: float) -> dict:
        report = verify(bundle_path=path, reference=args.checkpoint, text=args.text, max_tokens=args.max_tokens,
                        new_tokens=8, gates={k: None for k in ("max_abs_logit_err", "top1_agreement", "greedy_match",
                                                               "ppl_increase")})
        r = report["results"][0]
        b = Bundle.open(path)
        sizes = [f.bytes for f in b.experts.values()]
        row = {"name": name, "bundle_bytes": sum(f.bytes for f in b.files),
               "expert_bytes": round(sum(sizes) / len(sizes)),
               "backbone_bytes": b.backbone.bytes, "ppl": r["ppl"], "ppl_ref": r["ppl_ref"],
               "ppl_increase": r["ppl_increase"], "kl_mean": r["kl_mean"], "top1_agreement": r["top1_agreement"],
               "tokens": report["text"]["tokens"], "quantize_s": seconds}
        if b.quantization and "mixed_precision" in b.quantization:
            row["counts"] = b.quantization["mixed_precision"]["counts"]
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
        return row

    measure("float (source)", args.bundle, 0.0)
    int4_bytes = None
    for name, experts, backbone, group, rounding in ROWS:
        if args.rows and not any(s in name for s in args.rows):
            continue
        out = args.workdir / name.replace(" ", "").replace("/", "_").replace(",", "-").replace("@", "at")
        target = int4_bytes if experts == "auto" else None
        if experts == "auto" and target is None:
            print(f"skip {name}: needs the int4 g32 row first", file=sys.stderr)
            continue
        cfg = QuantConfig(experts=experts, backbone=backbone, group_size=group, rounding=rounding,
                          calibration=calibration if (rounding == "gptq" or experts == "auto") else None,
                          target_bytes=target)
        t0 = time.perf_counter()
        quantize(bundle=args.bundle, out=out, config=cfg, force=True, progress=False)
        row = measure(name, out, time.perf_counter() - t0)
        if name == "int4 g32 / int8, nearest":
            int4_bytes = row["bundle_bytes"]

    print(f"\n{src.root} vs {args.checkpoint}; {rows[0]['tokens']:,} tokens of {args.text.name}; calibration "
          f"{args.calibration.name} ({args.calibration_tokens:,} tokens)\n")
    print("| experts / backbone, rounding | bundle MB | bytes per expert (mean) | ppl | Δppl | KL (nats) | top-1 |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        extra = (" (" + ", ".join(f"{n} ×{c}" for n, c in r["counts"].items() if c) + ")") if "counts" in r else ""
        print(f"| {r['name']}{extra} | {r['bundle_bytes'] / 1e6:.3f} | {r['expert_bytes']:,} | {r['ppl']:.2f} | "
              f"{100 * r['ppl_increase']:+.2f} % | {r['kl_mean']:.5f} | {100 * r['top1_agreement']:.2f} % |")
    if args.json:
        Path(args.json).write_text(json.dumps({"checkpoint": args.checkpoint, "bundle": str(args.bundle),
                                               "text": str(args.text), "calibration": str(args.calibration),
                                               "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
