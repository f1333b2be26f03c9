"""Recipes: every shipped one loads; bad ones fail with every problem's key path at once; the schema's
keys are the dataclasses' and its choices the registries'; reading one imports no model code."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest

from cosmoe_export.errors import CosmoeError
from cosmoe_export.quantization.quant_config import Calibration, QuantConfig, QuantConfigError
from cosmoe_export.release import gates
from cosmoe_export.release.recipe import (
    SECTIONS,
    LowerSection,
    Recipe,
    VerifySection,
    find_recipe,
    load_recipe,
    recipe_from_dict,
    schema,
    shipped_recipes,
    with_source,
)
from runtime_py.backends import BACKENDS
from runtime_py.format import DTYPE_ALIASES, PROGRAM_TARGETS
from runtime_py.store import POLICIES

ROOT = Path(__file__).resolve().parents[3]
SHIPPED = sorted((ROOT / "recipes").glob("*.toml"))
HF = {"mixtral": "MixtralForCausalLM", "qwen2-moe": "Qwen2MoeForCausalLM", "qwen3-moe": "Qwen3MoeForCausalLM",
      "olmoe": "OlmoeForCausalLM"}


def test_the_shipped_recipes_are_all_there():
    assert {"demo", "wearable", "phone", *HF} <= {p.stem for p in SHIPPED}
    assert shipped_recipes() == [p.stem for p in SHIPPED]


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_every_shipped_recipe_loads(path):
    r = load_recipe(path)
    assert r.name == path.stem and r.description
    # CI runs on a fresh clone: every text a recipe names is a file of the project itself.
    for text in (*r.verify.text, *(r.quantize.calibration if r.quantize else ()), *r.analyze.text):
        assert text.is_file() and ROOT in text.parents, text
    if path.stem in HF:  # any checkpoint of one architecture, given with --source
        assert r.source.model is None and r.source.architecture == HF[path.stem]
    else:
        assert r.source.model is not None


def test_demo_builds_the_committed_fixture_quantized_for_every_target():
    r = load_recipe(find_recipe("demo"))
    assert Path(r.source.model) == ROOT / "recipes" / "models" / "tiny-bles"
    assert r.quantize.experts == "int4" and r.quantize.backbone == "int8"
    assert set(r.lower.targets) == {"executorch", "onnx", "gguf"}
    assert set(r.verify.backends) == {"torch", "executorch", "onnxruntime", "native", "llamacpp"}
    assert r.verify.experts_per_layer is not None or r.verify.budget is not None  # verified under a budget


def test_problems_are_reported_all_at_once_with_their_key_path(tmp_path):
    path = tmp_path / "bad.toml"
    (tmp_path / "t.txt").write_text("text")
    path.write_text("""
name = "bad"
colour = "blue"
[quantize]
group_size = "32"
experts = "int3"
calibration = "t.txt"
[lower]
targets = ["executorch", "tflite"]
[verify]
policy = "fifo"
new_tokens = true
text = "t.txt"
[verify.gates]
top1 = 0.9
kl_mean = "low"
""")
    with pytest.raises(CosmoeError) as e:
        load_recipe(path)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{path}: 8 problems: ")
    for expected in ("colour: unknown key", "quantize.group_size: expected an integer, got a string ('32')",
                     "quantize.experts: 'int3' is not one of", "lower.targets[1]: 'tflite' is not one of",
                     "verify.policy: 'fifo' is not one of", "verify.new_tokens: expected an integer, got a boolean",
                     "verify.gates.top1: unknown key", "verify.gates.kl_mean: expected a number or \"off\""):
        assert expected in msg, expected


def test_relative_paths_resolve_against_the_recipe_and_gates_can_be_switched_off(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.txt").write_text("a")
    (tmp_path / "sub" / "b.txt").write_text("b")
    (tmp_path / "sub" / "ckpt").mkdir()
    path = tmp_path / "sub" / "r.toml"
    path.write_text("""
