"""Sources of weights: a checkpoint directory or a named preset (seeded random weights).

Both give a ``Source``: the canonical config and an ordered plan of canonical tensors, each with
a loader that reads (or generates) just that tensor. Nothing is read until a loader runs, so a
stage can stream a checkpoint of any size tensor by tensor.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from cosmoe_export.errors import CheckpointError
from cosmoe_export.importers import tensor_names
from cosmoe_export.importers.adapters import Adapter, adapter_for
from cosmoe_export.importers.presets import get_preset
from runtime_py import format as fmt
from runtime_py.bundle import sha256_file
from runtime_py.config import CosmoeConfig, expert_of, tensor_shapes
from runtime_py.safetensors_header import Header, read_header

SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
TOKENIZER_FILES = (fmt.TOKENIZER_FILE, "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                   "vocab.json", "merges.txt", "tokenizer.model")


@dataclass
class PlannedTensor:
    name: str  # canonical
    shape: tuple[int, ...]
    dtype: torch.dtype  # dtype in the source
    load: Callable[[], torch.Tensor]
    origin: str = ""  # where it comes from, for error messages: "file: source name"


@dataclass
class Source:
    config: CosmoeConfig
    plan: dict[str, PlannedTensor]  # canonical name -> tensor, in model order
    provenance: dict[str, Any]
    tokenizer_files: list[Path] = field(default_factory=list)
    path: Path | None = None  # checkpoint directory (None for presets)
    adapter: Adapter | None = None
    release: Callable[[], None] = lambda: None  # drop memory maps (after each tensor)

    @property
    def reference_is_transformers(self) -> bool:
        return self.adapter is not None and self.adapter.uses_transformers

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Every tensor, loaded: only for models small enough to hold (references, tests)."""
        return {name: t.load() for name, t in self.plan.items()}


def open_source(spec: str, *, allow_pickle: bool = False, hash_files: bool = True) -> Source:
    """A preset name or a checkpoint directory. ``hash_files=False`` skips hashing the weight files
    for provenance (inspect does not need it; split does)."""
    preset = get_preset(spec)
    if preset is not None and not Path(spec).exists():
        return preset_source(spec, preset)
    return checkpoint_source(Path(spec), allow_pickle=allow_pickle, hash_files=hash_files)


