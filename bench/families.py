"""Every imported family through every stage and backend: the full matrix that CI samples.

    .venv/bin/python bench/families.py [--family glm4_moe ...] [--precision fp32 ...] [--work DIR]

For each family's tiny checkpoint (tests/conftest.py FAMILIES, made with the transformers class
itself): split, quantize (--precision: fp32, int8, int4 g32 with round to nearest; default fp32 and
int4), lower --target all, and `verify`
on torch, executorch, onnxruntime and native with 2 experts per layer (LRU), against the
checkpoint through transformers. Prints one Markdown row per (family, precision): each backend's
max |logit error| vs transformers and its greedy match. About 2 minutes per family and precision
on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.conftest import FAMILIES, make_hf_checkpoint  # noqa: E402

BACKENDS = ("torch", "executorch", "onnxruntime", "native")
CLI = [str(ROOT / ".venv/bin/cosmoe-export"), "-q"]


def cli(*args: object) -> None:
    subprocess.run([*CLI, *map(str, args)], check=True, stdout=subprocess.DEVNULL)


def verify(bundle: Path, ckpt: Path, backend: str) -> dict:
    out = bundle.parent / f"{bundle.name}-{backend}.json"
    # Exit 1 is a failed gate (a quantized bundle is not within the float gates): still a result.
    r = subprocess.run([*CLI, "verify", str(bundle), "--reference", str(ckpt), "--backend", backend,
                        "--experts-per-layer", "2", "--policy", "lru", "--json", str(out)],
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if r.returncode not in (0, 1):
        return {"error": r.stderr.strip().splitlines()[-1]}
    return json.loads(out.read_text())["results"][0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--family", action="append", choices=sorted(FAMILIES))
    ap.add_argument("--precision", action="append", choices=["fp32", "int8", "int4"])
    ap.add_argument("--work", type=Path, default=None)
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="families-"))
    print("| family | precision | " + " | ".join(BACKENDS) + " |")
    print("|---|---|" + "---|" * len(BACKENDS))
    for family in args.family or sorted(FAMILIES):
        ckpt = make_hf_checkpoint(family, work / family / "ckpt")
        float_bundle = work / family / "fp32"
        cli("split", ckpt, "-o", float_bundle)
        for precision in args.precision or ["fp32", "int4"]:
            bundle = float_bundle if precision == "fp32" else work / family / precision
            if precision != "fp32":
                cli("quantize", float_bundle, "-o", bundle, "--expert-scheme", precision,
                    "--backbone-scheme", precision)
            cli("lower", bundle, "--target", "all")
            cells = []
            for backend in BACKENDS:
                r = verify(bundle, ckpt, backend)
                cells.append(r["error"] if "error" in r else
                             f"{r['max_abs_logit_err']:.1e}, greedy {r['greedy_match']:.2f}")
            print(f"| {family} | {precision} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
