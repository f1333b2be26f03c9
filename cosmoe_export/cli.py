"""The ``cosmoe-export`` command line. Only this module parses, prints and exits."""

from __future__ import annotations

import json
import logging
import os
import sys
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import click

from cosmoe_export.executors import EXECUTORS, ExecutorConfig
from cosmoe_export.quantization.quant_config import (
    AUTO,
    ROUNDINGS,
    Calibration,
    QuantConfig,
    Spelling,
    group_sizes,
    scheme_names,
)
from cosmoe_export.release import gates
from runtime_py import format as fmt
from runtime_py.backends import BACKENDS, TORCH_ACTIVATIONS
from runtime_py.errors import CosmoeError

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}
ALL = "all"  # --backend / --target: every one


class _Registry(click.Choice):
    """The choices of a registry that imports torch (runtime_py/quant.py, runtime_py/bundle.py), read
    when the command runs or prints its help: `cosmoe-export -h` stays quick."""

    def __init__(self, read: Callable[[], Iterable[Any]]) -> None:
        self._read = read
        super().__init__(())

    @property
    def choices(self) -> tuple[Any, ...]:  # type: ignore[override]
        return tuple(self._read())

    @choices.setter
    def choices(self, _: Any) -> None:
        pass


def _hash_checks() -> tuple[str, ...]:
    from runtime_py.bundle import HASH_CHECKS
    return HASH_CHECKS


# QuantConfig's problems in the quantize command's words.
QUANT_FLAGS = Spelling({"experts": "--expert-scheme", "backbone": "--backbone-scheme", "group_size": "--group-size",
                        "rounding": "--rounding", "calibration": "--calibration FILE",
                        "target_bytes": "--target-size SIZE", "auto": "--expert-bits auto", "gptq": "--rounding gptq"})


class _Cli(click.Group):
    """Turns our named errors into one line on stderr and their exit code (traceback with -v)."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except CosmoeError as e:
            if ctx.meta.get("verbose"):
                raise
            click.echo(f"error: {e}", err=True)
            sys.exit(e.exit_code)


@click.group(cls=_Cli, context_settings=CONTEXT)
@click.option("-v", "--verbose", is_flag=True, help="Show tracebacks on errors.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
@click.version_option(package_name="cosmoe-export")
@click.pass_context
def cli(ctx: click.Context, verbose: bool, quiet: bool) -> None:
    """Convert sparse Mixture-of-Experts checkpoints into split bundles for phones and wearables.

    \b
    Quickstart: one recipe, one command, a verified bundle and its report
      cosmoe-export build recipes/demo.toml -o build/demo          # the committed tiny-bles model
      cosmoe-export build recipes/mixtral.toml --source ./my-mixtral -o build/mixtral
      cosmoe-export verify build/demo/bundle --integrity           # re-hash every file
    Exit codes: 0 every gate passed, 1 a gate failed, 2 bad input.

    \b
    The stages one by one:
      cosmoe-export inspect wearable-moe                # sizes and memory of a preset
      cosmoe-export split ./my-mixtral -o out/bundle    # backbone + one file per expert
      cosmoe-export verify out/bundle --reference ./my-mixtral --json report.json
      cosmoe-export quantize out/bundle -o out/q4 --expert-scheme int4 --calibration text.txt
      cosmoe-export verify out/q4 --reference ./my-mixtral --text held-out.txt

    Sources are checkpoint directories (config.json + safetensors) of the architectures listed by
    `cosmoe-export architectures`, or preset names (random weights).
    """
    ctx.meta["verbose"] = verbose
    ctx.meta["progress"] = not quiet


def _budget_options(f: Any) -> Any:
    """--budget / --experts-per-layer / --policy, shared by run and verify."""
    from runtime_py.store import POLICIES

    f = click.option("--policy", type=click.Choice(list(POLICIES)), default="lru", show_default=True,
                     help="Which experts stay resident: resident (all, up front), paper (CoSMoEs Eq. 8: only the "
                          "selected ones), lru, lfu, lru+prefetch (also loads the next layer's guessed experts).")(f)
    f = click.option("--experts-per-layer", type=click.IntRange(min=1), default=None,
                     help="Budget as backbone + N experts per layer.")(f)
    return click.option("--budget", default=None, metavar="SIZE",
                        help="Memory for backbone, KV cache and experts, e.g. 300MB (default: everything).")(f)


def _torch_activations_option(default: str) -> Any:
    """--torch-activations: run's default is the fast path, verify's the bundle's math (a device never
    rounds activations to bf16, so verify's gates do not either)."""
    return click.option("--torch-activations", type=click.Choice(TORCH_ACTIVATIONS), default=default,
                        show_default=True,
                        help="The torch backend's int kernels: bf16 (PyTorch's fast int8/int4 kernels round "
                             "activations to bf16) or fp32 (the bundle's math exactly, integers still resident; "
                             "slower). The other backends run their programs' kernels.")


