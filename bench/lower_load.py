"""Load time of one lowered expert unit, per target and precision, at a given expert shape.

Loading is what an offloading runtime pays on every expert swap: ExecuTorch's
``load_program`` + ``load_method`` (XNNPACK packs the weights here) and ONNX Runtime's
``InferenceSession`` creation (initializers bound, MatMulNBits prepacked). Each is compared with
the time to read the unit's bytes at this machine's memory bandwidth (measured here with numpy).

    .venv/bin/python bench/lower_load.py                      # wearable-moe expert: 432 -> 1280
    .venv/bin/python bench/lower_load.py --hidden 1440 --ffn 3840 --repeats 5   # phone-moe

With ``--layer-bundle BUNDLE`` it measures a layer program instead (layer 0 of that bundle, on the
bundle's integers): export time and time per call of the T = 1 program the stage used to write
and of the dynamic-T program it writes now, at T = 1, 16 and max_tokens (prefill in one call).

    .venv/bin/python bench/lower_load.py --layer-bundle /tmp/h1/tb4
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from cosmoe_export.lower import units
from cosmoe_export.lower.targets import TARGETS
from cosmoe_export.lower.units import QuantWeight
from runtime_py import quant
from runtime_py.bundle import Bundle
from runtime_py.config import CosmoeConfig

SCHEMES = [("none", None), ("int8", None), ("int4", 32), ("int4", 128)]


def read_bandwidth_gbs(nbytes: int = 256 << 20) -> float:
    a = np.ones(nbytes // 8)
    a.sum()
    best = min(_timed(a.sum) for _ in range(5))
    return nbytes / best / 1e9


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def expert_weights(d: int, f: int, scheme: str, group: int | None) -> dict:
    g = torch.Generator().manual_seed(0)
    out = {}
    for name, shape in (("gate.weight", (f, d)), ("up.weight", (f, d)), ("down.weight", (d, f))):
        w = torch.randn(shape, generator=g) * shape[1] ** -0.5
        if scheme == "none":
            out[name] = w
        else:
            enc = quant.choose_encoding(scheme, shape, group or 32, "float32")
            stored, scales = quant.quantize(w, enc)
            out[name] = QuantWeight(quant.codes(stored, enc, shape[1]), scales.float(), enc)
    return out


def load_et(path: Path) -> float:
    from executorch.runtime import Runtime
    rt = Runtime.get()
    t = time.perf_counter()
    rt.load_program(str(path)).load_method("forward")
    return time.perf_counter() - t


def load_onnx(path: Path) -> float:
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    t = time.perf_counter()
    ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return time.perf_counter() - t


LOADERS = {"executorch": load_et, "onnx": load_onnx}


def _runner(target: str, path: Path):
    if target == "executorch":
        from executorch.runtime import Runtime
        method = Runtime.get().load_program(str(path)).load_method("forward")
        return lambda xs: method.execute(xs)
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return lambda xs: sess.run(None, {n: x.numpy() for n, x in zip(units.LAYER_INPUTS, xs, strict=True)})


def layer_tokens(bundle_path: str, repeats: int) -> None:
    """Export seconds and ms per call of layer 0: static T = 1 vs dynamic T (median of ``repeats`` calls)."""
    bundle = Bundle.open(bundle_path)
    cfg = bundle.config
    raw = units.backbone_weights(bundle)
    floats = units.dequantized(raw)
    p = units.max_tokens(cfg)
    print(f"{bundle_path} layer 0; median of {repeats} calls after 3; S = {cfg.max_position_embeddings}, P = {p}")
    print(f"{'target':<11}{'program':<10}{'precision':<20}{'export s':>9}  ms per call at T")
    with tempfile.TemporaryDirectory() as tmp:
        for name, target in sorted(TARGETS.items()):
            programs = (("T=1", units.layer_example_inputs(cfg, 1), None, (1,)),
                        ("T=1..P", units.layer_example_inputs(cfg), units.layer_dynamic_shapes(cfg), (1, 16, p)))
            for kind, inputs, shapes, ts in programs:
                unit = units.build_layer(cfg, floats, 0)
                precision = target.backbone_integers(unit, units.layer_linears(cfg, 0), raw)
                t = time.perf_counter()
                data = target.module(unit, inputs, shapes, units.LAYER_INPUTS, units.LAYER_OUTPUTS)
                export_s = time.perf_counter() - t
                path = Path(tmp) / f"{name}-{kind.replace('=', '')}{target.suffix}"
                path.write_bytes(data)
                run = _runner(name, path)
                cells = []
                for n in ts:
                    call = functools.partial(run, list(units.layer_example_inputs(cfg, n)))
                    for _ in range(3):
                        call()
                    cells.append(f"{n}: {statistics.median(_timed(call) for _ in range(repeats)) * 1e3:.2f}")
                print(f"{name:<11}{kind:<10}{precision:<20}{export_s:>9.2f}  " + ", ".join(cells))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=432)
    ap.add_argument("--ffn", type=int, default=1280)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--json", default=None)
    ap.add_argument("--layer-bundle", default=None, help="time a layer program of this bundle instead")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.layer_bundle:
        layer_tokens(args.layer_bundle, max(args.repeats, 20))
        return
    cfg = CosmoeConfig(vocab_size=16, hidden_size=args.hidden, num_hidden_layers=1, num_attention_heads=1,
                       num_key_value_heads=1, head_dim=2, intermediate_size=args.ffn)
    bw = read_bandwidth_gbs()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for scheme, group in SCHEMES:
            weights = expert_weights(args.hidden, args.ffn, scheme, group)
            for name, target in sorted(TARGETS.items()):
                t = time.perf_counter()
                data = target.expert(cfg, weights)
                lower_s = time.perf_counter() - t
                path = Path(tmp) / f"{name}-{scheme}-{group}{target.suffix}"
                path.write_bytes(data)
                LOADERS[name](path)  # warm the runtime itself
                times = [LOADERS[name](path) for _ in range(args.repeats)]
                ms = statistics.median(times) * 1e3
                byte_ms = len(data) / (bw * 1e9) * 1e3
                rows.append({"target": name, "precision": target.precision(weights),
                             "group": group, "bytes": len(data), "lower_s": round(lower_s, 2),
                             "load_ms_p50": round(ms, 2), "bytes_at_bandwidth_ms": round(byte_ms, 3),
                             "load_over_bytes": round(ms / byte_ms, 1)})
    print(f"expert {args.hidden} -> {args.ffn} -> {args.hidden}; read bandwidth {bw:.1f} GB/s; "
          f"median of {args.repeats} loads")
    print(f"{'target':<11}{'precision':<22}{'bytes':>11}{'lower s':>9}{'load ms':>9}{'bytes ms':>10}{'ratio':>7}")
    for r in rows:
        print(f"{r['target']:<11}{r['precision'] + ('/g' + str(r['group']) if r['group'] else ''):<22}"
              f"{r['bytes']:>11,}{r['lower_s']:>9.2f}{r['load_ms_p50']:>9.2f}{r['bytes_at_bandwidth_ms']:>10.3f}"
              f"{r['load_over_bytes']:>7.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"bandwidth_gbs": bw, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
