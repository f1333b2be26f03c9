"""Bad input to the native runner: every malformed-bundle case of tests/malformed that reaches `run`, and
the native runner's own inputs (programs, prompts, budgets), through the real `cosmoe-run` binary, built
once with AddressSanitizer and UndefinedBehaviorSanitizer: exit code 2, one line on stderr that names
the file and the problem, and never a crash or a sanitizer report.

The corpus's `run:` cases are reused as they are, on a copy of its pristine bundle lowered to
ExecuTorch: each breaks the bundle and the same bundle goes to `cosmoe-run`. The corpus's `run:shard-*`
cases tamper with expert safetensors shards, which the native runner never reads (it runs programs):
they are replaced by the same tampering on the expert programs."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from filelock import FileLock

from tests.malformed import CASES, Workspace
from tests.malformed import builders as b
from tests.malformed.cases import prepare

ROOT = Path(__file__).resolve().parents[2]
VENV = ROOT / ".venv"
# Shard cases: tampering with files the native runner does not read; replaced by PROGRAM_CASES below.
# Prompt and budget cases break arguments, not the bundle: ARG_CASES below gives them as token ids.
ARGUMENT_CASES = {"run:budget-below-minimum", "run:prompt-longer-than-context"}
BUNDLE_CASES = sorted(n for n, c in CASES.items() if n.startswith("run:") and not n.startswith("run:shard-")
                      and c.names is not None and c.names.startswith("bundle") and n not in ARGUMENT_CASES)
PROMPT = ["--prompt-ids", "1,2,3", "--max-new-tokens", "2"]


@pytest.fixture(scope="module")
def asan_runner(tmp_path_factory) -> Path:
    """cosmoe-run built with -fsanitize=address,undefined (build/native-asan, reused between sessions)."""
    import executorch
    build = ROOT / "build" / "native-asan"
    et = Path(list(executorch.__path__)[0])
    configure = [VENV / "bin" / "cmake", "-S", ROOT / "runtime_native", "-B", build, "-G", "Ninja",
                 f"-DCMAKE_MAKE_PROGRAM={VENV / 'bin' / 'ninja'}", "-DCMAKE_BUILD_TYPE=Debug",
                 "-DCOSMOE_SANITIZE=ON", "-DCOSMOE_USE_OPENSSL=OFF",  # the portable SHA-256 too
                 f"-Dexecutorch_DIR={et / 'share' / 'cmake'}"]
    build.parent.mkdir(exist_ok=True)
    # Each worker that runs a test of this file builds it: one at a time (two CMake runs configuring one
    # directory at once fail on each other's files, as CI once did), the second finding it built.
    with FileLock(str(build) + ".lock"):
        for command in (configure, [VENV / "bin" / "cmake", "--build", build]):
            r = subprocess.run(command, capture_output=True, text=True)
            assert r.returncode == 0, f"{' '.join(map(str, command))}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return build / "cosmoe-run"


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    """The corpus's valid inputs, with the bundle lowered to ExecuTorch."""
    root = tmp_path_factory.mktemp("pristine-native")
    prepare(root)
    r = subprocess.run([VENV / "bin" / "cosmoe-export", "-q", "lower", root / "bundle", "--target", "executorch"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return root


def run_native(binary: Path, bundle: Path, *args: str) -> subprocess.CompletedProcess:
    # Leaks are checked too: a runner that opens and closes bundles in an app must not leak.
    env = {**os.environ, "ASAN_OPTIONS": "abort_on_error=0:detect_leaks=1", "UBSAN_OPTIONS": "print_stacktrace=1"}
    return subprocess.run([binary, bundle, *args], capture_output=True, text=True, env=env, timeout=300)


def check_one_line(r: subprocess.CompletedProcess, expect: str, named: Path | None) -> None:
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, f"exit {r.returncode}:\n{r.stderr[-3000:]}"
    assert len(lines) == 1 and lines[0].startswith("error: "), f"stderr is not one error line:\n{r.stderr[-3000:]}"
    assert expect in lines[0], f"{expect!r} not in {lines[0]!r}"
    if named is not None:
        assert str(named) in lines[0], f"{lines[0]!r} does not name {named}"


@pytest.mark.parametrize("name", BUNDLE_CASES)
def test_corpus_case(name, asan_runner, pristine, tmp_path):
    c = CASES[name]
    args = [str(a) for a in c.build(Workspace(tmp_path, pristine))]
    assert args[0] == "run"
    check_one_line(run_native(asan_runner, Path(args[1]), *PROMPT), c.expect, tmp_path / c.names)


def _garbage_vouched_for(bnd: Path, p: Path) -> None:
    """A program replaced by bytes that are no program, with a manifest that agrees."""
    p.write_bytes(b"\x00not an executorch program\x00" * 64)
    b.rehash(bnd, str(p.relative_to(bnd)))


def _truncated_vouched_for(bnd: Path, p: Path) -> None:
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    b.rehash(bnd, str(p.relative_to(bnd)))


def _append(bnd: Path, p: Path) -> None:
    with open(p, "ab") as f:
        f.write(b"\0" * 4)


def _flip(bnd: Path, p: Path) -> None:
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0x40
    p.write_bytes(bytes(data))


# name -> (tamper(bundle, program), expected substring). Each is applied to every expert program of
# layer 0 (whichever the router picks first is caught) under `resident`, which loads them all.
PROGRAM_CASES = {
    "size-differs": (_append, "manifest says"),
    "hash-differs": (_flip, "sha256"),
    "missing": (lambda bnd, p: p.unlink(), "missing"),
    "garbage-vouched-for": (_garbage_vouched_for, "corrupt"),
    "truncated-vouched-for": (_truncated_vouched_for, "corrupt"),
}


@pytest.mark.parametrize("name", sorted(PROGRAM_CASES))
@pytest.mark.parametrize("policy", ["resident", "lru"])
def test_expert_program_case(name, policy, asan_runner, pristine, tmp_path):
    tamper, expect = PROGRAM_CASES[name]
    bnd = b.copy_tree(pristine / "bundle", tmp_path / "bundle")
    programs = [bnd / f["path"] for f in _manifest(bnd)["files"]
                if f["role"] == "program" and f.get("unit") == "expert" and f.get("layer") == 0
                and f.get("target") == "executorch"]
    assert programs
    for p in programs:
        tamper(bnd, p)
    r = run_native(asan_runner, bnd, *PROMPT, "--policy", policy)
    check_one_line(r, expect, None)
    assert str(bnd) in r.stderr


def _manifest(bnd: Path) -> dict:
    import json
    return json.loads((bnd / "manifest.json").read_text())


def test_layer_program_corrupt(asan_runner, pristine, tmp_path):
    bnd = b.copy_tree(pristine / "bundle", tmp_path / "bundle")
    layer = next(bnd / f["path"] for f in _manifest(bnd)["files"] if f.get("unit") == "layer")
    _garbage_vouched_for(bnd, layer)
    check_one_line(run_native(asan_runner, bnd, *PROMPT), "corrupt", layer)


def test_not_lowered(asan_runner, pristine, tmp_path):
    bnd = b.copy_tree(pristine / "bundle", tmp_path / "bundle")
    programs = {f["path"].split("/")[0] for f in _manifest(bnd)["files"] if f["role"] == "program"}
    b.edit_manifest(bnd, lambda m: m.update(files=[f for f in m["files"] if f["role"] != "program"]))
    for d in programs:
        shutil.rmtree(bnd / d)
    check_one_line(run_native(asan_runner, bnd, *PROMPT), "run `cosmoe-export lower", bnd)


# The runner's own arguments: (args after BUNDLE, expected substring, whether the line names the bundle).
ARG_CASES = {
    "empty-prompt": (["--prompt-ids", "", "--max-new-tokens", "2"], "is empty", False),
    "prompt-longer-than-context": (["--prompt-ids", ",".join(["1"] * (b.TINY.max_position_embeddings + 8))],
                                   "shorten the prompt", True),
    "id-outside-vocabulary": (["--prompt-ids", f"1,{b.TINY.vocab_size}"], "must be in [0, 64)", True),
    "budget-below-minimum": ([*PROMPT, "--budget", "1000"], "below the minimum", True),
    "experts-per-layer-above-experts": ([*PROMPT, "--experts-per-layer", "9"], "between top-k 2 and 4", True),
    "budget-and-experts-per-layer": ([*PROMPT, "--experts-per-layer", "2", "--budget", "100000000"], "not both",
                                     False),
    "unknown-policy": ([*PROMPT, "--policy", "fifo"], "unknown policy 'fifo'", False),
    "not-a-number": (["--prompt-ids", "1,x,3"], "expected an integer", False),
    "top-p-out-of-range": ([*PROMPT, "--temperature", "1", "--top-p", "1.5"], "top_p in (0, 1]", False),
    "unknown-option": ([*PROMPT, "--bugdet", "1"], "unknown option --bugdet", False),
}


@pytest.mark.parametrize("name", sorted(ARG_CASES))
def test_argument_case(name, asan_runner, pristine, tmp_path):
    args, expect, names_bundle = ARG_CASES[name]
    bnd = pristine / "bundle"
    check_one_line(run_native(asan_runner, bnd, *args), expect, bnd if names_bundle else None)


@pytest.mark.parametrize("policy", ["resident", "paper", "lru", "lfu", "lru+prefetch"])
def test_sanitized_run_is_clean(policy, asan_runner, pristine, tmp_path):
    """A valid run under the sanitizers, every policy at the smallest budget it takes: exit 0, no report."""
    epl = [] if policy == "resident" else ["--experts-per-layer", "2"]
    r = run_native(asan_runner, pristine / "bundle", "--prompt-ids", "1,2,3,4,5,6,7", "--max-new-tokens", "20",
                   "--policy", policy, "--quiet", *epl)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stderr == "", r.stderr[-3000:]
    assert len(r.stdout.split()) == 20
