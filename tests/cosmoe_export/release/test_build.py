"""`build`: a recipe to a gated bundle and its report; byte-identical rebuilds; stages skipped when
their inputs did not change; `verify --integrity`.

The model is a one-layer CoSMoE checkpoint written here (4 experts, top-2, random weights) with the
tiny-bles tokenizer: a whole build with GPTQ, ExecuTorch and ONNX takes about a minute on 2 cores, most
of it lowering to ExecuTorch.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import jsonschema
import pytest
from click.testing import CliRunner
from safetensors.torch import save_file

from cosmoe_export.cli import cli
from cosmoe_export.errors import CosmoeError
from cosmoe_export.importers.sources import random_tensor
from cosmoe_export.release.build import build
from cosmoe_export.release.recipe import load_recipe
from runtime_py.backends import BACKENDS
from runtime_py.config import CosmoeConfig, tensor_shapes
from runtime_py.format import PROGRAM_TARGETS

ROOT = Path(__file__).resolve().parents[3]
TOKENIZER = ROOT / "recipes" / "models" / "tiny-bles" / "tokenizer.json"
CONFIG = CosmoeConfig(vocab_size=4096, hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=64, num_experts=4, num_experts_per_tok=2,
                      max_position_embeddings=128, rope_theta=10000.0, bos_token_id=0, eos_token_id=0)
# Texts of this project: the runtime's code calibrates, the docs verify (as recipes/demo.toml).
RECIPE = """
name = "mini"
description = "test: one layer, four experts"
[source]
model = "ckpt"
[quantize]
experts = "int4"
backbone = "int8"
rounding = "gptq"
calibration = ["{root}/runtime_py/*.py"]
calibration_tokens = 2048
[lower]
targets = ["executorch", "onnx", "gguf"]
[verify]
backends = ["torch", "executorch", "onnxruntime", "llamacpp"]
text = ["{root}/docs/FORMAT.md"]
max_tokens = 256
new_tokens = 4
experts_per_layer = 3
policy = "lru"
[verify.gates]
top1_agreement = 0.5
ppl_increase = 0.5
{extra}
[analyze]
max_tokens = 1024
[budget_curve]
prompt_tokens = 8
new_tokens = 4
"""


def write_recipe(where: Path, extra: str = "", measure_less: bool = False) -> Path:
    """measure_less: the same bundle, verified on torch only and without the budget curve (they
    measure, they write no byte of the bundle), to keep the rebuild test short."""
    text = RECIPE.format(root=ROOT, extra=extra)
    if measure_less:
        text = text.replace('backends = ["torch", "executorch", "onnxruntime", "llamacpp"]', 'backends = ["torch"]')
        text = text.replace("[budget_curve]\n", "[budget_curve]\nenabled = false\n")
    path = where / "mini.toml"
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A directory with the recipe and the checkpoint it names."""
    root = tmp_path_factory.mktemp("project")
    ckpt = root / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps(CONFIG.to_dict(), indent=2))
    save_file({n: random_tensor(n, s, seed=7) for n, s in tensor_shapes(CONFIG).items()},
              str(ckpt / "model.safetensors"), metadata={"format": "pt"})
    shutil.copyfile(TOKENIZER, ckpt / "tokenizer.json")
    write_recipe(root)
    return root


@pytest.fixture(scope="module")
def built(project, tmp_path_factory):
    out = tmp_path_factory.mktemp("first") / "out"
    return build(recipe=load_recipe(project / "mini.toml"), out=out, progress=False)


def test_the_report_schema_names_every_target_and_backend_the_code_has():
    # docs/report.schema.json is a static document; this keeps its choices those of the registries.
    schema = json.loads((ROOT / "docs" / "report.schema.json").read_text())
    assert schema["properties"]["bundle"]["properties"]["targets"]["items"]["enum"] == list(PROGRAM_TARGETS)
    assert schema["properties"]["backends"]["items"]["properties"]["backend"]["enum"] == list(BACKENDS)


def hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_build_leaves_a_gated_bundle_and_its_report(built):
    assert built.passed and built.bundle == built.out / "bundle"
    names = {p.name for p in built.out.iterdir()}
    assert names == {"bundle", "report.json", "report.md", "plots"}
    report = json.loads((built.out / "report.json").read_text())
    jsonschema.validate(report, json.loads((ROOT / "docs" / "report.schema.json").read_text()))
    assert report["passed"] and report["bundle"]["precision"] == "int4"
    assert report["bundle"]["targets"] == ["executorch", "gguf", "onnx"]
    assert [r["backend"] for r in report["backends"]] == ["torch", "executorch", "onnxruntime", "llamacpp"]
    for row in report["backends"]:
        gates = {g["name"]: g for g in row["gates"]}
        assert set(gates) == {"top1_agreement", "ppl_increase"}  # the recipe's, over the int4 defaults
        assert all(g["value"] is not None and g["passed"] for g in gates.values())
        assert {"kl_mean", "ppl", "ppl_ref", "top1_agreement"} <= set(row["parity"])
        assert {"decode_tok_s", "peak_rss_mb", "budget_bytes"} <= set(row["runtime"])
        if row["backend"] == "llamacpp":  # every expert mapped: no store to measure, measured so
            assert row["offloading"] == {} and row["programs"] == ["Q4_0+Q8_0+F32"]
            continue
        assert {"exrep", "hit_rate", "loads_per_token"} <= set(row["offloading"])
        assert row["runtime"]["policy"] == "lru"
    curve = report["budget_curve"]["points"]
    assert {p["backend"] for p in curve} == {"torch", "executorch", "onnxruntime"}  # llama.cpp takes no budget
    assert sorted({p["experts_per_layer"] for p in curve}) == [2, 3, 4]  # top-k .. all experts
    torch_curve = [p for p in curve if p["backend"] == "torch"]
    assert [p["budget_bytes"] for p in torch_curve] == sorted(p["budget_bytes"] for p in torch_curve)
    assert sorted(report["plots"]) == ["plots/budget_curve.png", "plots/delta_uniform.png", "plots/hit_rate.png",
                                       "plots/selection_map.png"]
    for p in report["plots"]:
        assert (built.out / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (built.out / "report.md").read_text()
    assert "— PASS" in md and "| torch | top1_agreement |" in md and "![budget_curve](plots/budget_curve.png)" in md
    assert "| llamacpp | top1_agreement |" in md and "| llamacpp | Q4_0+Q8_0+F32 |" in md
    assert {s["status"] for s in report["stages"].values()} == {"ran"}


def test_a_clean_rebuild_is_byte_identical(built, project, tmp_path):
    """Every file of the bundle (lowered programs included) and the plots made from deterministic
    numbers have the same bytes. Not compared, because they hold timings measured on this run:
    report.json, report.md and plots/budget_curve.png."""
    (tmp_path / "ckpt").symlink_to(project / "ckpt")
    recipe = load_recipe(write_recipe(tmp_path, measure_less=True))
    again = build(recipe=recipe, out=tmp_path / "out", progress=False)
    assert again.passed
    first, second = hashes(built.out / "bundle"), hashes(again.out / "bundle")
    assert any(p.endswith(".pte") for p in first) and any(p.endswith(".onnx") for p in first)
    assert first == second
    for plot in ("selection_map.png", "delta_uniform.png", "hit_rate.png"):
        assert (built.out / "plots" / plot).read_bytes() == (again.out / "plots" / plot).read_bytes(), plot
    manifest = json.loads((again.out / "bundle" / "manifest.json").read_text())
    tools = manifest["provenance"]["tools"]
    assert {"python", "cosmoe-export", "torch", "safetensors", "numpy", "tokenizers", "executorch", "torchao",
            "onnx"} <= set(tools)
    assert "not installed" not in tools.values()


def test_a_threshold_change_regates_without_rebuilding_and_fails_with_exit_1(built, project, tmp_path):
    recipe = write_recipe(tmp_path, extra="decode_tok_s = 1e9")
    (tmp_path / "ckpt").symlink_to(project / "ckpt")
    r = CliRunner().invoke(cli, ["-q", "build", str(recipe), "-o", str(built.out), "--work", str(built.work),
                                 "--json", str(tmp_path / "r.json")])
    assert r.exit_code == 1, r.output
    assert "decode_tok_s" in r.output and "needs >= 1e+09" in r.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert not report["passed"]
    assert {s["status"] for s in report["stages"].values()} == {"skipped"}
    # A failed build publishes its report, never its bundle.
    failed = len(report["backends"])  # every backend misses the impossible speed
    assert not (built.out / "bundle").exists() and (built.out / "report.md").read_text().count("**FAIL**") == failed


def test_verify_integrity_exits_1_on_any_changed_byte(built, tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(built.candidate, bundle)  # a copy: the work directory's files are hard links
    run = CliRunner().invoke
    r = run(cli, ["verify", str(bundle), "--integrity", "--json", str(tmp_path / "i.json")])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "i.json").read_text())["problems"] == []
    expert = bundle / "experts" / "layer_000" / "expert_001.safetensors"
    data = bytearray(expert.read_bytes())
    data[-1] ^= 1
    expert.write_bytes(bytes(data))
    r = run(cli, ["verify", str(bundle), "--integrity"])
    assert r.exit_code == 1 and "expert_001.safetensors: sha256 differs" in r.output
    program = next((bundle / "executorch").glob("*.pte"))
    program.write_bytes(program.read_bytes()[:-10])
    r = run(cli, ["verify", str(bundle), "--integrity"])
    assert r.exit_code == 1 and "2 of" in r.output and "bytes on disk" in r.output


