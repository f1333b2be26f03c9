"""Run a bundle's lowered programs: ExecuTorch (XNNPACK) or ONNX Runtime, one unit at a time.

The decode loop is the device's: embed -> for each layer (attention program with the KV cache
passed in; top-k routing here; the selected experts' programs, loaded on first use; weighted sum)
-> head. The layer programs take one token (see cosmoe_export/lower/units.py), so prefill is a
loop of decode steps.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import torch

from runtime_py.bundle import Bundle, FileEntry
from runtime_py.errors import FormatError
from runtime_py.model import rope_cos_sin, rope_inv_freq, route

Program = Callable[[list[torch.Tensor]], list[torch.Tensor]]


def _load_executorch(path: Path) -> Program:
    from executorch.runtime import Runtime
    method = Runtime.get().load_program(str(path)).load_method("forward")
    return lambda xs: list(method.execute(xs))


def _load_onnxruntime(path: Path) -> Program:
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    return lambda xs: [torch.from_numpy(o) for o in sess.run(None, {n: x.numpy()
                                                                    for n, x in zip(names, xs, strict=True)})]


# Backend name (as in verify/run) -> (the manifest's target, loader).
BACKENDS: dict[str, tuple[str, Callable[[Path], Program]]] = {
    "executorch": ("executorch", _load_executorch),
    "onnxruntime": ("onnx", _load_onnxruntime),
}


def available_backends(bundle: Bundle) -> list[str]:
    targets = {f.target for f in bundle.files if f.role == "program"}
    return [name for name, (target, _) in BACKENDS.items() if target in targets]


class ProgramRuntime:
    """``logits(ids)`` and ``greedy(ids, n)`` over the lowered units of one backend."""

    def __init__(self, bundle: Bundle, backend: str) -> None:
        if backend not in BACKENDS:
            raise FormatError(f"unknown backend {backend!r}; choose from {sorted(BACKENDS)}")
        target, self._loader = BACKENDS[backend]
        self.bundle, self.config, self.backend = bundle, bundle.config, backend
        self.units: dict[tuple[str, int | None, int | None], FileEntry] = {
            (f.unit, f.layer, f.expert): f for f in bundle.files if f.role == "program" and f.target == target}
        cfg = self.config
        layers = range(cfg.num_hidden_layers)
        want = {("embed", None, None), ("head", None, None), *(("layer", i, None) for i in layers),
                *(("expert", i, e) for i in layers for e in range(cfg.num_experts))}
        if set(self.units) != want:
            raise FormatError(f"{bundle.root}: the {target} programs do not cover every unit; run "
                              f"`cosmoe-export lower {bundle.root} --target {target}`")
        self._programs: dict[tuple, Program] = {}
        self.inv_freq = rope_inv_freq(cfg)
        self.loads = 0
        self.bytes_loaded = 0
        self.load_ms: list[float] = []
        # Backbone programs stay resident: load them now.
        for key in want:
            if key[0] != "expert":
                self._program(key)

    def _program(self, key: tuple) -> Program:
        prog = self._programs.get(key)
        if prog is None:
            entry = self.units[key]
            t = time.perf_counter()
            prog = self._programs[key] = self._loader(self.bundle.checked_path(entry))
            if key[0] == "expert":
                self.loads += 1
                self.bytes_loaded += entry.bytes
                self.load_ms.append((time.perf_counter() - t) * 1e3)
        return prog

    def _new_cache(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        cfg = self.config
        shape = (1, cfg.num_key_value_heads, cfg.max_position_embeddings, cfg.head_size)
        return ([torch.zeros(shape) for _ in range(cfg.num_hidden_layers)],
                [torch.zeros(shape) for _ in range(cfg.num_hidden_layers)])

    def _step(self, tok: int, pos: int, cache: tuple[list[torch.Tensor], list[torch.Tensor]]) -> torch.Tensor:
        """One token at position ``pos`` -> logits [V]; writes this token's keys/values into the cache."""
        cfg = self.config
        s = cfg.max_position_embeddings
        if pos >= s:
            raise FormatError(f"position {pos} is past the model's context of {s} tokens")
        k_cache, v_cache = cache
        x = self._program(("embed", None, None))([torch.tensor([[tok]])])[0]  # [1, 1, D]
        cos, sin = rope_cos_sin(self.inv_freq, torch.tensor([pos]), torch.float32)  # [1, Dh] x2
        mask = torch.zeros(1, s + 1)  # [T=1, S+1]: cache slots, then this token
        mask[0, pos:s] = float("-inf")  # slots not written yet
        for layer in range(cfg.num_hidden_layers):
            base, xn, logits, k_new, v_new = self._program(("layer", layer, None))(
                [x, cos, sin, mask, k_cache[layer], v_cache[layer]])
            k_cache[layer][:, :, pos] = k_new[:, :, 0]
            v_cache[layer][:, :, pos] = v_new[:, :, 0]
            weights, idx = route(logits, cfg.num_experts_per_tok, cfg.norm_topk_prob)  # [1, K] x2
            y = base.clone()  # [1, 1, D]
            for slot in range(cfg.num_experts_per_tok):
                out = self._program(("expert", layer, int(idx[0, slot])))([xn])[0]  # [1, D]
                y += weights[0, slot] * out.view(1, 1, -1)
            x = y
        return self._program(("head", None, None))([x])[0][0, -1]  # [V]

    @torch.inference_mode()
    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [B, T] -> logits [B, T, V], one decode step per token, one sequence at a time."""
        rows = []
        for row in ids:
            cache = self._new_cache()
            rows.append(torch.stack([self._step(int(t), pos, cache) for pos, t in enumerate(row)]))
        return torch.stack(rows)

    @torch.inference_mode()
    def greedy(self, ids: torch.Tensor, new_tokens: int) -> list[int]:
        cache = self._new_cache()
        logits = None
        for pos, t in enumerate(ids[0]):
            logits = self._step(int(t), pos, cache)
        out: list[int] = []
        pos = ids.shape[1]
        while len(out) < new_tokens:
            out.append(int(logits.argmax()))
            if len(out) < new_tokens:
                logits = self._step(out[-1], pos, cache)
                pos += 1
        return out
