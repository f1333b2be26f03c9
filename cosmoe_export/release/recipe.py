"""Recipes: one TOML file says how `cosmoe-export build` makes and gates a release bundle.

A recipe is data, checked against a JSON Schema (recipe.schema.json, whose choices come from the
code's registries: ``schema()``) and read into frozen dataclasses (``Recipe`` and one class per
section, whose defaults are the recipe's defaults). An unknown key, a wrong type or a value outside
a key's choices is reported with its path (``verify.gates.top1: unknown key``), one problem per
key and every problem of a file in one error. The ``[quantize]`` values are checked by the
quantize stage's own QuantConfig. Relative paths resolve against the recipe file's directory; text
fields take a path, a glob or a list of them (their files are concatenated in order, so a recipe
can name text the project wrote itself).

Reading a recipe imports no model code (nor torch): only the registries.
docs/REPORT.md describes every key; ``recipes/*.toml`` are the shipped recipes.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import glob
import json
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema

from cosmoe_export.errors import CosmoeError
from cosmoe_export.executors import EXECUTORS, ExecutorConfig
from cosmoe_export.importers.presets import get_preset
from cosmoe_export.quantization.quant_config import Calibration, QuantConfig, QuantConfigError, Spelling
from cosmoe_export.release import gates as gating
from runtime_py.backends import BACKENDS, TORCH_ACTIVATIONS
from runtime_py.format import DTYPE_ALIASES, PROGRAM_TARGETS
from runtime_py.memory import parse_size
from runtime_py.store import POLICIES

# Verified and lowered when a recipe names none: native needs its C++ runner built and llamacpp the
# gguf extra, and GGUF describes only the families llama.cpp knows, so a recipe asks for them by name.
BY_NAME_ONLY = {"backends": ("native", "llamacpp"), "targets": ("gguf",)}
DEFAULT_BACKENDS = tuple(name for name in BACKENDS if name not in BY_NAME_ONLY["backends"])
DEFAULT_TARGETS = tuple(name for name in PROGRAM_TARGETS if name not in BY_NAME_ONLY["targets"])


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
    dtype: str | None = None  # DTYPE_ALIASES key; None: the source's


@dataclass(frozen=True)
class QuantizeSection:
    """The quantize stage's QuantConfig, in a recipe's words (its defaults are QuantConfig's)."""

    experts: str = QuantConfig.experts
    backbone: str = QuantConfig.backbone
    group_size: int = QuantConfig.group_size
    rounding: str = QuantConfig.rounding
    calibration: tuple[Path, ...] = ()  # text files (or globs), concatenated
    calibration_tokens: int = Calibration.max_tokens
    target_size: str | None = None  # experts = "auto" only: "2.5MB"

    @property
    def target_bytes(self) -> int | None:
        return parse_size(self.target_size) if self.target_size else None

    def config(self, calibration: Path | None) -> QuantConfig:
        """The quantize stage's config; ``calibration``: the file of this section's texts. Raises
        QuantConfigError for options it refuses."""
        return QuantConfig(experts=self.experts, backbone=self.backbone, group_size=self.group_size,
                           rounding=self.rounding,
                           calibration=Calibration(calibration, self.calibration_tokens) if calibration else None,
                           target_bytes=self.target_bytes)


@dataclass(frozen=True)
class LowerSection:
    targets: tuple[str, ...] = DEFAULT_TARGETS


@dataclass(frozen=True)
class VerifySection:
    reference: str | None = None  # checkpoint or preset; None: the source
    backends: tuple[str, ...] = DEFAULT_BACKENDS
    text: tuple[Path, ...] = ()  # held-out text for kl_mean / ppl (quantized bundles need one)
    max_tokens: int | None = None
    new_tokens: int = 32
    # The memory the runtime may use while verifying: a size ("3MB"), or backbone + N experts per
    # layer (experts_per_layer); neither: every expert resident.
    budget: str | None = None
    experts_per_layer: int | None = None
    policy: str = "lru"
    # The torch backend's int kernels (runtime_py.backends.TORCH_ACTIVATIONS): "fp32" gates the bundle's
    # math, as no device rounds activations to bf16; "bf16" measures PyTorch's fast path instead.
    torch_activations: str = "fp32"
    # Gate name -> threshold, or None ("off" in TOML): cosmoe_export/release/gates.py. Quality gates override
    # the defaults for the bundle's precision; runtime gates apply to every backend.
    gates: Mapping[str, float | None] = field(default_factory=dict)

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
    for ``points`` values of k from top-k to all experts (budget_curve.budgets), each backend, the
    recipe's policy (lru where it is `resident`)."""

    enabled: bool = True
    prompt_tokens: int = 32
    new_tokens: int = 32
    repeats: int = 3  # generations per point; the median is reported
    # Budgets measured. 8 is every k of an 8-expert model; OLMoE's 8..64 would be 57 points of a
    # minute or more each, and a curve of 8 geometrically spaced ones shows the same shape.
    points: int = 8
    policy: str | None = None


@dataclass(frozen=True)
class ExecutorSection:
    """Where the per-expert tasks of quantize and lower run (cosmoe_export/executors.py, docs/SCALE.md).
    Input to no stage's stamp: the bytes are the same whatever runs them."""

    name: str = ExecutorConfig.name  # EXECUTORS key: "local" or "ray"
    jobs: int | None = None  # tasks at once; None: every local core (local), the cluster's CPUs (ray)
    address: str | None = None  # ray: the head's HOST:PORT; None: a Ray cluster started for the build

    def config(self) -> ExecutorConfig:
        return ExecutorConfig(self.name, self.jobs, self.address)


# Every section of a recipe: its key and its dataclass (the schema's top-level tables).
SECTIONS: dict[str, type] = {"source": SourceSection, "split": SplitSection, "quantize": QuantizeSection,
                             "lower": LowerSection, "verify": VerifySection, "analyze": AnalyzeSection,
                             "budget_curve": BudgetCurveSection, "executor": ExecutorSection}


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
    executor: ExecutorSection = ExecutorSection()
    path: Path | None = None  # the recipe file

    @property
    def analyze_text(self) -> tuple[Path, ...]:
        return self.analyze.text or self.verify.text


# ---- the schema ----------------------------------------------------------------------------------
def schema() -> dict[str, Any]:
    """recipe.schema.json with the choices of the code's registries filled in."""
    return copy.deepcopy(_schema())


@functools.cache
def _schema() -> dict[str, Any]:
    s = json.loads(resources.files("cosmoe_export.release").joinpath("recipe.schema.json").read_text(encoding="utf-8"))
    defs = s["$defs"]
    for name, registry in (("dtype", DTYPE_ALIASES), ("target", PROGRAM_TARGETS), ("backend", BACKENDS),
                           ("policy", POLICIES), ("executor", EXECUTORS), ("activations", TORCH_ACTIVATIONS)):
        defs[name]["enum"] = list(registry)
    defs["threshold"]["anyOf"][1]["const"] = gating.OFF
    defs["gates"]["properties"] = {name: {"$ref": "#/$defs/threshold"} for name in gating.OPS}
    return s


# Quantize problems, worded for a recipe (QuantConfig's field -> the recipe's key).
SPELLING = Spelling(words={"auto": 'experts = "auto"', "gptq": 'rounding = "gptq"', "calibration": "a calibration text",
                           "target_bytes": "target_size"},
                    keys={"experts": "quantize.experts", "backbone": "quantize.backbone",
                          "group_size": "quantize.group_size", "rounding": "quantize.rounding",
                          "calibration": "quantize.calibration", "target_bytes": "quantize.target_size"})
_TYPES = {"string": "a string", "integer": "an integer", "number": "a number", "boolean": "true or false",
          "object": "a table", "array": "a list"}


def _is_int(_checker: Any, value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # never 32.0, never true


_Validator = jsonschema.validators.extend(
    jsonschema.Draft202012Validator,
    type_checker=jsonschema.Draft202012Validator.TYPE_CHECKER.redefine("integer", _is_int))
_FORMATS = jsonschema.FormatChecker(formats=())
_FORMATS.checks("size", raises=CosmoeError)(lambda value: not isinstance(value, str) or parse_size(value) > 0)


def _schema_problems(data: dict[str, Any]) -> dict[str, str]:
    """Key path -> its first problem."""
    problems: dict[str, str] = {}
    for error in _Validator(_schema(), format_checker=_FORMATS).iter_errors(data):
        for where, message in _explain(error):
            problems.setdefault(where, message)
    return problems


def _explain(error: jsonschema.ValidationError) -> Iterator[tuple[str, str]]:
    where, kind, s = _key(error.absolute_path), error.validator, error.schema
    if kind == "additionalProperties":
        known = s.get("properties", {})
        hint = f" ({s['title']}: {', '.join(known)})" if "title" in s else ""
        for key in error.instance:
            if key not in known:
                yield _key([*error.absolute_path, key]), f"unknown key{hint}"
    elif kind == "anyOf":
        # The alternative of the value's own type says more ("[1]: expected a string") than all of them.
        deeper = [e for e in error.context if len(e.absolute_path) > len(error.absolute_path)]
        if deeper:
            for e in deeper:
                yield from _explain(e)
        else:
            yield where, f"expected {_expected(s)}, got {_kind(error.instance)}"
    elif kind in ("type", "const"):
        yield where, f"expected {_expected(s)}, got {_kind(error.instance)}"
    elif kind == "enum":
        yield where, f"{error.instance!r} is not one of {list(error.validator_value)}"
    elif kind == "minimum":
        yield where, "must not be negative" if error.validator_value == 0 else f"must be >= {error.validator_value}"
    elif kind == "format" and error.cause is not None:
        yield where, str(error.cause)
    else:
        yield where, error.message


def _expected(s: Mapping[str, Any]) -> str:
    if "anyOf" in s:
        return " or ".join(_expected(alt) for alt in s["anyOf"])
    if "const" in s:
        return json.dumps(s["const"])
    types = s["type"] if isinstance(s["type"], list) else [s["type"]]
    return " or ".join(_TYPES[t] for t in types)


def _key(path: Any) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else f".{part}" if out else str(part)
    return out


def _kind(value: Any) -> str:
    kinds = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
             dict: "a table"}
    return f"{kinds.get(type(value), type(value).__name__)} ({value!r})" if not isinstance(value, dict | list) \
        else kinds[type(value)]


# ---- reading -------------------------------------------------------------------------------------
SHIPPED = Path(__file__).resolve().parents[2] / "recipes"  # the project's recipes/ (source checkouts, the image)


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
    data = {"name": path.stem if path is not None else "recipe", **data}
    problems = _schema_problems(data)
    sections = {}
    for name, cls in SECTIONS.items():
        if isinstance(data.get(name, {}), dict) and name not in problems:
            sections[name] = _section(cls, name, data.get(name, {}), base, problems)
    if "quantize" in data and "quantize" in sections:
        try:
            sections["quantize"].config(next(iter(sections["quantize"].calibration), None))
        except QuantConfigError as e:
            for p in e.problems:  # a key the schema refused already has its problem
                if not _has_problem(problems, SPELLING.keys[p.field]):
                    problems[SPELLING.keys[p.field]] = SPELLING.text(p)
    if problems:
        n = len(problems)
        raise CosmoeError(f"{where}: {n} problem{'s' * (n > 1)}: " + "; ".join(f"{k}: {m}" for k, m in problems.items())
                          + " (docs/REPORT.md lists every recipe key)")
    if "quantize" not in data:
        sections["quantize"] = None
    recipe = Recipe(name=data["name"], description=data.get("description", ""), path=path, **sections)
    # Checkpoint paths are relative to the recipe, like every other path in it; preset names stay names.
    if recipe.source.model is not None:
        recipe = with_source(recipe, resolve_source(recipe.source.model, base))
    if recipe.verify.reference is not None:
        recipe = dataclasses.replace(recipe, verify=dataclasses.replace(
            recipe.verify, reference=resolve_source(recipe.verify.reference, base)))
    _check_consistency(recipe, where)
    return recipe


def _section(cls: type, name: str, raw: dict[str, Any], base: Path, problems: dict[str, str]) -> Any:
    """The section's dataclass from its checked TOML table: the keys the schema accepted, converted by
    their schema (texts -> resolved paths, lists -> tuples, gates: "off" -> None); the others keep their
    defaults (their problems are reported)."""
    props = _schema()["properties"][name]["properties"]
    values = {}
    for key, value in raw.items():
        where = f"{name}.{key}"
        if key not in props or _has_problem(problems, where):
            continue
        ref = props[key].get("$ref")
        if ref == "#/$defs/texts":
            values[key] = tuple(p for i, item in enumerate([value] if isinstance(value, str) else value)
                                for p in _paths(item, base, f"{where}[{i}]", problems))
        elif ref == "#/$defs/gates":
            values[key] = {g: None if t == gating.OFF else float(t) for g, t in value.items()}
        elif isinstance(value, list):
            values[key] = tuple(value)
        else:
            values[key] = value
    return cls(**values)


def _has_problem(problems: Mapping[str, str], where: str) -> bool:
    """A problem of the key ``where`` or of a value inside it."""
    return any(p == where or p.startswith((where + ".", where + "[")) for p in problems)


def _paths(raw: str, base: Path, where: str, problems: dict[str, str]) -> list[Path]:
    pattern = str(base / raw)
    if glob.has_magic(raw):
        found = sorted(Path(p) for p in glob.glob(pattern) if Path(p).is_file())
        if not found:
            problems.setdefault(where, f"{raw!r} matches no file (relative to {base})")
        return [p.resolve() for p in found]
    if not Path(pattern).is_file():
        problems.setdefault(where, f"no such file {pattern}")
    return [Path(pattern).resolve()]


def with_source(recipe: Recipe, source: str | None) -> Recipe:
    """The recipe with ``source.model`` replaced (``build --source``); paths stay as given."""
    if source is None:
        return recipe
    return dataclasses.replace(recipe, source=dataclasses.replace(recipe.source, model=source))


def _check_consistency(r: Recipe, where: str) -> None:
    """Problems between keys of different sections, or between verify's keys (each key alone was fine)."""
    problems = []
    v = r.verify
    if r.quantize is not None and not v.text:
        problems.append("verify.text: a quantized bundle is verified on a text (perplexity, KL divergence)")
    if v.budget is not None and v.experts_per_layer is not None:
        problems.append("verify.budget and verify.experts_per_layer: give one of them")
    if v.policy == "resident" and (v.budget is not None or v.experts_per_layer is not None):
        problems.append("verify.policy: \"resident\" keeps every expert loaded; it takes no budget")
    for backend in v.backends:
        target = BACKENDS.get(backend)
        if target is not None and target not in r.lower.targets:
            problems.append(f"verify.backends: {backend} needs lower.targets to include {target!r}")
    needs_text = [g for g in gating.ON_TEXT if v.gates.get(g) is not None]
    if needs_text and not v.text:
        problems.append(f"verify.gates: {', '.join(needs_text)} are measured on verify.text, which is not set")
    if r.executor.address is not None and r.executor.name != "ray":
        problems.append('executor.address: only applies with executor.name = "ray"')
    if problems:
        raise CosmoeError(f"{where}: " + "; ".join(problems))


def resolve_source(model: str, base: Path | None) -> str:
    """A preset name stays a name; anything else is a path (relative to the recipe's directory)."""
    if get_preset(model) is not None and not (base is not None and (base / model).exists()):
        return model
    p = Path(model)
    return str(p if p.is_absolute() or base is None else (base / p).resolve())
