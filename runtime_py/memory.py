"""Process memory as the kernel counts it (Linux /proc), and budget sizes as people write them."""

from __future__ import annotations

import os
import re
import resource

from runtime_py.errors import ConfigError

_PAGE = os.sysconf("SC_PAGE_SIZE")
# Decimal units as storage vendors and phone spec sheets use them; binary ones spelled out.
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*$")


def parse_size(text: str | int) -> int:
    """'300MB' -> 300_000_000; '1.5GiB', '512KB', '4096' (bytes) likewise."""
    if isinstance(text, int):
        value, unit = text, ""
    else:
        m = _SIZE_RE.match(str(text))
        if not m or m.group(2).upper() not in _UNITS:
            raise ConfigError(f"cannot read size {text!r}: write bytes or a number with KB, MB, GB (or KiB, MiB, GiB)")
        value, unit = float(m.group(1)), m.group(2).upper()
    n = int(value * _UNITS[unit])
    if n <= 0:
        raise ConfigError(f"size {text!r} must be positive")
    return n


def rss_bytes() -> int:
    """Resident set size now."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


def peak_rss_bytes() -> int:
    """Peak resident set size (VmHWM) since the process started or since ``reset_peak_rss``."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise OSError("VmHWM missing from /proc/self/status")


def reset_peak_rss() -> bool:
    """Start a new peak window (Linux >= 4.0: writing 5 to clear_refs resets VmHWM). False if refused."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def give_back_large_frees(threshold: int = 1 << 20) -> bool:
    """Serve every allocation of ``threshold`` bytes or more with its own memory map, so that freeing
    it returns it to the kernel. glibc's default raises this threshold (up to 32 MiB) each time such
    a block is freed, after which the blocks come from the heap and stay there once freed: a process
    that loads and drops one layer after another then grows by fragments of every layer (verify of a
    checkpoint larger than memory, measured by bench/memory_limit.py, reached its limit so). Setting
    the threshold (mallopt M_MMAP_THRESHOLD) also switches the adjustment off. False where the C
    library is not glibc (nothing changed)."""
    import ctypes
    import ctypes.util
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    M_MMAP_THRESHOLD = -3
    return bool(mallopt(M_MMAP_THRESHOLD, threshold))


def memory_available() -> int:
    """Bytes this process may still take: the kernel's MemAvailable, or less under a data or
    address-space limit (setrlimit) the process runs under."""
    try:
        with open("/proc/meminfo") as f:
            free = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):  # not Linux: physical memory is the best bound there is
        free = os.sysconf("SC_PHYS_PAGES") * _PAGE
    for limit in (resource.RLIMIT_DATA, resource.RLIMIT_AS):
        soft = resource.getrlimit(limit)[0]
        if soft != resource.RLIM_INFINITY:
            free = min(free, max(0, soft - rss_bytes()))
    return free
