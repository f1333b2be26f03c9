"""Benchmark: `split`, `quantize` (round to nearest, and GPTQ with calibration), `verify` and `analyze`
of a checkpoint several times larger than the memory the process is given complete, under a limit
the kernel enforces (issue 16's memory bound: backbone + one layer's experts + 1 GB).

The limit is RLIMIT_DATA (setrlimit in the child, no root needed): since Linux 4.7 it caps the
process's private writable memory (heap, anonymous mmaps, thread stacks), so a stage that loads a
checkpoint into memory dies with MemoryError / ENOMEM. One catch, measured here: the safetensors
library maps each file privately (copy-on-write), and the kernel charges such a map to the data limit
whole, so a shard bigger than the limit cannot even be opened. The checkpoint is therefore written in
shards of a quarter of the limit (split and quantize hold one or two shards open at a time); the
limit then binds what matters, the heap. Why not the others: `prlimit --as` caps address space, which
torch and mmap reserve far beyond use; cgroups here are v1, owned by the machine's supervisor, and
there is no systemd to delegate one (`systemd-run --scope -p MemoryMax` fails). Beside the limit it
prints peak RSS (wait4 rusage) split into anonymous (heap) and file-backed (mapped shards, which the
kernel can drop) from sampling /proc/PID/status: the anonymous peak is the number that must stay small.

    .venv/bin/python bench/memory_limit.py                      # 2560 MiB limit, checkpoint >= 2.5x that
    .venv/bin/python bench/memory_limit.py --limit-mb 768 --factor 3 --workdir /tmp/memlim

The checkpoint gets a byte-level BPE tokenizer trained here on ../shared/data/wikitext-2/valid.txt,
so that calibration, verify --text and analyze read real token ids (its test.txt is the text they
read). verify runs the int8 bundle on the PyTorch runtime at 2 experts per layer (a budget: the
runtime's own memory bound) against the checkpoint; the reference and the bundle's math stream
layer by layer because the model does not fit under the limit (cosmoe_export/reference.py).

Needs about 3.5x the checkpoint in free disk (checkpoint, bundle, two quantized bundles). Not part of CI.
"""

from __future__ import annotations

import argparse
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

import split_rss  # noqa: E402  (the synthetic Mixtral checkpoint writer, one tensor in memory at a time)

F32 = 4
DATA = ROOT.parent / "shared" / "data" / "wikitext-2"


