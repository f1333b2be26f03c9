"""Decode speed, memory and expert swaps of runtime_py, per backend, precision and policy.

Writes the tables of docs/BENCHMARKS.md. Every configuration runs in a fresh process (so peak RSS
is that configuration's), greedy, after a 20-token prompt. Models:

- ``wearable``: a Mixtral-architecture checkpoint at the paper's wearable shape with the peers'
  vocabulary (19 layers, hidden 432, 8 experts top-2, FFN 1280, vocab 32000; random weights, made
  here with transformers) -- the shape ../shared/BACKEND-FACTS.md measured llama.cpp and
  transformers on. fp32 bundle and int4-expert / int8-backbone bundle (round to nearest).
- ``tiny-bles`` / ``tiny-moe``: the committed trained fixtures (recipes/models), fp32.

    .venv/bin/python bench/runtime.py                     # everything (first run lowers: ~30 min)
    .venv/bin/python bench/runtime.py --models tiny-bles tiny-moe --skip-peers
    .venv/bin/python bench/runtime.py --one BUNDLE torch lru 4   # one configuration, JSON on stdout

Artifacts go to build/bench/ and are reused when present.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "build" / "bench"
CLI = [str(Path(sys.executable).parent / "cosmoe-export")]
PROMPT = [(7 * i + 3) % 1000 + 10 for i in range(20)]  # fixed ids, valid in every vocabulary here
BACKENDS = ("torch", "executorch", "onnxruntime")
PEER_SHAPE = dict(vocab_size=32000, hidden_size=432, intermediate_size=1280, num_hidden_layers=19,
                  num_attention_heads=8, num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2,
                  max_position_embeddings=2048, rope_theta=500000.0, tie_word_embeddings=False)


def sh(*args: str) -> None:
    print("+", " ".join(args), file=sys.stderr, flush=True)
    subprocess.run([*CLI, "-q", *args], check=True, cwd=ROOT)


def make_peer_checkpoint(out: Path) -> Path:
    if not (out / "config.json").exists():
        import torch
        from transformers import MixtralConfig, MixtralForCausalLM
        torch.manual_seed(0)
        MixtralForCausalLM(MixtralConfig(**PEER_SHAPE)).save_pretrained(out)
    return out


def prepare(models: list[str]) -> dict[str, dict[str, Path]]:
    """model -> precision -> lowered bundle directory (built once, reused)."""
    out: dict[str, dict[str, Path]] = {}
    for model in models:
        src = make_peer_checkpoint(BENCH / "mixtral-wearable") if model == "wearable" \
            else ROOT / "recipes" / "models" / model
        fp32 = BENCH / ("wearable-fp32" if model == "wearable" else f"{model}-fp32")
        q4 = BENCH / ("wearable-q4" if model == "wearable" else f"{model}-q4")
        if not (fp32 / "manifest.json").exists():
            sh("split", str(src), "-o", str(fp32), "--dtype", "fp32", "--force")
        if not (q4 / "manifest.json").exists():
            sh("quantize", str(fp32), "-o", str(q4), "--expert-scheme", "int4", "--backbone-scheme", "int8", "--force")
        for bundle in (fp32, q4):
            targets = {f["target"] for f in json.loads((bundle / "manifest.json").read_text())["files"]
                       if f["role"] == "program"}
            if targets != {"executorch", "onnx"}:
                sh("lower", str(bundle), "--target", "all")
        out[model] = {"fp32": fp32, "int4/int8": q4}
    return out


def one(bundle: str, backend: str, policy: str, experts_per_layer: int | None, tokens: int) -> dict:
    """One configuration in this process: JSON metrics (plus the machine's read bandwidth)."""
    from runtime_py.bundle import Bundle
    from runtime_py.runner import Runner

    b = Bundle.open(bundle)
    policy, _, min_prob = policy.partition(":")  # "lru+prefetch:0": prefetch every guess
    extra = {"prefetch_min_prob": float(min_prob)} if min_prob else {}
    with Runner(b, backend=backend, policy=policy, experts_per_layer=experts_per_layer, **extra) as r:
        r.generate(PROMPT[:4], 4)  # warm-up: first calls pay one-time costs (kernels, page cache)
        g = r.generate(PROMPT, tokens)
        swap_ms = swap_in_ms(r)
    return {**g.metrics, "swap_in_ms_p50": swap_ms, "bandwidth_gbs": read_bandwidth_gbs()}


def swap_in_ms(r, rounds: int = 3) -> float:
    """Median time of one warm expert swap-in: every expert of layer 0 loaded once (page cache warm,
    first-load hash done), then loaded again ``rounds`` times each and released, as an eviction would."""
    e = r.config.num_experts
    for i in range(e):
        r.engine.release_expert(r.engine.load_expert(0, i))
    times = []
    for _ in range(rounds):
        for i in range(e):
            t = time.perf_counter()
            unit = r.engine.load_expert(0, i)
            times.append((time.perf_counter() - t) * 1e3)
            r.engine.release_expert(unit)
    return sorted(times)[len(times) // 2]


def read_bandwidth_gbs(nbytes: int = 256 << 20) -> float:
    """Memory read bandwidth of this machine, one core (numpy sum over a 256 MB array), best of 5."""
    import numpy as np
    a = np.ones(nbytes // 8)
    a.sum()
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        a.sum()
        best = min(best, time.perf_counter() - t)
    return nbytes / best / 1e9


_MEASURED: dict[tuple, dict] = {}


def measure(bundle: Path, backend: str, policy: str, experts_per_layer: int | None, tokens: int) -> dict:
    """One configuration in a fresh process (memoised: the tables share some rows)."""
    key = (str(bundle), backend, policy, experts_per_layer, tokens)
    if key not in _MEASURED:
        _MEASURED[key] = _measure(bundle, backend, policy, experts_per_layer, tokens)
    return _MEASURED[key]


def _measure(bundle: Path, backend: str, policy: str, experts_per_layer: int | None, tokens: int) -> dict:
    args = [sys.executable, __file__, "--one", str(bundle), backend, policy, str(experts_per_layer or 0),
            "--tokens", str(tokens)]
    p = subprocess.run(args, capture_output=True, text=True, cwd=ROOT)
    if p.returncode:
        raise SystemExit(f"{' '.join(args)} failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def transformers_generate(checkpoint: Path, tokens: int) -> dict:
    code = f"""
import json, time, torch, resource
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained({str(checkpoint)!r}, dtype=torch.float32).eval()
ids = torch.tensor([{PROMPT}])
m.generate(ids[:, :4], max_new_tokens=4, do_sample=False)
with torch.inference_mode():
    t = time.perf_counter(); out = m(ids, use_cache=True); prefill = time.perf_counter() - t
    t = time.perf_counter()
    m.generate(ids, max_new_tokens={tokens}, min_new_tokens={tokens}, do_sample=False)
    total = time.perf_counter() - t
print(json.dumps({{"decode_tok_s": ({tokens} - 1) / (total - prefill), "prefill_ms": prefill * 1e3,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3}}))
"""
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    if p.returncode:
        raise SystemExit(p.stderr[-3000:])
    return json.loads(p.stdout.strip().splitlines()[-1])


def fmt(x: float | None, spec: str = ".1f") -> str:
    return "-" if x is None else format(x, spec)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--one", nargs=4, metavar=("BUNDLE", "BACKEND", "POLICY", "EXPERTS_PER_LAYER"))
    ap.add_argument("--models", nargs="+", default=["wearable", "tiny-bles", "tiny-moe"])
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--skip-peers", action="store_true", help="Do not run transformers' generate.")
    ap.add_argument("--out", type=Path, default=None, help="Write the markdown tables here too.")
    ap.add_argument("--tables", nargs="+", choices=["resident", "offload", "swap"],
                    default=["resident", "offload", "swap"])
    args = ap.parse_args()
    if args.one:
        bundle, backend, policy, epl = args.one
        print(json.dumps(one(bundle, backend, policy, int(epl) or None, args.tokens)))
        return

    bundles = prepare(args.models)
    lines = [f"Generated by `{' '.join(['.venv/bin/python', 'bench/runtime.py', *sys.argv[1:]])}` on "
             f"{os.cpu_count()} cores; greedy, {len(PROMPT)}-token prompt, {args.tokens} new tokens, torch threads "
             "default.", ""]

    if "resident" in args.tables:
        lines += resident_table(bundles, args)
    if "offload" in args.tables:
        lines += offload_table(bundles, args)
    if "swap" in args.tables:
        lines += swap_table(bundles, args)
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


def row(lines: list[str], *cells) -> None:
    """Append one markdown table row and show it as it is measured (a full run takes long)."""
    lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    print(lines[-1], file=sys.stderr, flush=True)


def resident_table(bundles: dict, args: argparse.Namespace) -> list[str]:
    lines = ["### Resident decode (all experts loaded up front)", "",
              "| model | precision | backend | decode tok/s | vs transformers | prefill ms | peak RSS MB |",
              "|---|---|---|---|---|---|---|"]
    for model, by_precision in bundles.items():
        peer = None
        if model == "wearable" and not args.skip_peers:
            peer = transformers_generate(BENCH / "mixtral-wearable", args.tokens)
            lines.append(f"| {model} | fp32 | transformers 5.23 `generate` | {peer['decode_tok_s']:.1f} | 1.00 | "
                         f"{peer['prefill_ms']:.0f} | {peer['peak_rss_mb']:.0f} |")
        for precision, bundle in by_precision.items():
            for backend in BACKENDS:
                m = measure(bundle, backend, "resident", None, args.tokens)
                ratio = f"{m['decode_tok_s'] / peer['decode_tok_s']:.2f}" if peer else "-"
                row(lines, model, precision, backend, fmt(m["decode_tok_s"]), ratio, f"{m['prefill_ms']:.0f}",
                    f"{m['peak_rss_mb']:.0f}")
    return [*lines, ""]


def offload_table(bundles: dict, args: argparse.Namespace) -> list[str]:
    """Offloading policies at backbone + 4 (2 for Eq. 8) experts per layer."""
    lines = ["### Offloaded decode by policy (fp32; budget = backbone + N experts per layer)", "",
              "| model | backend | policy | N | decode tok/s | vs resident | loads/token | hit rate | ExRep % | "
              "peak RSS MB | expert MB resident (max) |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for model in bundles:
        for backend in ("torch", "executorch", "onnxruntime"):
            base = measure(bundles[model]["fp32"], backend, "resident", None, args.tokens)
            for policy, n in [("paper", 2), ("lru", 4), ("lfu", 4), ("lru+prefetch", 4), ("lru+prefetch:0", 4)]:
                m = measure(bundles[model]["fp32"], backend, policy, n, args.tokens)
                row(lines, model, backend, policy, n, fmt(m["decode_tok_s"]),
                    f"{m['decode_tok_s'] / base['decode_tok_s']:.2f}", f"{m['loads_per_token']:.2f}",
                    f"{m['hit_rate']:.3f}", f"{m['exrep']:.1f}", f"{m['peak_rss_mb']:.0f}",
                    f"{m['resident_expert_bytes_max'] / 1e6:.1f}")
    return [*lines, ""]


def swap_table(bundles: dict, args: argparse.Namespace) -> list[str]:
    """Swap-in cost against the bytes at this machine's read bandwidth."""
    lines = ["### Expert swap-in vs memory bandwidth", "",
              "Warm swap-in: every expert of layer 0 loaded once (page cache warm, first-load sha256 done), "
              "then reloaded and released 3 times each; median. Loads during decode (policy paper, N = 2, "
              "first loads with their sha256 check included): p50/p95. Ideal: the shard's bytes at the read "
              "bandwidth measured in the same process (numpy, one core).", "",
              "| model | precision | backend | unit MB (resident) | shard MB | warm swap-in ms | ideal ms | "
              "ratio | decode loads ms p50 / p95 |", "|---|---|---|---|---|---|---|---|---|"]
    for model, by_precision in bundles.items():
        for precision, bundle in by_precision.items():
            for backend in BACKENDS:
                m = measure(bundle, backend, "paper", 2, args.tokens)
                shard = m["expert_bytes_loaded"] / max(1, m["expert_loads"])
                ideal = shard / (m["bandwidth_gbs"] * 1e9) * 1e3
                row(lines, model, precision, backend, f"{m['expert_unit_bytes'] / 1e6:.2f}", f"{shard / 1e6:.2f}",
                    f"{m['swap_in_ms_p50']:.2f}", f"{ideal:.2f}", f"{m['swap_in_ms_p50'] / ideal:.1f}",
                    f"{m['expert_load_ms_p50']:.2f} / {m['expert_load_ms_p95']:.2f}")
    return [*lines, ""]


if __name__ == "__main__":
    main()
