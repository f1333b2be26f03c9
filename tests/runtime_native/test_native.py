"""The native backend: the C++ runner cosmoe-run (runtime_native/) behind runtime_py/native.py's
NativeRunner, against runtime_py's own ExecuTorch backend on the same lowered programs.

The committed trained fixture tiny-bles is lowered to ExecuTorch twice per session, as fp32 and with
int4 experts and an int8 backbone (side by side: a few minutes on 2 cores); every test shares them.
The tests run the installed runner: `bash scripts/install.sh` builds it, and a missing one fails
them (a broken native build must not pass CI as skips).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from cosmoe_export.cli import cli
from cosmoe_export.errors import CosmoeError
from cosmoe_export.release.recipe import recipe_from_dict
from runtime_py.backends import available_backends, native_binary
from runtime_py.bundle import Bundle
from runtime_py.native import NativeRunner
from runtime_py.runner import Runner, open_runner


def test_the_runner_is_installed():
    assert native_binary() is not None, "cosmoe-run is missing: run `bash scripts/install.sh`"
PROMPT = [5, 17, 99, 3, 250, 42, 7, 7]
# Budgets under which the two runners must agree: every expert resident, the paper's Eq. 8 policy
# at the top-k itself, LRU at half of the experts.
POLICIES = {"resident": None, "paper": 2, "lru": 4}


def _cli(*args: str) -> None:
    r = CliRunner().invoke(cli, ["-q", *args])
    assert r.exit_code == 0, r.output


@pytest.fixture(scope="session")
def bles_bundles(tiny_bles_bundle, tmp_path_factory) -> dict[str, Path]:
    """tiny-bles lowered to ExecuTorch: "fp32", and "int4" (int4 experts, int8 backbone)."""
    out = tmp_path_factory.mktemp("native")
    paths = {"fp32": out / "fp32", "int4": out / "int4"}
    shutil.copytree(tiny_bles_bundle, paths["fp32"])  # the shared split stays as it is
    _cli("quantize", str(tiny_bles_bundle), "-o", str(paths["int4"]), "--expert-scheme", "int4",
         "--backbone-scheme", "int8")
    # Both at once: lowering keeps about one core busy, and CI has two.
    lowering = [subprocess.Popen([sys.executable, "-m", "cosmoe_export.cli", "-q", "lower", str(path), "--target",
                                  "executorch"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                for path in paths.values()]
    for proc in lowering:
        output, _ = proc.communicate()
        assert proc.returncode == 0, output
    return paths


def _runners(bundle: Bundle, policy: str) -> tuple[Runner, NativeRunner]:
    options = {"policy": policy, "experts_per_layer": POLICIES[policy]}
    return Runner(bundle, backend="executorch", **options), NativeRunner(bundle, **options)


@pytest.mark.parametrize("precision", ["fp32", "int4"])
@pytest.mark.parametrize("policy", list(POLICIES))
def test_greedy_tokens_and_expert_traffic_match_the_executorch_runner(bles_bundles, precision, policy):
    bundle = Bundle.open(bles_bundles[precision])
    python, native = _runners(bundle, policy)
    with python, native:
        want = python.generate(PROMPT, 128)
        streamed: list[int] = []
        got = native.generate(PROMPT, 128, on_token=streamed.append)
    assert got.tokens == want.tokens and streamed == got.tokens
    assert got.stopped == want.stopped == "max_new_tokens"
    # The same store semantics on both sides: the same selections load the same experts.
    m, w = got.metrics, want.metrics
    assert (m["backend"], m["policy"], m["prompt_tokens"], m["new_tokens"]) == ("native", policy, len(PROMPT), 128)
    assert m["expert_loads"] == w["expert_loads"]
    assert m["hit_rate"] == pytest.approx(w["hit_rate"]) and m["exrep"] == pytest.approx(w["exrep"])
    assert m["resident_expert_bytes_max"] <= m["budget_bytes"] - m["backbone_bytes"]
    assert (native.budget_bytes, native.backbone_bytes, native.expert_unit_bytes) == (
        m["budget_bytes"], m["backbone_bytes"], m["expert_unit_bytes"])


# Largest |native - executorch| over the largest |executorch logit|. fp32: the same programs on the
# same inputs. int4: the expert programs quantize their inputs per token to int8 (8da4w), and the
# routing weights (softmax and top-k, computed outside the programs on each side) differ in their
# last bit; an input at a rounding boundary then flips a code. One ulp on the routing weights moves
# runtime_py's own ExecuTorch int4 logits by 1.9e-3 of the largest logit on this bundle.
LOGIT_TOLERANCE = {"fp32": 1e-5, "int4": 1e-2}


@pytest.mark.parametrize("precision", ["fp32", "int4"])
def test_logits_match_the_executorch_runner(bles_bundles, precision):
    bundle = Bundle.open(bles_bundles[precision])
    g = torch.Generator().manual_seed(0)
    # Whole context windows, as verify --text scores them, and two rows: one run per row.
    ids = torch.randint(0, bundle.config.vocab_size, (2, bundle.config.max_position_embeddings), generator=g)
    python, native = _runners(bundle, "lru")
    with python, native:
        want = python.logits(ids)  # [B, T, V]
        got = native.logits(ids)  # [B, T, V]
    assert got.shape == want.shape and got.dtype == torch.float32
    assert float((got - want).abs().max()) <= LOGIT_TOLERANCE[precision] * float(want.abs().max())
    assert float((got.argmax(-1) == want.argmax(-1)).float().mean()) >= (1.0 if precision == "fp32" else 0.99)


def test_metrics_have_exactly_the_runner_keys(bles_bundles):
    bundle = Bundle.open(bles_bundles["fp32"])
    with Runner(bundle, backend="executorch", policy="lru+prefetch", experts_per_layer=4) as r:
        want = r.generate(PROMPT, 8).metrics
    with open_runner(bundle, backend="native", policy="lru+prefetch", experts_per_layer=4) as r:
        assert isinstance(r, NativeRunner)
        got = r.generate(PROMPT, 8).metrics
    assert sorted(got) == sorted(want)
    assert got["peak_rss_mb"] > 0 and got["budget_bytes"] > got["backbone_bytes"] > 0


def test_run_cli_streams_tokens_and_writes_json(bles_bundles, tmp_path):
    out = tmp_path / "m.json"
    r = CliRunner().invoke(cli, ["run", str(bles_bundles["int4"]), "--backend", "native", "--prompt",
                                 "The expert router", "--max-new-tokens", "12", "--experts-per-layer", "4",
                                 "--json", str(out)])
    assert r.exit_code == 0, r.output
    m = json.loads(out.read_text())
    assert m["backend"] == "native" and m["policy"] == "lru"
    assert len(m["tokens"]) == 12 or m["stopped"] == "stop_token"
    assert r.output.startswith("The expert router" + m["text"][:5])
    assert "[native, lru]" in r.output


@pytest.mark.parametrize("args, message", [
    (["--budget", "1MB"], "below the minimum"),
    (["--experts-per-layer", "9"], "experts per layer"),
])
def test_run_cli_bad_budget_is_one_line_and_exit_2(bles_bundles, args, message):
    r = CliRunner().invoke(cli, ["run", str(bles_bundles["fp32"]), "--backend", "native", "--prompt-ids", "1,2,3",
                                 *args])
    assert r.exit_code == 2, r.output
    assert message in r.output and "Traceback" not in r.output
    assert len(r.output.strip().splitlines()) == 1


def test_verify_native_against_the_source(bles_bundles, tmp_path):
    out = tmp_path / "r.json"
    reference = Path(__file__).resolve().parents[2] / "recipes/models/tiny-bles"
    r = CliRunner().invoke(cli, ["verify", str(bles_bundles["fp32"]), "--reference", str(reference),
                                 "--backend", "native", "--new-tokens", "8", "--experts-per-layer", "4",
                                 "--json", str(out)])
    assert r.exit_code == 0, r.output
    (result,) = json.loads(out.read_text())["results"]
    assert result["backend"] == "native" and result["passed"] and result["greedy_match"] == 1.0
    assert "native" in available_backends(Bundle.open(bles_bundles["fp32"]))


def test_missing_runner_is_one_line_saying_how_to_install(tiny_bles_bundle, tmp_path, monkeypatch):
    monkeypatch.delenv("COSMOE_RUN", raising=False)
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))  # a Python with no runner beside it
    bundle = Bundle.open(tiny_bles_bundle)
    r = CliRunner().invoke(cli, ["run", str(bundle.root), "--backend", "native", "--prompt-ids", "1,2,3"])
    assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1
    assert "bash scripts/install.sh" in r.output
    monkeypatch.setenv("COSMOE_RUN", str(tmp_path / "nowhere"))
    with pytest.raises(CosmoeError, match="COSMOE_RUN"):
        NativeRunner(bundle)


def test_recipes_name_native_only_with_executorch_programs(tmp_path):
    base = {"name": "n", "source": {"model": "tiny"}, "verify": {"backends": ["torch", "native"]}}
    assert recipe_from_dict(base, base=tmp_path).verify.backends == ("torch", "native")
    with pytest.raises(CosmoeError, match="native needs lower.targets to include 'executorch'"):
        recipe_from_dict({**base, "lower": {"targets": ["onnx"]}}, base=tmp_path)
    with pytest.raises(CosmoeError, match="not one of"):
        recipe_from_dict({**base, "verify": {"backends": ["nativ"]}}, base=tmp_path)


@pytest.mark.parametrize("policy", ["resident", "paper", "lru+prefetch"])
def test_dense_layers_run_natively_as_the_executorch_runner(lowered_dense, policy):
    """GLM-4-MoE with a dense first layer: the C++ runner reads the plan, skips routing there, and
    gives the tokens, expert traffic and logits of runtime_py's ExecuTorch runner."""
    bundle = Bundle.open(lowered_dense)
    per_layer = {"resident": None, "paper": 2, "lru+prefetch": 3}[policy]
    python = Runner(bundle, backend="executorch", policy=policy, experts_per_layer=per_layer)
    native = NativeRunner(bundle, policy=policy, experts_per_layer=per_layer)
    ids = torch.tensor([PROMPT])
    with python, native:
        want, got = python.generate(PROMPT, 24), native.generate(PROMPT, 24)
        want_logits = python.logits(ids)
        assert float((native.logits(ids) - want_logits).abs().max()) <= 1e-5 * float(want_logits.abs().max())
    assert got.tokens == want.tokens
    m, w = got.metrics, want.metrics
    assert m["expert_loads"] == w["expert_loads"] and m["exrep"] == pytest.approx(w["exrep"])
    assert m["hit_rate"] == pytest.approx(w["hit_rate"])


