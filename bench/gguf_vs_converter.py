"""Our GGUF next to llama.cpp's own converter's, of the same checkpoint, on `llama-bench`.

The checkpoint is docs/BENCHMARKS.md's Mixtral at hidden 512 (bench/native.py's: 8 layers, 8
experts top-2, FFN 1280, vocab 32,000, random weights, a byte-level BPE tokenizer trained on
../shared/data), where llama.cpp block-quantizes every tensor. Per precision:

- ours: bench/native.py's bundle (`split` -> `quantize`, round to nearest, group 32, experts and
  backbone) -> `lower --target gguf`, so Q4_0 / Q8_0 hold the bundle's integers bit for bit;
- theirs: llama.cpp's `convert_hf_to_gguf.py` (f32) -> `llama-quantize Q4_0 / Q8_0`, which also picks its
  own types for some tensors (e.g. Q6_K for the output head at Q4_0).

Both run in the same `llama-bench` binary (bench/llamacpp.py builds it from the pinned sdist), one
after the other in one run, so the ratio is the number to read. Prints a Markdown table.

    .venv/bin/python bench/gguf_vs_converter.py                 # first run builds llama-bench (~15 min on 2 cores)
    .venv/bin/python bench/gguf_vs_converter.py --tokens 64 --json build/bench-native/gguf.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import llamacpp  # noqa: E402  (bench/llamacpp.py)
import native  # noqa: E402  (bench/native.py: the checkpoint, its bundles and the converter's GGUFs)

HIDDEN = 512
PRECISIONS = ("int4", "int8")  # -> native.GGUF_TYPE: Q4_0, Q8_0


def ours(bits: str) -> Path:
    """native.bundle's int4 / int8 bundle of the checkpoint, lowered to GGUF."""
    bundle = native.bundle(HIDDEN, bits, lower=False)
    if not (bundle / "gguf" / "model.gguf").exists():
        subprocess.run([str(native.EXPORT), "-q", "lower", str(bundle), "--target", "gguf"], check=True)
    return bundle / "gguf" / "model.gguf"


def types(model: Path) -> str:
    from gguf import GGUFReader  # the venv's gguf-py 0.19.0: the sdist's own copy
    counts = Counter(t.tensor_type.name for t in GGUFReader(str(model)).tensors)
    return ", ".join(f"{n} {t}" for t, n in sorted(counts.items()))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=native.THREADS)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    llamacpp.build()
    rows = []
    for bits in PRECISIONS:
        for who, model in (("cosmoe-export lower --target gguf", ours(bits)),
                           ("convert_hf_to_gguf.py + llama-quantize", native.gguf(HIDDEN, bits))):
            cores = llamacpp.wait_for_idle()
            m = llamacpp.bench(model, tokens=args.tokens, threads=args.threads)
            rows.append({"precision": native.GGUF_TYPE[bits], "gguf": who, "file_mb": model.stat().st_size / 1e6,
                         "tensor_types": types(model), "others_cores_before": cores, **m})
    print(f"| precision | GGUF | file MB | tensors | llama-bench tg{args.tokens} tok/s | peak RSS MB |")
    print("|---|---|---:|---|---:|---:|")
    for r in rows:
        print(f"| {r['precision']} | {r['gguf']} | {r['file_mb']:.1f} | {r['tensor_types']} | "
              f"{r['decode_tok_s']:.1f} ± {r['decode_tok_s_stddev']:.1f} | {r['peak_rss_mb']:.0f} |")
    print()
    for bits in PRECISIONS:
        a, b = (r["decode_tok_s"] for r in rows if r["precision"] == native.GGUF_TYPE[bits])
        print(f"{native.GGUF_TYPE[bits]}: ours / the converter's = {a / b:.2f}x")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
