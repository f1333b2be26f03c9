"""Every imported family through every stage and backend: the full matrix that CI samples.

    .venv/bin/python bench/families.py [--family glm4_moe ...] [--precision fp32 ...] [--work DIR]

For each family's tiny checkpoint (tests/conftest.py FAMILIES, made with the transformers class
itself): split, quantize (--precision: fp32, int8, int4 g32 with round to nearest; default fp32 and
int4), lower --target all, and run each backend (torch, executorch, onnxruntime, native) with 2
experts per layer (LRU) against the bundle's own math (import parity against transformers is CI's
test_importers.py). Prints one Markdown row per (family, precision): each backend's max |logit
error| over the largest logit, and whether its greedy tokens are the reference's. About 2 minutes
per family and precision on 2 cores.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cosmoe_export.reference import TorchRuntime  # noqa: E402
from runtime_py.bundle import Bundle  # noqa: E402
from runtime_py.runner import open_runner  # noqa: E402
from tests.conftest import FAMILIES, make_hf_checkpoint  # noqa: E402

BACKENDS = ("torch", "executorch", "onnxruntime", "native")
CLI = [str(ROOT / ".venv/bin/cosmoe-export"), "-q"]


def cli(*args: object) -> None:
    subprocess.run([*CLI, *map(str, args)], check=True, stdout=subprocess.DEVNULL)


def compare(bundle: Path, backend: str) -> str:
    """The backend against the bundle's own math (the PyTorch reference runtime: dequantized
    weights, fp32 activations): max |logit error| over the largest logit on a 16-token prompt, and
    whether 24 greedy tokens agree, with 2 experts per layer (LRU)."""
    b = Bundle.open(bundle)
    ids = torch.randint(0, b.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    want, greedy = TorchRuntime(b).logits(ids), TorchRuntime(b).greedy(ids, 24)
    with open_runner(b, backend=backend, experts_per_layer=2, policy="lru") as r:
        err = float((r.logits(ids) - want).abs().max()) / float(want.abs().max())
        same = r.generate(ids[0].tolist(), 24).tokens == greedy
    return f"{err:.1e}, greedy {'same' if same else 'differs'}"


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
            cells = [compare(bundle, backend) for backend in BACKENDS]
            print(f"| {family} | {precision} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