def _executor_options(f: Any) -> Any:
    """--jobs / --executor / --address, shared by the commands with per-expert tasks (docs/SCALE.md)."""
    f = click.option("--address", default=None, metavar="HOST:PORT",
                     help="--executor ray: the Ray head to join (default: a local Ray cluster for this run).")(f)
    f = click.option("--executor", type=click.Choice(list(EXECUTORS)), default="local", show_default=True,
                     help="Where per-expert tasks run: local processes, or Ray tasks on a cluster.")(f)
    return click.option("--jobs", type=click.IntRange(min=1), default=None, metavar="N",
                        help="Per-expert tasks at once [default: every local core; ray: the cluster's CPUs]. "
                             "The output is the same bytes for every N.")(f)


def _executor(jobs: int | None, executor: str, address: str | None) -> ExecutorConfig:
    if address is not None and executor != "ray":
        raise click.BadParameter("only applies with --executor ray", param_hint="--address")
    return ExecutorConfig(executor, jobs, address)


def _parse_budget(budget: str | None) -> int | None:
    from runtime_py.memory import parse_size

    return None if budget is None else parse_size(budget)


def _write_json(path: str | None, data: dict) -> None:
    if path:
        text = json.dumps(data, indent=2) + "\n"
        if path == "-":
            click.echo(text, nl=False)
        else:
            Path(path).write_text(text)


@cli.command(context_settings=CONTEXT)
@click.argument("recipe")
@click.option("--source", default=None, help="Checkpoint directory or preset; replaces the recipe's source.model.")
@click.option("-o", "--out", "out", type=click.Path(path_type=Path), default=None,
              help="Output directory: bundle/, report.json, report.md, plots/  [default: build/RECIPE-NAME]")
@click.option("--work", type=click.Path(path_type=Path), default=None,
              help="Stage outputs and their stamps; keep it to make reruns fast  [default: OUT.work]")
@click.option("--json", "json_path", default=None, help="Write the report as JSON to this file too ('-' for stdout).")
@click.pass_context
def build(ctx: click.Context, recipe: str, source: str | None, out: Path | None, work: Path | None,
          json_path: str | None) -> None:
    """Build a release bundle from RECIPE and gate it: split -> quantize -> lower -> verify, plus the
    routing analysis and the memory-vs-speed curve, into OUT: bundle/ (only when every gate passed),
    report.json, report.md and plots/ (docs/REPORT.md).

    RECIPE is a TOML file or the name of a shipped one (recipes/NAME.toml: demo, wearable, phone,
    mixtral, qwen2-moe, qwen3-moe, olmoe). Stages whose inputs did not change are skipped, so a rerun
    after a threshold change only re-gates. Exit code 0 when every gate passes, 1 when one fails,
    2 on bad input.

    \b
    Examples:
      cosmoe-export build recipes/demo.toml -o build/demo
      cosmoe-export build mixtral --source ./my-mixtral -o build/mixtral --json mixtral.json
      cosmoe-export -q build wearable --source ./wearable-ckpt -o /out/wearable
    """
    from cosmoe_export.release.build import build as run_build
    from cosmoe_export.release.recipe import find_recipe, load_recipe
    from runtime_py.errors import GateFailed

    r = load_recipe(find_recipe(recipe))
    out = out if out is not None else Path("build") / r.name
    info = json_path == "-"  # keep stdout for the JSON
    result = run_build(recipe=r, source=source, out=out, work=work, progress=ctx.meta["progress"],
                       log=(lambda line: click.echo(line, err=True)) if ctx.meta["progress"] else (lambda line: None))
    for row in result.report["backends"]:
        shown = " ".join(f"{g['name']}={'n/a' if g['value'] is None else format(g['value'], '.4g')}"
                         f"{'' if g['passed'] else '(FAIL)'}" for g in row["gates"])
        click.echo(f"{row['backend']} ({row['precision']}): {shown}  {'PASS' if row['passed'] else 'FAIL'}", err=info)
    b = result.report["bundle"]
    where = f"bundle {result.bundle}" if result.passed else f"no bundle published (candidate: {result.candidate})"
    click.echo(f"build {r.name}: {'PASS' if result.passed else 'FAIL'}; {where}, {b['files']} files, "
               f"{b['bytes'] / 1e6:.2f} MB; report {out / 'report.md'}", err=info)
    _write_json(json_path, result.report)
    if not result.passed:
        from cosmoe_export.release.report import failed_gates
        raise GateFailed(f"build {r.name}: gate(s) failed: {'; '.join(failed_gates(result.report))} "
                         f"(see {out / 'report.md'})")


