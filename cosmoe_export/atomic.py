"""Atomic output directories: write into a temporary sibling, rename into place on success.

A run killed at any moment leaves either no OUT or the previous complete OUT; the temporary
sibling it leaves is removed by the next run for the same OUT.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

from runtime_py.errors import CosmoeError

TMP_MARK = ".cosmoe-tmp-"
# A write that fails for lack of room: disk full, quota, or a file-size limit (RLIMIT_FSIZE).
_DISK_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


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
        if out.exists() and force:  # move the old one aside, then swap, then delete
            old = out.parent / f".{out.name}{TMP_MARK}{os.getpid()}-old-{uuid.uuid4().hex[:8]}"
            os.rename(out, old)
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            # rename(2) refuses to replace a non-empty directory: a run racing us into the same OUT
            # that finished first wins, and this one fails below instead of mixing the two.
            os.rename(tmp, out)
        _fsync_dir(out.parent)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if e.errno in _DISK_FULL:
            where = f" ({e.filename})" if e.filename else ""
            raise CosmoeError(f"{out}: a write failed{where}: {os.strerror(e.errno)}; nothing was written: free disk "
                              "space or raise the file-size limit, then run again") from None
        if e.errno in (errno.ENOTEMPTY, errno.EEXIST) and e.filename == str(tmp):
            raise CosmoeError(f"{out}: another run wrote it while this one was running (two runs into one OUT?); "
                              "this run's result was discarded, OUT is the other run's") from None
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
