"""``quantize``: a float bundle -> a bundle whose backbone and expert shards hold quantized weights.

Each canonical tensor gets an encoding by its role (ROLES, first match wins; every tensor must
match one): routed experts take the expert scheme (or a per-expert choice, ``experts="auto"``),
the backbone's matrices the backbone scheme, and routers, norms and biases stay float. Codes and
scales live beside each other in the same file (runtime_py/quant.py is the layout), and every
tensor's scheme, bits and group size are in the manifest.

Rounding: to nearest, or, given calibration text, GPTQ (cosmoe_export/quantization/gptq.py) for every quantized
matrix whose inputs the calibration run sees (experts, attention, shared experts, output head; the
embedding is a lookup and is rounded to nearest). The calibration walk goes layer by layer
(cosmoe_export/quantization/calibrate.py) and each layer's expert shards are written as soon as it is done.

Per-expert mixed precision (``experts="auto"``) measures every expert under every encoding of the
ladder on the calibration text in a first walk, chooses (cosmoe_export/quantization/mixed_precision.py), then
writes in a second walk: twice the compute, one layer's statistics in memory.

Per-expert work (reading, GPTQ's Hessians and rounding, writing a shard; mixed precision's scoring)
runs as tasks on an executor (cosmoe_export/executors.py: ``--jobs``, ``--executor ray``). A task is
a pure function of the bundle path, the options, (layer, expert) and, with calibration, the tokens
routed to that expert; the manifest lists the results in (layer, expert) order, so the bundle is
byte-identical whatever the executor and job count.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from cosmoe_export import text
from cosmoe_export.atomic import atomic_dir
from cosmoe_export.errors import CosmoeError, FormatError
from cosmoe_export.executors import Executor, ExecutorConfig, open_executor
from cosmoe_export.manifest_writer import ManifestWriter
from cosmoe_export.quantization import calibrate, gptq, mixed_precision
from cosmoe_export.quantization.quant_config import AUTO, ROUNDINGS, Calibration, QuantConfig  # noqa: F401 (re-exported)
from cosmoe_export.reference import TorchRuntime
from cosmoe_export.st_writer import SafetensorsWriter, file_bytes
from cosmoe_export.versions import tool_versions
from runtime_py import format as fmt
from runtime_py import quant
from runtime_py.bundle import Bundle, FileEntry
from runtime_py.config import CosmoeConfig, expert_of, expert_tensor_shapes, tensor_shapes
from runtime_py.expert_slots import ExpertSlots
from runtime_py.memory import parse_size  # noqa: F401  (re-exported for the CLI)
from runtime_py.model import Expert
from runtime_py.shards import read_shard

# Role of each canonical tensor, by name; the first pattern that matches wins.
ROLES: list[tuple[str, re.Pattern[str]]] = [(role, re.compile(p)) for role, p in [
    ("expert", r"^layers\.\d+\.moe\.experts\.\d+\."),
    # The router decides which experts load: a flipped top-2 choice swaps an expert in (a load) and
    # changes the output more than rounding any one weight does, for E x D values (8 KB per layer
    # at hidden 128 in fp32). docs/QUANTIZATION.md has the measurement (bench/quant_roles.py).
    # Qwen2-MoE's shared-expert gate is a router too: one sigmoid per token scales a whole expert;
    # and the score bias (ERNIE, GLM) picks experts.
    ("router", r"^layers\.\d+\.moe\.((router|shared_gate)\.weight|score_bias)$"),
    ("norm", r"(^|\.)\w*norm\.weight$"),  # 1-D, D values each: nothing to save, and scale-sensitive
    ("bias", r"\.bias$"),  # 1-D as well
    ("sinks", r"^layers\.\d+\.attn\.sinks$"),  # gpt-oss: one logit per head [H], like a bias
    ("embedding", r"^embed\.weight$"),  # a lookup: per-row scales dequantize only the rows used
    ("head", r"^lm_head\.weight$"),  # per-output-channel = per-vocabulary-row scales
    ("attention", r"^layers\.\d+\.attn\.([qkvo]|q_a|q_b|kv_a|kv_b|gate)\.weight$"),  # q_a, q_b, kv_a, kv_b: MLA
    # LFM2's short convolutions: the two projections as attention's; the [D, 1, K] kernel is tiny.
    ("conv", r"^layers\.\d+\.conv\.(in_proj|out_proj)\.weight$"),
    ("conv_kernel", r"^layers\.\d+\.conv\.weight$"),
    # Qwen3.5's Gated DeltaNet: its three wide projections as attention's; the per-head write
    # strength and decay projections [Hv, D], A_log, dt_bias and the conv kernel are small and set
    # the recurrence's decay, exponentially sensitive: float.
    ("linear_attn", r"^layers\.\d+\.linear\.(in_proj_qkv|in_proj_z|out_proj)\.weight$"),
    ("linear_state", r"^layers\.\d+\.linear\.(in_proj_a\.weight|in_proj_b\.weight|conv\.weight|A_log|dt_bias)$"),
    ("shared_expert", r"^layers\.\d+\.moe\.shared\.(gate|up|down)\.weight$"),
    ("dense_mlp", r"^layers\.\d+\.mlp\.(gate|up|down)\.weight$"),  # a "dense" layer of the plan
]]
# Which requested scheme each role takes: "experts", "backbone", or None (keep the float dtype).
ROLE_SCHEME = {"expert": "experts", "router": None, "norm": None, "bias": None, "sinks": None, "embedding": "backbone",
               "head": "backbone", "attention": "backbone", "shared_expert": "backbone", "dense_mlp": "backbone",
               "conv": "backbone", "conv_kernel": None, "linear_attn": "backbone", "linear_state": None}


def role_of(name: str) -> str:
    for role, pattern in ROLES:
        if pattern.search(name):
            return role
    raise CosmoeError(f"tensor {name!r} has no quantization role; add it to cosmoe_export.quantization.quantize.ROLES")


@dataclass(frozen=True)
class QuantizeResult:
    out: Path
    files: int
    bytes: int  # every file listed in the manifest
    source_bytes: int
    mixed_precision: dict | None


@dataclass
class _Plan:
    """Everything decided before the first byte is written."""

    src: Bundle
    config: QuantConfig
    float_name: str
    float_dtype: torch.dtype
    shapes: dict[str, tuple[int, ...]]
    backbone: dict[str, quant.Encoding]
    levels: list[mixed_precision.Level]
    choice: np.ndarray  # [L*E] index into levels

    @property
    def cfg(self) -> CosmoeConfig:
        return self.src.config

    def level_of(self, layer: int, e: int) -> int:
        # choice is over the experts of the MoE layers only, in (layer, expert) order.
        return int(self.choice[self.cfg.moe_layers.index(layer) * self.cfg.num_experts + e])

    def expert_encodings(self, layer: int, e: int, level: int) -> dict[str, quant.Encoding]:
        return {n: self.levels[level].encoding(s, self.float_name)
                for n, s in expert_tensor_shapes(self.cfg, layer, e).items()}


def quantize(*, bundle: Path, out: Path, config: QuantConfig, force: bool = False, progress: bool = True,
             executor: ExecutorConfig | None = None) -> QuantizeResult:
    """``executor``: where the per-expert tasks run (default: local, every core for large bundles)."""
    src = Bundle.open(bundle)
    if src.quantization is not None:
        raise CosmoeError(f"{bundle}: is already quantized ({src.quantization['experts']} experts, "
                          f"{src.quantization['backbone']} backbone); quantize the float bundle it came from")
    plan = _plan(src, config)
    tokenizer_files = [f for f in src.files if f.role == "tokenizer"]
    fixed_bytes = (file_bytes(_specs(plan.backbone, plan.shapes, plan.float_dtype), fmt.SHARD_METADATA)
                   + sum(f.bytes for f in tokenizer_files))
    calib = _open_calibration(src, config)
    job = _Job(str(src.root.resolve()), hashlib.sha256((src.root / fmt.MANIFEST_NAME).read_bytes()).hexdigest(),
               config)
    # One thread: GPTQ's and calibration's sums reduce in an order that depends on the thread count,
    # and the bytes written from them must not (every worker runs on one thread too).
    tasks = len(src.config.moe_layers) * src.config.num_experts
    with torch.inference_mode(), calibrate.one_thread(), _cleared_worker(), open_executor(executor, tasks=tasks) as ex:
        mixed = None
        if config.experts == AUTO:
            assert config.target_bytes is not None and calib is not None
            mixed = _decide(plan, calib, fixed_bytes, config.target_bytes, ex, job)
        with atomic_dir(out, force=force) as tmp:
            backbone_src = _read_source(plan, src.backbone, plan.backbone)
            if ex.shared_files:
                job = dataclasses.replace(job, out=str(tmp))
            entries, rounded, nearest = _write_experts(tmp, plan, calib, backbone_src, progress, ex, job)
            entries.insert(0, _write_backbone(tmp, plan, backbone_src, rounded))
            for f in tokenizer_files:
                (tmp / f.path).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src.checked_path(f), tmp / f.path)
                entries.append({"path": f.path, "role": "tokenizer", "bytes": f.bytes, "sha256": f.sha256})
            total = sum(e["bytes"] for e in entries)
            if mixed is not None and total != mixed["bundle_bytes"]:  # the size plan and the writer must agree
                raise RuntimeError(f"planned {mixed['bundle_bytes']} bytes, wrote {total}")
            manifest = _manifest(plan, calib, nearest, mixed)
            manifest.add_files(entries)
            manifest.write(tmp, where="quantize: the manifest it wrote")
    return QuantizeResult(out, len(entries) + 1, total, sum(f.bytes for f in src.files), mixed)


@dataclass
class _Calibration:
    runtime: TorchRuntime  # the float bundle, run layer by layer
    batches: list[torch.Tensor]  # [b, T] windows of the calibration text
    record: dict  # the manifest's quantization.calibration


def _plan(src: Bundle, config: QuantConfig) -> _Plan:
    """Every tensor's encoding by its role; the expert ladder (one rung unless ``auto``)."""
    cfg, float_name = src.config, src.backbone.dtype
    shapes = tensor_shapes(cfg)
    schemes = {"experts": config.experts, "backbone": config.backbone}

    def scheme_of(name: str) -> str:
        which = ROLE_SCHEME[role_of(name)]  # an unknown tensor fails here, before anything is written
        return schemes[which] if which else quant.FLOAT

    scheme_by_name = {n: scheme_of(n) for n in shapes}
    backbone = {n: quant.choose_encoding(scheme_by_name[n], shapes[n], config.group_size, float_name)
                for n in shapes if expert_of(n) is None}
    if config.experts == AUTO:
        levels = mixed_precision.ladder(config.group_size)
    else:
        levels = [mixed_precision.Level(config.experts, config.group_size if config.experts == "int4" else None)]
    return _Plan(src, config, float_name, fmt.dtype(float_name).torch, shapes, backbone, levels,
                 np.zeros(len(cfg.moe_layers) * cfg.num_experts, dtype=np.int64))


