"""What the runner needs from a backend: the ``Engine`` protocol.

An engine runs everything but the routed experts of one bundle on one backend: embedding,
attention, router and head, with the KV cache, one call per prompt chunk or decoded token. At every
layer it hands the routed tokens to its ``dispatch``, the runner's expert step (runtime_py/runner.py:
the budgeted store, routing metrics, prefetch), given when the engine is made; the units the store
asks for come from the engine's ``load_expert``. Implementations:

    runtime_py/torch_engine.py     TorchEngine    the canonical PyTorch model, experts read into slots
    runtime_py/program_backend.py  ProgramEngine  the lowered programs (ExecuTorch, ONNX Runtime)

The native backend (runtime_py/native.py, NativeRunner) is not an engine: the C++ runner
(runtime_native/) runs its own loop, store and policies in its own process, mirroring
ProgramEngine and runtime_py/runner.py, so nothing crosses per layer. NativeRunner stands one level
up, in Runner's place: the same ``generate``, ``logits``, ``check_prompt``, ``close``, byte
attributes and metrics (``runtime_py.runner.open_runner`` returns either).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch

from runtime_py.model import Dispatch

if TYPE_CHECKING:
    from runtime_py.bundle import Bundle


@runtime_checkable  # isinstance checks that every member is there (tests/runtime_py/test_runtime.py)
class Engine(Protocol):
    name: str  # the backend (runtime_py.backends.BACKENDS)
    backbone_bytes: int  # resident bytes of everything but the routed experts, as loaded
    unit_bytes: int  # resident bytes of one expert unit, as loaded (the store's unit)
    # (layer, x [N, D], weights [N, K], idx [N, K]) -> y [N, D]: given at construction; may be replaced
    # between calls (tests spy on it), never during one.
    dispatch: Dispatch

    def load_expert(self, layer: int, expert: int) -> Callable[[torch.Tensor], torch.Tensor]:
        """The unit of (layer, expert), loaded now: x [N, D] -> y [N, D]."""
        ...

    def release_expert(self, unit: Any) -> None:
        """The store is done with ``unit`` (evicted): its memory may be reused or freed."""
        ...

    def expert_file_bytes(self, layer: int, expert: int) -> int:
        """Bytes a load of (layer, expert) reads from the bundle."""
        ...

    def guess_logits(self, layer: int, x_prev: torch.Tensor) -> torch.Tensor:
        """Layer ``layer``'s router logits [N, E] guessed from layer-1's MoE input x_prev [N, D] (prefetch)."""
        ...

    def cache_bytes(self, max_len: int) -> int:
        """Bytes of the KV cache ``new_cache(max_len)`` allocates."""
        ...

    def new_cache(self, max_len: int) -> Any:
        ...

    def forward(self, ids: Sequence[int], cache: Any, pos: int) -> torch.Tensor:
        """Tokens [T] at positions pos.. continuing ``cache`` -> logits of the last one [V] (fp32)."""
        ...

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [B, T] -> logits [B, T, V] (fp32), for parity checks."""
        ...

    def close(self) -> None:
        ...


# Backend name -> engine: (bundle, check_hash (runtime_py.bundle.HASH_CHECKS), dispatch,
# torch_activations (runtime_py.backends.TORCH_ACTIVATIONS; the PyTorch engine's only)) -> Engine.
EngineFactory = Callable[["Bundle", str, Dispatch, str], Engine]
