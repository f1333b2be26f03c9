"""The corpus: every bad input with the one-line error it must produce.

A case is a function that breaks a copy of a valid input inside a ``Workspace`` and returns the CLI
arguments to run, registered with ``@case(name, expect=..., names=...)``: ``expect`` is a substring of
the error line, ``names`` the workspace path the line must name, ``exit_code`` 2 (bad input) unless
the failure is a gate. Breakages of a bundle or a checkpoint are crossed with every command that reads
one (``BUNDLE_COMMANDS``, ``CHECKPOINT_COMMANDS``): a new command joins every case with one line there.
"""

from __future__ import annotations

import json
import pickle
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tests.malformed import builders as b


class Workspace:
    """A fresh directory per case, with copies of the pristine valid inputs made on demand."""

    def __init__(self, root: Path, pristine: Path) -> None:
        self.root, self.pristine = root, pristine

    def checkpoint(self, name: str = "ckpt") -> Path:
        return b.copy_tree(self.pristine / "ckpt", self.root / name)

    def bundle(self, name: str = "bundle") -> Path:
        return b.copy_tree(self.pristine / "bundle", self.root / name)

    def file(self, name: str, data: bytes) -> Path:
        (self.root / name).write_bytes(data)
        return self.root / name

    @property
    def out(self) -> Path:
        """Where a stage that writes is told to write: it must not exist after a failure."""
        return self.root / "out"


@dataclass(frozen=True)
class Case:
    name: str
    build: Callable[[Workspace], list[str]]
    expect: str  # substring of the one error line
    names: str | None  # workspace-relative path the line must name (None: the input was an argument, no file)
    exit_code: int = 2
    after: Callable[[Workspace], None] | None = None  # extra check once the command failed


CASES: dict[str, Case] = {}
# Cases that fail today in code this corpus's owner may not edit: run as strict xfails, so the test
# turns red (and this entry must go) the day the gap is fixed. Value: where the fix belongs.
KNOWN_GAPS: dict[str, str] = {}


def case(name: str, *, expect: str, names: str | None, exit_code: int = 2, after=None):
    def register(build: Callable[[Workspace], list[str]]) -> Callable[[Workspace], list[str]]:
        assert name not in CASES, name
        CASES[name] = Case(name, build, expect, names, exit_code, after)
        return build
    return register


def prepare(pristine: Path) -> None:
    """Write the valid inputs every case copies from (once per test session)."""
    b.make_checkpoint(pristine / "ckpt")
    b.make_bundle(pristine / "ckpt", pristine / "bundle")
    (pristine / "text.txt").write_text(" ".join(b.WORDS[1:]) * 2)
    # The smallest build: no lowering, verified on torch only (its other defaults are fine for TINY).
    (pristine / "recipe.toml").write_text('name = "malformed"\n[source]\nmodel = "ckpt"\n[lower]\ntargets = []\n'
                                          '[verify]\nbackends = ["torch"]\n')


# ---- commands that read a checkpoint or a bundle ---------------------------------------------------------
# Each maps (path of the broken input, workspace) -> CLI arguments: a new command joins every case
# that applies to it with one line here.
def _text(ws: Workspace) -> str:
    return str(ws.pristine / "text.txt")


CHECKPOINT_COMMANDS: dict[str, Callable[[Path, Workspace], list]] = {
    "split": lambda src, ws: ["split", src, "-o", ws.out],
    "inspect": lambda src, ws: ["inspect", src],
    "build": lambda src, ws: ["build", ws.pristine / "recipe.toml", "--source", src, "-o", ws.out],
}
BUNDLE_COMMANDS: dict[str, Callable[[Path, Workspace], list]] = {
    "inspect": lambda bnd, ws: ["inspect", bnd],
    "quantize": lambda bnd, ws: ["quantize", bnd, "-o", ws.out, "--expert-scheme", "int8"],
    "verify": lambda bnd, ws: ["verify", bnd, "--reference", ws.pristine / "ckpt", "--backend", "torch",
                               "--new-tokens", "4"],
    "analyze": lambda bnd, ws: ["analyze", bnd, "--text", _text(ws)],
    "lower": lambda bnd, ws: ["lower", bnd, "--target", "onnx"],
    "run": lambda bnd, ws: ["run", bnd, "--prompt", "w1 w2 w3", "--max-new-tokens", "2"],
}
# Commands that read the tensor files of a bundle (inspect reads only its manifest).
SHARD_READERS = ("quantize", "verify", "analyze", "lower", "run")