@cli.command(context_settings=CONTEXT)
@click.argument("src")
@click.option("-o", "--out", "out", required=True, type=click.Path(path_type=Path), help="Bundle directory to write.")
@click.option("--dtype", type=click.Choice(list(fmt.DTYPE_ALIASES)), default=None,
              help="Precision of the bundle's tensors (default: the source's).")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@click.option("--allow-pickle", is_flag=True, help="Read .bin/.pt checkpoints (weights-only unpickler).")
@click.option("--json", "json_path", default=None, help="Write files and bytes as JSON to this file ('-' for stdout).")
@click.pass_context
def split(ctx: click.Context, src: str, out: Path, dtype: str | None, force: bool, allow_pickle: bool,
          json_path: str | None) -> None:
    """Split SRC (checkpoint directory or preset) into a bundle: a backbone and one file per expert.

    The bundle is written atomically (a temporary directory renamed on success) and is byte-for-byte
    the same for the same input.

    \b
    Examples:
      cosmoe-export split ./mixtral-tiny -o bundles/mixtral-tiny
      cosmoe-export split wearable-moe -o bundles/wearable --dtype bf16 --force
    """
    from cosmoe_export.importers.sources import open_source
    from cosmoe_export.importers.split import split as run_split

    source = open_source(src, allow_pickle=allow_pickle)
    result = run_split(source=source, out=out, dtype=fmt.DTYPE_ALIASES[dtype] if dtype else None, force=force,
                       progress=ctx.meta["progress"])
    click.echo(f"wrote {result.out}: {result.files} files, {result.bytes / 1e6:.1f} MB", err=json_path == "-")
    _write_json(json_path, {"out": str(result.out), "files": result.files, "bytes": result.bytes})


@cli.command(context_settings=CONTEXT)
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("-o", "--out", "out", required=True, type=click.Path(path_type=Path), help="Bundle directory to write.")
@click.option("--expert-scheme", type=_Registry(scheme_names), default=None,
              help=f"Scheme of every routed expert (default {QuantConfig.experts}; not with --expert-bits auto).")
@click.option("--backbone-scheme", type=_Registry(scheme_names), default=QuantConfig.backbone, show_default=True,
              help="Scheme of attention, shared experts, embedding and output head (routers and norms stay float).")
@click.option("--group-size", type=_Registry(group_sizes), default=QuantConfig.group_size, show_default=True,
              help="int4 group size (inputs per scale); with --expert-bits auto, the smallest group tried.")
@click.option("--expert-bits", type=click.Choice(["fixed", AUTO]), default="fixed", show_default=True,
              help="auto: int4 or int8 per expert, from --calibration, to meet --target-size.")
@click.option("--calibration", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="UTF-8 text the model runs on to round with GPTQ and to measure experts for --expert-bits auto.")
@click.option("--rounding", type=click.Choice(ROUNDINGS), default=None,
              help="How weights are rounded [default: gptq with --calibration, else nearest].")
@click.option("--target-size", default=None, help="Bundle size for --expert-bits auto: 300MB, 2.5MB, 1GiB or bytes.")
@click.option("--calibration-tokens", type=click.IntRange(min=2), default=Calibration.max_tokens, show_default=True,
              help="Tokens of --calibration to use.")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@click.option("--json", "json_path", default=None,
              help="Write a summary (and the auto decision) as JSON ('-': stdout).")