[source]
model = "ckpt"
[quantize]
calibration = "*.txt"
[lower]
targets = []
[verify]
backends = ["torch"]
text = ["a.txt"]
[verify.gates]
top1_agreement = "off"
decode_tok_s = 5
""")
    r = load_recipe(path)
    assert r.name == "r" and r.source.model == str(tmp_path / "sub" / "ckpt")
    assert r.quantize.calibration == (tmp_path / "sub" / "a.txt", tmp_path / "sub" / "b.txt")
    assert r.verify.text == (tmp_path / "sub" / "a.txt",)
    assert r.verify.gates == {"top1_agreement": None, "decode_tok_s": 5.0}
    assert with_source(r, "tiny").source.model == "tiny"


@pytest.mark.parametrize("data, message", [
    ({"verify": {"backends": ["executorch"]}, "lower": {"targets": ["onnx"]}},
     "verify.backends: executorch needs lower.targets to include 'executorch'"),
    ({"quantize": {}}, "verify.text: a quantized bundle is verified on a text"),
    ({"verify": {"budget": "3MB", "experts_per_layer": 4}}, "give one of them"),
    ({"verify": {"budget": "lots"}}, "verify.budget: cannot read size 'lots'"),
    ({"quantize": {"rounding": "gptq"}, "verify": {"text": "r.toml"}}, "quantize.calibration: "),
    ({"verify": {"text": "missing.txt"}}, "verify.text[0]: no such file"),
    ({"source": "tiny"}, "source: expected a table, got a string"),
])
def test_inconsistent_recipes_are_refused(tmp_path, data, message):
    (tmp_path / "r.toml").write_text("")
    with pytest.raises(CosmoeError, match="^r.toml: .*" + message.replace("(", r"\(").replace(")", r"\)")
                       .replace("[", r"\[").replace("]", r"\]")):
        recipe_from_dict(data, base=tmp_path, where="r.toml")


def test_unreadable_recipes_are_one_line_errors(tmp_path):
    (tmp_path / "broken.toml").write_text("name = \n")
    with pytest.raises(CosmoeError, match="not valid TOML"):
        load_recipe(tmp_path / "broken.toml")
    with pytest.raises(CosmoeError, match="no such recipe file"):
        load_recipe(tmp_path / "missing.toml")
    with pytest.raises(CosmoeError, match="shipped: .*demo"):
        find_recipe("no-such-recipe")


def test_reading_a_recipe_imports_no_model_code():
    """The gates and the recipe reader are plain data: importing them pulls in no torch, and reading
    every shipped recipe no model code (QuantConfig reads the scheme registry, runtime_py/quant.py)."""
    code = """
import sys
import cosmoe_export.release.gates, cosmoe_export.release.recipe
assert "torch" not in sys.modules, "importing the gates or the recipe reader imported torch"
from cosmoe_export.release.recipe import find_recipe, load_recipe, shipped_recipes
for name in shipped_recipes():
    load_recipe(find_recipe(name))
model = sorted(m for m in sys.modules if m.startswith(("transformers", "runtime_py.model", "runtime_py.torch_engine",
                                                        "cosmoe_export.release.verify",
                                                        "cosmoe_export.quantization.quantize")))
assert not model, model
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr


def test_the_schema_is_valid_has_the_dataclasses_keys_and_the_registries_choices():
    s = schema()
    jsonschema.Draft202012Validator.check_schema(s)
    assert set(s["properties"]) == {f.name for f in dataclasses.fields(Recipe)} - {"path"}
    for name, cls in SECTIONS.items():
        assert set(s["properties"][name]["properties"]) == {f.name for f in dataclasses.fields(cls)}, name
    defs = s["$defs"]
    assert defs["backend"]["enum"] == list(BACKENDS)
    assert defs["target"]["enum"] == list(PROGRAM_TARGETS)
    assert defs["dtype"]["enum"] == list(DTYPE_ALIASES)
    assert defs["policy"]["enum"] == list(POLICIES)
    assert list(defs["gates"]["properties"]) == list(gates.OPS)
    # The recipe's defaults name only things the registries have.
    assert set(LowerSection().targets) == set(PROGRAM_TARGETS) - {"gguf"}
    assert set(VerifySection().backends) == set(BACKENDS) - {"native", "llamacpp"}


@pytest.mark.parametrize("section, message", [
    ({"experts": "auto", "calibration": "t.txt"}, 'quantize.target_size: experts = "auto" needs target_size'),
    ({"target_size": "3MB"}, 'quantize.target_size: target_size only applies with experts = "auto"'),
    ({"experts": "auto", "target_size": "3MB", "rounding": "gptq"},
     'quantize.calibration: experts = "auto" and rounding = "gptq" need a calibration text'),
    ({"group_size": 16}, "quantize.group_size: 16 is not one of [32, 64, 128]"),
])
def test_quantize_options_are_checked_by_quant_config(tmp_path, section, message):
    (tmp_path / "t.txt").write_text("text")
    with pytest.raises(CosmoeError) as e:
        recipe_from_dict({"quantize": section, "verify": {"text": "t.txt"}}, base=tmp_path, where="r.toml")
    assert message in str(e.value) and "\n" not in str(e.value)
    q = {k: v for k, v in section.items() if k not in ("calibration", "target_size")}
    with pytest.raises(QuantConfigError):  # the same options, given to the quantize stage directly
        QuantConfig(**q, target_bytes=3_000_000 if "target_size" in section else None,
                    calibration=Calibration(tmp_path / "t.txt") if "calibration" in section else None)