def checkpoint_case(name: str, *, expect: str, names: str, commands=tuple(CHECKPOINT_COMMANDS), extra=(), after=None):
    """``break_(checkpoint_dir)`` -> a broken checkpoint; one case per command that reads checkpoints."""
    def register(break_: Callable[[Path], None]):
        for cmd in commands:
            def build(ws: Workspace, cmd=cmd) -> list:
                src = ws.checkpoint()
                break_(src)
                return [*CHECKPOINT_COMMANDS[cmd](src, ws), *extra]
            case(f"{cmd}:{name}", expect=expect, names=names, after=after)(build)
        return break_
    return register


def bundle_case(name: str, *, expect: str, names: str, commands=tuple(BUNDLE_COMMANDS)):
    def register(break_: Callable[[Path], None]):
        for cmd in commands:
            def build(ws: Workspace, cmd=cmd) -> list:
                bnd = ws.bundle()
                break_(bnd)
                return BUNDLE_COMMANDS[cmd](bnd, ws)
            case(f"{cmd}:{name}", expect=expect, names=names)(build)
        return break_
    return register


# ---- safetensors files -----------------------------------------------------------------------------------
ST = "ckpt/model.safetensors"


@checkpoint_case("truncated-safetensors", expect="truncated", names=ST)
def _(ckpt: Path) -> None:
    p = ckpt / "model.safetensors"
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


@checkpoint_case("safetensors-shorter-than-8-bytes", expect="shorter than the 8-byte", names=ST)
def _(ckpt: Path) -> None:
    (ckpt / "model.safetensors").write_bytes(b"\x10\x00")


@checkpoint_case("header-length-beyond-file", expect="beyond the end", names=ST)
def _(ckpt: Path) -> None:
    p = ckpt / "model.safetensors"
    buf = p.read_bytes()
    p.write_bytes(struct.pack("<Q", len(buf)) + buf[8:])


@checkpoint_case("header-too-large", expect="cap", names=ST)
def _(ckpt: Path) -> None:
    p = ckpt / "model.safetensors"
    p.write_bytes(struct.pack("<Q", 1 << 40) + p.read_bytes()[8:])


@checkpoint_case("header-not-json", expect="not valid JSON", names=ST)
def _(ckpt: Path) -> None:
    b.write_raw(ckpt / "model.safetensors", b'{"embed.weight": ', b"")


def _shift(ckpt: Path, name: str, delta_begin: int, delta_end: int) -> None:
    header, data = b.read_raw(ckpt / "model.safetensors")
    off = header[name]["data_offsets"]
    header[name]["data_offsets"] = [off[0] + delta_begin, off[1] + delta_end]
    b.write_raw(ckpt / "model.safetensors", header, data)


def _last_tensor(ckpt: Path) -> str:
    header, _ = b.read_raw(ckpt / "model.safetensors")
    return max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][1])


@checkpoint_case("overlapping-offsets", expect="overlap", names=ST)
def _(ckpt: Path) -> None:
    header, _ = b.read_raw(ckpt / "model.safetensors")
    second = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"])[1]
    _shift(ckpt, second, -4, -4)  # starts inside the first tensor, leaves a 4-byte hole behind