@_executor_options
@click.pass_context
def quantize(ctx: click.Context, bundle: Path, out: Path, expert_scheme: str | None, backbone_scheme: str,
             group_size: int, expert_bits: str, calibration: Path | None, rounding: str | None,
             target_size: str | None, calibration_tokens: int, force: bool, json_path: str | None,
             jobs: int | None, executor: str, address: str | None) -> None:
    """Quantize a float BUNDLE's experts and backbone into a new bundle.

    Schemes: int8 (symmetric, per output channel), int4 (symmetric, per group of --group-size inputs,
    two values per byte), none (keep the float dtype). Routers and norms always stay float. With
    --calibration the weights are rounded by GPTQ on that text (much closer to the float model at
    int4), else to nearest. The bundle is written atomically and is byte-for-byte the same for the
    same input; docs/FORMAT.md describes the bytes and docs/QUANTIZATION.md the quality of each scheme.

    \b
    Examples:
      cosmoe-export quantize bundles/tiny-bles -o bundles/tiny-bles-q8 --expert-scheme int8 --backbone-scheme int8
      cosmoe-export quantize bundles/tiny-bles -o bundles/tiny-bles-q4 --expert-scheme int4 \\
          --calibration ../shared/data/wikitext-2/valid.txt
      cosmoe-export quantize bundles/tiny-bles -o bundles/tiny-bles-mp --expert-bits auto \\
          --calibration ../shared/data/wikitext-2/valid.txt --target-size 2.5MB
      cosmoe-export quantize bundles/olmoe -o bundles/olmoe-q4 --calibration text.txt --jobs 16
      cosmoe-export quantize bundles/olmoe -o bundles/olmoe-q4 --calibration text.txt --executor ray \\
          --address head:6379
    """
    from cosmoe_export.quantization.quant_config import QuantConfigError
    from cosmoe_export.quantization.quantize import parse_size
    from cosmoe_export.quantization.quantize import quantize as run_quantize

    # Two flags say what one option says: experts is a scheme (--expert-scheme) or auto (--expert-bits).
    if expert_bits == AUTO and expert_scheme is not None:
        raise CosmoeError("--expert-scheme and --expert-bits auto exclude each other: auto chooses per expert")
    try:
        config = QuantConfig(experts=AUTO if expert_bits == AUTO else (expert_scheme or QuantConfig.experts),
                             backbone=backbone_scheme, group_size=group_size,
                             rounding=rounding or ("gptq" if calibration else "nearest"),
                             calibration=Calibration(calibration, calibration_tokens) if calibration else None,
                             target_bytes=parse_size(target_size) if target_size else None)
    except QuantConfigError as e:  # QuantConfig decides; the words are the flags'
        raise CosmoeError("; ".join(e.spelled(QUANT_FLAGS))) from None
    r = run_quantize(bundle=bundle, out=out, config=config, force=force, progress=ctx.meta["progress"],
                     executor=_executor(jobs, executor, address))
    info = sys.stderr if json_path == "-" else sys.stdout
    click.echo(f"wrote {r.out}: {r.files} files, {r.bytes / 1e6:.2f} MB ({100 * r.bytes / r.source_bytes:.1f} % of "
               f"{r.source_bytes / 1e6:.2f} MB)", file=info)
    if r.mixed_precision:
        m = r.mixed_precision
        counts = ", ".join(f"{n} x{c}" for n, c in m["counts"].items() if c)
        click.echo(f"  experts: {counts}; target {m['target_bytes'] / 1e6:.2f} MB", file=info)
    _write_json(json_path, {"out": str(r.out), "files": r.files, "bytes": r.bytes, "source_bytes": r.source_bytes,
                            "quantization": {"experts": config.experts, "backbone": config.backbone,
                                             "group_size": config.group_size},
                            "mixed_precision": r.mixed_precision})


@cli.command(context_settings=CONTEXT)
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--target", "target", type=click.Choice([*fmt.PROGRAM_TARGETS, ALL]), default=ALL, show_default=True,
              help="Which runtime to lower for (all: executorch and onnx; gguf by name).")
@click.option("--json", "json_path", default=None, help="Write timings as JSON to this file ('-' for stdout).")
@_executor_options
@click.pass_context
def lower(ctx: click.Context, bundle: Path, target: str, json_path: str | None, jobs: int | None, executor: str,
          address: str | None) -> None:
    """Add ExecuTorch (XNNPACK) and/or ONNX programs to BUNDLE, one per unit: embedding, each layer
    (attention + router), head, and one per (layer, expert) so experts load one by one.

    Quantized experts keep the bundle's own integers (8da4w/8da8w for ExecuTorch, MatMulNBits for
    ONNX). Programs go to BUNDLE/executorch and BUNDLE/onnx and are listed in the manifest.

    --target gguf writes the whole model as BUNDLE/gguf/model.gguf for llama.cpp: int4 (groups of a
    multiple of 32) as Q4_0 and int8 as Q8_0 bit for bit, floats as stored; what GGUF cannot hold
    exactly is listed in the manifest and by `inspect` (docs/LOWERING.md "GGUF").

    \b
    Examples:
      cosmoe-export lower bundles/tiny-bles --target all
      cosmoe-export lower bundles/tiny-bles --target gguf
      cosmoe-export lower bundles/wearable --target onnx --json timings.json
      cosmoe-export lower bundles/olmoe --target all --executor ray --address head:6379
    """
    from cosmoe_export.lower import lower as run_lower
    from cosmoe_export.lower.targets import TARGETS

    targets = sorted(TARGETS) if target == ALL else [target]
    timings = run_lower(bundle_path=bundle, targets=targets, progress=ctx.meta["progress"],
                        executor=_executor(jobs, executor, address))
    for name, t in timings.items():
        if "model_s" in t:  # a whole-model target
            click.echo(f"{name}: {t['model_s']:.1f} s", err=json_path == "-")
            continue
        click.echo(f"{name}: backbone {t['backbone_s']:.1f} s, experts {t['experts_s']:.1f} s "
                   f"({t['per_expert_s'] * 1e3:.0f} ms per expert)", err=json_path == "-")
    _write_json(json_path, timings)


