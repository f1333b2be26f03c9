"""Run a bundle's lowered programs: ExecuTorch (XNNPACK) or ONNX Runtime, one unit at a time.

The decode loop is the device's: embed -> for each layer (attention program with the KV cache
passed in; top-k routing here; the selected experts' programs through the runner's budgeted store;
weighted sum) -> head. A dense layer's program computes its MLP itself and returns zero router
logits (docs/LOWERING.md): it is not routed, and no expert loads. Programs take up to
``max_tokens`` tokens per call (manifest), so a prompt is prefilled in chunks of that many.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch

from runtime_py.bundle import Bundle, FileEntry
from runtime_py.config import backbone_shapes, kv_cache_bytes
from runtime_py.errors import FormatError
from runtime_py.memory import rss_bytes
from runtime_py.model import Dispatch, add_residual, guess_logits, rope_attention_factor, rope_cos_sin, rope_inv_freq
from runtime_py.routers import route
from runtime_py.shards import read_shard

Program = Callable[[list[torch.Tensor]], list[torch.Tensor]]


def _load_executorch(path: Path, threads: int) -> Program:  # XNNPACK uses the runtime's shared threadpool
    from executorch.runtime import Runtime
    method = Runtime.get().load_program(str(path)).load_method("forward")
    return lambda xs: list(method.execute(xs))


def _load_onnxruntime(path: Path, threads: int) -> Program:
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    # Every session owns a thread pool. An expert is a few small matmuls for one token: with
    # hundreds of expert sessions, pools whose threads spin between calls cost far more than they
    # save (26 -> 388 tok/s on tiny-bles, 2 cores), so experts get one thread, the backbone all.
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    return lambda xs: [torch.from_numpy(o) for o in sess.run(None, {n: x.numpy()
                                                                    for n, x in zip(names, xs, strict=True)})]


# Backend name (as in verify/run) -> (the manifest's target, loader).
BACKENDS: dict[str, tuple[str, Callable[[Path, int], Program]]] = {
    "executorch": ("executorch", _load_executorch),
    "onnxruntime": ("onnx", _load_onnxruntime),
}


def layer_masks(pos: int, t: int, s: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Additive masks of T tokens at positions pos..pos+T-1: over the S cache slots passed in
    (slot_mask [S]: 0 for the written slots < pos, -inf for the rest) and over the T new keys
    (new_mask [T, T]: each token sees itself and the ones before it)."""
    slot_mask = torch.full((s,), float("-inf"))
    slot_mask[:pos] = 0
    return slot_mask, torch.triu(torch.full((t, t), float("-inf")), diagonal=1)