def _open_calibration(src: Bundle, config: QuantConfig) -> _Calibration | None:
    c = config.calibration
    if c is None:
        return None
    ids = text.encode_file(src, c.text, max_tokens=c.max_tokens, purpose="calibration")
    windows = text.windows(ids, src.config.max_position_embeddings)  # [B, T]
    record = {"file": Path(c.text).name, "sha256": hashlib.sha256(Path(c.text).read_bytes()).hexdigest(),
              "tokens": int(windows.numel()), "windows": int(windows.shape[0])}
    # One expert in memory at a time: the tasks load their own (a worker's copy), so the walk needs
    # each only while its tokens pass through it.
    return _Calibration(TorchRuntime(src, stream_experts=True), text.batches(windows, src.config.vocab_size), record)


def _write_experts(root: Path, plan: _Plan, calib: _Calibration | None, backbone_src: dict[str, torch.Tensor],
                   progress: bool, ex: Executor,
                   job: _Job) -> tuple[list[dict], dict[str, tuple[torch.Tensor, torch.Tensor]], list[str]]:
    """Write every expert shard, layer by layer. With GPTQ, the calibration walk also rounds the
    backbone's matrices as their Hessians come in. Returns (expert entries, backbone matrices
    rounded by GPTQ, experts GPTQ left to nearest rounding for lack of calibration tokens)."""
    cfg = plan.cfg
    entries: list[dict] = []
    rounded: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    nearest: list[str] = []
    bar = tqdm(total=len(cfg.moe_layers) * cfg.num_experts, desc="quantize", unit="expert",
               disable=not progress or None)

    def collect(results) -> None:
        for entry, data, to_nearest in results:  # in (layer, expert) order, however the tasks finished
            if data is not None:
                _put(root, entry["path"], data)
            if to_nearest:
                nearest.append(f"layers.{entry['layer']}.moe.experts.{entry['expert']}")
            entries.append(entry)
            bar.update(1)

    if plan.config.rounding != "gptq":
        collect(ex.map(_expert_task, ((job, layer, e, plan.level_of(layer, e), None)
                                      for layer in cfg.moe_layers for e in range(cfg.num_experts))))
        bar.close()
        return entries, rounded, nearest
    assert calib is not None
    matrices = {n for n, e in plan.backbone.items() if e.quantized and role_of(n) != "embedding"}
    for lc in calibrate.walk(calib.runtime, calib.batches, matrices):
        # The layer's tasks go first (each with the tokens routed to its expert), so the workers
        # round experts while this process rounds the layer's backbone matrices.
        results = None
        # The output head's Hessian comes last, alone; a dense layer has no experts.
        if lc.layer in cfg.moe_layers:
            # A generator: each task's tokens are copied out when the executor takes it (a window of
            # 2 x jobs at a time), not the whole layer's at once.
            results = ex.map(_expert_task, ((job, lc.layer, e, plan.level_of(lc.layer, e), _tokens(lc.routed(e)))
                                            for e in range(cfg.num_experts)))
        for name, h in lc.hessians.items():
            rounded[name] = gptq.gptq_quantize(backbone_src[name], gptq.inverse_factor(h), plan.backbone[name])
        if results is not None:
            collect(results)
    bar.close()
    return entries, rounded, nearest