@cli.command(context_settings=CONTEXT)
@click.argument("path")
@click.option("--json", "json_out", is_flag=True, help="Print JSON instead of a table.")
@click.option("--allow-pickle", is_flag=True, help="Read .bin/.pt checkpoints (weights-only unpickler).")
def inspect(path: str, json_out: bool, allow_pickle: bool) -> None:
    """Sizes of a checkpoint, preset or bundle: parameters, bytes per expert, memory resident vs offloaded.

    \b
    Examples:
      cosmoe-export inspect phone-moe
      cosmoe-export inspect bundles/mixtral-tiny --json
    """
    from cosmoe_export.inspect import inspect as run_inspect

    r = run_inspect(path, allow_pickle=allow_pickle)
    if json_out:
        click.echo(json.dumps(r, indent=2))
        return
    click.echo(f"{path} ({r['kind']}, {r['architecture']}, {r['dtype']})")
    if "source_precision" in r:
        click.echo(f"  source precision: {r['source_precision']} (dequantized exactly at import)")
    if "quantization" in r:
        q = r["quantization"]
        click.echo(f"  quantized: experts {q['experts']}, backbone {q['backbone']}, int4 group {q['group_size']}, "
                   f"rounding {q['rounding']}")
    click.echo(f"  layers {r['num_layers']}, experts {r['num_experts']} ({r['expert_kind']}), top-{r['top_k']}, "
               f"hidden {r['hidden_size']}, vocab {r['vocab_size']}")
    click.echo(f"  parameters: active {r['params_active'] / 1e6:,.1f}M, total {r['params_total'] / 1e6:,.1f}M "
               f"(backbone {r['params_backbone'] / 1e6:,.1f}M, {r['params_per_expert'] / 1e6:,.3f}M per expert)")
    if "paper" in r:
        p = r["paper"]
        click.echo(f"  vs paper Table 1: active {p['active_diff_pct']:+.2f} %, total {p['total_diff_pct']:+.2f} %")
    click.echo(f"  bytes: backbone {r['backbone_bytes'] / 1e6:,.1f} MB, "
               f"per expert {r['bytes_per_expert'] / 1e6:,.2f} MB")
    click.echo("  memory      resident     offloaded (backbone + top-k experts per layer)")
    for name, m in r["memory_bytes"].items():
        click.echo(f"    {name:<6} {m['resident'] / 1e6:>11,.1f} MB {m['offloaded'] / 1e6:>11,.1f} MB")
    for target, p in r.get("programs", {}).items():
        click.echo(f"  {target}: {p['files']} files, {p['bytes'] / 1e6:,.1f} MB, {', '.join(p['precisions'])}")
        g = p.get("gguf")
        if g is not None:
            types = ", ".join(f"{n} {t}" for t, n in g["tensor_types"].items())
            click.echo(f"    llama.cpp {g['architecture']}, tokenizer {g['tokenizer']}; tensors: {types}")
            for f in g["fallbacks"]:
                click.echo(f"    not as in the bundle: {f['tensor']} {f['type']} ({f['why']})")
            for d in g.get("differences", []):
                click.echo(f"    llama.cpp computes otherwise: {d}")


@cli.command(context_settings=CONTEXT)
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--prompt", default=None, help="Text to continue (the bundle's tokenizer encodes it).")
@click.option("--prompt-file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Read the prompt from a UTF-8 file.")
@click.option("--prompt-ids", default=None, metavar="IDS",
              help="Comma-separated token ids (for bundles without a tokenizer).")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--backend", type=click.Choice(list(BACKENDS)), default="torch", show_default=True,
              help="executorch/onnxruntime/native/llamacpp need `cosmoe-export lower` first; native is the C++ "
                   "runner (bash scripts/install.sh builds it), llamacpp llama.cpp on the GGUF (EXTRAS=gguf).")
@_budget_options
@click.option("--temperature", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="0: greedy.")
@click.option("--top-p", type=click.FloatRange(min=0, max=1, min_open=True), default=1.0, show_default=True)
@click.option("--seed", default=0, show_default=True, help="Sampling seed.")
@click.option("--check-hash", type=_Registry(_hash_checks), default="first", show_default=True,
              help="When to check an expert shard's sha256 against the manifest (its size is checked on every load).")
