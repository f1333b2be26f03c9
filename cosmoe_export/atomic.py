"""Atomic output directories: write into a temporary sibling, rename into place on success.

A run killed at any moment leaves either no OUT or the previous complete OUT; the temporary
sibling it leaves is removed by the next run for the same OUT.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

from runtime_py.errors import CosmoeError

TMP_MARK = ".cosmoe-tmp-"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale(out: Path) -> None:
    """Remove temporary siblings of ``out`` left by runs that died (their pid is gone)."""
    prefix = f".{out.name}{TMP_MARK}"
    for p in out.parent.glob(prefix + "*"):
        try:
            pid = int(p.name[len(prefix):].split("-")[0])
        except ValueError:
            continue
        if not _pid_alive(pid):
            shutil.rmtree(p, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(out: Path, *, force: bool = False) -> Iterator[Path]:
    out = Path(out)
    if out.exists() and not force:
        raise CosmoeError(f"{out}: already exists; pass --force to replace it")
    if not out.parent.is_dir():
        raise CosmoeError(f"{out.parent}: output's parent directory does not exist")
    clean_stale(out)
    tmp = out.parent / f".{out.name}{TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        if out.exists():  # --force: move the old one aside, then swap, then delete
            old = out.parent / f".{out.name}{TMP_MARK}{os.getpid()}-old-{uuid.uuid4().hex[:8]}"
            os.rename(out, old)
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
        _fsync_dir(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