def _manifest(plan: _Plan, calib: _Calibration | None, nearest: list[str], mixed: dict | None) -> ManifestWriter:
    config, src = plan.config, plan.src
    schemes = {"experts": config.experts, "backbone": config.backbone}
    # dense_mlp is recorded only for plans with dense layers, as the plan itself is (format v2): a
    # quantized bundle of an all-MoE model keeps the manifest bytes it had before dense layers; sinks
    # likewise only for a model that has them, and the conv roles for a model with conv layers.
    mixers = set(plan.cfg.layer_mixers or ())
    has = {"dense_mlp": not plan.cfg.all_moe, "sinks": plan.cfg.attention_sinks, "conv": "conv" in mixers,
           "conv_kernel": "conv" in mixers, "linear_attn": "linear" in mixers, "linear_state": "linear" in mixers}
    roles = {role: (config.experts if role == "expert" else schemes[s] if s else quant.FLOAT)
             for role, s in ROLE_SCHEME.items() if has.get(role, True)}
    quantization: dict = {"experts": config.experts, "backbone": config.backbone, "group_size": config.group_size,
                          "rounding": config.rounding, "roles": roles}
    if calib is not None:
        quantization["calibration"] = calib.record
    if config.rounding == "gptq":
        quantization["gptq"] = {"damp": gptq.DAMP, "block": gptq.BLOCK, "rounded_to_nearest": nearest}
    if mixed is not None:
        quantization["mixed_precision"] = mixed
    source_manifest = (src.root / fmt.MANIFEST_NAME).read_bytes()
    provenance = {"source": src.manifest["provenance"]["source"],
                  "quantized_from": {"manifest_sha256": hashlib.sha256(source_manifest).hexdigest(),
                                     "tools": src.manifest["provenance"]["tools"]},
                  "tools": tool_versions(*(("tokenizers",) if calib is not None else ()))}
    return ManifestWriter(model=src.manifest["model"], tokenizer=src.manifest.get("tokenizer"), provenance=provenance,
                          quantization=quantization)


