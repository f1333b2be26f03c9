"""The native backend: a bundle's ExecuTorch programs run by the C++ runner ``cosmoe-run``
(runtime_native/, docs/NATIVE.md), behind Runner's interface (runtime_py/runner.py).

Every call is one process of the runner over the bundle: ``generate`` streams the token ids it
prints, one a line, and reads its metrics from ``--json``; ``logits`` scores row by row (``--score``
writes the logits of every prompt position, raw little-endian float32 [T, V]). The runner does its
own arithmetic: a budget, policy or prompt it refuses is its exit code 2 and one line on stderr,
which becomes a CosmoeError here (the CLI's exit 2 with that line); any other failure is a
RuntimeError with what it printed. The constructor runs it once on a one-token prompt, so that a
bad budget fails where Runner's does, before anything is generated, and the bytes the runner
measured (budget, backbone and KV cache, one expert) are known from the start.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from runtime_py.backends import require_backend, require_native_binary
from runtime_py.bundle import Bundle
from runtime_py.errors import CosmoeError
from runtime_py.runner import PREFETCH_MIN_PROB, Generation, check_prompt

PROBE_PROMPT = [0]  # every vocabulary has token 0


class NativeRunner:
    """Runner's public interface (runtime_py/runner.py) over the C++ runner. Not an Engine
    (runtime_py/engine.py): the C++ runner has its own engine, store and policies in its own
    process, so nothing here runs per layer or holds an expert."""

    backend = "native"

    def __init__(self, bundle: Bundle, *, budget_bytes: int | None = None, experts_per_layer: int | None = None,
                 policy: str = "lru", check_hash: str = "first", prefetch_min_prob: float = PREFETCH_MIN_PROB,
                 threads: int | None = None) -> None:
        require_backend(bundle, "native")  # ExecuTorch programs and an installed runner, else what to do
        self.binary = require_native_binary()
        self.bundle, self.config, self.policy = bundle, bundle.config, policy
        # Passed as given: the runner checks them and computes the budget itself.
        self._options = ["--policy", policy, "--check-hash", check_hash,
                         "--prefetch-min-prob", repr(float(prefetch_min_prob))]
        if budget_bytes is not None:
            self._options += ["--budget", str(int(budget_bytes))]
        if experts_per_layer is not None:
            self._options += ["--experts-per-layer", str(int(experts_per_layer))]
        if threads is not None:
            self._options += ["--threads", str(int(threads))]
        self.budget_bytes = self.backbone_bytes = self.expert_unit_bytes = 0
        self.generate(PROBE_PROMPT, 1)  # refuses a bad budget now; sets the bytes above

    # ------------------------------------------------------------------ public API (as Runner's)
    def check_prompt(self, prompt_ids: Sequence[int], max_new_tokens: int) -> list[int]:
        return check_prompt(self.bundle, prompt_ids, max_new_tokens)

    def generate(self, prompt_ids: Sequence[int], max_new_tokens: int, *, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int = 0, stop_ids: Sequence[int] = (),
                 on_token: Callable[[int], None] | None = None) -> Generation:
        ids = self.check_prompt(prompt_ids, max_new_tokens)
        args = ["--max-new-tokens", str(max_new_tokens), "--temperature", repr(float(temperature)),
                "--top-p", repr(float(top_p)), "--seed", str(int(seed))]
        if stop_ids:
            args += ["--stop-ids", _ids(stop_ids)]
        streamed: list[int] = []

        def token(line: str) -> None:
            try:
                tok = int(line)
            except ValueError:
                raise RuntimeError(f"{self.binary}: printed {line.strip()!r} where a token id belongs") from None
            streamed.append(tok)
            if on_token is not None:
                on_token(tok)

        with tempfile.TemporaryDirectory(prefix="cosmoe-run-") as tmp:
            path = Path(tmp) / "metrics.json"
            self._run(Path(tmp), ids, [*args, "--json", str(path)], token)
            metrics: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
        tokens, stopped = metrics.pop("tokens"), metrics.pop("stopped")
        if tokens != streamed:
            raise RuntimeError(f"{self.binary}: streamed {streamed} but its --json says {tokens}")
        self.budget_bytes = metrics["budget_bytes"]
        self.backbone_bytes = metrics["backbone_bytes"]
        self.expert_unit_bytes = metrics["expert_unit_bytes"]
        return Generation(tokens, metrics, stopped)

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [B, T] -> logits [B, T, V] (fp32), for parity checks: one scoring run per row."""
        if ids.dim() != 2:
            raise ValueError(f"ids must be [B, T], not {list(ids.shape)}")
        b, t = ids.shape
        v = self.config.vocab_size
        out = torch.empty(b, t, v)  # each row read straight into it: no second copy of B x T x V
        with tempfile.TemporaryDirectory(prefix="cosmoe-run-") as tmp:
            path = Path(tmp) / "logits.f32"
            for r, row in enumerate(ids.tolist()):
                self._run(Path(tmp), row, ["--score", str(path)])
                if path.stat().st_size != t * v * 4:
                    raise RuntimeError(f"{self.binary}: --score wrote {path.stat().st_size // 4} values for {t} "
                                       f"tokens x {v} vocabulary")
                with path.open("rb") as f:
                    f.readinto(out[r].numpy())  # fp32 in the host's byte order, as --score fwrites them
        return out  # [B, T, V]

    def close(self) -> None:
        """Nothing stays open between calls: every call is its own process."""

    def __enter__(self) -> NativeRunner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ the process
    def _run(self, tmp: Path, prompt: Sequence[int], args: list[str],
             on_line: Callable[[str], None] | None = None) -> None:
        """One run of the runner over the bundle, each line of its stdout to ``on_line`` as it comes."""
        ids = tmp / "prompt.txt"  # a file, not an argument: long contexts stay clear of the argv limits
        ids.write_text(_ids(prompt), encoding="utf-8")
        cmd = [str(self.binary), str(self.bundle.root), "--prompt-ids-file", str(ids), *args, *self._options,
               "--quiet"]
        # stderr goes to a file, not a pipe: however much the runner writes there, its stdout keeps flowing.
        with tempfile.TemporaryFile("w+", encoding="utf-8", errors="replace") as err:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err, text=True)
            try:
                for line in proc.stdout:
                    if on_line is not None and line.strip():
                        on_line(line)
            except BaseException:
                proc.kill()
                raise
            finally:
                proc.stdout.close()
                code = proc.wait()
            err.seek(0)
            message = err.read().strip().removeprefix("error: ")  # the CLI adds its own
        if code == 2:  # bad input: its one line names the file and the problem
            raise CosmoeError(message or f"{self.binary}: exit code 2 and no message")
        if code != 0:
            raise RuntimeError(f"{self.binary} failed with exit code {code}: {message or 'no message'}")


def _ids(ids: Sequence[int]) -> str:
    return ",".join(str(int(t)) for t in ids)
