"""The runtime's backends by name: the lowered programs each runs, and which of them can run a bundle here.

torch, executorch and onnxruntime run in this process (``runtime_py.runner.ENGINES``); native is the
C++ runner ``cosmoe-run`` (runtime_native/, driven by runtime_py/native.py), a separate binary that
runs the bundle's ExecuTorch programs; llamacpp is llama.cpp running the bundle's GGUF
(runtime_py/llamacpp.py), when llama-cpp-python is installed (the ``gguf`` extra). ``run``,
``verify`` and recipes take their choices from BACKENDS. Light on imports: the CLI reads it to
build its options.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from runtime_py.errors import ConfigError, FormatError

if TYPE_CHECKING:
    from runtime_py.bundle import Bundle

# Backend name -> the lowered target (`cosmoe-export lower --target`) it runs; None: the bundle's tensors.
BACKENDS: dict[str, str | None] = {
    "torch": None,
    "executorch": "executorch",
    "onnxruntime": "onnx",
    "native": "executorch",
    "llamacpp": "gguf",
}
# Backends that keep every expert resident (llama.cpp maps its whole GGUF): no budget, no policy.
# verify measures them resident beside the budgeted ones; the budget curve leaves them out.
RESIDENT_ONLY = ("llamacpp",)
# The torch backend's int kernels take activations as (runtime_py/qlinear.py): "bf16", PyTorch's fast
# int8/int4 kernels; "fp32", the bundle's math exactly. The program backends run their own kernels.
TORCH_ACTIVATIONS = ("bf16", "fp32")
NATIVE_BINARY = "cosmoe-run"
NATIVE_ENV = "COSMOE_RUN"  # overrides where the native runner is


def native_binary() -> Path | None:
    """The native runner: $COSMOE_RUN, else cosmoe-run beside this Python (scripts/install.sh puts it
    in the virtual environment's bin/); None when it is not an executable file."""
    path = Path(os.environ.get(NATIVE_ENV) or Path(sys.executable).parent / NATIVE_BINARY)
    return path if path.is_file() and os.access(path, os.X_OK) else None


def require_native_binary() -> Path:
    path = native_binary()
    if path is not None:
        return path
    if os.environ.get(NATIVE_ENV):
        raise ConfigError(f"{NATIVE_ENV}={os.environ[NATIVE_ENV]}: not an executable file; point it at a built "
                          f"{NATIVE_BINARY} or unset it")
    raise ConfigError(f"{Path(sys.executable).parent / NATIVE_BINARY}: the native runner is not installed; "
                      "run `bash scripts/install.sh` (it builds runtime_native/)")


def llamacpp_installed() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


def require_llamacpp() -> None:
    if not llamacpp_installed():
        raise ConfigError("the llamacpp backend needs llama-cpp-python: EXTRAS=gguf bash scripts/install.sh")


# Backends that need something installed beyond the bundle's programs: name -> whether it is here.
_INSTALLED = {"native": lambda: native_binary() is not None, "llamacpp": llamacpp_installed}


def _targets(bundle: Bundle) -> set[str]:
    return {f.target for f in bundle.files if f.role == "program"}


def available_backends(bundle: Bundle) -> list[str]:
    """The backends that can run ``bundle`` here: torch, every one whose programs it holds, and native
    and llamacpp when what they run is installed too."""
    targets = _targets(bundle)
    return [name for name, target in BACKENDS.items()
            if (target is None or target in targets) and _INSTALLED.get(name, lambda: True)()]


def require_backend(bundle: Bundle, backend: str) -> None:
    """Nothing when ``backend`` can run ``bundle`` here, else the error that says what to do."""
    if backend not in BACKENDS:
        raise ConfigError(f"unknown backend {backend!r}; choose from {list(BACKENDS)}")
    if backend == "native":
        require_native_binary()
    if backend == "llamacpp":
        require_llamacpp()
    target = BACKENDS[backend]
    if target is not None and target not in _targets(bundle):
        raise FormatError(f"{bundle.root}: has no programs for backend {backend!r}; run `cosmoe-export lower "
                          f"{bundle.root} --target {target}` first")
