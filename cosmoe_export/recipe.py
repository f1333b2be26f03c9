"""Recipes: one TOML file says how `cosmoe-export build` makes and gates a release bundle.

A recipe is data, read into frozen dataclasses (``Recipe`` and one class per section). Every
section's fields are its schema: the reader walks the TOML against the dataclass fields' types,
so an unknown key, a wrong type or a value outside a field's choices is reported with its path
(``verify.gates.top1: unknown key``), all problems of a file in one error. Relative paths resolve
against the recipe file's directory; text fields take a path, a glob or a list of them (their files
are concatenated in order, so a recipe can name text the project wrote itself).

docs/REPORT.md describes every key; ``recipes/*.toml`` are the shipped recipes.
"""

from __future__ import annotations

import dataclasses
import glob
import tomllib
import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

from cosmoe_export.errors import CosmoeError
from cosmoe_export.presets import get_preset
from cosmoe_export.report import RUNTIME_GATES
from cosmoe_export.verify import GATE_OPS
from runtime_py.backends import BACKENDS
from runtime_py.format import DTYPE_ALIASES
from runtime_py.runner import POLICIES, parse_size

SCHEMES = ("int8", "int4", "none")
TARGET_NAMES = ("executorch", "onnx")
BACKEND_NAMES = tuple(BACKENDS)
# Verified when a recipe names none: native needs its C++ runner built, so a recipe asks for it by name.
DEFAULT_BACKENDS = ("torch", "executorch", "onnxruntime")
GATE_NAMES = (*GATE_OPS, *RUNTIME_GATES)
OFF = "off"  # TOML has no null: a gate set to "off" switches a default gate off


def _choices(*values: Any) -> dict[str, Any]:
    return {"choices": tuple(values)}


@dataclass(frozen=True)
class SourceSection:
    # A checkpoint directory (relative to the recipe) or a preset name; `build --source` overrides it.
    # None: the recipe is for any checkpoint of its kind and needs --source.
    model: str | None = None
    # When set, a source of another architecture is refused (e.g. a Qwen checkpoint given to mixtral.toml).
    architecture: str | None = None
    allow_pickle: bool = False


@dataclass(frozen=True)
class SplitSection:
    dtype: str | None = field(default=None, metadata=_choices(*DTYPE_ALIASES))  # None: the source's


@dataclass(frozen=True)
class QuantizeSection:
    experts: str = field(default="int4", metadata=_choices(*SCHEMES, "auto"))
    backbone: str = field(default="int8", metadata=_choices(*SCHEMES))
    group_size: int = field(default=32, metadata=_choices(32, 64, 128))
    rounding: str = field(default="nearest", metadata=_choices("nearest", "gptq"))
    calibration: tuple[Path, ...] = ()  # text files (or globs), concatenated
    calibration_tokens: int = 16384
    target_size: str | None = field(default=None, metadata={"size": True})  # experts = "auto" only: "2.5MB"

    @property
    def target_bytes(self) -> int | None:
        return parse_size(self.target_size) if self.target_size else None


@dataclass(frozen=True)
class LowerSection:
    targets: tuple[str, ...] = field(default=TARGET_NAMES, metadata=_choices(*TARGET_NAMES))


@dataclass(frozen=True)
class VerifySection:
    reference: str | None = None  # checkpoint or preset; None: the source
    backends: tuple[str, ...] = field(default=DEFAULT_BACKENDS, metadata=_choices(*BACKEND_NAMES))
    text: tuple[Path, ...] = ()  # held-out text for kl_mean / ppl (quantized bundles need one)
    max_tokens: int | None = None
    new_tokens: int = 32
    # The memory the runtime may use while verifying: a size ("3MB"), or backbone + N experts per
    # layer (experts_per_layer); neither: every expert resident.
    budget: str | None = field(default=None, metadata={"size": True})
    experts_per_layer: int | None = None
    policy: str = field(default="lru", metadata=_choices(*POLICIES))
    # Gate name -> threshold (number) or "off". Quality gates (verify.GATE_OPS) override the defaults
    # for the bundle's precision; runtime gates (report.RUNTIME_GATES) apply to every backend.
    gates: Mapping[str, float | None] = field(default_factory=dict, metadata={"keys": GATE_NAMES})

    @property
    def budget_bytes(self) -> int | None:
        return parse_size(self.budget) if self.budget else None


@dataclass(frozen=True)
class AnalyzeSection:
    text: tuple[Path, ...] = ()  # empty: verify.text
    max_tokens: int | None = 16384
    layer: int | None = None  # the layer of the selection map; None: the middle one