@checkpoint_case("out-of-bounds-offsets", expect="reach past the end", names=ST)
def _(ckpt: Path) -> None:
    """The last tensor claims 64 more bytes (shape grown to match) than the file holds."""
    name = _last_tensor(ckpt)
    header, data = b.read_raw(ckpt / "model.safetensors")
    begin, end = header[name]["data_offsets"]
    header[name].update(data_offsets=[begin, end + 64], shape=[(end + 64 - begin) // 4])  # F32
    b.write_raw(ckpt / "model.safetensors", header, data)


@checkpoint_case("size-disagrees-with-shape", expect="needs", names=ST)
def _(ckpt: Path) -> None:
    header, data = b.read_raw(ckpt / "model.safetensors")
    header["norm.weight"]["shape"] = [header["norm.weight"]["shape"][0] + 1]
    b.write_raw(ckpt / "model.safetensors", header, data)


@checkpoint_case("duplicate-tensor-name", expect="twice", names=ST)
def _(ckpt: Path) -> None:
    header, data = b.read_raw(ckpt / "model.safetensors")
    text = json.dumps(header, separators=(",", ":"))
    entry = json.dumps({"norm.weight": header["norm.weight"]}, separators=(",", ":"))[1:-1]
    b.write_raw(ckpt / "model.safetensors", (text[:-1] + "," + entry + "}").encode(), data)


@checkpoint_case("duplicate-tensor-across-shards", expect="also in model-2.safetensors", names=ST)
def _(ckpt: Path) -> None:
    from safetensors.torch import load_file, save_file
    t = load_file(str(ckpt / "model.safetensors"))
    save_file({"norm.weight": t["norm.weight"]}, str(ckpt / "model-2.safetensors"))


def _retype(ckpt: Path, name: str, *, dtype=None, shape=None) -> None:
    import torch
    from safetensors.torch import load_file, save_file
    t = load_file(str(ckpt / "model.safetensors"))
    if dtype is not None:
        t[name] = t[name].to(dtype)
    if shape is not None:
        t[name] = torch.zeros(shape)
    save_file(t, str(ckpt / "model.safetensors"))


@checkpoint_case("dtype-contradicts-config", expect="has dtype I32", names=ST)
def _(ckpt: Path) -> None:
    import torch
    _retype(ckpt, "layers.0.attn.q.weight", dtype=torch.int32)


@checkpoint_case("shape-contradicts-config", expect="the config implies", names=ST)
def _(ckpt: Path) -> None:
    _retype(ckpt, "layers.1.moe.experts.2.up.weight", shape=(8, 17))


def _drop(ckpt: Path, prefix: str) -> None:
    from safetensors.torch import load_file, save_file
    t = load_file(str(ckpt / "model.safetensors"))
    save_file({k: v for k, v in t.items() if not k.startswith(prefix)}, str(ckpt / "model.safetensors"))


@checkpoint_case("missing-expert", expect="tensors missing", names="ckpt")
def _(ckpt: Path) -> None:
    _drop(ckpt, "layers.1.moe.experts.3.")


@checkpoint_case("extra-tensor", expect="unexpected tensors", names=ST)
def _(ckpt: Path) -> None:
    import torch
    from safetensors.torch import load_file, save_file
    t = load_file(str(ckpt / "model.safetensors"))
    t["layers.0.moe.experts.9.gate.weight"] = torch.zeros(8, 16)
    save_file(t, str(ckpt / "model.safetensors"))


def _poison(ckpt: Path, value: float) -> None:
    from safetensors.torch import load_file, save_file
    t = load_file(str(ckpt / "model.safetensors"))
    t["layers.1.moe.experts.0.down.weight"][3, 2] = value
    save_file(t, str(ckpt / "model.safetensors"))


# Only split (and build, which splits) reads weight values; inspect reads headers and shapes.
@checkpoint_case("nan-weights", expect="NaN or Inf", names=ST, commands=("split", "build"))
def _(ckpt: Path) -> None:
    _poison(ckpt, float("nan"))


@checkpoint_case("inf-weights", expect="NaN or Inf", names=ST, commands=("split", "build"))
def _(ckpt: Path) -> None:
    _poison(ckpt, float("-inf"))


@checkpoint_case("no-weights", expect="no *.safetensors", names="ckpt")
def _(ckpt: Path) -> None:
    (ckpt / "model.safetensors").unlink()


# ---- config.json -----------------------------------------------------------------------------------------
CFG = "ckpt/config.json"


def _config(**changes) -> Callable[[Path], None]:
    def edit(ckpt: Path) -> None:
        cfg = json.loads((ckpt / "config.json").read_text())
        cfg.update(changes)
        (ckpt / "config.json").write_text(json.dumps(cfg))
    return edit


checkpoint_case("top-k-above-experts", expect="exceeds num_experts", names=CFG)(_config(num_experts_per_tok=5))
checkpoint_case("zero-size", expect="hidden_size must be a positive integer", names=CFG)(_config(hidden_size=0))
checkpoint_case("negative-size", expect="num_experts must be a positive integer", names=CFG)(_config(num_experts=-4))
checkpoint_case("size-not-an-int", expect="intermediate_size must be a positive integer",
                names=CFG)(_config(intermediate_size=8.5))
checkpoint_case("heads-not-dividing-hidden", expect="does not divide hidden_size",
                names=CFG)(_config(num_attention_heads=3, num_key_value_heads=1))
checkpoint_case("absurd-sizes", expect="exceeds the limit", names=CFG)(
    _config(hidden_size=1 << 20, vocab_size=1 << 20, intermediate_size=1 << 20))
checkpoint_case("absurd-expert-count", expect="expert files exceeds the limit", names=CFG)(
    _config(num_hidden_layers=1 << 20, num_experts=1 << 10, hidden_size=2, num_attention_heads=1,
            num_key_value_heads=1, intermediate_size=1, vocab_size=2))
checkpoint_case("absurd-context", expect="KV cache", names=CFG)(_config(max_position_embeddings=1 << 40))
checkpoint_case("unknown-config-key", expect="unknown keys", names=CFG)(_config(hiden_size=16))
checkpoint_case("unknown-architecture", expect="not supported", names=CFG)(
    _config(architectures=["GPT2LMHeadModel"]))


@checkpoint_case("config-not-json", expect="not valid JSON", names=CFG)
def _(ckpt: Path) -> None:
    (ckpt / "config.json").write_bytes(b'{"vocab_size": 64,')


@checkpoint_case("config-not-utf8", expect="not valid JSON", names=CFG)
def _(ckpt: Path) -> None:
    (ckpt / "config.json").write_bytes(b'{"vocab_size": "\xff\xfe"}')


@checkpoint_case("config-missing", expect="no config.json", names="ckpt")
def _(ckpt: Path) -> None:
    (ckpt / "config.json").unlink()


@checkpoint_case("hf-config-impossible", expect="exceeds num_experts", names=CFG)
def _(ckpt: Path) -> None:
    """The Hugging Face path (transformers reads config.json first): Mixtral with top-5 of 4 experts."""
    cfg = {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "vocab_size": 64, "hidden_size": 16,
           "intermediate_size": 8, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
           "num_local_experts": 4, "num_experts_per_tok": 5, "max_position_embeddings": 32}
    (ckpt / "config.json").write_text(json.dumps(cfg))


# ---- pickles ---------------------------------------------------------------------------------------------
class _RunsCode:
    """Unpickling this would create a file: the proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _pickle_checkpoint(ckpt: Path, payload) -> None:
    (ckpt / "model.safetensors").unlink()
    with open(ckpt / "pytorch_model.bin", "wb") as f:
        pickle.dump(payload, f)


@checkpoint_case("pickle-without-allow-pickle", expect="pass --allow-pickle", names="ckpt/pytorch_model.bin")
def _(ckpt: Path) -> None:
    import torch
    (ckpt / "model.safetensors").unlink()
    torch.save({"embed.weight": torch.zeros(64, 16)}, ckpt / "pytorch_model.bin")


def _no_marker(ws: Workspace) -> None:
    assert not (ws.root / "PWNED").exists(), "the pickle's code ran"


# build has no --allow-pickle (recipes never read pickles): its pickle case is the one above.
@checkpoint_case("pickle-that-runs-code", expect="refused by the weights-only unpickler",
                 names="ckpt/pytorch_model.bin", extra=("--allow-pickle",), after=_no_marker,
                 commands=tuple(c for c in CHECKPOINT_COMMANDS if c != "build"))
def _(ckpt: Path) -> None:
    _pickle_checkpoint(ckpt, {"embed.weight": _RunsCode(ckpt.parent / "PWNED")})


# ---- bundles: the manifest -------------------------------------------------------------------------------
MANIFEST = "bundle/manifest.json"


def _expert_entry(m: dict, layer: int = 1, expert: int = 2) -> dict:
    return next(f for f in m["files"] if f.get("layer") == layer and f.get("expert") == expert)


@bundle_case("manifest-absolute-path", expect="is absolute", names=MANIFEST)
def _(bnd: Path) -> None:
    b.edit_manifest(bnd, lambda m: _expert_entry(m).update(path=str(bnd / "experts/layer_001/expert_002.safetensors")))


@bundle_case("manifest-dotdot-path", expect="leaves the bundle", names=MANIFEST)
def _(bnd: Path) -> None:
    b.edit_manifest(bnd, lambda m: _expert_entry(m).update(path="experts/../../ckpt/model.safetensors"))


@bundle_case("manifest-symlink-outside", expect="resolves outside the bundle", names=MANIFEST)
def _(bnd: Path) -> None:
    shard = bnd / "experts/layer_001/expert_002.safetensors"
    outside = bnd.parent / "elsewhere.safetensors"
    shard.rename(outside)
    shard.symlink_to(outside)


@bundle_case("manifest-newer-format", expect="upgrade cosmoe-export", names=MANIFEST)
def _(bnd: Path) -> None:
    b.edit_manifest(bnd, lambda m: m.update(format_version=3))  # runtime_py/format.py FORMAT_VERSION is 2


@bundle_case("manifest-not-json", expect="not valid UTF-8 JSON", names=MANIFEST)
def _(bnd: Path) -> None:
    (bnd / "manifest.json").write_bytes(b'{"format": "cosmoe-bundle", "files": [')


@bundle_case("manifest-duplicate-key", expect="appears twice", names=MANIFEST)
def _(bnd: Path) -> None:
    text = (bnd / "manifest.json").read_text()
    (bnd / "manifest.json").write_text(text.replace('"format": "cosmoe-bundle",', '"format": "cosmoe-bundle",' * 2, 1))


@bundle_case("manifest-missing", expect="manifest.json", names="bundle")
def _(bnd: Path) -> None:
    (bnd / "manifest.json").unlink()


@bundle_case("manifest-expert-missing", expect="do not cover every (layer, expert)", names=MANIFEST)
def _(bnd: Path) -> None:
    b.edit_manifest(bnd, lambda m: m["files"].remove(_expert_entry(m)))


@bundle_case("manifest-impossible-config", expect="exceeds num_experts", names=MANIFEST)
def _(bnd: Path) -> None:
    b.edit_manifest(bnd, lambda m: m["model"].update(num_experts_per_tok=9))


# A token mixer named in the layer plan without its sizes: refused before any cache is sized.
for _mixer, _expect in [("mla", "'mla' layers need"), ("conv", "'conv' layers but conv_kernel is 0"),
                        ("linear", "'linear' layers need")]:
    def _break(bnd: Path, mixer=_mixer) -> None:
        def edit(m: dict) -> None:
            m["format_version"] = 2
            m["model"]["layer_mixers"] = [mixer] * m["model"]["num_hidden_layers"]
        b.edit_manifest(bnd, edit)
    bundle_case(f"manifest-{_mixer}-without-sizes", expect=_expect, names=MANIFEST)(_break)


# ---- bundles: the shards ---------------------------------------------------------------------------------
# Each tampering is done twice: to every expert of layer 0 (whichever the router picks first is caught)
# and to the backbone (read first by every stage; the only one lower reaches quickly).
SHARD_TARGETS = {
    "shard": ("bundle/experts/layer_000/", lambda bnd: sorted((bnd / "experts/layer_000").glob("*.safetensors")),
              ("quantize", "verify", "analyze", "run")),
    "backbone": ("bundle/backbone.safetensors", lambda bnd: [bnd / "backbone.safetensors"], SHARD_READERS),
}


def _append(p: Path, bnd: Path) -> None:
    with open(p, "ab") as f:
        f.write(b"\0" * 4)


def _flip(p: Path, bnd: Path) -> None:
    buf = bytearray(p.read_bytes())
    buf[-3] ^= 0x40  # one weight changed, size unchanged
    p.write_bytes(bytes(buf))


def _trailing_bytes_vouched_for(p: Path, bnd: Path) -> None:
    header, data = b.read_raw(p)
    b.write_raw(p, header, data + b"\0" * 4)  # bytes no tensor owns, and a manifest that agrees
    b.rehash(bnd, str(p.relative_to(bnd)))


for _what, (_names, _files, _commands) in SHARD_TARGETS.items():
    for _name, _tamper, _expect in [("size-differs", _append, "manifest says"), ("hash-differs", _flip, "sha256"),
                                    ("missing", lambda p, bnd: p.unlink(), "missing"),
                                    ("bad-header-vouched-for", _trailing_bytes_vouched_for, "safetensors")]:
        def _break(bnd: Path, files=_files, tamper=_tamper) -> None:
            for p in files(bnd):
                tamper(p, bnd)
        bundle_case(f"{_what}-{_name}", expect=_expect, names=_names, commands=_commands)(_break)


@bundle_case("shard-nan-vouched-for", expect="NaN or Inf", names="bundle/experts/layer_001/expert_002.safetensors",
             commands=("quantize",))
def _(bnd: Path) -> None:
    """A NaN written into a shard whose manifest hash was updated to match: the hash cannot catch it."""
    rel = "experts/layer_001/expert_002.safetensors"
    header, data = b.read_raw(bnd / rel)
    off = header["layers.1.moe.experts.2.up.weight"]["data_offsets"][0]
    data = data[:off] + struct.pack("<f", float("nan")) + data[off + 4:]
    b.write_raw(bnd / rel, header, data)
    b.rehash(bnd, rel)


# ---- text inputs -----------------------------------------------------------------------------------------
TEXT_COMMANDS = {
    "analyze": lambda bnd, t, ws: ["analyze", bnd, "--text", t],
    "verify": lambda bnd, t, ws: ["verify", bnd, "--reference", ws.pristine / "ckpt", "--backend", "torch",
                                  "--new-tokens", "4", "--text", t],
    "quantize": lambda bnd, t, ws: ["quantize", bnd, "-o", ws.out, "--expert-scheme", "int4", "--calibration", t],
}
for _cmd, _args in TEXT_COMMANDS.items():
    for _name, _data, _expect in [("empty-text", b"", "encodes to 0 token(s)"),
                                  ("non-utf8-text", b"w1 w2 \xff\xfe w3", "cannot read as UTF-8")]:
        def _build(ws: Workspace, args=_args, data=_data) -> list:
            return args(ws.bundle(), ws.file("prompt.txt", data), ws)
        case(f"{_cmd}:{_name}", expect=_expect, names="prompt.txt")(_build)


# ---- run: prompts and budgets ----------------------------------------------------------------------------
def _run(ws: Workspace, *args) -> list:
    return ["run", ws.bundle(), *args, "--max-new-tokens", "2"]


case("run:empty-prompt-file", expect="is empty", names="prompt.txt")(
    lambda ws: _run(ws, "--prompt-file", ws.file("prompt.txt", b"")))
case("run:empty-prompt", expect="is empty", names=None)(lambda ws: _run(ws, "--prompt", ""))
case("run:non-utf8-prompt", expect="not UTF-8", names="prompt.txt")(
    lambda ws: _run(ws, "--prompt-file", ws.file("prompt.txt", b"w1 \xff w2")))
case("run:prompt-longer-than-context", expect="shorten the prompt", names="bundle")(
    lambda ws: _run(ws, "--prompt", " ".join(["w1"] * (b.TINY.max_position_embeddings + 8))))
case("run:budget-below-minimum", expect="below the minimum", names="bundle")(
    lambda ws: _run(ws, "--prompt", "w1", "--budget", "1KB"))


# ---- verify --integrity: a changed file is a failed gate (exit 1), not bad input ---------------------------
# A gate's report may take a line per bad file before its one error line (tests/cosmoe_export/test_malformed.py).
for _name, _tamper in [("hash-differs", _flip), ("size-differs", _append), ("missing", lambda p, bnd: p.unlink())]:
    def _integrity(ws: Workspace, tamper=_tamper) -> list:
        bnd = ws.bundle()
        tamper(bnd / "experts/layer_001/expert_002.safetensors", bnd)
        return ["verify", bnd, "--integrity"]
    case(f"verify-integrity:shard-{_name}", expect="differ from the manifest",
         names="bundle/experts/layer_001/expert_002.safetensors", exit_code=1)(_integrity)


# ---- build: recipes ----------------------------------------------------------------------------------------
def _recipe(text: bytes):
    def build(ws: Workspace) -> list:
        ws.checkpoint()
        return ["build", ws.file("recipe.toml", text), "-o", ws.out]
    return build


case("build:recipe-unknown-key", expect="quantize.exprts: unknown key", names="recipe.toml")(
    _recipe(b'name = "t"\n[source]\nmodel = "ckpt"\n[quantize]\nexprts = "int4"\n'))
case("build:recipe-wrong-type", expect="verify.new_tokens", names="recipe.toml")(
    _recipe(b'name = "t"\n[source]\nmodel = "ckpt"\n[verify]\nnew_tokens = "many"\n'))
case("build:recipe-not-toml", expect="not valid TOML", names="recipe.toml")(_recipe(b'name = "t\n[source'))