# ---- presets -----------------------------------------------------------------------------------
def _seed(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") & ((1 << 63) - 1)


def random_tensor(name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Deterministic random init for one tensor: its own generator, seeded by (seed, name), so any
    tensor can be made alone, in any order, layer by layer."""
    if name.endswith("norm.weight"):
        return torch.ones(shape)
    g = torch.Generator().manual_seed(_seed(seed, name))
    # Unit-variance embeddings; other matrices scaled by fan-in so every component (experts
    # included) moves the logits and parity checks see errors anywhere.
    std = 1.0 if name == "embed.weight" else shape[-1] ** -0.5
    return torch.randn(shape, generator=g) * std


def preset_source(name: str, config: CosmoeConfig, seed: int = 0) -> Source:
    plan = {n: PlannedTensor(n, s, torch.float32, lambda n=n, s=s: random_tensor(n, s, seed), f"preset {name}: {n}")
            for n, s in tensor_shapes(config).items()}
    return Source(config, plan, {"kind": "preset", "name": name, "seed": seed})


# ---- checkpoints -------------------------------------------------------------------------------
class _SafetensorsFiles:
    """Open safetensors handles, lazily; ``release`` closes them so their pages leave RSS."""

    def __init__(self) -> None:
        self._open: dict[Path, Any] = {}
        self._headers: dict[Path, Header] = {}  # validated once; release() reopens files per tensor

    def header(self, path: Path) -> Header:
        """The file's header, read by our strict reader (it names the exact problem, and refuses
        duplicate names that the library would resolve silently) without mapping the file."""
        if path not in self._headers:
            self._headers[path] = read_header(path)
        return self._headers[path]

    def handle(self, path: Path) -> Any:
        h = self._open.get(path)
        if h is None:
            self.header(path)
            try:
                h = self._open[path] = safe_open(str(path), framework="pt")
            except Exception as e:  # SafetensorError, OSError
                raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
        return h

    def release(self) -> None:
        self._open.clear()


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


def checkpoint_source(path: Path, *, allow_pickle: bool = False, hash_files: bool = True) -> Source:
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint directory or preset")
    if not path.is_dir():
        raise CheckpointError(f"{path}: expected a checkpoint directory with config.json and safetensors files")
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path}: neither a bundle (no manifest.json) nor a checkpoint (no config.json); "
                              "pass a bundle written by `cosmoe-export split` or a checkpoint directory")
    raw = _read_json(path / "config.json")
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path / 'config.json'}: expected a JSON object")
    adapter = adapter_for(raw, str(path / "config.json"))
    config = adapter.config(raw, path)
    files = _SafetensorsFiles()
    index = _weight_index(path, files, allow_pickle)  # source name -> (file, shape, dtype, getter)
    plan = _plan(path, config, index, adapter)
    _permute_rows(plan, config, adapter.row_permutations(config))
    _offset_norms(plan, adapter.zero_centered_norms(config))
    weight_files = sorted({entry[0] for entry in index.values()})
    prov = {"kind": "checkpoint", "architecture": adapter.architecture, "files": [
        {"name": p.name, "bytes": p.stat().st_size, **({"sha256": sha256_file(p)} if hash_files else {})}
        for p in [path / "config.json", *weight_files]]}
    if any(k.endswith(tensor_names.MXFP4_SUFFIXES) for k in index):
        # What the weights were before import (gpt-oss releases its experts as MXFP4): `inspect` says so.
        prov["source_precision"] = "mxfp4 experts"
    tok = [path / n for n in TOKENIZER_FILES if (path / n).is_file()]
    return Source(config, plan, prov, tok, path, adapter, files.release)


def _weight_index(path: Path, files: _SafetensorsFiles, allow_pickle: bool) -> dict[str, tuple]:
    index_path = path / SAFETENSORS_INDEX
    if index_path.exists():
        idx = _read_json(index_path)
        weight_map = idx.get("weight_map") if isinstance(idx, dict) else None
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index_path}: no 'weight_map' object")
        shards = sorted(set(weight_map.values()))
        for shard in shards:
            if not isinstance(shard, str) or "/" in shard or "\\" in shard or shard.startswith("."):
                raise CheckpointError(f"{index_path}: shard name {shard!r} must be a plain file name")
        out = _index_safetensors([path / s for s in shards], files)
        listed = {k: path / v for k, v in weight_map.items()}
        real = {k: v[0] for k, v in out.items()}
        if listed != real:
            diff = sorted(set(listed.items()) ^ set(real.items()))[:3]
            raise CheckpointError(f"{index_path}: disagrees with its shard files, e.g. {diff}")
        return out
    shards = sorted(path.glob("*.safetensors"))
    if shards:
        return _index_safetensors(shards, files)
    pickles = sorted(p for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if not pickles:
        raise CheckpointError(f"{path}: no *.safetensors weights found")
    if not allow_pickle:
        raise CheckpointError(
            f"{pickles[0]}: pickle checkpoints can run code when loaded; convert to safetensors "
            "(transformers: model.save_pretrained(dir, safe_serialization=True)) or pass --allow-pickle")
    return _index_pickles(pickles)


def _index_safetensors(shards: list[Path], files: _SafetensorsFiles) -> dict[str, tuple]:
    out: dict[str, tuple] = {}
    for shard in shards:
        if not shard.is_file():
            raise CheckpointError(f"{shard}: shard listed in the index is missing")
        # From the header alone: mapping every shard here would hold the whole checkpoint's address
        # space at once (and the library's private maps count against RLIMIT_DATA, bench/memory_limit.py).
        tensors = files.header(shard).tensors
        for key in sorted(tensors):
            if key in out:
                raise CheckpointError(f"{shard}: tensor {key!r} also in {out[key][0].name}")
            out[key] = (shard, tensors[key].shape, tensors[key].dtype,
                        lambda shard=shard, key=key: files.handle(shard).get_slice(key))
    return out


def _index_pickles(pickles: list[Path]) -> dict[str, tuple]:
    # weights_only=True: the unpickler accepts only tensors and plain containers, never code.
    out: dict[str, tuple] = {}
    for p in pickles:
        try:
            sd = torch.load(p, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:
            raise CheckpointError(f"{p}: refused by the weights-only unpickler ({str(e).splitlines()[0]})") from None
        if not isinstance(sd, dict):
            raise CheckpointError(f"{p}: expected a state dict, got {type(sd).__name__}")
        for key, t in sd.items():
            if not isinstance(t, torch.Tensor):
                raise CheckpointError(f"{p}: entry {key!r} is not a tensor")
            known = fmt.dtype_of(t.dtype)
            st = known.st if known else str(t.dtype)
            out[key] = (p, tuple(t.shape), st, lambda t=t: t)
    return out


def _float_dtype(file: Path, key: str, st_dtype: str) -> torch.dtype:
    """The torch dtype of a source tensor, which must be one a bundle can hold."""
    if st_dtype not in fmt.DTYPES:
        raise CheckpointError(f"{file}: {key} has dtype {st_dtype}; expected {', '.join(fmt.DTYPES)}")
    return fmt.st_dtype(st_dtype).torch


def _plan(path: Path, config: CosmoeConfig, index: dict[str, tuple], adapter: Adapter) -> dict[str, PlannedTensor]:
    """Map every canonical tensor to its source; account for every source tensor."""
    consumed: set[str] = set()
    plan: dict[str, PlannedTensor] = {}
    missing: list[str] = []

    def take(key: str, want: tuple[int, ...], name: str, pick: Callable[[Any], torch.Tensor]) -> PlannedTensor:
        file, shape, st_dtype, getter = index[key]
        return PlannedTensor(name, want, _float_dtype(file, key, st_dtype), lambda: pick(getter()), f"{file}: {key}")

    for name, want in tensor_shapes(config).items():
        present = [p for p in tensor_names.source_candidates(name) if p.template in index]
        # The first source of the right shape (Qwen3.5's q_proj holds q and the output gate per
        # head: twice the rows of a plain q_proj, the same name), else the first, to report it.
        fits = [p for p in present if index[p.template][1] == p.source_shape(want)]
        found = (fits or present or [None])[0]
        if name in index and found is None:  # our own checkpoints use canonical names
            found = tensor_names.Part(name)
        if found is not None:
            key, shape = found.template, index[found.template][1]
            if shape != found.source_shape(want):
                raise CheckpointError(f"{index[key][0]}: {key} has shape {list(shape)}, "
                                      f"the config implies {list(found.source_shape(want))}")
            consumed.add(key)
            plan[name] = take(key, want, name, _picker(found, want, config))
            continue
        fused = _fused(name, config, index, consumed, adapter)
        if fused is not None:
            plan[name] = fused
            continue
        missing.append(name)
    if missing:
        raise CheckpointError(f"{path}: {len(missing)} tensors missing for this config, e.g. {missing[:3]}")
    extra = sorted(k for k in index if k not in consumed and not k.endswith(tensor_names.IGNORED_SUFFIXES)
                   and not adapter.ignores(k, config))
    if extra:
        raise CheckpointError(f"{index[extra[0]][0]}: {len(extra)} unexpected tensors, e.g. {extra[:3]}; "
                              "is the config's architecture right for these weights?")
    return plan


def _permute_rows(plan: dict[str, PlannedTensor], config: CosmoeConfig, rules: list) -> None:
    """Reorder rows of the tensors each rule names (Adapter.row_permutations: RoPE pairs into the
    bundle's half-split layout) as their tensors load."""
    if rules and config.qk_norm == "full":  # a norm over the whole projection would need its own permutation
        raise CheckpointError(f"{config.qk_norm!r} q/k norm with a permuted RoPE layout is not supported")
    for name, t in plan.items():
        rule = next((r for r in rules if re.fullmatch(r.pattern, name)), None)
        if rule is None:
            continue

        def load(load=t.load, blocks=rule.blocks, perm=rule.perm) -> torch.Tensor:
            w, index = load(), torch.tensor(perm)  # [blocks * n, ...]
            return w.reshape(blocks, len(index), *w.shape[1:])[:, index].reshape(w.shape).contiguous()
        t.load = load


def _offset_norms(plan: dict[str, PlannedTensor], patterns: list[str]) -> None:
    """Norm weights a family stores zero-centred (it scales by 1 + w: Qwen3.5's RMSNorm) become
    1 + w, in fp32 as the family computes it (in bf16, 1 + w would round away w's low bits)."""
    for name, t in plan.items():
        if any(re.fullmatch(p, name) for p in patterns):
            t.load = lambda load=t.load: 1.0 + load().float()
            t.dtype = torch.float32


def _picker(part: tensor_names.Part, want: tuple[int, ...], config: CosmoeConfig) -> Callable[[Any], torch.Tensor]:
    """Read a source slice into the canonical tensor: whole, one block of rows (of the whole tensor,
    or of each attention head's rows), or squeezed."""
    if part.squeeze:
        return lambda sl: sl[:].reshape(want)
    if part.per_head:  # rows [H, parts, Dh]: block `index` of every head
        h = config.num_attention_heads
        return lambda sl: sl[:].reshape(h, part.parts, -1, *want[1:])[:, part.index].reshape(want).contiguous()
    if part.parts > 1:
        rows = want[0]
        return lambda sl: sl[part.index * rows:(part.index + 1) * rows].contiguous()
    return lambda sl: sl[:]


def _fused(name: str, config: CosmoeConfig, index: dict[str, tuple], consumed: set[str],
           adapter: Adapter) -> PlannedTensor | None:
    """A per-expert tensor cut out of a fused [E, ...] tensor, read one expert slice at a time."""
    loc = expert_of(name)
    if loc is None or config.expert_kind != "standard":
        return None
    layer, e = loc
    part, kind = name.rsplit(".", 2)[-2:]  # gate | up | down, weight | bias
    if adapter.gpt_oss_experts:
        return _gpt_oss_expert(name, layer, e, part, kind, config, index, consumed)
    templates = tensor_names.FUSED_DOWN if part == "down" else tensor_names.FUSED_GATE_UP
    key = next((k for k in (t.format(l=layer) for t in templates) if k in index), None)
    if key is None:
        return None
    file, shape, st_dtype, getter = index[key]
    d, f, n_exp = config.hidden_size, config.intermediate_size, config.num_experts
    want = (n_exp, d, f) if part == "down" else (n_exp, 2 * f, d)
    if shape != want:
        raise CheckpointError(f"{file}: {key} has shape {list(shape)}, the config implies {list(want)}")
    dtype = _float_dtype(file, key, st_dtype)
    consumed.add(key)
    rows = {"gate": slice(0, f), "up": slice(f, 2 * f), "down": slice(None)}[part]
    return PlannedTensor(name, want[1:] if part == "down" else (f, d), dtype,
                         lambda: getter()[e:e + 1, rows][0].contiguous(), f"{file}: {key}[{e}]")


def numel(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


# e2m1 (FP4) code -> value, as transformers' integrations/mxfp4.py FP4_VALUES.
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def mxfp4_dequantize(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """MXFP4 blocks [..., R, G, 16] uint8 and scales [..., R, G] uint8 -> fp32 [..., R, G * 32]:
    value = FP4_VALUES[code] * 2^(scale - 127), codes low nibble first. Exact: every such value is
    a float32 (and a bfloat16, transformers' dtype) for the scales real checkpoints hold."""
    lut = torch.tensor(FP4_VALUES, dtype=torch.float32)
    codes = torch.stack([blocks & 0x0F, blocks >> 4], dim=-1).to(torch.int64)  # [..., R, G, 16, 2]
    values = lut[codes].flatten(-2)  # [..., R, G, 32]
    out = torch.ldexp(values, (scales.to(torch.int32) - 127)[..., None])
    return out.flatten(-2)  # [..., R, G * 32]


def _gpt_oss_expert(name: str, layer: int, e: int, part: str, kind: str, config: CosmoeConfig,
                    index: dict[str, tuple], consumed: set[str]) -> PlannedTensor | None:
    """Expert e's gate/up/down weight [out, in] or bias [out] from gpt-oss's fused tensors
    (tensor_names.GPT_OSS_GATE_UP), float or MXFP4."""
    d, f, n = config.hidden_size, config.intermediate_size, config.num_experts
    base = (tensor_names.GPT_OSS_DOWN if part == "down" else tensor_names.GPT_OSS_GATE_UP).format(l=layer)
    rows = slice(None) if part == "down" else slice(0 if part == "gate" else 1, None, 2)  # of the output features
    out_features = d if part == "down" else f

    def checked(key: str, want: tuple[int, ...]) -> tuple:
        file, shape, st_dtype, getter = index[key]
        if tuple(shape) != want:
            raise CheckpointError(f"{file}: {key} has shape {list(shape)}, the config implies {list(want)}")
        consumed.add(key)
        return file, st_dtype, getter

    if kind == "bias":
        key = base + "_bias"
        if key not in index:
            return None
        file, st_dtype, getter = checked(key, (n, d if part == "down" else 2 * f))
        return PlannedTensor(name, (out_features,), _float_dtype(file, key, st_dtype),
                             lambda: getter()[e:e + 1][0, rows].contiguous(), f"{file}: {key}[{e}]")
    in_features = f if part == "down" else d
    if base in index:  # float: x @ W, W [E, in, out]
        file, st_dtype, getter = checked(base, (n, in_features, 2 * f if part != "down" else d))
        return PlannedTensor(name, (out_features, in_features), _float_dtype(file, base, st_dtype),
                             lambda: getter()[e:e + 1][0][:, rows].T.contiguous(), f"{file}: {base}[{e}]")
    blocks_key, scales_key = (base + s for s in tensor_names.MXFP4_SUFFIXES)
    if blocks_key not in index or scales_key not in index:
        return None
    if in_features % 32:
        raise CheckpointError(f"{index[blocks_key][0]}: {blocks_key}: MXFP4 needs rows of a multiple of 32 "
                              f"values, the config implies {in_features}")
    r = 2 * f if part != "down" else d
    file, b_dtype, blocks = checked(blocks_key, (n, r, in_features // 32, 16))
    _, s_dtype, scales = checked(scales_key, (n, r, in_features // 32))
    if b_dtype != "U8" or s_dtype != "U8":
        raise CheckpointError(f"{file}: {blocks_key} / {scales_key} must be uint8 (MXFP4), got {b_dtype} / {s_dtype}")
    # bfloat16: what transformers dequantizes MXFP4 to, and every MXFP4 value fits it exactly.
    return PlannedTensor(name, (out_features, in_features), torch.bfloat16,
                         lambda: mxfp4_dequantize(blocks()[e:e + 1][0], scales()[e:e + 1][0])[rows].contiguous(),
                         f"{file}: {blocks_key}[{e}]")
