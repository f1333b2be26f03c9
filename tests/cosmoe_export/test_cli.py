"""The CLI as users see it: JSON keys, one-line errors with exit code 2, tracebacks only with -v."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from cosmoe_export.cli import cli
from cosmoe_export.importers.presets import PAPER_PARAMS


def run(*args):
    return CliRunner().invoke(cli, list(map(str, args)))


@pytest.mark.parametrize("preset", sorted(PAPER_PARAMS))
def test_inspect_presets_json(preset):
    r = run("inspect", preset, "--json")
    assert r.exit_code == 0, r.output
    data = json.loads(r.output)
    for key in ("architecture", "num_layers", "num_experts", "top_k", "params_total", "params_active",
                "backbone_bytes", "bytes_per_expert", "memory_bytes"):
        assert key in data
    assert data["num_experts"] == 8 and data["top_k"] == 2
    assert abs(data["paper"]["active_diff_pct"]) < 3 and abs(data["paper"]["total_diff_pct"]) < 3
    assert data["memory_bytes"]["fp32"]["offloaded"] < data["memory_bytes"]["fp32"]["resident"]


def test_inspect_checkpoint_and_bundle_agree(hf_checkpoint, tmp_path):
    ckpt = hf_checkpoint("qwen3_moe")
    a = json.loads(run("inspect", ckpt, "--json").output)
    assert run("-q", "split", ckpt, "-o", tmp_path / "b").exit_code == 0
    b = json.loads(run("inspect", tmp_path / "b", "--json").output)
    assert a["architecture"] == b["architecture"] == "Qwen3MoeForCausalLM"
    for k in ("params_total", "params_active", "num_layers", "num_experts", "top_k"):
        assert a[k] == b[k]
    # fp32 bytes per expert: three 48x64 matrices plus the safetensors header
    assert a["bytes_per_expert"] == 3 * 48 * 64 * 4 < b["bytes_per_expert"] < a["bytes_per_expert"] + 1024


def test_inspect_human_output():
    r = run("inspect", "wearable-moe")
    assert r.exit_code == 0 and "vs paper Table 1" in r.output and "offloaded" in r.output


def test_error_is_one_line_exit_2(tmp_path):
    r = subprocess.run([sys.executable, "-m", "cosmoe_export.cli", "split", str(tmp_path / "missing"), "-o",
                        str(tmp_path / "o")], capture_output=True, text=True)
    assert r.returncode == 2
    lines = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert lines == [f"error: {tmp_path / 'missing'}: no such checkpoint directory or preset"]
    assert "Traceback" not in r.stderr and not (tmp_path / "o").exists()
    r = subprocess.run([sys.executable, "-m", "cosmoe_export.cli", "-v", "split", str(tmp_path / "missing"), "-o",
                        str(tmp_path / "o")], capture_output=True, text=True)
    assert r.returncode != 0 and "Traceback" in r.stderr


def examples(help_text: str) -> list[list[str]]:
    """The command lines of a help text (after its first "cosmoe-export"), continuations joined."""
    lines, line = [], ""
    for raw in help_text.splitlines():
        line += raw.strip()
        if line.endswith("\\"):
            line = line[:-1] + " "
            continue
        if line.startswith("cosmoe-export "):
            lines.append(shlex.split(line.split("#")[0])[1:])
        line = ""
    return lines


def parse_example(args: list[str], root: Path) -> click.Context:
    """Parse one example as the CLI would, without running it; the files it reads are made first,
    under ``root`` (the examples' relative paths resolve inside it)."""
    i = next(i for i, a in enumerate(args) if not a.startswith("-"))  # the group's own flags come first
    group = cli.make_context("cosmoe-export", args[:i + 1])
    cmd = cli.get_command(group, args[i])
    assert cmd is not None, args
    rest = args[i + 1:]
    for param in cmd.params:
        if isinstance(param.type, click.Path) and param.type.exists:
            for opt in param.opts:
                if opt in rest:
                    path = Path(rest[rest.index(opt) + 1]).resolve()
                    assert root in path.parents, f"{args}: reads {path}, outside the test's directory"
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_text("text")
    return cmd.make_context(args[i], rest, parent=group)


# Examples that need no input and are quick: run, not only parsed.
RUN = [["architectures"], ["inspect", "phone-moe"]]


def test_help_is_a_quickstart_and_every_command_has_examples_that_parse(tmp_path, monkeypatch):
    r = run("-h")
    assert r.exit_code == 0 and "Quickstart" in r.output
    quickstart = examples(r.output)
    assert quickstart
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")  # the examples' relative paths land here
    for args in quickstart:
        parse_example(args, tmp_path)
    for name in cli.commands:
        r = run(name, "-h")
        assert r.exit_code == 0 and "Examples:" in r.output, name
        own = examples(r.output.split("Examples:", 1)[1])
        assert own and all(name in args for args in own), name
        for args in own:
            ctx = parse_example(args, tmp_path)
            assert ctx.command.name == name
    every = [args for name in cli.commands for args in examples(run(name, "-h").output)]
    for args in RUN:
        assert args in every, args
        r = run(*args)
        assert r.exit_code == 0 and r.output, (args, r.output)


def test_architectures_lists_every_family():
    r = run("architectures")
    for arch in ("CosmoeForCausalLM", "MixtralForCausalLM", "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM",
                 "OlmoeForCausalLM"):
        assert arch in r.output
