"""llama.cpp as the peer of our runtimes: build it, convert a checkpoint to GGUF, time its decode.

llama.cpp comes from the llama-cpp-python sdist on PyPI, which vendors it (so the version is pinned by
one PyPI release and nothing but the package registry is needed): `llama-bench` and
`llama-quantize` are built from its `vendor/llama.cpp` with CMake (CPU only, Release, native
instructions). Checkpoints are converted with that tree's own `convert_hf_to_gguf.py`, importing
the `gguf` package from the same tree (`gguf-py`, the converter's default: nothing is installed).

A tokenizer trained here has a pre-tokenizer hash in none of the converter's tables, so the one
lookup that maps the hash to a name (`conversion/base.py` `TextModel.get_vocab_base_pre`) is
replaced in-process by one that answers "gpt-2": a byte-level BPE tokenizer trained with
`tokenizers`' ByteLevel pre-tokenizer splits with GPT-2's regex, which llama.cpp calls "gpt-2".
The converter's file is not edited.

    .venv/bin/python bench/llamacpp.py build                          # once; ~15 min on 2 cores
    .venv/bin/python bench/llamacpp.py convert CHECKPOINT OUT.gguf    # f32 GGUF
    .venv/bin/python bench/llamacpp.py quantize IN.gguf OUT.gguf Q4_0
    .venv/bin/python bench/llamacpp.py bench MODEL.gguf               # JSON: tok/s, peak RSS
    .venv/bin/python bench/llamacpp.py bandwidth                      # GB/s, numpy sums over 1 GB on 2 threads

Everything lands in build/llamacpp/ and is reused when present.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VERSION = "0.3.36"  # llama-cpp-python, as in ../shared/BACKEND-FACTS.md "Peers on this machine"
HOME = ROOT / "build" / "llamacpp"
SDIST = HOME / f"llama_cpp_python-{VERSION}.tar.gz"
SRC = HOME / f"llama_cpp_python-{VERSION}" / "vendor" / "llama.cpp"
CMAKE_BUILD = HOME / "cmake-build"
BIN = CMAKE_BUILD / "bin"
TOOLS = ("llama-bench", "llama-quantize")
PIP = [sys.executable, "-m", "pip"]


def log(*args: object) -> None:
    print("+", *args, file=sys.stderr, flush=True)


def run(args: list[str], **kw) -> None:
    log(" ".join(map(str, args)))
    subprocess.run(args, check=True, **kw)


def source() -> Path:
    """The vendored llama.cpp tree, downloaded and unpacked once."""
    if not (SRC / "CMakeLists.txt").exists():
        HOME.mkdir(parents=True, exist_ok=True)
        if not SDIST.exists():
            run([*PIP, "download", "--no-deps", "--no-binary", ":all:", f"llama-cpp-python=={VERSION}",
                 "-d", str(HOME)])
        with tarfile.open(SDIST) as tar:
            tar.extractall(HOME, filter="data")
    return SRC


def build(jobs: int = 2) -> Path:
    """Directory holding llama-bench and llama-quantize (built once; CMake >= 3.14 is enough, so
    Debian's cmake does)."""
    if all((BIN / t).exists() for t in TOOLS):
        return BIN
    src = source()
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    run(["cmake", "-S", str(src), "-B", str(CMAKE_BUILD), *generator, "-DCMAKE_BUILD_TYPE=Release",
         "-DBUILD_SHARED_LIBS=OFF",  # binaries that do not depend on where the build tree is
         "-DGGML_NATIVE=ON",  # this machine's instructions (AVX-512 etc.), as a user's build would
         "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF",
         "-DLLAMA_BUILD_APP=OFF", "-DLLAMA_OPENSSL=OFF"])
    run(["cmake", "--build", str(CMAKE_BUILD), "--config", "Release", "-j", str(jobs), "--target", *TOOLS])
    return BIN


def convert(checkpoint: Path, out: Path, outtype: str = "f32") -> Path:
    """GGUF of a Hugging Face checkpoint directory (config, safetensors, tokenizer), in a child
    process (the converter configures logging and parses argv)."""
    if not out.exists():
        tmp = out.with_suffix(".tmp.gguf")
        run([sys.executable, __file__, "_convert", str(checkpoint), str(tmp), outtype], cwd=ROOT)
        tmp.rename(out)
    return out


def _convert_in_process(checkpoint: str, out: str, outtype: str) -> None:
    src = source()
    sys.path[:0] = [str(src), str(src / "gguf-py")]
    from conversion import base  # type: ignore[import-not-found]

    def get_vocab_base_pre(self, tokenizer) -> str:
        # The only lookup a tokenizer trained here fails: its hash is in no table. ByteLevel BPE
        # pre-tokenizes with GPT-2's regex.
        return "gpt-2"

    base.TextModel.get_vocab_base_pre = get_vocab_base_pre
    import convert_hf_to_gguf  # type: ignore[import-not-found]

    sys.argv = ["convert_hf_to_gguf.py", checkpoint, "--outfile", out, "--outtype", outtype]
    convert_hf_to_gguf.main()


def quantize(src: Path, out: Path, qtype: str, threads: int = 2) -> Path:
    """``llama-quantize`` SRC to QTYPE (Q8_0, Q4_0, ...), once."""
    if not out.exists():
        tmp = out.with_suffix(".tmp.gguf")
        run([str(build() / "llama-quantize"), str(src), str(tmp), qtype, str(threads)],
            stdout=subprocess.DEVNULL)
        tmp.rename(out)
    return out


# The child's ru_maxrss counts the memory of the process it was forked from: at exec Linux records
# the old (forked) address space's high-water mark as the child's. So children are forked by this
# small launcher, not by the bench (whose numpy bandwidth array alone is 1 GB); its own ~10 MB is
# the floor of every peak. It writes the grandchild's ru_maxrss (KiB) and CPU seconds to argv[1].
_LAUNCHER = """import os, sys
pid = os.fork()
if pid == 0:
    try:
        os.execv(sys.argv[2], sys.argv[2:])
    except OSError as e:
        print(f"{sys.argv[2]}: {e}", file=sys.stderr)
    os._exit(127)
_, status, ru = os.wait4(pid, 0)
with open(sys.argv[1], "w") as f:
    f.write(f"{ru.ru_maxrss} {ru.ru_utime + ru.ru_stime}")
sys.exit(os.waitstatus_to_exitcode(status))
"""


def cpu_busy_s() -> float:
    """CPU seconds the whole machine has spent busy since boot (/proc/stat: all but idle and iowait)."""
    with open("/proc/stat") as f:
        user, nice, system, idle, iowait, irq, softirq, steal, *_ = map(int, f.readline().split()[1:])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def run_measured(args: list[str], env: dict | None = None) -> dict:
    """Run ARGS to completion: its stdout and stderr, its peak RSS in MB (ru_maxrss), and how many
    cores other processes kept busy meanwhile (``others_cores``: the machine is shared)."""
    with tempfile.TemporaryDirectory() as tmp:
        usage = Path(tmp) / "rusage"
        out, err = open(Path(tmp) / "out", "w+b"), open(Path(tmp) / "err", "w+b")
        with out, err:
            t, busy = time.perf_counter(), cpu_busy_s()
            p = subprocess.run([sys.executable, "-I", "-S", "-c", _LAUNCHER, str(usage), *args], stdout=out,
                               stderr=err, cwd=ROOT, env=env)
            wall, busy = time.perf_counter() - t, cpu_busy_s() - busy
            out.seek(0), err.seek(0)
            stdout, stderr = out.read().decode(errors="replace"), err.read().decode(errors="replace")
        if p.returncode:
            raise RuntimeError(f"{' '.join(args)} exited {p.returncode}:\n{stderr[-3000:]}")
        maxrss_kib, cpu_s = usage.read_text().split()
    return {"stdout": stdout, "stderr": stderr, "peak_rss_mb": int(maxrss_kib) * 1024 / 1e6,  # KiB on Linux
            "wall_s": wall, "others_cores": max(0.0, busy - float(cpu_s)) / wall}


def wait_for_idle(max_cores: float = 0.3, sample_s: float = 2.0, timeout_s: float = 600.0) -> float:
    """Wait until other processes keep fewer than MAX_CORES cores busy (over SAMPLE_S seconds), at
    most TIMEOUT_S; returns the last sample. OpenMP's spinning threads (llama.cpp, torch) slow down
    many times over when a third process takes a core, so a run next to a compile measures nothing."""
    deadline = time.monotonic() + timeout_s
    while True:
        busy = cpu_busy_s()
        time.sleep(sample_s)
        cores = (cpu_busy_s() - busy) / sample_s
        if cores < max_cores or time.monotonic() > deadline:
            return cores


def bench(model: Path, tokens: int = 64, threads: int = 2) -> dict:
    """``llama-bench -p 0 -n TOKENS -t THREADS`` (tg TOKENS: one warm-up run, then the average of
    its default 5 repetitions) in a fresh process: decode tok/s and that process's peak RSS."""
    m = run_measured([str(build() / "llama-bench"), "-m", str(model), "-p", "0", "-n", str(tokens),
                      "-t", str(threads), "-o", "json"])
    (result,) = [r for r in json.loads(m["stdout"]) if r["n_gen"] == tokens]
    return {"decode_tok_s": result["avg_ts"], "decode_tok_s_stddev": result["stddev_ts"],
            "peak_rss_mb": m["peak_rss_mb"], "others_cores": m["others_cores"],
            "build_commit": result.get("build_commit"), "cpu_info": result.get("cpu_info"),
            "model_size": result.get("model_size")}


def read_bandwidth_gbs(nbytes: int = 1 << 30, repeats: int = 3, threads: int = 2) -> float:
    """Memory read bandwidth of this machine: numpy sums over an NBYTES float64 array split between
    THREADS threads (numpy releases the GIL in a reduction), best of REPEATS. Use the runtimes' thread
    count: here one core reads ~10 GB/s and two ~16."""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np
    a = np.ones(nbytes // 8)
    parts = np.array_split(a, threads)
    best = float("inf")
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(np.sum, parts))  # pages touched, threads started
        for _ in range(repeats):
            t = time.perf_counter()
            list(pool.map(np.sum, parts))
            best = min(best, time.perf_counter() - t)
    return nbytes / best / 1e9


def gguf_bytes_per_token(model: Path, experts_per_token: int) -> dict:
    """Weight bytes one decoded token reads from a GGUF: every tensor, except that of the stacked
    expert tensors (``*_exps``) only EXPERTS_PER_TOKEN of their experts count, and of the token
    embedding one row. Also the file's tensor types by bytes."""
    sys.path.insert(0, str(source() / "gguf-py"))
    from gguf import GGUFReader  # type: ignore[import-not-found]

    total, by_type = 0.0, {}
    for t in GGUFReader(str(model)).tensors:
        n = int(t.n_bytes)
        by_type[t.tensor_type.name] = by_type.get(t.tensor_type.name, 0) + n
        if t.name.endswith("_exps.weight"):
            n = n * experts_per_token / int(t.shape[-1])  # gguf shapes are innermost first: [.., .., E]
        elif t.name == "token_embd.weight":
            n = n / int(t.shape[-1])  # [D, V]: one row of V
        total += n
    return {"bytes_per_token": total, "bytes_by_type": by_type}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("build")
    p = sub.add_parser("convert")
    p.add_argument("checkpoint", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--outtype", default="f32")
    p = sub.add_parser("_convert")  # the child process of convert()
    p.add_argument("checkpoint")
    p.add_argument("out")
    p.add_argument("outtype")
    p = sub.add_parser("quantize")
    p.add_argument("src", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("qtype")
    p = sub.add_parser("bench")
    p.add_argument("model", type=Path)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p = sub.add_parser("bandwidth")
    p.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    if args.cmd == "build":
        print(build())
    elif args.cmd == "convert":
        print(convert(args.checkpoint, args.out, args.outtype))
    elif args.cmd == "_convert":
        _convert_in_process(args.checkpoint, args.out, args.outtype)
    elif args.cmd == "quantize":
        print(quantize(args.src, args.out, args.qtype))
    elif args.cmd == "bench":
        print(json.dumps(bench(args.model, args.tokens, args.threads)))
    elif args.cmd == "bandwidth":
        print(f"{read_bandwidth_gbs(threads=args.threads):.2f}")


if __name__ == "__main__":
    main()