# ---- the manifest as the schema has it ----------------------------------------------------------
def _cpp_set(name: str) -> set[str]:
    """One of runtime_native/src/bundle.cpp's `const std::set<std::string> kName = {...};`."""
    import re
    text = (Path(__file__).parents[2] / "runtime_native/src/bundle.cpp").read_text()
    body = re.search(rf"std::set<std::string> {name} = \{{(.*?)\}};", text, re.S).group(1)
    return set(re.findall(r'"([^"]+)"', body))


def test_the_runner_takes_the_keys_and_choices_the_manifest_schema_has():
    """The C++ runner validates manifests by hand: its key sets and enums are the schema's, so a key
    the exporter starts writing (the GGUF entry's `gguf`) cannot make every bundle unreadable to it."""
    from runtime_py import format as fmt
    schema = fmt.manifest_schema()
    entry = schema["properties"]["files"]["items"]["properties"]
    assert _cpp_set("kTopKeys") == set(schema["properties"])
    assert _cpp_set("kTopRequired") == set(schema["required"])
    assert _cpp_set("kFileKeys") == set(entry)
    for cpp, key in (("kRoles", "role"), ("kTargets", "target"), ("kUnits", "unit"), ("kDtypes", "dtype")):
        assert _cpp_set(cpp) == set(entry[key]["enum"]), key


def test_a_bundle_with_a_gguf_too_runs_natively(bles_bundles, tmp_path):
    """lower --target gguf beside the ExecuTorch programs: the runner reads the manifest, skips the
    GGUF (llama.cpp's file) and gives the same tokens."""
    both = tmp_path / "both"
    shutil.copytree(bles_bundles["int4"], both)
    _cli("lower", str(both), "--target", "gguf")
    with NativeRunner(Bundle.open(bles_bundles["int4"])) as alone, NativeRunner(Bundle.open(both)) as beside:
        assert beside.generate(PROMPT, 16).tokens == alone.generate(PROMPT, 16).tokens