@_torch_activations_option("bf16")
@click.option("--json", "json_path", default=None, help="Write the metrics as JSON to this file ('-' for stdout).")
def run(bundle: Path, prompt: str | None, prompt_file: Path | None, prompt_ids: str | None, max_new_tokens: int,
        backend: str, budget: str | None, experts_per_layer: int | None, policy: str, temperature: float,
        top_p: float, seed: int, check_hash: str, torch_activations: str, json_path: str | None) -> None:
    """Generate text with BUNDLE the way a device would: the backbone resident and the routed experts
    loaded on demand under a memory budget. Text streams to stdout; the metrics (prefill, decode
    tokens/s, peak RSS, expert loads and load times, hit rate, ExRep, loads per token) print at the
    end and go to --json. --backend native runs the C++ runner (docs/NATIVE.md) in a process of its
    own, on the bundle's ExecuTorch programs; its peak RSS is that process's.

    \b
    Examples:
      cosmoe-export run build/demo/bundle --prompt "The router picks"
      cosmoe-export run build/demo/bundle --prompt "Hello" --backend executorch --experts-per-layer 4 \\
          --policy lru+prefetch --json metrics.json
      cosmoe-export run build/demo/bundle --prompt-file p.txt --budget 12MB --policy paper --temperature 0.8 --top-p 0.9
      cosmoe-export run build/demo/bundle --prompt "Hello" --backend native --experts-per-layer 4 --json metrics.json
    """
    from runtime_py.bundle import Bundle
    from runtime_py.runner import open_runner
    from runtime_py.tokenizer import BundleTokenizer, TextStream

    given = [name for name, v in (("--prompt", prompt), ("--prompt-file", prompt_file), ("--prompt-ids", prompt_ids))
             if v is not None]
    if len(given) != 1:
        raise CosmoeError("give exactly one of --prompt, --prompt-file, --prompt-ids")
    b = Bundle.open(bundle)
    tokenizer = None
    if prompt_ids is not None:
        try:
            ids = [int(t) for t in prompt_ids.split(",") if t.strip()]
        except ValueError:
            raise CosmoeError(f"--prompt-ids {prompt_ids!r}: write comma-separated integers") from None
        if not ids:
            raise CosmoeError("--prompt-ids: is empty; give at least one token id")
    else:
        if prompt_file is not None:
            try:
                prompt = prompt_file.read_bytes().decode("utf-8")
            except FileNotFoundError:
                raise CosmoeError(f"{prompt_file}: no such file") from None
            except UnicodeDecodeError as e:
                raise CosmoeError(f"{prompt_file}: not UTF-8 text (byte {e.start}); convert it to UTF-8") from None
        tokenizer = BundleTokenizer(b)
        ids = tokenizer.encode(prompt, where=str(prompt_file) if prompt_file else "--prompt")
    out = sys.stderr if json_path == "-" else sys.stdout
    stream = TextStream(tokenizer) if tokenizer else None

    def show(token: int) -> None:
        click.echo(stream.feed(token) if stream else f"{token} ", nl=False, file=out)
        out.flush()

    with open_runner(b, backend=backend, budget_bytes=_parse_budget(budget), experts_per_layer=experts_per_layer,
                     policy=policy, check_hash=check_hash, torch_activations=torch_activations) as runner:
        runner.check_prompt(ids, max_new_tokens)  # refuse before printing anything
        if prompt is not None:
            click.echo(prompt, nl=False, file=out)
        result = runner.generate(ids, max_new_tokens, temperature=temperature, top_p=top_p, seed=seed,
                                 stop_ids=tokenizer.stop_ids if tokenizer else (), on_token=show)
    m = result.metrics
    click.echo("", file=out)
    click.echo(f"[{backend}, {policy}] prefill {m['prompt_tokens']} tokens {m['prefill_ms']:.1f} ms, decode "
               f"{m['decode_tok_s'] or 0:.1f} tok/s, peak RSS {m['peak_rss_mb']:.0f} MB, budget "
               f"{m['budget_bytes'] / 1e6:.1f} MB (experts resident at most "
               f"{m['resident_expert_bytes_max'] / 1e6:.1f} MB), {m['expert_loads']} expert loads "
               f"(p50 {m['expert_load_ms_p50']:.2f} ms, p95 {m['expert_load_ms_p95']:.2f} ms), hit rate "
               f"{m['hit_rate']:.3f}, {m['loads_per_token']:.2f} loads/token, ExRep {m['exrep']:.1f} %, "
               f"stopped: {result.stopped}", err=True)
    _write_json(json_path, {**m, "tokens": result.tokens, "stopped": result.stopped,
                            "text": tokenizer.decode(result.tokens) if tokenizer else None})


@cli.command(context_settings=CONTEXT)
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--reference", default=None, help="Checkpoint directory or preset the bundle was split from.")
@click.option("--integrity", is_flag=True,
              help="Re-hash every file against the manifest first (alone: only that); exit 1 on any difference.")
@click.option("--backend", type=click.Choice([*BACKENDS, ALL]), default=ALL, show_default=True,
              help="'all': torch plus every backend the bundle has programs for (native, llamacpp: when installed).")
@click.option("--new-tokens", default=32, show_default=True, help="Greedy tokens compared per prompt.")
@click.option("--text", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="UTF-8 text for kl_mean, ppl and ppl_ref (needed for quantized bundles).")
@click.option("--max-tokens", type=click.IntRange(min=2), default=None, help="Use only the first N tokens of --text.")
@click.option("--gate", "gate_specs", multiple=True, metavar="NAME=VALUE",
              help=f"Override a gate threshold, or NAME={gates.OFF}; quality gates: {', '.join(gates.QUALITY)} "
                   f"(ppl_increase is relative, 0.03 = +3 %); runtime gates: {', '.join(gates.RUNTIME)}. Repeatable.")
