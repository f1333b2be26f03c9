"""Benchmark: builds at real widths (issue 16). Checkpoints are made with transformers' own classes
(built on the meta device for their exact names and shapes, then written one shard at a time with
random weights, so the writer holds one shard, not the model), with a byte-level BPE tokenizer
trained here on ../shared/data/wikitext-2/valid.txt.

    # OLMoE-1B-7B in full (16 layers x 64 experts, about 13.8 GB bf16): `build` of recipes/olmoe.toml
    # (split -> GPTQ int4 experts / int8 backbone -> ExecuTorch + ONNX -> verify at 16 of 64 experts per layer)
    .venv/bin/python bench/scale.py olmoe --workdir /tmp/scale
    # A Qwen3-30B-A3B slice (4 of its 48 layers at real widths): split, quantize (GPTQ) and lower, each at
    # --jobs 1, --jobs 2 and under a local Ray cluster; the full model extrapolated per expert and per layer
    .venv/bin/python bench/scale.py qwen3-slice --workdir /tmp/scale
    .venv/bin/python bench/scale.py olmoe --layers 2      # any model cut to its first N layers

Each command runs in its own process (peak RSS: its ru_maxrss through os.wait4, the calling process
only; and the peak of the summed RSS of its process tree, workers of --jobs 2 and Ray included,
sampled 5 times a second from /proc). Prints a
markdown table and, with --json, writes every measurement. Needs about 4x the checkpoint in free disk.
Not part of CI: the machine is busy for tens of minutes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "wikitext-2"
CLI = [sys.executable, "-m", "cosmoe_export.cli", "-q"]

# Real widths (the published configs), random weights.
MODELS = {
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", dict(
        vocab_size=50304, hidden_size=2048, intermediate_size=1024, num_hidden_layers=16, num_attention_heads=16,
        num_key_value_heads=16, num_experts=64, num_experts_per_tok=8, max_position_embeddings=4096,
        rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=False, norm_topk_prob=False)),
    "qwen3-slice": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(
        vocab_size=151936, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
        num_hidden_layers=4, num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128,
        num_experts_per_tok=8, decoder_sparse_step=1, norm_topk_prob=True, max_position_embeddings=4096,
        rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=False)),
}
FULL_LAYERS = {"olmoe": 16, "qwen3-slice": 48}
SHARD_BYTES = 2 << 30


def write_checkpoint(model: str, out: Path, layers: int | None, seed: int = 0) -> dict:
    """config.json and sharded bf16 safetensors with an index, as save_pretrained lays them out."""
    import torch
    import transformers
    from safetensors.torch import save_file
    cfg_cls, model_cls, kw = MODELS[model]
    config = getattr(transformers, cfg_cls)(**{**kw, **({"num_hidden_layers": layers} if layers else {})})
    config.architectures = [model_cls]
    config.torch_dtype = "bfloat16"
    with torch.device("meta"):
        meta = getattr(transformers, model_cls)(config)
    shapes = {k: tuple(v.shape) for k, v in meta.state_dict().items()}
    out.mkdir(parents=True)
    config.save_pretrained(out)
    weight_map, shard, shard_bytes, files = {}, {}, 0, []

    def flush() -> None:
        nonlocal shard, shard_bytes
        name = f"model-{len(files) + 1:05d}.safetensors"
        save_file(shard, str(out / name), metadata={"format": "pt"})
        files.append(name)
        weight_map.update({k: name for k in shard})
        shard, shard_bytes = {}, 0

    for i, (name, shape) in enumerate(shapes.items()):
        g = torch.Generator().manual_seed(seed * 1_000_003 + i)
        if name.endswith("norm.weight"):  # not all ones: equal tensors would keep the layer template off
            t = 1 + 0.1 * torch.randn(shape, generator=g)
        else:
            t = torch.randn(shape, generator=g) * 0.02
        t = t.to(torch.bfloat16)
        if shard and shard_bytes + t.numel() * 2 > SHARD_BYTES:
            flush()
        shard[name], shard_bytes = t, shard_bytes + t.numel() * 2
    flush()
    total = sum(math.prod(s) for s in shapes.values()) * 2
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    _tokenizer(out, config.vocab_size)
    return {"layers": config.num_hidden_layers, "experts": config.num_experts, "bytes": total, "shards": len(files)}


def _tokenizer(ckpt: Path, vocab: int) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel()
    tok.train([str(DATA / "valid.txt")], trainers.BpeTrainer(vocab_size=min(vocab, 32000),
                                                             initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(ckpt / "tokenizer.json"))


def _tree_rss_mb(root: int) -> float:
    """RSS summed over ``root`` and its descendants, from /proc (Linux). Pages shared between a
    process and its forked workers count once per process: an upper bound on the tree's memory."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            stat = Path(f"/proc/{d}/stat").read_text()
            statm = Path(f"/proc/{d}/statm").read_text().split()
        except OSError:  # exited between listdir and read
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(d))
        rss[int(d)] = int(statm[1])
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        total += rss.get(pid, 0)
        todo.extend(children.get(pid, []))
    return total * os.sysconf("SC_PAGE_SIZE") / 2**20


