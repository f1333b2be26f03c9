"""Faults while writing: a full disk, two runs racing into one OUT, temporary directories left by a
killed run. Each must end with a complete OUT or none, and a one-line error. (scripts/kill_test.py
kills real runs at random moments; it is too slow for CI.)"""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from cosmoe_export.atomic import TMP_MARK, atomic_dir
from cosmoe_export.errors import CosmoeError
from runtime_py.bundle import Bundle
from tests.malformed.builders import make_checkpoint

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("faults") / "ckpt")


def _split(src: Path, out: Path, *, file_size_limit: int | None = None) -> subprocess.Popen:
    def limit() -> None:
        # SIGXFSZ ignored: a write past the limit fails with EFBIG, as a full disk fails with ENOSPC.
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, file_size_limit))
    return subprocess.Popen([sys.executable, "-m", "cosmoe_export.cli", "-q", "split", str(src), "-o", str(out)],
                            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=limit if file_size_limit else None)


def _leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}{TMP_MARK}"))


def test_disk_full_leaves_nothing(checkpoint, tmp_path):
    """A file-size limit below the backbone's size: the experts are written, then the backbone fails."""
    out = tmp_path / "out"
    p = _split(checkpoint, out, file_size_limit=6000)
    _, err = p.communicate(timeout=300)
    assert p.returncode == 2, err
    assert err.strip().splitlines() == [err.strip()] and "File too large" in err and str(out) in err, err
    assert not out.exists() and _leftovers(out) == []


def test_two_runs_into_one_out_in_process(checkpoint, tmp_path):
    """The race made deterministic: the second run's rename finds the first run's OUT and fails."""
    out = tmp_path / "out"
    with pytest.raises(CosmoeError, match="another run wrote it"):
        with atomic_dir(out) as slow:
            (slow / "a").write_text("slow")
            with atomic_dir(out) as fast:
                (fast / "a").write_text("fast")
    assert (out / "a").read_text() == "fast" and _leftovers(out) == []


def test_two_processes_into_one_out(checkpoint, tmp_path):
    """Real processes: one wins; the other fails with exit 2 and one line (whether it lost the race or
    started after the winner finished); OUT is complete."""
    out = tmp_path / "out"
    procs = [_split(checkpoint, out) for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    assert sorted(rc for rc, _ in results) == [0, 2], results
    err = next(e for rc, e in results if rc == 2)
    assert err.strip().splitlines() == [err.strip()] and str(out) in err, err
    assert Bundle.open(out).verify_integrity() == [] and _leftovers(out) == []


def test_stale_temp_dirs_are_cleaned(checkpoint, tmp_path):
    """A killed run's temporary sibling (its pid is gone) is removed by the next run; a live run's is kept."""
    out = tmp_path / "out"
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = tmp_path / f".out{TMP_MARK}{dead.pid}-deadbeef"
    live = tmp_path / f".out{TMP_MARK}{os.getpid()}-cafef00d"
    for d in (stale, live):
        (d / "experts").mkdir(parents=True)
    p = _split(checkpoint, out)
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0, err
    assert not stale.exists() and live.exists()
    assert Bundle.open(out).verify_integrity() == []
