"""Resident decode side by side: the native runner (`cosmoe-run`) vs runtime_py (torch, executorch)
vs llama.cpp (`llama-bench`), at equal bits, against each one's bytes per token and the machine's
read bandwidth.

One Mixtral checkpoint per width, made here with transformers (random weights; the peers' shape of
bench/runtime.py PEER_SHAPE but 8 layers instead of 19, so that lowering stays affordable on 2
cores) with a byte-level BPE tokenizer trained here (the GGUF converter wants one). Every runtime
gets the same checkpoint: llama.cpp as GGUF f32 / Q8_0 / Q4_0, ours as bundles fp32 / int8 (experts
and backbone) / int4 (group 32 experts and backbone, round to nearest), lowered for ExecuTorch.
At hidden 432 llama.cpp cannot block-quantize 432-wide rows (it stores them f16), so there only
fp32 and int4 are built.

Every measurement is one fresh process: greedy, 64 new tokens after a fixed 20-token prompt (llama-
bench: tg64 on an empty context), 2 threads, all experts resident; peak RSS is that process's
ru_maxrss (os.wait4). Rounds are interleaved (round 1 runs every configuration, then round 2, ...);
the table gives the median and the min-max range.

    .venv/bin/python bench/native.py --prepare            # build everything (first time: ~1.5 h on 2 shared cores)
    .venv/bin/python bench/native.py                       # measure, print the table
    .venv/bin/python bench/native.py --write               # ... and update docs/BENCHMARKS.md
    .venv/bin/python bench/native.py --hidden 512 --only native,llamacpp --rounds 5

Artifacts go to build/bench-native/ (and llama.cpp's build to build/llamacpp/), reused when present.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import llamacpp  # noqa: E402
from runtime import PEER_SHAPE, PROMPT  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "build" / "bench-native"
BIN = Path(sys.executable).parent
EXPORT = BIN / "cosmoe-export"
NATIVE = Path(os.environ.get("COSMOE_RUN") or BIN / "cosmoe-run")  # as runtime_py.backends.native_binary
DOC = ROOT / "docs" / "BENCHMARKS.md"
SECTION = "## Native runner vs llama.cpp"
CORPUS = [Path("/work/shared/data/wikitext-2/valid.txt"), Path("/work/shared/data/wikitext-2/test.txt"),
          Path("/work/shared/data/pydocs-3.11.txt")]  # read in place, never copied

LAYERS = 8  # 19 in PEER_SHAPE; lowering costs ~5 s per expert + ~20 s per layer on 2 cores
TOKENS = 64
THREADS = 2
OFFLOAD_EXPERTS = 4  # native `lru` row: backbone + 4 of 8 experts per layer
GGUF_TYPE = {"fp32": "f32", "int8": "Q8_0", "int4": "Q4_0"}  # equal bits: ours -> llama.cpp's
QUANTIZE = {"int8": ["--expert-scheme", "int8", "--backbone-scheme", "int8"],
            "int4": ["--expert-scheme", "int4", "--backbone-scheme", "int4", "--group-size", "32",
                     "--rounding", "nearest"]}
RUNTIMES = ("native", "native-lru", "torch", "executorch", "llamacpp")


def bits_at(hidden: int) -> tuple[str, ...]:
    # llama.cpp's 32-wide blocks need rows that are a multiple of 32; otherwise its Q8_0 / Q4_0 files
    # are mostly f16, and int8 would compare against nothing.
    return ("fp32", "int8", "int4") if hidden % 32 == 0 else ("fp32", "int4")


def sh(*args: object) -> None:
    print("+", " ".join(map(str, args)), file=sys.stderr, flush=True)
    subprocess.run([str(a) for a in args], check=True, cwd=ROOT)


# ---- artifacts ---------------------------------------------------------------------------------

def tokenizer_dir() -> Path:
    """A byte-level BPE tokenizer with PEER_SHAPE's 32000 ids, trained once on ../shared/data."""
    out = WORK / "tokenizer"
    if not (out / "tokenizer.json").exists():
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
        from transformers import PreTrainedTokenizerFast

        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)  # GPT-2's regex: llama.cpp "gpt-2"
        tok.decoder = decoders.ByteLevel()
        # <unk>, <s>, </s> at 0, 1, 2: MixtralConfig's default bos/eos ids
        trainer = trainers.BpeTrainer(vocab_size=PEER_SHAPE["vocab_size"], special_tokens=["<unk>", "<s>", "</s>"],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        tok.train([str(p) for p in CORPUS], trainer)
        tmp = out.with_name("tokenizer.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                eos_token="</s>").save_pretrained(tmp)
        tmp.rename(out)
    return out


def checkpoint(hidden: int) -> Path:
    """Mixtral, random weights (seed 0), PEER_SHAPE at HIDDEN wide and LAYERS deep, with the tokenizer."""
    out = WORK / f"mixtral-h{hidden}-l{LAYERS}"
    if not (out / "config.json").exists():
        tok = tokenizer_dir()
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        code = f"""
import torch
from transformers import MixtralConfig, MixtralForCausalLM
torch.manual_seed(0)
shape = {dict(PEER_SHAPE, hidden_size=hidden, num_hidden_layers=LAYERS)!r}
MixtralForCausalLM(MixtralConfig(**shape, bos_token_id=1, eos_token_id=2)).save_pretrained({str(tmp)!r})
"""
        sh(sys.executable, "-c", code)
        for f in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(tok / f, tmp / f)
        tmp.rename(out)
    return out


def bundle(hidden: int, bits: str, lower: bool) -> Path:
    """Our bundle of checkpoint(HIDDEN) at BITS, lowered for ExecuTorch when LOWER."""
    fp32 = WORK / f"h{hidden}-fp32"
    if not (fp32 / "manifest.json").exists():
        sh(EXPORT, "-q", "split", checkpoint(hidden), "-o", fp32, "--dtype", "fp32", "--force")
    out = fp32
    if bits != "fp32":
        out = WORK / f"h{hidden}-{bits}"
        if not (out / "manifest.json").exists():
            sh(EXPORT, "-q", "quantize", fp32, "-o", out, *QUANTIZE[bits], "--force")
    if lower and not lowered(out):
        sh(EXPORT, "-q", "lower", out, "--target", "executorch", "--json", out.with_name(out.name + "-lower.json"))
    return out


def lowered(b: Path) -> bool:
    """B has ExecuTorch programs, written after the last change to the code that lowers them (else
    a changed lowering would be measured with programs from before it)."""
    files = json.loads((b / "manifest.json").read_text())["files"]
    programs = [b / f["path"] for f in files if f["role"] == "program" and f["target"] == "executorch"]
    newest_code = max(p.stat().st_mtime for p in (ROOT / "cosmoe_export" / "lower").rglob("*.py"))
    return bool(programs) and min(p.stat().st_mtime for p in programs) > newest_code


def gguf(hidden: int, bits: str) -> Path:
    f32 = llamacpp.convert(checkpoint(hidden), WORK / f"h{hidden}-f32.gguf", "f32")
    if bits == "fp32":
        return f32
    return llamacpp.quantize(f32, WORK / f"h{hidden}-{GGUF_TYPE[bits]}.gguf", GGUF_TYPE[bits], THREADS)


# ---- bytes per token ---------------------------------------------------------------------------

def safetensors_sizes(path: Path) -> dict[str, tuple[int, list[int]]]:
    """name -> (bytes, shape), from the header alone."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    return {k: (v["data_offsets"][1] - v["data_offsets"][0], v["shape"]) for k, v in header.items()
            if k != "__metadata__"}


def bundle_bytes_per_token(b: Path, experts_per_token: int) -> float:
    """Weight bytes one decoded token reads from bundle B: the backbone (of the embedding, one row),
    and EXPERTS_PER_TOKEN experts (the mean expert file's tensors) in every layer."""
    manifest = json.loads((b / "manifest.json").read_text())
    total = 0.0
    for name, (n, shape) in safetensors_sizes(b / "backbone.safetensors").items():
        total += n / shape[0] if name.startswith("embed.") else n  # embed.weight[_scale]: [V, ...]
    experts = [sum(n for n, _ in safetensors_sizes(b / f["path"]).values())
               for f in manifest["files"] if f["role"] == "expert"]
    return total + statistics.mean(experts) * experts_per_token * manifest["model"]["num_hidden_layers"]


# ---- measurements ------------------------------------------------------------------------------

@dataclass
class Config:
    hidden: int
    bits: str
    runtime: str  # one of RUNTIMES
    artifact: Path | None = None
    bytes_per_token: float | None = None
    missing: str | None = None  # why it is not measured
    runs: list[dict] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        return {"native": "native `cosmoe-run`", "native-lru": f"native, lru {OFFLOAD_EXPERTS}/8 experts",
                "torch": "runtime_py torch", "executorch": "runtime_py executorch",
                "llamacpp": "llama.cpp `llama-bench`"}[self.runtime]

    @property
    def bits_label(self) -> str:
        if self.runtime != "llamacpp":
            return self.bits
        t = GGUF_TYPE[self.bits]
        return t if self.hidden % 32 == 0 or self.bits == "fp32" else f"{t} (mostly f16)"

    def median(self, key: str) -> float | None:
        xs = [r[key] for r in self.runs if r.get(key) is not None]
        return statistics.median(xs) if xs else None

    def range(self, key: str) -> tuple[float, float] | None:
        xs = [r[key] for r in self.runs if r.get(key) is not None]
        return (min(xs), max(xs)) if xs else None


def configs(hiddens: list[int], only: set[str]) -> list[Config]:
    out = []
    for hidden in hiddens:
        for bits in bits_at(hidden):
            for runtime in RUNTIMES:
                if runtime in only and (runtime != "native-lru" or bits == "int4"):
                    out.append(Config(hidden, bits, runtime))
    return out


def prepare(cs: list[Config]) -> None:
    """Build what every configuration needs, one heavy job at a time."""
    need_lower = {(c.hidden, c.bits) for c in cs if c.runtime in ("native", "native-lru", "executorch")}
    for c in cs:
        try:
            if c.runtime == "llamacpp":
                c.artifact = gguf(c.hidden, c.bits)
                c.bytes_per_token = llamacpp.gguf_bytes_per_token(c.artifact, PEER_SHAPE["num_experts_per_tok"])[
                    "bytes_per_token"]
            else:
                c.artifact = bundle(c.hidden, c.bits, lower=(c.hidden, c.bits) in need_lower)
                c.bytes_per_token = bundle_bytes_per_token(c.artifact, PEER_SHAPE["num_experts_per_tok"])
                if c.runtime.startswith("native") and not NATIVE.exists():
                    c.missing = f"missing: no {NATIVE} (bash scripts/install.sh builds it)"
        except (subprocess.CalledProcessError, RuntimeError) as e:
            c.missing = f"not built: {e}"
            print(c.missing, file=sys.stderr)


def command(c: Config, json_out: Path) -> list[str]:
    ids = ",".join(map(str, PROMPT))
    if c.runtime == "llamacpp":
        return [str(llamacpp.build() / "llama-bench"), "-m", str(c.artifact), "-p", "0", "-n", str(TOKENS),
                "-t", str(THREADS), "-o", "json"]
    if c.runtime in ("native", "native-lru"):
        policy = ["--policy", "resident"] if c.runtime == "native" else \
            ["--policy", "lru", "--experts-per-layer", str(OFFLOAD_EXPERTS)]
        return [str(NATIVE), str(c.artifact), "--prompt-ids", ids, "--max-new-tokens", str(TOKENS), *policy,
                "--threads", str(THREADS), "--json", str(json_out), "--quiet"]
    return [str(EXPORT), "-q", "run", str(c.artifact), "--prompt-ids", ids, "--max-new-tokens", str(TOKENS),
            "--policy", "resident", "--backend", c.runtime, "--json", str(json_out)]


def measure(c: Config) -> dict:
    """One run of C in a fresh process: decode tok/s, its peak RSS (MB, ru_maxrss) and how many cores
    other processes used meanwhile."""
    env = dict(os.environ, OMP_NUM_THREADS=str(THREADS))  # torch's intra-op pool: 2 threads, as the others
    with tempfile.TemporaryDirectory() as tmp:
        json_out = Path(tmp) / "metrics.json"
        run = llamacpp.run_measured(command(c, json_out), env=env)
        out = {"peak_rss_mb": run["peak_rss_mb"], "others_cores": run["others_cores"], "wall_s": run["wall_s"]}
        if c.runtime == "llamacpp":
            (r,) = [r for r in json.loads(run["stdout"]) if r["n_gen"] == TOKENS]
            return {**out, "decode_tok_s": r["avg_ts"], "build_commit": r.get("build_commit")}
        m = json.loads(json_out.read_text())
        return {**out, "decode_tok_s": m["decode_tok_s"], "own_peak_rss_mb": m.get("peak_rss_mb")}


def measure_all(cs: list[Config], rounds: int, idle_cores: float, max_wait_s: float) -> None:
    todo = [c for c in cs if not c.missing]
    for r in range(1, rounds + 1):
        for c in todo:
            t = time.monotonic()
            before = llamacpp.wait_for_idle(idle_cores, timeout_s=max_wait_s)
            waited = time.monotonic() - t
            try:
                c.runs.append(m := {**measure(c), "others_cores_before": before, "waited_s": waited})
                print(f"round {r}: h{c.hidden} {c.bits_label} {c.runtime}: {m['decode_tok_s']:.1f} tok/s, "
                      f"{m['peak_rss_mb']:.0f} MB (others: {before:.2f} cores before, {m['others_cores']:.2f} "
                      f"during; waited {waited:.0f} s)", file=sys.stderr, flush=True)
            except RuntimeError as e:
                c.errors.append(str(e).splitlines()[-1][:200])
                print(f"round {r}: h{c.hidden} {c.bits} {c.runtime} failed: {e}", file=sys.stderr, flush=True)


# ---- the table ---------------------------------------------------------------------------------

def machine() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        model = re.search(r"^Model name:\s*(.+)$", out, re.M).group(1).strip()
    except (OSError, AttributeError):
        model = "unknown CPU"
    return f"{model}, {os.cpu_count()} cores"


def table(cs: list[Config], bandwidth: float) -> list[str]:
    lines = ["| hidden | bits | runtime | decode tok/s median (min-max) | vs llama.cpp | peak RSS MB | "
             "weight MB read / token | GB/s achieved | bandwidth-bound tok/s | of read bandwidth |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    peer = {(c.hidden, c.bits): c.median("decode_tok_s") for c in cs if c.runtime == "llamacpp"}
    for c in cs:
        head = f"| {c.hidden} | {c.bits_label} | {c.label} |"
        mb = f"{c.bytes_per_token / 1e6:.1f}" if c.bytes_per_token else "-"
        tok = c.median("decode_tok_s")
        if tok is None:
            why = c.missing or ("failed: " + c.errors[0] if c.errors else "not run")
            lines.append(f"{head} {why} | - | - | {mb} | - | - | - |")
            continue
        lo, hi = c.range("decode_tok_s")
        p = peer.get((c.hidden, c.bits))
        vs = "1.00" if c.runtime == "llamacpp" else (f"{tok / p:.2f}" if p else "-")
        gbs = c.bytes_per_token * tok / 1e9
        bound = bandwidth * 1e9 / c.bytes_per_token
        lines.append(f"{head} {tok:.1f} ({lo:.1f}-{hi:.1f}) | {vs} | {c.median('peak_rss_mb'):,.0f} | {mb} | "
                     f"{gbs:.2f} | {bound:.0f} | {gbs / bandwidth:.2f} |")
    return lines


def notes(cs: list[Config]) -> list[str]:
    out = []
    by = {(c.hidden, c.bits, c.runtime): c for c in cs}
    for c in cs:
        if c.runtime != "native-lru" or c.median("decode_tok_s") is None:
            continue
        res = by.get((c.hidden, c.bits, "native"))
        if res and res.median("decode_tok_s"):
            out.append(f"- Offloaded native (h{c.hidden} {c.bits}, `--policy lru --experts-per-layer "
                       f"{OFFLOAD_EXPERTS}`): {c.median('decode_tok_s') / res.median('decode_tok_s'):.2f}x native "
                       f"resident, peak RSS {c.median('peak_rss_mb'):,.0f} MB vs {res.median('peak_rss_mb'):,.0f} MB.")
    during = [r["others_cores"] for c in cs for r in c.runs]
    if during:
        busy = sorted(f"h{c.hidden} {c.bits_label} {c.runtime} ({max(r['others_cores'] for r in c.runs):.2f})"
                      for c in cs if c.runs and max(r["others_cores"] for r in c.runs) >= 0.3)
        out.append(f"- The machine is shared: other processes kept a median of {statistics.median(during):.2f} "
                   f"cores busy during the runs (max {max(during):.2f}); each run waited until they used under "
                   f"0.3 cores first. " + (f"Runs that overlapped more (max cores): {', '.join(busy)}."
                                          if busy else "No run overlapped more than 0.3 cores."))
    commits = {r.get("build_commit") for c in cs if c.runtime == "llamacpp" for r in c.runs} - {None}
    if commits:
        out.append(f"- llama.cpp build: llama-cpp-python {llamacpp.VERSION} sdist, vendored llama.cpp "
                   f"{', '.join(sorted(commits))}, CPU, Release, `-DGGML_NATIVE=ON`.")
    return out


def caption(rounds: int, bandwidth: float) -> str:
    return (f"Mixtral checkpoints made with transformers (random weights, seed 0): **{LAYERS} layers** (not the "
            f"peers' 19, to keep ExecuTorch lowering affordable on 2 cores), 8 experts top-2, FFN 1280, vocab 32000, "
            f"context 2048, hidden 512 and the paper's 432; the same checkpoint for every runtime. Ours: bundles "
            f"fp32, int8 (experts and backbone per-channel int8), int4 (experts and backbone int4 group 32, round to "
            f"nearest), `lower --target executorch`; llama.cpp: the checkpoint converted to GGUF f32 with its "
            f"`convert_hf_to_gguf.py`, then `llama-quantize` Q8_0 / Q4_0 (its defaults: Q4_0 keeps the output head "
            f"Q6_K). At 432 llama.cpp stores every 432-wide row f16 (its blocks are 32 wide), so its \"Q4_0\" "
            f"there is mostly f16, and int8 is not built. Greedy, {TOKENS} new tokens after a {len(PROMPT)}-token "
            f"prompt (llama-bench: tg{TOKENS} on an empty context, a warm-up then the mean of 5 repetitions; ours: "
            f"one generation, no warm-up), {THREADS} threads, all experts resident unless the row says otherwise; "
            f"each run a fresh process, {rounds} rounds interleaved, median and min-max. Peak RSS: the process's "
            f"ru_maxrss (os.wait4; forked by a small launcher, so the bench's own memory does not count), median. "
            f"Weight bytes per token: the tensors the bundle or GGUF stores for the backbone and head, one "
            f"embedding row, and 2 experts per layer (a runtime that repacks weights, as XNNPACK does, may read "
            f"somewhat more). GB/s achieved = bytes/token x tok/s; bandwidth-bound tok/s = the measured read "
            f"bandwidth ({bandwidth:.1f} GB/s: numpy sums over 1 GB on {THREADS} threads, best of 3, before and "
            f"after the runs) / bytes per token; the last column is achieved / measured bandwidth.")


def write_section(text: str) -> None:
    doc = DOC.read_text()
    start = doc.find(f"\n{SECTION}\n")
    if start < 0:
        doc = doc.rstrip("\n") + "\n\n" + text + "\n"
    else:
        nxt = re.compile(r"^## ", re.M).search(doc, start + len(SECTION) + 2)
        end = nxt.start() if nxt else len(doc)
        doc = doc[:start + 1] + text + "\n" + ("\n" + doc[end:] if nxt else "")
    DOC.write_text(doc)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--hidden", type=int, nargs="+", default=[512, 432])
    ap.add_argument("--only", default=",".join(RUNTIMES),
                    help=f"comma-separated runtimes among {','.join(RUNTIMES)} (default: all)")
    ap.add_argument("--skip-llamacpp", action="store_true", help="no llama.cpp build, GGUF or rows")
    ap.add_argument("--prepare", action="store_true", help="only build the checkpoints, bundles and GGUFs")
    ap.add_argument("--idle-cores", type=float, default=0.3,
                    help="before each run, wait until other processes use fewer cores than this (the machine "
                         "is shared)")
    ap.add_argument("--max-wait", type=float, default=900, help="seconds to wait for that before running anyway")
    ap.add_argument("--write", action="store_true", help=f"replace the section '{SECTION}' of docs/BENCHMARKS.md")
    args = ap.parse_args()
    only = set(args.only.split(","))
    if unknown := only - set(RUNTIMES):
        ap.error(f"unknown runtime(s) {','.join(sorted(unknown))}; choose among {','.join(RUNTIMES)}")
    if args.skip_llamacpp:
        only.discard("llamacpp")

    cs = configs(args.hidden, only)
    prepare(cs)
    if args.prepare:
        return
    load = [os.getloadavg()[0]]  # the machine is shared: say how busy it was
    bandwidth = llamacpp.read_bandwidth_gbs(threads=THREADS)
    measure_all(cs, args.rounds, args.idle_cores, args.max_wait)
    bandwidth = max(bandwidth, llamacpp.read_bandwidth_gbs(threads=THREADS))  # before and after: the better of two
    load.append(os.getloadavg()[0])
    (WORK / "results.json").write_text(json.dumps(
        {"bandwidth_gbs": bandwidth, "configs": [{"hidden": c.hidden, "bits": c.bits, "runtime": c.runtime,
                                                  "bytes_per_token": c.bytes_per_token, "missing": c.missing,
                                                  "runs": c.runs, "errors": c.errors} for c in cs]}, indent=1))

    rows = table(cs, bandwidth)
    cmd = " ".join([".venv/bin/python", "bench/native.py", *sys.argv[1:]])
    text = "\n".join([SECTION, "",
                      f"Generated by `{cmd}` on {time.strftime('%Y-%m-%d')}, {machine()}; one run, rounds "
                      f"interleaved; 1-minute load average {load[0]:.1f} before, {load[1]:.1f} after (compare ratios "
                      "within this table, not with figures from other days or machines).", "",
                      caption(args.rounds, bandwidth), "", *rows, "", *notes(cs)]).rstrip("\n")
    print(text)
    if args.write:
        write_section(text)
        print(f"wrote {DOC.relative_to(ROOT)}", file=sys.stderr)


if __name__ == "__main__":
    main()