def train_tokenizer(ckpt: Path, vocab: int) -> None:
    """A byte-level BPE of the checkpoint's vocabulary size, trained on wikitext-2's valid split."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel()
    tok.train([str(DATA / "valid.txt")], trainers.BpeTrainer(vocab_size=vocab,
                                                             initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(ckpt / "tokenizer.json"))


def run_limited(cmd: list[str], limit: int) -> dict:
    def set_limit() -> None:
        resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, preexec_fn=set_limit)
    peaks = {"anon": 0, "file": 0}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            r = split_rss._proc_rss(proc.pid)
            if r:
                peaks["anon"], peaks["file"] = max(peaks["anon"], r[0]), max(peaks["file"], r[1])
            done.wait(0.005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    output = proc.stdout.read().decode(errors="replace")
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    done.set()
    sampler.join()
    return {"rc": proc.returncode, "wall_s": time.perf_counter() - start, "peak_rss": usage.ru_maxrss * 1024,
            **peaks, "output": output.strip().splitlines()[-1:]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--limit-mb", type=int, default=2560, help="RLIMIT_DATA of each stage, MiB (default 2560)")
    ap.add_argument("--factor", type=float, default=2.5, help="checkpoint size / limit (default 2.5)")
    ap.add_argument("--text-tokens", type=int, default=2048, help="tokens of text for calibration, verify, analyze")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--only", default=None, help="comma-separated stages to run again in an existing --workdir")
    args = ap.parse_args()
    limit = args.limit_mb << 20
    # Mixtral-shaped, hidden 1024, 8 experts of width 3584: ~362 MB per layer; as many layers as needed.
    ns = argparse.Namespace(hidden=1024, intermediate=3584, experts=8, heads=16, kv_heads=4, vocab=8192,
                            shard_mb=limit / 4 / 1e6, seed=0)
    def nbytes(layers: int) -> int:
        return sum(math.prod(s) for _, s in split_rss.mixtral_tensors(ns, layers)) * F32
    layers = max(1, math.ceil((args.factor * limit - nbytes(0)) / (nbytes(1) - nbytes(0))))
    work = args.workdir or Path(tempfile.mkdtemp(prefix="memlim-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        ckpt, bundle, qbundle, gbundle = work / "ckpt", work / "bundle", work / "bundle-q8", work / "bundle-gptq"
        if args.only is None:
            for p in (ckpt, bundle, qbundle, gbundle):
                shutil.rmtree(p, ignore_errors=True)
            split_rss.write_checkpoint(ckpt, ns, layers)
            train_tokenizer(ckpt, ns.vocab)
        else:  # the checkpoint on disk, whatever limit it was made for
            import json
            layers = json.loads((ckpt / "config.json").read_text())["num_hidden_layers"]
        tensors = split_rss.mixtral_tensors(ns, layers)
        text = DATA / "test.txt"
        size = sum(math.prod(s) for _, s in tensors) * F32
        largest = max(math.prod(s) for _, s in tensors) * F32
        shards = len(list(ckpt.glob("*.safetensors")))
        print(f"checkpoint: {layers} layers, {size / 2**20:,.0f} MiB in {shards} shards ({size / limit:.1f}x the "
              f"limit), largest tensor {largest / 2**20:,.0f} MiB; limit RLIMIT_DATA {args.limit_mb} MiB", flush=True)
        cli = [sys.executable, "-m", "cosmoe_export.cli", "-q"]
        stages = {
            "split": [*cli, "split", str(ckpt), "-o", str(bundle)],
            "quantize": [*cli, "quantize", str(bundle), "-o", str(qbundle), "--expert-scheme", "int8",
                         "--backbone-scheme", "int8"],
            "quantize --rounding gptq": [*cli, "quantize", str(bundle), "-o", str(gbundle), "--expert-scheme", "int4",
                                         "--backbone-scheme", "int8", "--rounding", "gptq", "--calibration",
                                         str(DATA / "valid.txt"), "--calibration-tokens", str(args.text_tokens)],
            "verify": [*cli, "verify", str(qbundle), "--reference", str(ckpt), "--backend", "torch", "--text",
                       str(text), "--max-tokens", str(args.text_tokens), "--new-tokens", "8",
                       "--experts-per-layer", "2", "--json", str(work / "verify.json"),
                       # random weights: int8's quality gates fail on near-uniform logits; measured, not gated
                       "--gate", "top1_agreement=off", "--gate", "ppl_increase=off"],
            "analyze": [*cli, "analyze", str(ckpt), "--text", str(text), "--max-tokens", str(args.text_tokens),
                        "--json", str(work / "analyze.json")],
        }
        experts = sum(math.prod(s) for n, s in split_rss.mixtral_tensors(ns, 1) if ".experts." in n) * F32
        backbone = size - layers * experts
        bound = backbone + experts + (1 << 30)
        print(f"issue 16's bound: backbone {backbone / 2**20:,.0f} MiB + one layer's experts {experts / 2**20:,.0f} "
              f"MiB (fp32) + 1 GiB = {bound / 2**20:,.0f} MiB", flush=True)
        failed = 0
        for name, cmd in stages.items():
            if args.only is not None and name not in args.only.split(","):
                continue
            r = run_limited(cmd, limit)
            failed += r["rc"] != 0
            print(f"{name}: exit {r['rc']}, {r['wall_s']:.1f} s, peak RSS {r['peak_rss'] / 2**20:,.0f} MiB "
                  f"(anonymous {r['anon'] / 2**20:,.0f} MiB, file-backed {r['file'] / 2**20:,.0f} MiB, sampled); "
                  f"{' '.join(r['output'])}", flush=True)
        # The control: the same limit must stop a process that does hold the checkpoint in memory.
        load_all = [sys.executable, "-c", "import sys; from safetensors.torch import load_file; from pathlib import "
                    "Path; [load_file(str(p)) for p in sorted(Path(sys.argv[1]).glob('*.safetensors'))]", str(ckpt)]
        r = run_limited(load_all, limit)
        print(f"control (load every shard into memory under the same limit): exit {r['rc']} "
              f"({'refused, as it must be' if r['rc'] else 'NOT refused: the limit does not bind'})")
        return 1 if failed or r["rc"] == 0 else 0
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