@click.option("--json", "json_path", default=None, help="Write the report as JSON to this file ('-' for stdout).")
@click.option("--allow-pickle", is_flag=True, help="Read .bin/.pt reference checkpoints.")
@_budget_options
@_torch_activations_option("fp32")
def verify(bundle: Path, reference: str | None, integrity: bool, backend: str, new_tokens: int, text: Path | None,
           max_tokens: int | None, gate_specs: tuple[str, ...], json_path: str | None, allow_pickle: bool,
           budget: str | None, experts_per_layer: int | None, policy: str, torch_activations: str) -> None:
    """Run BUNDLE through the reference runtime and compare it with the reference model.

    A float bundle must match it (logits within 1e-4, same top-1 and greedy tokens). A quantized
    bundle is measured against its float source on --text: KL divergence, perplexity ratio, top-1
    agreement (llama.cpp's --kl-divergence statistics), gated by default at docs/QUANTIZATION.md's
    targets for its precision; the bundle's own math (dequantized weights, fp32 activations) is
    measured too, and each backend against it, so what the weights lose and what a kernel adds
    show apart.
    Exit code 0 when every gate passes, 1 when a gate fails, 2 on bad input.

    \b
    Examples:
      cosmoe-export verify bundles/mixtral-tiny --reference ./mixtral-tiny
      cosmoe-export verify bundles/tiny --reference tiny --json report.json
      cosmoe-export verify build/demo/bundle --integrity
      cosmoe-export verify bundles/tiny-bles-q4 --reference recipes/models/tiny-bles \\
          --text ../shared/data/wikitext-2/test.txt --gate ppl_increase=0.05
      cosmoe-export verify build/demo/bundle --reference recipes/models/tiny-bles --backend native \\
          --text ../shared/data/wikitext-2/test.txt --experts-per-layer 4
    """
    from cosmoe_export.release.verify import verify as run_verify

    if integrity:
        _check_integrity(bundle, json_path if reference is None else None)
    if reference is None:
        if integrity:
            return
        raise CosmoeError("verify needs --reference SRC (the checkpoint or preset the bundle came from), "
                          "or --integrity to re-hash the bundle's files only")
    overrides: dict[str, float | None] = {}
    for spec in gate_specs:
        name, _, value = spec.partition("=")
        try:
            overrides[name.strip()] = None if value.strip() == gates.OFF else float(value)
        except ValueError:
            raise CosmoeError(f"--gate {spec!r}: write NAME=NUMBER or NAME={gates.OFF}") from None
    report = run_verify(bundle_path=bundle, reference=reference, backend=backend, new_tokens=new_tokens,
                        text=text, max_tokens=max_tokens, gates=overrides, allow_pickle=allow_pickle,
                        budget=_parse_budget(budget), experts_per_layer=experts_per_layer, policy=policy,
                        torch_activations=torch_activations, progress=click.get_current_context().meta["progress"])
    err = json_path == "-"
    if "bundle_math" in report:
        click.echo(f"bundle math (dequantized weights, fp32 activations): {_quality(report['bundle_math'])}", err=err)
    for r in report["results"]:
        status = "PASS" if r["passed"] else "FAIL"
        quality = _quality(r) if "kl_mean" in r else f"top1_agreement={r['top1_agreement']:.3f}"
        if "vs_bundle" in r:
            v = r["vs_bundle"]
            quality += f" | vs bundle math: top1_agreement={v['top1_agreement']:.4f} kl_mean={v['kl_mean']:.2e} |"
        click.echo(f"{r['backend']} {r['dtype']} ({r['precision']}): max_abs_logit_err={r['max_abs_logit_err']:.2e} "
                   f"greedy_match={r['greedy_match']:.3f} {quality} {_offloading(r)}"
                   f"decode_tok_s={r['decode_tok_s'] or 0:.1f}  {status}", err=err)
    _write_json(json_path, report)
    if not report["passed"]:
        click.echo("error: verify: a gate failed (see above)", err=True)
        sys.exit(1)


def _offloading(r: dict[str, Any]) -> str:
    """A backend's expert loads and hit rate; nothing for one without an expert store (llamacpp maps every expert)."""
    return f"expert_loads={r['expert_loads']} hit_rate={r['hit_rate']:.3f} " if "expert_loads" in r else ""


def _quality(m: dict[str, Any]) -> str:
    """One line of cosmoe_export/release/quality.py's statistics."""
    return (f"top1_agreement={m['top1_agreement']:.4f}±{m['top1_agreement_stderr']:.4f} "
            f"kl_mean={m['kl_mean']:.2e} kl_p99={m['kl_p99']:.2e} ppl={m['ppl']:.3f} ppl_ref={m['ppl_ref']:.3f} "
            f"({100 * m['ppl_increase']:+.2f}±{100 * m['ppl_ratio_stderr']:.2f} %)")