@dataclass(frozen=True)
class BudgetCurveSection:
    """Decode speed and loads per token against the memory budget: backbone + k experts per layer
    for k = top-k .. all experts, each backend, the recipe's policy (lru where it is `resident`)."""

    enabled: bool = True
    prompt_tokens: int = 32
    new_tokens: int = 32
    repeats: int = 3  # generations per point; the median is reported
    policy: str | None = field(default=None, metadata=_choices(*POLICIES))


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str = ""
    source: SourceSection = SourceSection()
    split: SplitSection = SplitSection()
    quantize: QuantizeSection | None = None  # absent: the bundle stays float
    lower: LowerSection = LowerSection()
    verify: VerifySection = VerifySection()
    analyze: AnalyzeSection = AnalyzeSection()
    budget_curve: BudgetCurveSection = BudgetCurveSection()
    path: Path | None = field(default=None, metadata={"internal": True})  # the recipe file

    @property
    def analyze_text(self) -> tuple[Path, ...]:
        return self.analyze.text or self.verify.text


# ---- reading -------------------------------------------------------------------------------------
SHIPPED = Path(__file__).resolve().parents[1] / "recipes"  # the project's recipes/ (source checkouts, the image)


def shipped_recipes() -> list[str]:
    return sorted(p.stem for p in SHIPPED.glob("*.toml"))


def find_recipe(spec: str) -> Path:
    """A recipe file, or the name of a shipped recipe (``demo`` -> recipes/demo.toml)."""
    path = Path(spec)
    if path.is_file() or path.suffix == ".toml":
        return path
    shipped = SHIPPED / f"{spec}.toml"
    if shipped.is_file():
        return shipped
    raise CosmoeError(f"{spec}: no such recipe file or shipped recipe; shipped: {', '.join(shipped_recipes())}")


