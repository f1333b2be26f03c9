"""Benchmark: does ``cosmoe-export split`` stream? Peak RSS vs checkpoint size.

The claim (cosmoe_export/importers/split.py) is that split's peak memory is a constant (interpreter, torch,
transformers' config code) plus a few tensors' worth, however big the checkpoint is; the hard
bound checked here is looser, one decoder layer (what any layer-by-layer streamer must meet).

This script makes that visible: it writes synthetic Mixtral checkpoints of growing size (the
largest >= 2 GB by default) *without ever holding one in memory*, runs the real CLI on each in a
child process, and reports the child's peak RSS next to the checkpoint size, the largest tensor
and the largest layer.

Run it from the repository root (it needs about 2x the largest checkpoint in free disk space,
since the bundle is written next to it):

    .venv/bin/python bench/split_rss.py                      # 2- and 6-layer checkpoints (~0.8, ~2.2 GB)
    .venv/bin/python bench/split_rss.py --layers 8 --json rss.json --workdir /tmp/rss --keep

Exit status 1 if any run's peak RSS exceeds the bound, baseline + max(largest layer, largest
tensor) + slack (``--slack-mb``: heap the allocator keeps after freeing temporaries, and modules
the import-only baseline does not load), so the script can gate a release; it is still a
benchmark, not part of the test suite (a minute or more of disk I/O).

Numbers: ``peak RSS`` is the kernel's exact high-water mark for the child (``wait4`` rusage
ru_maxrss). ``anon``/``file`` peaks come from sampling /proc/PID/status every few ms and split
that RSS into heap (anonymous) and file-backed pages (memory-mapped safetensors): when a reader
leaks, the file column is where it shows.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # so `python bench/split_rss.py` finds the package without installing it

from cosmoe_export.st_writer import SafetensorsWriter  # noqa: E402

F32 = 4
# Everything the CLI imports before it reads a single weight: the "constant" part of the bound.
# transformers is included because the Mixtral adapter parses config.json with AutoConfig.
BASELINE_CODE = ("import torch, transformers, cosmoe_export.cli, cosmoe_export.importers.sources, "
                 "cosmoe_export.importers.split; from transformers import MixtralConfig")


# ---- synthetic checkpoint ------------------------------------------------------------------------
def mixtral_tensors(args: argparse.Namespace, layers: int) -> list[tuple[str, tuple[int, ...]]]:
    """(HF name, shape) of every tensor, in model order, with Mixtral's classic per-expert names."""
    d, f, hd = args.hidden, args.intermediate, args.hidden // args.heads
    out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (args.vocab, d))]
    for layer in range(layers):
        p = f"model.layers.{layer}"
        out += [(f"{p}.input_layernorm.weight", (d,)),
                (f"{p}.self_attn.q_proj.weight", (args.heads * hd, d)),
                (f"{p}.self_attn.k_proj.weight", (args.kv_heads * hd, d)),
                (f"{p}.self_attn.v_proj.weight", (args.kv_heads * hd, d)),
                (f"{p}.self_attn.o_proj.weight", (d, args.heads * hd)),
                (f"{p}.post_attention_layernorm.weight", (d,)),
                (f"{p}.block_sparse_moe.gate.weight", (args.experts, d))]
        for e in range(args.experts):
            x = f"{p}.block_sparse_moe.experts.{e}"
            out += [(f"{x}.w1.weight", (f, d)), (f"{x}.w2.weight", (d, f)), (f"{x}.w3.weight", (f, d))]
    out += [("model.norm.weight", (d,)), ("lm_head.weight", (args.vocab, d))]
    return out