def timed(cmd: list[str], env: dict | None = None) -> dict:
    """Run ``cmd``: wall seconds, its own peak RSS (ru_maxrss: a pool's or Ray's workers are not counted)
    and, on Linux, the peak of its process tree's summed RSS, sampled 5 times a second."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env={**os.environ, **(env or {}), "PYTHONPATH": str(ROOT)},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    tree_peak, done = [0.0], threading.Event()

    def sample() -> None:
        while not done.wait(0.2):
            tree_peak[0] = max(tree_peak[0], _tree_rss_mb(proc.pid))

    sampler = threading.Thread(target=sample, daemon=True)
    if Path("/proc/self/statm").exists():
        sampler.start()
    output = proc.stdout.read().decode(errors="replace")
    done.set()
    _, status, usage = os.wait4(proc.pid, 0)
    rc = os.waitstatus_to_exitcode(status)
    if rc != 0:
        sys.exit(f"{' '.join(cmd)}: exit {rc}\n{output[-4000:]}")
    r = {"s": round(time.perf_counter() - start, 1), "peak_rss_mb": round(usage.ru_maxrss / 1024)}
    if tree_peak[0]:
        r["tree_peak_rss_mb"] = round(tree_peak[0])
    print(f"{' '.join(cmd[len(CLI):])}: {r}", flush=True)  # as it comes: a long run may be stopped
    return r


def olmoe_build(work: Path, ckpt: Path, info: dict) -> dict:
    out = work / "build"
    shutil.rmtree(out, ignore_errors=True)
    r = timed([*CLI, "build", str(ROOT / "recipes" / "olmoe.toml"), "--source", str(ckpt), "-o", str(out)])
    report = json.loads((out / "report.json").read_text())
    return {"build": r, "stages": report["stages"], "passed": report["passed"],
            "backends": [{k: v for k, v in row.items() if k != "programs"} for row in report["backends"]]}


def qwen_stages(work: Path, ckpt: Path, info: dict) -> dict:
    bundle = work / "bundle"
    runs: dict = {"split": timed([*CLI, "split", str(ckpt), "-o", str(bundle), "--force"])}
    calib = ["--calibration", str(DATA / "valid.txt"), "--calibration-tokens", "8192"]
    for name, opts in (("jobs 1", ["--jobs", "1"]), ("jobs 2", ["--jobs", "2"]), ("ray", ["--executor", "ray"])):
        q = work / f"q-{name.replace(' ', '')}"
        runs[f"quantize, {name}"] = timed([*CLI, "quantize", str(bundle), "-o", str(q), "--force", "--expert-scheme",
                                           "int4", "--backbone-scheme", "int8", "--rounding", "gptq", *calib, *opts])
        runs[f"lower, {name}"] = timed([*CLI, "lower", str(q), "--target", "all", *opts,
                                        "--json", str(work / f"lower-{name.replace(' ', '')}.json")])
        runs[f"lower, {name}"]["timings"] = json.loads((work / f"lower-{name.replace(' ', '')}.json").read_text())
        if name != "jobs 1":  # quantized and lowered: every file
            same = subprocess.run(["diff", "-rq", str(work / "q-jobs1"), str(q)], capture_output=True, text=True)
            runs[f"lower, {name}"]["identical_to_jobs_1"] = same.returncode == 0
    return runs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", choices=list(MODELS))
    ap.add_argument("--layers", type=int, default=None, help="cut the model to its first N layers")
    ap.add_argument("--workdir", type=Path, required=True)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--reuse-checkpoint", action="store_true", help="keep WORKDIR/ckpt if it is there")
    args = ap.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    ckpt = args.workdir / "ckpt"
    t = time.perf_counter()
    if not (args.reuse_checkpoint and (ckpt / "config.json").is_file()):
        shutil.rmtree(ckpt, ignore_errors=True)
        info = write_checkpoint(args.model, ckpt, args.layers)
    else:
        idx = json.loads((ckpt / "model.safetensors.index.json").read_text())
        cfg = json.loads((ckpt / "config.json").read_text())
        info = {"layers": cfg["num_hidden_layers"], "experts": cfg["num_experts"],
                "bytes": idx["metadata"]["total_size"], "shards": len(set(idx["weight_map"].values()))}
    print(f"checkpoint {args.model}: {info['layers']} layers x {info['experts']} experts, "
          f"{info['bytes'] / 1e9:.2f} GB bf16 in {info['shards']} shards ({time.perf_counter() - t:.0f} s)", flush=True)
    runs = (olmoe_build if args.model == "olmoe" else qwen_stages)(args.workdir, ckpt, info)
    result = {"model": args.model, "checkpoint": info, "full_layers": FULL_LAYERS[args.model], "runs": runs,
              "cpus": len(os.sched_getaffinity(0)), "date": time.strftime("%Y-%m-%d")}
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