def test_build_refuses_bad_input_with_exit_2(project, tmp_path):
    run = CliRunner().invoke
    keep = tmp_path / "precious"
    keep.mkdir()
    (keep / "notes.txt").write_text("mine")
    r = run(cli, ["build", str(project / "mini.toml"), "-o", str(keep)])
    assert r.exit_code == 2 and "is not a build output" in r.output and (keep / "notes.txt").exists()
    r = run(cli, ["build", str(project / "mini.toml"), "--source", str(tmp_path / "nope"), "-o", str(tmp_path / "o")])
    assert r.exit_code == 2 and "no such checkpoint directory or preset" in r.output
    r = run(cli, ["build", "mixtral", "-o", str(tmp_path / "o")])
    assert r.exit_code == 2 and "pass --source" in r.output
    r = run(cli, ["build", "mixtral", "--source", str(project / "ckpt"), "-o", str(tmp_path / "o")])
    assert r.exit_code == 2 and "is a CosmoeForCausalLM checkpoint" in r.output


def test_build_help_is_a_quickstart_with_examples():
    r = CliRunner().invoke(cli, ["--help"])
    assert "cosmoe-export build recipes/demo.toml" in r.output
    r = CliRunner().invoke(cli, ["build", "--help"])
    assert r.exit_code == 0 and "Examples:" in r.output


def test_gates_start_from_the_precision_defaults_and_unmeasured_metrics_fail():
    from cosmoe_export.release import gates
    limits = gates.thresholds("int4", {"top1_agreement": 0.9, "ppl_increase": None, "decode_tok_s": 10.0})
    assert limits == {"top1_agreement": 0.9, "decode_tok_s": 10.0}  # ppl_increase switched off
    assert gates.thresholds("float", {})["max_abs_logit_err"] == 1e-4
    assert not gates.check("decode_tok_s", None, 10.0)["passed"]
    assert gates.check("peak_rss_mb", 500.0, 500.0)["passed"] and not gates.check("peak_rss_mb", 501.0, 500.0)["passed"]
    assert gates.check("hit_rate", 0.8, 0.7)["op"] == ">="
    assert [g["passed"] for g in gates.evaluate({"top1_agreement": 0.95}, limits)] == [True, False]
    assert gates.integrity([])["passed"] and not gates.integrity(["a: sha256 differs"])["passed"]
    with pytest.raises(CosmoeError, match="unknown gate"):
        gates.thresholds("float", {"speed": 1.0})


def test_build_gates_the_stored_measurements_as_verify_gates_them(built):
    """One set of gates: the thresholds in force, evaluated on verify's measurements, are the gates
    `verify` would report for the same numbers."""
    from cosmoe_export.release import gates
    report = json.loads((built.out / "report.json").read_text())
    measured = json.loads((built.work / "verify" / "result.json").read_text())
    for row, result in zip(report["backends"], measured["results"], strict=True):
        assert row["gates"] == gates.evaluate(result, report["thresholds"])
        assert "gates" not in result  # the verify stage measures; the build gates