def _check_integrity(bundle: Path, json_path: str | None) -> None:
    """Re-hash every file of BUNDLE against its manifest: a truncated or edited shard must never run."""
    from runtime_py.bundle import Bundle
    from runtime_py.errors import GateFailed

    opened = Bundle.open(bundle)
    problems = opened.verify_integrity()
    for line in problems:
        click.echo(line, err=True)
    _write_json(json_path, {"bundle": str(bundle), "files": len(opened.files), "problems": problems})
    if problems:
        raise GateFailed(f"{bundle}: {len(problems)} of {len(opened.files)} files differ from the manifest; "
                         "rebuild the bundle (never run it)")
    click.echo(f"{bundle}: {len(opened.files)} files match the manifest", err=json_path == "-")


@cli.command(context_settings=CONTEXT)
def architectures() -> None:
    """List the supported source architectures, what proves each stage for each (the table of
    docs/FAMILIES.md), and the named presets.

    \b
    Examples:
      cosmoe-export architectures
    """
    from cosmoe_export.importers import coverage
    from cosmoe_export.importers.adapters import REFUSED, supported_architectures
    from cosmoe_export.importers.presets import PRESETS

    click.echo("architectures: " + ", ".join(supported_architectures()))
    click.echo("presets: " + ", ".join(PRESETS))
    click.echo("")
    click.echo(coverage.table())
    click.echo("")
    for name, why in REFUSED.items():
        click.echo(f"refused: {name}: {why}")


@cli.command(context_settings=CONTEXT)
@click.argument("path")
@click.option("--text", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="UTF-8 text to run, cut into windows of the model's context.")
@click.option("--max-tokens", type=click.IntRange(min=2), default=None,
              help="Use only the first N tokens of the text (default: all).")
@click.option("--json", "json_path", default=None, help="Write the report as JSON to this file ('-' for stdout).")
@click.option("--plots", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Write PNG plots (selection map, ΔUniform per layer, hit rate vs cache size) here.")
def analyze(path: str, text: Path, max_tokens: int | None, json_path: str | None, plots: Path | None) -> None:
    """Routing statistics of PATH (checkpoint directory or bundle) over a text: perplexity, ExRep
    (CoSMoEs Eq. 4-5), ΔUniform, expert loads per token under the Eq. 8 policy, and the hit rate of
    a per-layer expert cache (LRU and the Belady optimum) for every cache size.

    \b
    Examples:
      cosmoe-export analyze recipes/models/tiny-bles --text ../shared/data/wikitext-2/test.txt
      cosmoe-export analyze bundles/tiny-bles --text notes.txt --max-tokens 65536 --json r.json --plots plots/
    """
    from cosmoe_export.release.analyze import analyze as run_analyze

    r = run_analyze(path=path, text=text, max_tokens=max_tokens, plots=plots)
    out = sys.stderr if json_path == "-" else sys.stdout
    e, half = r["num_experts"], r["num_experts"] // 2
    click.echo(f"{path} ({r['kind']}): {r['tokens']:,} tokens in {r['windows']} windows of {r['window_tokens']}, "
               f"perplexity {r['perplexity']:.2f}", file=out)
    click.echo(f"  layer  ExRep %  ΔUniform  loads/token  LRU@{half}/{e}  Belady@{half}/{e}", file=out)
    rows = [(str(p["layer"]), p["exrep"], p["delta_uniform"], p["eq8_loads_per_token"], p["hit_rate_lru"][half - 1],
             p["hit_rate_belady"][half - 1]) for p in r["per_layer"]]
    c = r["hit_rate_curve"]
    rows.append(("all", r["exrep"], r["delta_uniform"], r["eq8_loads_per_token"], c["lru"][half - 1],
                 c["belady"][half - 1]))
    for name, x, du, loads, lru, bel in rows:
        click.echo(f"  {name:>5}  {x:7.2f}  {du:8.2f}  {loads:11.3f}  {100 * lru:8.1f} %  {100 * bel:9.1f} %", file=out)
    for p in r.get("plots", []):
        click.echo(f"  wrote {p}", file=out)
    _write_json(json_path, r)


def _quiet_libraries() -> None:
    """transformers, torchao and torch print import-time warnings and progress bars that say nothing
    about the user's job; our one-line errors must not drown in them. Nothing is ever downloaded."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    for name in ("torchao", "torch.utils._pytree", "torch._logging", "torch.onnx", "onnxscript"):
        logging.getLogger(name).setLevel(logging.ERROR)
    # Export-time deprecation chatter from torch / executorch internals; our own warnings still show.
    for category in (FutureWarning, DeprecationWarning, UserWarning):
        warnings.filterwarnings("ignore", category=category, module=r"(torch|executorch|torchao|onnxscript|copyreg)")


def main() -> None:
    _quiet_libraries()
    cli()


if __name__ == "__main__":
    main()
