"""Benchmark: should the PyTorch backend run quantized weights with PyTorch's int kernels, or
dequantize them to fp32 when an expert loads?

For one weight matrix of each shape, one token (x [1, K]), one thread, it prints the best-of-7 time
(timeit's rule: on a shared machine the minimum is the cost without interference) of
    fp32 / bf16 F.linear                       (resident float weight)
    torch._weight_int8pack_mm                  (int8 codes + fp32 per-channel scales)
    torch._weight_int4pack_mm_for_cpu          (int4 packed by _convert_weight_to_int4pack_for_cpu)
    dequantize + F.linear every call           (keeps only the codes resident)
and the one-off costs paid when an expert loads: dequantize int8 / int4 to fp32, and the int4
kernel's own repacking. The decision rule it supports: time per token = compute of the resident
weights + loads per token x load cost, so a scheme must win on compute to be worth a costlier load.

    .venv/bin/python bench/quant_kernels.py                  # tiny fixture, wearable and phone shapes
    .venv/bin/python bench/quant_kernels.py --shapes 3840x1440 --threads 2 --json k.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from runtime_py import quant as Q  # noqa: E402

# N x K of one expert matrix: tiny fixtures (gate/up 256x128), wearable-moe (1280x432), BACKEND-FACTS'
# phone-sized expert (3840x1440).
DEFAULT_SHAPES = ("256x128", "1280x432", "3840x1440")


def best_ms(fn, min_time: float = 0.3, reps: int = 7) -> float:
    fn()  # warm-up (first-call allocation, lazy init)
    n, t0 = 1, time.perf_counter()
    while time.perf_counter() - t0 < min_time / reps:  # calibrate the inner loop to ~min_time/reps
        fn()
        n += 1
    runs = []
    for _ in range(reps):
        t = time.perf_counter()
        for _ in range(n):
            fn()
        runs.append((time.perf_counter() - t) / n * 1e3)
    return min(runs)


def bench_shape(n: int, k: int, group: int) -> dict[str, float]:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(n, k, generator=g) * k ** -0.5  # [N, K]
    x = torch.randn(1, k, generator=g)  # [1, K]
    e8 = Q.choose_encoding("int8", (n, k), group, "float32")
    e4 = Q.choose_encoding("int4", (n, k), group, "float32")
    c8, s8 = Q.quantize(w, e8)  # int8 [N, K], bf16 [N, 1]
    c4, s4 = Q.quantize(w, e4)  # uint8 [N, K/2], bf16 [N, K/G]
    s8_f = s8.float().view(-1)  # [N]
    g4 = e4.group_size
    kp = -(-k // g4) * g4  # the int4 kernel needs K % G == 0: pad with zero codes (exact)

    def repack() -> torch.Tensor:
        u = F.pad(Q.codes(c4, e4, k).to(torch.int32), (0, kp - k)) + 8  # [N, Kp] 0..15
        return torch._convert_weight_to_int4pack_for_cpu(u, 1)

    sz4 = torch.stack([s4.float().t().contiguous(), torch.zeros(kp // g4, n)], -1)  # [K/G, N, 2]
    w4_packed = repack()
    xp = F.pad(x, (0, kp - k))  # [1, Kp]
    w32, w16 = Q.dequantize(c4, s4, e4, k), w.to(torch.bfloat16)
    x16 = x.to(torch.bfloat16)
    with torch.inference_mode():
        return {
            "fp32_linear": best_ms(lambda: F.linear(x, w32)),
            "bf16_linear": best_ms(lambda: F.linear(x16, w16)),
            "int8pack_mm": best_ms(lambda: torch._weight_int8pack_mm(x, c8, s8_f)),
            "int4pack_mm": best_ms(lambda: torch._weight_int4pack_mm_for_cpu(xp, w4_packed, g4, sz4)),
            "int8_dequant_linear": best_ms(lambda: F.linear(x, Q.dequantize(c8, s8, e8, k))),
            "int4_dequant_linear": best_ms(lambda: F.linear(x, Q.dequantize(c4, s4, e4, k))),
            "load_int8_dequant": best_ms(lambda: Q.dequantize(c8, s8, e8, k)),
            "load_int4_dequant": best_ms(lambda: Q.dequantize(c4, s4, e4, k)),
            "load_int4_repack": best_ms(repack),
        }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=list(DEFAULT_SHAPES), help="NxK weight shapes.")
    ap.add_argument("--group-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = {}
    for shape in args.shapes:
        n, k = map(int, shape.split("x"))
        rows[shape] = bench_shape(n, k, args.group_size)
    names = list(next(iter(rows.values())))
    print(f"one token, {args.threads} thread(s), int4 group {args.group_size}; ms per call, best of 7")
    print(f"{'':22}" + "".join(f"{s:>12}" for s in rows))
    for name in names:
        print(f"{name:22}" + "".join(f"{rows[s][name]:12.4f}" for s in rows))
    if args.json:
        Path(args.json).write_text(json.dumps({"threads": args.threads, "group_size": args.group_size,
                                               "torch": torch.__version__, "ms": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