def load_recipe(path: str | Path) -> Recipe:
    """Read and check a recipe file; every problem of the file is in one CosmoeError."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CosmoeError(f"{path}: no such recipe file; the shipped ones are in recipes/*.toml") from None
    except (OSError, UnicodeDecodeError) as e:
        raise CosmoeError(f"{path}: cannot read the recipe ({e})") from None
    except tomllib.TOMLDecodeError as e:
        raise CosmoeError(f"{path}: not valid TOML ({e})") from None
    return recipe_from_dict(data, base=path.resolve().parent, where=str(path), path=path)


def recipe_from_dict(data: dict[str, Any], *, base: Path, where: str = "recipe", path: Path | None = None) -> Recipe:
    reader = _Reader(base)
    data = dict(data)
    data.setdefault("name", path.stem if path is not None else "recipe")
    values = reader.section(Recipe, data, "")
    if reader.problems:
        n = len(reader.problems)
        raise CosmoeError(f"{where}: {n} problem{'s' * (n > 1)}: " + "; ".join(reader.problems)
                          + " (docs/REPORT.md lists every recipe key)")
    recipe = Recipe(**values, path=path)
    # Checkpoint paths are relative to the recipe, like every other path in it; preset names stay names.
    if recipe.source.model is not None:
        recipe = with_source(recipe, resolve_source(recipe.source.model, base))
    if recipe.verify.reference is not None:
        recipe = dataclasses.replace(recipe, verify=dataclasses.replace(
            recipe.verify, reference=resolve_source(recipe.verify.reference, base)))
    _check_consistency(recipe, where)
    return recipe


def with_source(recipe: Recipe, source: str | None) -> Recipe:
    """The recipe with ``source.model`` replaced (``build --source``); paths stay as given."""
    if source is None:
        return recipe
    return dataclasses.replace(recipe, source=dataclasses.replace(recipe.source, model=source))


def _check_consistency(r: Recipe, where: str) -> None:
    """Problems between keys (each key alone was fine)."""
    problems = []
    q, v = r.quantize, r.verify
    if q is not None:
        if (q.experts == "auto") != (q.target_size is not None):
            problems.append("quantize.target_size: needed with experts = \"auto\", and only with it")
        if (q.experts == "auto" or q.rounding == "gptq") and not q.calibration:
            problems.append("quantize.calibration: experts = \"auto\" and rounding = \"gptq\" need a calibration text")
        if not v.text:
            problems.append("verify.text: a quantized bundle is verified on a text (perplexity, KL divergence)")
    if v.budget is not None and v.experts_per_layer is not None:
        problems.append("verify.budget and verify.experts_per_layer: give one of them")
    if v.policy == "resident" and (v.budget is not None or v.experts_per_layer is not None):
        problems.append("verify.policy: \"resident\" keeps every expert loaded; it takes no budget")
    for backend in v.backends:
        target = BACKENDS.get(backend)
        if target is not None and target not in r.lower.targets:
            problems.append(f"verify.backends: {backend} needs lower.targets to include {target!r}")
    needs_text = [g for g in ("kl_mean", "ppl_increase") if v.gates.get(g) is not None]
    if needs_text and not v.text:
        problems.append(f"verify.gates: {', '.join(needs_text)} are measured on verify.text, which is not set")
    if problems:
        raise CosmoeError(f"{where}: " + "; ".join(problems))


class _Reader:
    """Walks TOML data against a dataclass's fields, converting values and collecting problems."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.problems: list[str] = []

    def section(self, cls: type, data: Any, prefix: str) -> dict[str, Any]:
        if not isinstance(data, dict):
            self.problems.append(f"{prefix.rstrip('.')}: expected a table, got {_kind(data)}")
            return {}
        hints = get_type_hints(cls)
        known = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
        for key in data:
            if key not in known:
                self.problems.append(f"{prefix}{key}: unknown key")
        out = {}
        for name, f in known.items():
            if name in data:
                out[name] = self.value(data[name], hints[name], f.metadata, f"{prefix}{name}")
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                self.problems.append(f"{prefix}{name}: missing")
        return out

    def value(self, raw: Any, hint: Any, meta: Mapping[str, Any], where: str) -> Any:
        origin, args = get_origin(hint), get_args(hint)
        if origin in (Union, types.UnionType):  # X | None: TOML has no null, so a given value is an X
            inner = next(a for a in args if a is not type(None))
            return self.value(raw, inner, meta, where)
        if dataclasses.is_dataclass(hint):
            return hint(**self.section(hint, raw, where + "."))
        if origin is tuple:
            items = raw if isinstance(raw, list) else [raw] if args[0] is Path and isinstance(raw, str) else None
            if items is None:
                self.problems.append(f"{where}: expected a list, got {_kind(raw)}")
                return ()
            if args[0] is Path:
                return tuple(p for i, item in enumerate(items) for p in self.paths(item, f"{where}[{i}]"))
            return tuple(self.scalar(item, args[0], meta, f"{where}[{i}]") for i, item in enumerate(items))
        if origin is Mapping:
            return self.gates(raw, meta["keys"], where)
        return self.scalar(raw, hint, meta, where)

    def scalar(self, raw: Any, kind: type, meta: Mapping[str, Any], where: str) -> Any:
        # bool is an int in Python; a recipe that says `group_size = true` is still wrong.
        ok = (isinstance(raw, kind) and not (kind is not bool and isinstance(raw, bool))) or (
            kind is float and isinstance(raw, int) and not isinstance(raw, bool))
        if not ok:
            self.problems.append(f"{where}: expected {_NAMES.get(kind, kind.__name__)}, got {_kind(raw)}")
            return raw
        choices = meta.get("choices")
        if choices is not None and raw not in choices:
            self.problems.append(f"{where}: {raw!r} is not one of {list(choices)}")
        if kind is int and raw < 0:
            self.problems.append(f"{where}: must not be negative")
        if meta.get("size"):
            try:
                parse_size(raw)
            except CosmoeError as e:
                self.problems.append(f"{where}: {e}")
        return float(raw) if kind is float else raw

    def paths(self, raw: Any, where: str) -> list[Path]:
        if not isinstance(raw, str):
            self.problems.append(f"{where}: expected a path, got {_kind(raw)}")
            return []
        pattern = str(self.base / raw)
        if glob.has_magic(raw):
            found = sorted(Path(p) for p in glob.glob(pattern) if Path(p).is_file())
            if not found:
                self.problems.append(f"{where}: {raw!r} matches no file (relative to {self.base})")
            return [p.resolve() for p in found]
        if not Path(pattern).is_file():
            self.problems.append(f"{where}: no such file {pattern}")
        return [Path(pattern).resolve()]

    def gates(self, raw: Any, names: tuple[str, ...], where: str) -> dict[str, float | None]:
        if not isinstance(raw, dict):
            self.problems.append(f"{where}: expected a table, got {_kind(raw)}")
            return {}
        out: dict[str, float | None] = {}
        for key, value in raw.items():
            if key not in names:
                self.problems.append(f"{where}.{key}: unknown key (gates: {', '.join(names)})")
            elif value == OFF:
                out[key] = None
            elif isinstance(value, int | float) and not isinstance(value, bool):
                out[key] = float(value)
            else:
                self.problems.append(f"{where}.{key}: expected a number or \"off\", got {_kind(value)}")
        return out


_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true or false"}


def _kind(value: Any) -> str:
    kinds = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
             dict: "a table"}
    return f"{kinds.get(type(value), type(value).__name__)} ({value!r})" if not isinstance(value, dict | list) \
        else kinds[type(value)]


def resolve_source(model: str, base: Path | None) -> str:
    """A preset name stays a name; anything else is a path (relative to the recipe's directory)."""
    if get_preset(model) is not None and not (base is not None and (base / model).exists()):
        return model
    p = Path(model)
    return str(p if p.is_absolute() or base is None else (base / p).resolve())
