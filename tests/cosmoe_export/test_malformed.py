"""Every crafted bad input of tests/malformed through the real CLI: exit code 2 (1 for a failed gate), one
line on stderr that names the file and the problem, no traceback, and nothing written."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from cosmoe_export.cli import cli
from tests.malformed import CASES, Workspace
from tests.malformed.cases import KNOWN_GAPS, prepare

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pristine")
    prepare(root)
    return root


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every path under ``root`` (files with size and mtime): a failed command must change none of them.
    Directories count by name only: a temporary directory made and removed again changes their mtime."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames:
            out[str((Path(dirpath) / name).relative_to(root))] = (-1, -1)
        for name in filenames:
            st = (Path(dirpath) / name).lstat()
            out[str((Path(dirpath) / name).relative_to(root))] = (st.st_size, st.st_mtime_ns)
    return out


@pytest.mark.parametrize("name", [
    pytest.param(n, marks=pytest.mark.xfail(strict=True, reason=KNOWN_GAPS[n])) if n in KNOWN_GAPS else n
    for n in sorted(CASES)])
def test_malformed(name, pristine, tmp_path):
    c = CASES[name]
    ws = Workspace(tmp_path, pristine)
    args = [str(a) for a in c.build(ws)]
    before = snapshot(tmp_path)
    r = CliRunner().invoke(cli, ["-q", *args])
    assert isinstance(r.exception, SystemExit), f"{name}: not a named error:\n{r.output}"
    lines = r.stderr.strip().splitlines()
    assert r.exit_code == c.exit_code, f"{name}: exit {r.exit_code}\n{r.stderr}"
    if c.exit_code == 1:  # a failed gate: one line per bad file, each naming it, then the one error line
        assert all(str(tmp_path) in line for line in lines[:-1]), f"{name}: stray stderr lines:\n{r.stderr}"
        lines = [lines[-1]]
    assert len(lines) == 1 and lines[0].startswith("error: "), f"{name}: stderr is not one error line:\n{r.stderr}"
    assert c.expect in lines[0], f"{name}: {c.expect!r} not in {lines[0]!r}"
    if c.names is not None:
        named = str(tmp_path / c.names)
        assert named in r.stderr, f"{name}: stderr does not name {named}:\n{r.stderr}"
    assert snapshot(tmp_path) == before, f"{name}: the failed command changed or created files"
    assert not ws.out.exists()
    if c.after is not None:
        c.after(ws)


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "cosmoe_export.cli", *args], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=300)


@pytest.mark.parametrize("name", ["split:pickle-that-runs-code", "quantize:shard-hash-differs"])
def test_malformed_real_process(name, pristine, tmp_path):
    """A few cases as a user runs them: a real process, its real exit code and stderr (warnings included)."""
    c = CASES[name]
    args = [str(a) for a in c.build(Workspace(tmp_path, pristine))]
    r = _cli(*args)
    assert r.returncode == c.exit_code, r.stderr
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and c.expect in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    v = _cli("-v", *args)  # -v: the same error with its traceback
    assert v.returncode != 0 and "Traceback" in v.stderr and c.expect in v.stderr


def _has_integrity_option() -> bool:
    return any(p.name == "integrity" for p in cli.commands["verify"].params)


@pytest.mark.parametrize("tamper", ["hash", "size", "missing"])
def test_integrity_check_reports_tampering(tamper, pristine, tmp_path):
    """A shard changed after the bundle was written is found: by ``verify --integrity`` as a failed gate
    (exit 1) once issue 7 adds it, by ``Bundle.verify_integrity`` (what it calls) until then."""
    from runtime_py.bundle import Bundle
    bnd = Workspace(tmp_path, pristine).bundle()
    assert Bundle.open(bnd).verify_integrity() == []
    shard = bnd / "experts/layer_001/expert_002.safetensors"
    if tamper == "hash":
        buf = bytearray(shard.read_bytes())
        buf[-1] ^= 1
        shard.write_bytes(bytes(buf))
    elif tamper == "size":
        shard.write_bytes(shard.read_bytes()[:-4])
    else:
        shard.unlink()
    problems = Bundle.open(bnd).verify_integrity()
    assert len(problems) == 1 and str(shard) in problems[0]
    if _has_integrity_option():
        r = CliRunner().invoke(cli, ["-q", "verify", str(bnd), "--integrity"])
        assert r.exit_code == 1 and str(shard) in r.output, r.output  # the file on stdout, the verdict on stderr
