"""The options of one ``quantize`` run, and their only validator.

The CLI (flags) and recipes (``[quantize]``) build a QuantConfig and let it refuse bad options;
each front end words the problems its own way through a ``Spelling`` (``--target-size SIZE`` on
the command line, ``quantize.target_size`` in a recipe), so neither checks an option itself.

Light on imports, so that reading a recipe imports no model code: the scheme registry
(runtime_py/quant.py, which needs torch) is read only when a config is checked.
cosmoe_export/quantization/quantize.py re-exports everything here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from cosmoe_export.errors import CosmoeError

AUTO = "auto"  # experts: int4 or int8 per expert, chosen to meet a size target (mixed_precision.py)
ROUNDINGS = ("nearest", "gptq")


def scheme_names() -> tuple[str, ...]:
    """Every scheme a tensor can be stored in (runtime_py.quant.SCHEME_NAMES: "none" first)."""
    from runtime_py import quant
    return quant.SCHEME_NAMES


def group_sizes() -> tuple[int, ...]:
    from runtime_py import quant
    return quant.GROUP_SIZES


@dataclass(frozen=True)
class Calibration:
    text: Path
    max_tokens: int = 16384


class Problem(NamedTuple):
    field: str  # the QuantConfig field it is about
    template: str  # str.format template over a Spelling's words
    names_itself: bool  # the sentence names its field ("{auto} needs {calibration}"), or follows it


@dataclass(frozen=True)
class Spelling:
    """How a front end names the options in QuantConfig's problems."""

    words: Mapping[str, str]  # every field, and the conditions "auto" (experts) and "gptq" (rounding)
    keys: Mapping[str, str] | None = None  # recipes: field -> key, each problem after "key: "; None: sentences

    def text(self, p: Problem) -> str:
        """The problem, to follow its key."""
        return p.template.format(**self.words)

    def render(self, p: Problem) -> str:
        if self.keys is not None:
            return f"{self.keys[p.field]}: {self.text(p)}"
        return self.text(p) if p.names_itself else f"{self.words[p.field]} {self.text(p)}"


PYTHON = Spelling({"experts": "experts", "backbone": "backbone", "group_size": "group_size", "rounding": "rounding",
                   "calibration": "a calibration text", "target_bytes": "target_bytes", "auto": 'experts="auto"',
                   "gptq": 'rounding="gptq"'},
                  keys={f: f for f in ("experts", "backbone", "group_size", "rounding", "calibration", "target_bytes")})


class QuantConfigError(CosmoeError):
    """Every problem of one QuantConfig; ``spelled`` words them for a front end."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        super().__init__("quantize: " + "; ".join(self.spelled(PYTHON)))

    def spelled(self, spelling: Spelling) -> list[str]:
        return [spelling.render(p) for p in self.problems]


@dataclass(frozen=True)
class QuantConfig:
    experts: str = "int4"  # quant.SCHEME_NAMES entry, or "auto"
    backbone: str = "int8"  # quant.SCHEME_NAMES entry
    group_size: int = 32  # int4 group; with "auto", the smallest group on the ladder
    rounding: str = "nearest"  # ROUNDINGS; gptq needs calibration
    calibration: Calibration | None = None  # for gptq and for "auto"
    target_bytes: int | None = None  # "auto" only: every file of the bundle but the manifest

    def __post_init__(self) -> None:
        problems = self.problems()
        if problems:
            raise QuantConfigError(problems)

    def problems(self) -> list[Problem]:
        """At most one problem per field."""
        schemes = scheme_names()
        out = [_choice(name, getattr(self, name), choices) for name, choices in (
            ("experts", (*schemes, AUTO)), ("backbone", schemes), ("group_size", group_sizes()),
            ("rounding", ROUNDINGS)) if getattr(self, name) not in choices]
        auto = self.experts == AUTO
        if auto and self.target_bytes is None:
            out.append(Problem("target_bytes", "{auto} needs {target_bytes}", True))
        elif not auto and self.target_bytes is not None:
            out.append(Problem("target_bytes", "{target_bytes} only applies with {auto}", True))
        needs = [w for w, needed in (("{auto}", auto), ("{gptq}", self.rounding == "gptq")) if needed]
        if needs and self.calibration is None:
            out.append(Problem("calibration", f"{' and '.join(needs)} need{'s' * (len(needs) == 1)} {{calibration}}",
                               True))
        return out


def _choice(field: str, value: object, choices: tuple) -> Problem:
    text = f"{value!r} is not one of {list(choices)}"
    return Problem(field, text.replace("{", "{{").replace("}", "}}"), False)
