"""Versions of every tool that writes a byte of a bundle, recorded in its manifest."""

from __future__ import annotations

import platform
from importlib.metadata import PackageNotFoundError, version


def tool_versions(*packages: str) -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in ("cosmoe-export", "torch", "safetensors", *packages):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out
