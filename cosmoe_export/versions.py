"""Versions of every tool that writes a byte of a bundle, recorded in its manifest."""

from __future__ import annotations

import platform
from importlib.metadata import PackageNotFoundError, version


def tool_versions(*packages: str) -> dict[str, str]:
    out = {"python": platform.python_version()}
    # numpy: the safetensors writer, mixed-precision choices and ONNX initializers pass through it.
    for name in ("cosmoe-export", "torch", "safetensors", "numpy", *packages):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out
