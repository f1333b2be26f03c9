"""Our GGUF next to llama.cpp's own converter's, of the same checkpoint, on `llama-bench`.

The checkpoint is a Mixtral at hidden 512 (the shape where llama.cpp block-quantizes every tensor,
docs/BENCHMARKS.md) with vocab 32,000 and random weights, made here with transformers. Per precision:

- ours: `split` -> `quantize` (round to nearest, group 32; experts and backbone) -> `lower --target gguf`,
  so Q4_0 / Q8_0 hold the bundle's integers bit for bit;
- theirs: llama.cpp's `convert_hf_to_gguf.py` (f32) -> `llama-quantize Q4_0 / Q8_0`, which also picks its
  own types for some tensors (e.g. Q6_K for the output head at Q4_0).

Both run in the same `llama-bench` binary (bench/llamacpp.py builds it from the pinned sdist), one
after the other in one run, so the ratio is the number to read. Prints a Markdown table.

    .venv/bin/python bench/gguf.py                 # first run builds llama-bench (~15 min on 2 cores)
    .venv/bin/python bench/gguf.py --tokens 64 --json build/bench/gguf.json
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
from runtime import BENCH, PEER_SHAPE  # noqa: E402  (bench/runtime.py)

CLI = [str(Path(sys.executable).parent / "cosmoe-export")]
SHAPE = {**PEER_SHAPE, "hidden_size": 512, "intermediate_size": 1536}  # rows a multiple of 32 everywhere
PRECISIONS = {"Q4_0": "int4", "Q8_0": "int8"}


def sh(*args: str) -> None:
    print("+", " ".join(args), file=sys.stderr, flush=True)
    subprocess.run([*CLI, "-q", *args], check=True)


def checkpoint(out: Path) -> Path:
    if not (out / "config.json").exists():
        import torch
        from transformers import MixtralConfig, MixtralForCausalLM
        torch.manual_seed(0)
        MixtralForCausalLM(MixtralConfig(**SHAPE)).save_pretrained(out)
    return out


def ours(ckpt: Path, qtype: str) -> Path:
    fp32, bundle = BENCH / "gguf-h512-fp32", BENCH / f"gguf-h512-{qtype}"
    if not (fp32 / "manifest.json").exists():
        sh("split", str(ckpt), "-o", str(fp32), "--dtype", "fp32", "--force")
    scheme = PRECISIONS[qtype]
    if not (bundle / "manifest.json").exists():
        sh("quantize", str(fp32), "-o", str(bundle), "--expert-scheme", scheme, "--backbone-scheme", scheme,
           "--group-size", "32", "--force")
    if not (bundle / "gguf" / "model.gguf").exists():
        sh("lower", str(bundle), "--target", "gguf")
    return bundle / "gguf" / "model.gguf"


def theirs(ckpt: Path, qtype: str) -> Path:
    f32 = llamacpp.convert(ckpt, BENCH / "gguf-h512-converter-f32.gguf")
    return llamacpp.quantize(f32, BENCH / f"gguf-h512-converter-{qtype}.gguf", qtype)


def types(model: Path) -> str:
    sys.path.insert(0, str(llamacpp.source() / "gguf-py"))
    from gguf import GGUFReader  # type: ignore[import-not-found]
    counts = Counter(t.tensor_type.name for t in GGUFReader(str(model)).tensors)
    return ", ".join(f"{n} {t}" for t, n in sorted(counts.items()))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    BENCH.mkdir(parents=True, exist_ok=True)
    ckpt = checkpoint(BENCH / "mixtral-h512")
    llamacpp.build()
    rows = []
    for qtype in PRECISIONS:
        for who, model in (("cosmoe-export lower --target gguf", ours(ckpt, qtype)),
                           ("convert_hf_to_gguf.py + llama-quantize", theirs(ckpt, qtype))):
            cores = llamacpp.wait_for_idle()
            m = llamacpp.bench(model, tokens=args.tokens, threads=args.threads)
            rows.append({"precision": qtype, "gguf": who, "file_mb": model.stat().st_size / 1e6,
                         "tensor_types": types(model), "others_cores_before": cores, **m})
    print(f"| precision | GGUF | file MB | tensors | llama-bench tg{args.tokens} tok/s | peak RSS MB |")
    print("|---|---|---:|---|---:|---:|")
    for r in rows:
        print(f"| {r['precision']} | {r['gguf']} | {r['file_mb']:.1f} | {r['tensor_types']} | "
              f"{r['decode_tok_s']:.1f} ± {r['decode_tok_s_stddev']:.1f} | {r['peak_rss_mb']:.0f} |")
    for qtype in PRECISIONS:
        a, b = (r["decode_tok_s"] for r in rows if r["precision"] == qtype)
        print(f"\n{qtype}: ours / converter's = {a / b:.2f}x", end="")
    print()
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