class ProgramEngine:
    """The decode loop over one backend's lowered units (an Engine, runtime_py/engine.py); the runner
    supplies the expert dispatch."""

    def __init__(self, bundle: Bundle, backend: str, *, dispatch: Dispatch, check_hash: str = "first") -> None:
        if backend not in BACKENDS:
            raise FormatError(f"unknown backend {backend!r}; choose from {sorted(BACKENDS)}")
        target, self._loader = BACKENDS[backend]
        self.name, self.bundle, self.config, self.check_hash = backend, bundle, bundle.config, check_hash
        self.units: dict[tuple[str, int | None, int | None], FileEntry] = {
            (f.unit, f.layer, f.expert): f for f in bundle.files if f.role == "program" and f.target == target}
        cfg = self.config
        layers = range(cfg.num_hidden_layers)
        want = {("embed", None, None), ("head", None, None), *(("layer", i, None) for i in layers),
                *(("expert", i, e) for i in cfg.moe_layers for e in range(cfg.num_experts))}
        if set(self.units) != want:
            raise FormatError(f"{bundle.root}: the {target} programs do not cover every unit; run "
                              f"`cosmoe-export lower {bundle.root} --target {target}`")
        self.inv_freq = rope_inv_freq(cfg)
        # Tokens per program call: bundles lowered before programs took several have no max_tokens (1).
        # An expert takes at most the chunk's tokens, so its max_tokens bounds the chunk too.
        self.chunk = min(f.max_tokens or 1 for f in self.units.values())
        # Layer programs lowered with a dynamic cache length take only the filled slots; older ones
        # were exported for the whole context and take all of it (docs/LOWERING.md).
        self.prefix_cache = all(self.units[("layer", i, None)].cache == "prefix" for i in layers)
        self.positional = [cfg.cache_spec(i).positional for i in layers]  # config.CacheSpec
        self.dispatch = dispatch
        # Backbone programs stay resident. Their cost is what loading them added to RSS (packed
        # weights, program buffers), and never less than their files.
        before = rss_bytes()
        threads = os.cpu_count() or 1
        self._backbone = {key: self._open(self.units[key], threads) for key in sorted(want, key=str)
                          if key[0] != "expert"}
        files = sum(self.units[key].bytes for key in self._backbone)
        self.backbone_bytes = max(rss_bytes() - before, files)
        self.routers, self.score_biases = self._routing_tensors()
        self.unit_bytes = self._measure_unit_bytes()

    # ---- units
    def _open(self, entry: FileEntry, threads: int = 1) -> Program:
        path = self.bundle.hashed_path(entry, self.check_hash)  # size check on every load, sha256 when due
        return self._loader(path, threads)

    def _measure_unit_bytes(self) -> int:
        """Resident bytes of one expert unit as loaded: the RSS growth of loading two of them (layer
        0, experts 0 and 1), halved; never less than the file. Experts of a bundle share one shape
        and precision, so one measurement stands for all."""
        first = self.config.moe_layers[0]
        entries = [self.units[("expert", first, e)] for e in range(min(2, self.config.num_experts))]
        before = rss_bytes()
        held = [self._loader(self.bundle.checked_path(e), 1) for e in entries]
        grown = (rss_bytes() - before) // len(held)
        del held
        return max(grown, max(e.bytes for e in entries))

    def _routing_tensors(self) -> tuple[dict[int, tuple], dict[int, torch.Tensor | None]]:
        """From one read of the backbone (routers, norms and score biases are never quantized), fp32:
        for the prefetch guess, every layer's (router weight [E, D] or None in a dense layer, FFN norm
        weight [D], its bias [D] or None; the guess divides by the previous layer's norm); for
        routing, each MoE layer's selection-only score bias [E] or None (runtime_py/routers.py). The
        router's own bias [E] (gpt-oss), where it has one, comes last in the guess's tuple."""
        cfg = self.config
        bias = cfg.norm == "layer"  # a LayerNorm's bias enters the guess too (model.guess_logits)
        names = {i: (f"layers.{i}.moe.router.weight" if cfg.ffn_kind(i).routed else None, f"layers.{i}.ffn_norm.weight",
                     f"layers.{i}.ffn_norm.bias" if bias else None,
                     f"layers.{i}.moe.router.bias" if cfg.router_bias and cfg.ffn_kind(i).routed else None)
                 for i in range(cfg.num_hidden_layers)}
        scores = {i: f"layers.{i}.moe.score_bias" if cfg.score_bias else None for i in cfg.moe_layers}
        wanted = [n for names_i in names.values() for n in names_i if n] + [n for n in scores.values() if n]
        state = read_shard(self.bundle, self.bundle.backbone, backbone_shapes(cfg), dtype=torch.float32,
                           names=wanted, check_hash=self.check_hash)
        return ({i: tuple(state[n] if n else None for n in names_i) for i, names_i in names.items()},
                {i: state[n] if n else None for i, n in scores.items()})

    def load_expert(self, layer: int, expert: int) -> Callable[[torch.Tensor], torch.Tensor]:
        program = self._open(self.units[("expert", layer, expert)])
        return lambda x: program([x])[0]  # x [N, D] -> [N, D]

    def expert_file_bytes(self, layer: int, expert: int) -> int:
        return self.units[("expert", layer, expert)].bytes

    def release_expert(self, unit: Program) -> None:
        pass  # the store drops its reference; the program (and its packed weights) is freed with it

    def guess_logits(self, layer: int, x_prev: torch.Tensor) -> torch.Tensor:
        (router, norm, bias, router_bias), (_, prev_norm, prev_bias, _) = self.routers[layer], self.routers[layer - 1]
        return guess_logits(router, norm, prev_norm, x_prev, bias, prev_bias, router_bias)

    # ---- cache and steps
    def cache_bytes(self, max_len: int) -> int:
        return kv_cache_bytes(self.config)  # new_cache holds the whole context, whatever max_len says

    def new_cache(self, max_len: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        # Room for the whole context (budgeted up front); layer calls get the filled prefix of it.
        specs = [self.config.cache_spec(layer) for layer in range(self.config.num_hidden_layers)]
        return [torch.zeros(1, *spec.k) for spec in specs], [torch.zeros(1, *spec.v) for spec in specs]

    def _chunk(self, ids: list[int], pos: int, cache: tuple[list[torch.Tensor], list[torch.Tensor]]) -> torch.Tensor:
        """T <= max_tokens tokens at positions pos..pos+T-1 -> logits [T, V]; writes their keys and
        values into the cache. Shapes: C context, S cache slots passed in, T tokens, D hidden,
        E experts, K experts per token."""
        cfg = self.config
        c, t = cfg.max_position_embeddings, len(ids)
        if pos + t > c:
            raise FormatError(f"positions up to {pos + t - 1} are past the model's context of {c} tokens")
        # The filled prefix (at least one slot: a program input cannot be empty; masked at pos 0),
        # or the whole cache for programs exported with a static one.
        s = max(pos, 1) if self.prefix_cache else c
        k_cache, v_cache = cache
        x = self._backbone[("embed", None, None)]([torch.tensor([ids])])[0]  # [1, T, D]
        cos, sin = rope_cos_sin(self.inv_freq, torch.arange(pos, pos + t), torch.float32,
                                rope_attention_factor(cfg))  # [T, Dh] x2
        slot_mask, new_mask = layer_masks(pos, t, s)  # [S], [T, T]
        # Programs with a static cache take one mask over the whole context and the new keys.
        masks = [slot_mask, new_mask] if self.prefix_cache else [torch.cat([slot_mask.expand(t, -1), new_mask], 1)]
        for layer in range(cfg.num_hidden_layers):
            positional = self.positional[layer]  # else a state, passed whole and replaced
            k_in, v_in = ((c[layer][:, :, :s] if positional else c[layer]).contiguous() for c in cache)  # [1,G,S,Wk|Wv]
            base, xn, logits, k_new, v_new = self._backbone[("layer", layer, None)](
                [x, cos, sin, *masks, k_in, v_in])  # [1,T,D] [T,D] [T,E] [1,G,T,Wk] [1,G,T,Wv]
            rows = slice(pos, pos + t) if positional else slice(None)
            k_cache[layer][:, :, rows] = k_new
            v_cache[layer][:, :, rows] = v_new
            if not cfg.ffn_kind(layer).routed:  # a dense layer: base already holds its MLP; nothing routed
                x = base
                continue
            weights, idx = route(logits, cfg, self.score_biases[layer])  # [T, K] x2
            x = add_residual(base, self.dispatch(layer, xn, weights, idx).view(1, t, -1), cfg.residual_multiplier)
        return self._backbone[("head", None, None)]([x])[0][0]  # [T, V]

    @torch.inference_mode()
    def forward(self, ids: list[int], cache, pos: int) -> torch.Tensor:
        """Tokens [T] at positions pos.. -> logits of the last one [V]; prompts longer than what one
        program call takes (its manifest ``max_tokens``) are prefilled in chunks."""
        logits = None
        for i in range(0, len(ids), self.chunk):
            logits = self._chunk([int(t) for t in ids[i:i + self.chunk]], pos + i, cache)
        return logits[-1]

    @torch.inference_mode()
    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [B, T] -> logits [B, T, V], in chunks, one sequence at a time, each chunk's written into
        the result (B x T x V is 0.8 GB at 4,096 positions of a 50k vocabulary: no second copy)."""
        b, t = ids.shape
        out = torch.empty(b, t, self.config.vocab_size)
        for r, row in enumerate(ids.tolist()):
            cache = self.new_cache(t)
            for i in range(0, t, self.chunk):
                out[r, i:i + self.chunk] = self._chunk(row[i:i + self.chunk], i, cache)
        return out

    def close(self) -> None:
        self._backbone.clear()