# ---- rounding ----------------------------------------------------------------------------------------
def _round(w: torch.Tensor, enc: quant.Encoding, hinv: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    return quant.quantize(w, enc) if hinv is None else gptq.gptq_quantize(w, hinv, enc)


def _expert_factors(expert: Expert, layer: int, e: int, plan: _Plan,
                    routed: calibrate.Routed | None) -> dict[str, torch.Tensor] | None:
    """GPTQ's inverse factors (gptq.inverse_factor) of expert e's matrices, or None when it saw fewer
    calibration tokens than its widest matrix has inputs (H would be singular: GPTQ would fit the
    rounding to a handful of tokens). Matrices that read one input (gate and up) share one factor."""
    shapes = expert_tensor_shapes(plan.cfg, layer, e)
    if routed is None or len(routed.weight) < max(s[1] for s in shapes.values()):
        return None
    prefix = f"layers.{layer}.moe.experts.{e}."
    factors: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id(input) -> (input, its factor)
    out = {}
    for n, x in calibrate.matrix_inputs(expert, routed.x).items():
        if id(x) not in factors:
            factors[id(x)] = (x, gptq.inverse_factor(gptq.hessian(x, routed.weight)))
        out[prefix + n] = factors[id(x)][1]
    return out


# ---- per-expert tasks (cosmoe_export/executors.py) ---------------------------------------------------
@dataclass(frozen=True)
class _Job:
    """What every task of one quantize run shares: enough for a worker to rebuild the run's plan."""

    bundle: str  # the float bundle's directory (on a cluster: a path every node sees)
    manifest_sha256: str  # the bundle the plan was made for: a changed one is refused
    config: QuantConfig
    out: str | None = None  # tasks write their shard here (same machine); None: they return its bytes
    run: str = field(default_factory=lambda: uuid.uuid4().hex)  # no worker reuses another run's state


Tokens = tuple[np.ndarray, np.ndarray]  # an expert's calibration tokens: x [N, D], routing weight [N]


def _tokens(routed: calibrate.Routed | None) -> Tokens | None:
    """As plain arrays: pickled by value for any executor (torch would send a local pool shared-memory handles)."""
    return None if routed is None else (routed.x.numpy(), routed.weight.numpy())


def _routed(tokens: Tokens | None) -> calibrate.Routed | None:
    return None if tokens is None else calibrate.Routed(torch.from_numpy(tokens[0]), torch.from_numpy(tokens[1]))


@dataclass
class _Worker:
    plan: _Plan
    slots: ExpertSlots  # the float experts as modules, as the calibration run holds them


@functools.lru_cache(maxsize=1)
def _worker(job: _Job) -> _Worker:
    src = Bundle.open(Path(job.bundle))
    if hashlib.sha256((src.root / fmt.MANIFEST_NAME).read_bytes()).hexdigest() != job.manifest_sha256:
        raise CosmoeError(f"{src.root}: its manifest changed while quantizing it; quantize again")
    return _Worker(_plan(src, job.config), ExpertSlots(src, torch.float32))


@contextlib.contextmanager
def _cleared_worker() -> Iterator[None]:
    """Drop the in-process worker's bundle and plan when the run ends (a pool's workers end with it)."""
    try:
        yield
    finally:
        _worker.cache_clear()


@torch.inference_mode()
def _expert_task(job: _Job, layer: int, e: int, level: int, tokens: Tokens | None) -> tuple[dict, bytes | None, bool]:
    """Round and write expert (layer, e) at ``level``: (its manifest entry, the shard's bytes unless
    it was written into ``job.out``, whether GPTQ had to round it to nearest)."""
    w = _worker(job)
    factors = None
    if job.config.rounding == "gptq":
        factors = _expert_factors(w.slots.load(layer, e).module, layer, e, w.plan, _routed(tokens))
    if job.out is not None:
        return _write_expert(Path(job.out), w.plan, layer, e, level, factors or {}), None, factors is None \
            and job.config.rounding == "gptq"
    with tempfile.TemporaryDirectory(prefix="cosmoe-quantize-") as tmp:
        entry = _write_expert(Path(tmp), w.plan, layer, e, level, factors or {})
        data = (Path(tmp) / entry["path"]).read_bytes()
    return entry, data, factors is None and job.config.rounding == "gptq"


@torch.inference_mode()
def _error_task(job: _Job, layer: int, e: int, tokens: Tokens) -> list[float]:
    """Mixed precision's score of expert (layer, e) at every level: sum_t w_t^2 ||E^q(x_t) - E(x_t)||^2
    (calibrate.output_error; the caller divides by the layer's output energy)."""
    w = _worker(job)
    plan, routed = w.plan, _routed(tokens)
    assert routed is not None
    expert = w.slots.load(layer, e).module
    prefix = f"layers.{layer}.moe.experts.{e}."
    factors = (_expert_factors(expert, layer, e, plan, routed) or {}) if plan.config.rounding == "gptq" else {}
    params = dict(expert.named_parameters())
    errors = []
    for level in plan.levels:
        rounded = {}
        for n, p in params.items():
            enc = level.encoding(tuple(p.shape), plan.float_name)
            rounded[n] = quant.dequantize(*_round(p, enc, factors.get(prefix + n)), enc, p.shape[1])
        errors.append(calibrate.output_error(expert, rounded, routed))
    return errors


# ---- writing -----------------------------------------------------------------------------------------
def _specs(encodings: dict[str, quant.Encoding], shapes: dict[str, tuple[int, ...]],
           float_dtype: torch.dtype) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    specs: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
    for name, enc in encodings.items():
        specs.update(quant.stored_specs(name, shapes[name], enc, float_dtype))
    return specs


def _write_expert(root: Path, plan: _Plan, layer: int, e: int, level: int, factors: dict[str, torch.Tensor]) -> dict:
    encodings = plan.expert_encodings(layer, e, level)
    entry = plan.src.experts[(layer, e)]
    source = _read_source(plan, entry, encodings)
    rounded = {n: _round(w, encodings[n], factors.get(n)) for n, w in source.items() if encodings[n].quantized}
    written = _write_file(root, entry.path, plan, encodings, source, rounded)
    return {**written, "role": "expert", "layer": layer, "expert": e, "tensors": _tensors_json(encodings)}


def _put(root: Path, rel: str, data: bytes) -> None:
    """A shard a task sent back as bytes, written where that task would have written it."""
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "xb") as f:  # never overwrite, as SafetensorsWriter
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _write_backbone(root: Path, plan: _Plan, source: dict[str, torch.Tensor],
                    rounded: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict:
    written = _write_file(root, plan.src.backbone.path, plan, plan.backbone, source, rounded)
    return {**written, "role": "backbone", "tensors": _tensors_json(plan.backbone)}


def _read_source(plan: _Plan, entry: FileEntry, encodings: dict[str, quant.Encoding]) -> dict[str, torch.Tensor]:
    """The file's float tensors, names and shapes checked, memory-mapped; NaN or Inf refused."""
    # Its sha256 is checked first: a shard changed on disk must not be quantized into a new bundle.
    source = read_shard(plan.src, entry, {n: plan.shapes[n] for n in encodings}, dtype=plan.float_dtype)
    for name, w in source.items():
        if not bool(torch.isfinite(w).all()):
            raise FormatError(f"{plan.src.path_of(entry)}: {name} contains NaN or Inf values; re-split the bundle "
                              "from a good checkpoint")
    return source


def _write_file(root: Path, rel: str, plan: _Plan, encodings: dict[str, quant.Encoding],
                source: dict[str, torch.Tensor], rounded: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict:
    """Write one file. Tensors not in ``rounded`` are rounded to nearest when their turn comes: a
    tensor's scales and codes are written at different points of the file (safetensors orders by
    dtype), and computing each from the memory map keeps no file's codes in memory."""
    (root / rel).parent.mkdir(parents=True, exist_ok=True)
    writer = SafetensorsWriter(root / rel, _specs(encodings, plan.shapes, plan.float_dtype), fmt.SHARD_METADATA)
    try:
        for stored in writer.order:
            name = stored if stored in encodings else stored.removesuffix(quant.SCALE_SUFFIX)
            w, enc = source[name], encodings[name]
            if not enc.quantized:
                t = w.to(plan.float_dtype)
            elif name in rounded:
                t = rounded[name][0 if stored == name else 1]
            else:
                t = quant.quantize(w, enc)[0] if stored == name else quant.scales(w, enc)
            writer.write(stored, t.contiguous())
        sha = writer.close()
    except BaseException:
        writer.abort()
        raise
    return {"path": rel, "bytes": writer.bytes, "sha256": sha, "dtype": plan.float_name}


def _tensors_json(encodings: dict[str, quant.Encoding]) -> dict[str, dict]:
    return {name: enc.to_json() for name, enc in encodings.items()}


# ---- per-expert mixed precision ----------------------------------------------------------------------
def _decide(plan: _Plan, calib: _Calibration, fixed_bytes: int, target_bytes: int, ex: Executor, job: _Job) -> dict:
    """Measure every expert under every level, choose a level per expert within the target (sets
    ``plan.choice``), and return the manifest's record of the decision."""
    cfg, levels = plan.cfg, plan.levels
    shapes0 = expert_tensor_shapes(cfg, 0, 0)
    # Every expert has the same shapes (the config says so), so one file size per level.
    level_bytes = [file_bytes(_specs({n: lv.encoding(s, plan.float_name) for n, s in shapes0.items()},
                                     shapes0, plan.float_dtype), fmt.SHARD_METADATA) for lv in levels]
    n_experts = len(cfg.moe_layers) * cfg.num_experts
    if target_bytes - fixed_bytes < level_bytes[0] * n_experts:
        raise CosmoeError(f"--target-size {target_bytes:,} bytes is below the smallest bundle possible, "
                          f"{fixed_bytes + level_bytes[0] * n_experts:,} bytes (backbone {plan.config.backbone}, "
                          f"every expert {levels[0].name}); raise the target or quantize the backbone more")
    # Rows: the MoE layers (cfg.moe_layers), in order.
    selections = np.zeros((len(cfg.moe_layers), cfg.num_experts), dtype=np.int64)
    error = np.zeros((len(cfg.moe_layers), cfg.num_experts, len(levels)))
    for lc in calibrate.walk(calib.runtime, calib.batches, set()):
        if lc.layer not in cfg.moe_layers:  # a dense layer, or the head
            continue
        row = cfg.moe_layers.index(lc.layer)
        selections[row] = lc.selections
        scored = lc.routed_experts  # experts never selected keep error 0
        for e, errors in zip(scored, ex.map(_error_task, ((job, lc.layer, e, _tokens(lc.routed(e))) for e in scored)),
                             strict=True):
            for q, err in enumerate(errors):
                error[row, e, q] = err / max(lc.out_energy, 1e-300)
    cost = np.tile(np.array(level_bytes, dtype=np.int64), (n_experts, 1))  # [L*E, Q]
    plan.choice = mixed_precision.allocate(error.reshape(n_experts, -1), cost, target_bytes - fixed_bytes)
    return mixed_precision.record(layers=cfg.moe_layers, levels=levels, level_bytes=level_bytes,
                                  selections=selections, error=error,
                                  choice=plan.choice, target_bytes=target_bytes,
                                  bundle_bytes=fixed_bytes + int(cost[np.arange(n_experts), plan.choice].sum()))
