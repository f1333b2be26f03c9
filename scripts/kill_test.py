"""Kill `split`, `quantize` and `lower` (and `build` once it exists) with SIGKILL at random moments;
afterwards OUT must be absent or complete and pass integrity (Bundle.open + verify_integrity), and the
next run must succeed and leave no temporary directory behind.

Half the kills land at a uniformly random time over a whole run (start-up included); the other half
wait until the run's temporary directory appears and land uniformly within the write phase, where
the interesting states are. Seeded: the same --seed gives the same kill times (the states they hit
still depend on the machine's speed).

    .venv/bin/python scripts/kill_test.py --trials 8 --seed 0          # 8 per stage, 24 in all

Not part of CI (minutes). Exits 1 if any trial leaves a broken OUT or a temporary directory.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cosmoe_export.atomic import TMP_MARK  # noqa: E402
from runtime_py.bundle import Bundle  # noqa: E402
from runtime_py.errors import CosmoeError  # noqa: E402

SOURCE = ROOT / "recipes/models/tiny-bles"


@dataclass
class Stage:
    name: str
    argv: callable  # (work: Path, out: Path) -> list[str]
    prepare: callable  # (work: Path, out: Path) -> None: the input state before a run
    watch: callable  # out -> directory whose temporary siblings mark the write phase

    def command(self, work: Path, out: Path, *, force: bool = False) -> list[str]:
        return [sys.executable, "-m", "cosmoe_export.cli", "-q", *map(str, self.argv(work, out)),
                *(["--force"] if force else [])]


def _nothing(work: Path, out: Path) -> None:
    pass


def _fresh_bundle(work: Path, out: Path) -> None:
    shutil.copytree(work / "base", out)


def _lowered_bundle(work: Path, out: Path) -> None:
    shutil.copytree(work / "base-lowered", out)


STAGES = {
    "split": Stage("split", lambda w, o: ["split", SOURCE, "-o", o], _nothing, lambda o: o),
    "quantize": Stage("quantize", lambda w, o: ["quantize", w / "base", "-o", o, "--expert-scheme", "int8"],
                      _nothing, lambda o: o),
    # lower writes into the bundle: OUT is the bundle itself; half its trials re-lower a lowered one,
    # where a kill between swapping the program directory and the manifest would matter.
    "lower": Stage("lower", lambda w, o: ["lower", o, "--target", "onnx"], _fresh_bundle, lambda o: o / "onnx"),
    "relower": Stage("relower", lambda w, o: ["lower", o, "--target", "onnx"], _lowered_bundle,
                     lambda o: o / "onnx"),
}
# `build` (issue 7) joins here with one line once `cosmoe-export build` exists.
FORCE_ON_RERUN = {"split", "quantize"}


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True,
                          text=True, **kw)


def temp_dirs(watch: Path) -> list[Path]:
    """Temporary siblings of the watched directory, and stray manifest temp files beside it."""
    parent = watch.parent
    if not parent.is_dir():
        return []
    return sorted(p for p in parent.iterdir()
                  if p.name.startswith(f".{watch.name}{TMP_MARK}") or (p.name.startswith(".manifest.json.")
                                                                        and p.name.endswith(".tmp")))


def state_of(out: Path) -> str:
    if not out.exists():
        return "absent"
    try:
        problems = Bundle.open(out).verify_integrity()
    except CosmoeError as e:
        return f"BROKEN ({e})"
    return "complete" if not problems else f"BROKEN ({problems[0]})"


def calibrate(stage: Stage, work: Path) -> tuple[float, float, float]:
    """Times of one undisturbed run: (whole run, temporary directory appeared, result renamed into place)."""
    out = work / f"calib-{stage.name}"
    stage.prepare(work, out)
    watch = stage.watch(out)
    existed = watch.exists()
    t0 = time.perf_counter()
    p = subprocess.Popen(stage.command(work, out), cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    t_tmp = t_done = None
    while p.poll() is None:
        now = time.perf_counter() - t0
        if t_tmp is None and temp_dirs(watch):
            t_tmp = now
        if t_tmp is not None and t_done is None and not temp_dirs(watch) and (watch.exists() or existed):
            t_done = now
        time.sleep(0.001)
    total = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"{stage.name}: calibration run failed: {p.stderr.read()}")
    t_tmp = t_tmp if t_tmp is not None else 0.0
    return total, t_tmp, t_done if t_done is not None else total


def trial(stage: Stage, work: Path, i: int, rng: random.Random, timing: tuple[float, float, float]) -> dict:
    total, t_tmp, t_done = timing
    out = work / f"{stage.name}-{i:02d}"
    stage.prepare(work, out)
    in_write_phase = i % 2 == 1
    # Write-phase kills: uniform over the time from the temporary directory to the rename, plus 20 %.
    delay = rng.uniform(0, 1.2 * max(t_done - t_tmp, 0.01)) if in_write_phase else rng.uniform(0, total)
    p = subprocess.Popen(stage.command(work, out), cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = time.perf_counter()
    if in_write_phase:  # wait for the write phase to begin, then the drawn delay
        while p.poll() is None and not temp_dirs(stage.watch(out)) and time.perf_counter() - t0 < 2 * total:
            time.sleep(0.001)
        t0 = time.perf_counter()
    while p.poll() is None and time.perf_counter() - t0 < delay:
        time.sleep(0.001)
    killed = p.poll() is None
    if killed:
        p.send_signal(signal.SIGKILL)
    p.wait()
    after_kill = state_of(out)
    left = [x.name for x in temp_dirs(stage.watch(out))]
    rerun = run(stage.command(work, out, force=stage.name in FORCE_ON_RERUN and out.exists()), timeout=900)
    after_rerun = state_of(out) if rerun.returncode == 0 else f"RERUN FAILED ({rerun.stderr.strip()[-200:]})"
    left_after = [x.name for x in temp_dirs(stage.watch(out))]
    ok = not after_kill.startswith("BROKEN") and after_rerun == "complete" and not left_after
    return {"stage": stage.name, "trial": i, "phase": "write" if in_write_phase else "any", "delay_s": round(delay, 3),
            "killed": killed, "after_kill": after_kill, "temp_left_by_kill": left, "after_rerun": after_rerun,
            "temp_after_rerun": left_after, "ok": ok}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=8, help="trials per stage (default 8)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--stages", default="split,quantize,lower,relower")
    ap.add_argument("--json", default=None, help="write every trial's record here")
    args = ap.parse_args()
    rng = random.Random(args.seed)
    stages = [STAGES[s] for s in args.stages.split(",")]
    records = []
    with tempfile.TemporaryDirectory(prefix="kill-test-") as tmp:
        work = Path(tmp)
        r = run([sys.executable, "-m", "cosmoe_export.cli", "-q", "split", str(SOURCE), "-o", str(work / "base")])
        assert r.returncode == 0, r.stderr
        if any(s.name == "relower" for s in stages):
            shutil.copytree(work / "base", work / "base-lowered")
            r = run([sys.executable, "-m", "cosmoe_export.cli", "-q", "lower", str(work / "base-lowered"),
                     "--target", "onnx"])
            assert r.returncode == 0, r.stderr
        for stage in stages:
            timing = calibrate(stage, work)
            print(f"{stage.name}: undisturbed run {timing[0]:.2f} s, writes from {timing[1]:.2f} s "
                  f"to {timing[2]:.2f} s", flush=True)
            for i in range(args.trials):
                rec = trial(stage, work, i, rng, timing)
                records.append(rec)
                print(f"  {rec['stage']:<8} #{i:02d} {rec['phase']:<5} kill at {rec['delay_s']:6.3f} s "
                      f"{'killed' if rec['killed'] else 'finished first'}: {rec['after_kill']}, "
                      f"{len(rec['temp_left_by_kill'])} temp left; rerun: {rec['after_rerun']}, "
                      f"{len(rec['temp_after_rerun'])} temp left  {'OK' if rec['ok'] else 'FAIL'}", flush=True)
    killed = sum(r["killed"] for r in records)
    bad = [r for r in records if not r["ok"]]
    states = {}
    for r in records:
        states[r["after_kill"].split(" ")[0]] = states.get(r["after_kill"].split(" ")[0], 0) + 1
    print(f"kill_test: {len(records)} trials ({killed} killed mid-run), after the kill: "
          + ", ".join(f"{k} {v}" for k, v in sorted(states.items()))
          + f"; {sum(bool(r['temp_left_by_kill']) for r in records)} left a temporary directory, "
          f"{sum(bool(r['temp_after_rerun']) for r in records)} still there after the next run; "
          f"{len(bad)} failed")
    if args.json:
        Path(args.json).write_text(json.dumps(records, indent=2))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