def make_tensor(name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    # One generator per tensor, seeded by its name: the shard writer asks for tensors in its own
    # (sorted) order, and the checkpoint must be the same bytes whatever that order is.
    if name.endswith("norm.weight"):
        return torch.ones(shape)
    s = int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") >> 1
    return torch.randn(shape, generator=torch.Generator().manual_seed(s)) * shape[-1] ** -0.5


def write_checkpoint(ckpt: Path, args: argparse.Namespace, layers: int) -> list[tuple[str, tuple[int, ...]]]:
    """Sharded safetensors + index, one tensor in memory at a time."""
    ckpt.mkdir(parents=True)
    tensors = mixtral_tensors(args, layers)
    # Greedy packing in model order, like save_pretrained's max_shard_size: shard boundaries fall
    # inside layers, so the reader must cope with one layer spread over two files.
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in tensors:
        nbytes = math.prod(shape) * F32
        if shards[-1] and size + nbytes > args.shard_mb * 1e6:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        shapes = dict(shard)
        writer = SafetensorsWriter(ckpt / fname, {n: (torch.float32, s) for n, s in shard}, {"format": "pt"})
        for name in writer.order:
            writer.write(name, make_tensor(name, shapes[name], args.seed))
        writer.close()
        weight_map.update({n: fname for n, _ in shard})
    total = sum(math.prod(s) * F32 for _, s in tensors)
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (ckpt / "config.json").write_text(json.dumps({
        "architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "vocab_size": args.vocab,
        "hidden_size": args.hidden, "intermediate_size": args.intermediate, "num_hidden_layers": layers,
        "num_attention_heads": args.heads, "num_key_value_heads": args.kv_heads,
        "num_local_experts": args.experts, "num_experts_per_tok": 2, "hidden_act": "silu",
        "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 1e6, "sliding_window": None,
        "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float32"}, indent=2))
    return tensors


# ---- measuring a child ---------------------------------------------------------------------------
def _proc_rss(pid: int) -> tuple[int, int] | None:
    """(RssAnon, RssFile) in bytes, or None once the process is gone."""
    try:
        fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
        return int(fields["RssAnon"].split()[0]) * 1024, int(fields["RssFile"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None


def run_measured(cmd: list[str]) -> dict:
    """Run ``cmd``; its exact peak RSS (wait4 rusage, so no other child's peak can leak into it),
    sampled anon/file peaks, and wall time."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # the machine is shared
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    peaks = {"anon": 0, "file": 0}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            r = _proc_rss(proc.pid)
            if r:
                peaks["anon"], peaks["file"] = max(peaks["anon"], r[0]), max(peaks["file"], r[1])
            done.wait(0.005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    output = proc.stdout.read().decode(errors="replace")  # drain before reaping, or a chatty child blocks
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)  # we reaped it ourselves; tell Popen
    wall = time.perf_counter() - start
    done.set()
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed with exit code {proc.returncode}:\n{output}")
    return {"peak_rss": usage.ru_maxrss * 1024, "peak_anon": peaks["anon"], "peak_file": peaks["file"],
            "wall_s": wall}


def cli_command() -> list[str]:
    exe = Path(sys.executable).parent / "cosmoe-export"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "cosmoe_export.cli"]


# ---- report --------------------------------------------------------------------------------------
def mb(n: float) -> str:
    return f"{n / 1e6:,.0f} MB"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, nargs="+", default=[2, 6],
                    help="decoder layers of each checkpoint to try (default: 2 6; ~362 MB per layer)")
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--intermediate", type=int, default=3584)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=8192, help="kept modest so no single tensor dominates")
    ap.add_argument("--shard-mb", type=float, default=1000, help="max shard size, MB")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--slack-mb", type=float, default=64,
                    help="constant allowed above the import-only baseline (default 64 MB)")
    ap.add_argument("--min-gb", type=float, default=2.0, help="refuse unless the largest checkpoint is this big")
    ap.add_argument("--workdir", type=Path, default=None, help="where to write (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoints and bundles")
    ap.add_argument("--json", type=Path, default=None, help="also write the numbers to this file")
    args = ap.parse_args()
    torch.set_num_threads(1)  # generation runs next to other work on a 2-core machine

    per_layer = len(mixtral_tensors(args, 1)) - len(mixtral_tensors(args, 0))
    largest = max(math.prod(s) for _, s in mixtral_tensors(args, max(args.layers))) * F32
    if sum(math.prod(s) for _, s in mixtral_tensors(args, max(args.layers))) * F32 < args.min_gb * 1e9:
        ap.error(f"the largest checkpoint is under {args.min_gb} GB; add layers (or lower --min-gb)")

    work = args.workdir or Path(tempfile.mkdtemp(prefix="split-rss-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"workdir {work}", flush=True)
    baseline = run_measured([sys.executable, "-c", BASELINE_CODE])
    print(f"baseline (imports only): peak RSS {mb(baseline['peak_rss'])}", flush=True)
    runs = []
    try:
        for layers in args.layers:
            ckpt, out = work / f"mixtral-{layers}l", work / f"bundle-{layers}l"
            t0 = time.perf_counter()
            tensors = write_checkpoint(ckpt, args, layers)
            gen_s = time.perf_counter() - t0
            ckpt_bytes = sum(p.stat().st_size for p in ckpt.glob("*.safetensors"))
            layer_bytes = sum(math.prod(s) * F32 for _, s in tensors[1:1 + per_layer])
            print(f"{layers} layers: wrote {mb(ckpt_bytes)} in {gen_s:.0f} s; splitting...", flush=True)
            m = run_measured([*cli_command(), "-q", "split", str(ckpt), "-o", str(out)])
            bound = baseline["peak_rss"] + max(layer_bytes, largest) + args.slack_mb * 1e6
            runs.append({"layers": layers, "checkpoint_bytes": ckpt_bytes,
                         "shards": len(list(ckpt.glob("*.safetensors"))), "largest_tensor_bytes": largest,
                         "largest_layer_bytes": layer_bytes, **m,
                         "above_baseline": m["peak_rss"] - baseline["peak_rss"],
                         "rss_over_checkpoint": m["peak_rss"] / ckpt_bytes, "bound": bound,
                         "bounded": m["peak_rss"] <= bound})
            if not args.keep:  # free the disk before the next, bigger checkpoint
                shutil.rmtree(ckpt)
                shutil.rmtree(out)
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)

    print()
    print(f"{'layers':>6} {'ckpt':>9} {'largest tensor':>14} {'largest layer':>13} {'peak RSS':>9} "
          f"{'anon':>8} {'file':>8} {'-baseline':>9} {'RSS/ckpt':>8} {'wall':>6}  bounded")
    for r in runs:
        print(f"{r['layers']:>6} {mb(r['checkpoint_bytes']):>9} {mb(r['largest_tensor_bytes']):>14} "
              f"{mb(r['largest_layer_bytes']):>13} {mb(r['peak_rss']):>9} {mb(r['peak_anon']):>8} "
              f"{mb(r['peak_file']):>8} {mb(r['above_baseline']):>9} {r['rss_over_checkpoint']:>8.3f} "
              f"{r['wall_s']:>5.0f}s  {'yes' if r['bounded'] else 'NO'}")
    print(f"baseline (imports only) {mb(baseline['peak_rss'])}; bound = baseline + max(largest layer, largest "
          f"tensor) + {args.slack_mb:.0f} MB slack")
    if len(runs) > 1:  # the point of the benchmark: more checkpoint, (almost) no more memory
        small, big = min(runs, key=lambda r: r["checkpoint_bytes"]), max(runs, key=lambda r: r["checkpoint_bytes"])
        print(f"checkpoint {mb(small['checkpoint_bytes'])} -> {mb(big['checkpoint_bytes'])}: peak RSS "
              f"{mb(small['peak_rss'])} -> {mb(big['peak_rss'])} "
              f"({(big['peak_rss'] - small['peak_rss']) / 1e6:+,.0f} MB)")
    if args.json:
        args.json.write_text(json.dumps({"baseline": baseline, "runs": runs, "config": {
            k: getattr(args, k) for k in ("hidden", "intermediate", "experts", "heads", "kv_heads", "vocab",
                                          "shard_mb", "seed")}}, indent=2) + "\n")
    return 0 if all(r["bounded"] for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
