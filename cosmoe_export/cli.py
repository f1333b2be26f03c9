"""The ``cosmoe-export`` command line. Only this module parses, prints and exits."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import click

from runtime_py.errors import CosmoeError

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


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
    Quickstart:
      cosmoe-export inspect wearable-moe                # sizes and memory of a preset
      cosmoe-export split ./my-mixtral -o out/bundle    # backbone + one file per expert
      cosmoe-export verify out/bundle --reference ./my-mixtral --json report.json

    Sources are checkpoint directories (config.json + safetensors) of the architectures listed by
    `cosmoe-export architectures`, or preset names (random weights).
    """
    ctx.meta["verbose"] = verbose
    ctx.meta["progress"] = not quiet


def _write_json(path: str | None, data: dict) -> None:
    if path:
        text = json.dumps(data, indent=2) + "\n"
        if path == "-":
            click.echo(text, nl=False)
        else:
            Path(path).write_text(text)


@cli.command(context_settings=CONTEXT)
@click.argument("src")
@click.option("-o", "--out", "out", required=True, type=click.Path(path_type=Path), help="Bundle directory to write.")
@click.option("--dtype", type=click.Choice(["fp32", "bf16", "fp16"]), default=None,
              help="Precision of the bundle's tensors (default: the source's).")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@click.option("--allow-pickle", is_flag=True, help="Read .bin/.pt checkpoints (weights-only unpickler).")
@click.pass_context
def split(ctx: click.Context, src: str, out: Path, dtype: str | None, force: bool, allow_pickle: bool) -> None:
    """Split SRC (checkpoint directory or preset) into a bundle: a backbone and one file per expert.

    The bundle is written atomically (a temporary directory renamed on success) and is byte-for-byte
    the same for the same input.

    \b
    Examples:
      cosmoe-export split ./mixtral-tiny -o bundles/mixtral-tiny
      cosmoe-export split wearable-moe -o bundles/wearable --dtype bf16 --force
    """
    from cosmoe_export.sources import open_source
    from cosmoe_export.split import split as run_split
    from runtime_py.format import DTYPE_ALIASES

    source = open_source(src, allow_pickle=allow_pickle)
    result = run_split(source=source, out=out, dtype=DTYPE_ALIASES[dtype] if dtype else None, force=force,
                       progress=ctx.meta["progress"])
    click.echo(f"wrote {result.out}: {result.files} files, {result.bytes / 1e6:.1f} MB")


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


@cli.command(context_settings=CONTEXT)
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--reference", required=True, help="Checkpoint directory or preset the bundle was split from.")
@click.option("--backend", type=click.Choice(["torch"]), default="torch", show_default=True)
@click.option("--new-tokens", default=32, show_default=True, help="Greedy tokens compared per prompt.")
@click.option("--json", "json_path", default=None, help="Write the report as JSON to this file ('-' for stdout).")
@click.option("--allow-pickle", is_flag=True, help="Read .bin/.pt reference checkpoints.")
def verify(bundle: Path, reference: str, backend: str, new_tokens: int, json_path: str | None,
           allow_pickle: bool) -> None:
    """Run BUNDLE through the reference runtime and compare it with the reference model.

    Exit code 0 when every gate passes, 1 when a gate fails, 2 on bad input.

    \b
    Examples:
      cosmoe-export verify bundles/mixtral-tiny --reference ./mixtral-tiny
      cosmoe-export verify bundles/tiny --reference tiny --json report.json
    """
    from cosmoe_export.verify import verify as run_verify

    report = run_verify(bundle_path=bundle, reference=reference, backend=backend, new_tokens=new_tokens,
                        allow_pickle=allow_pickle)
    for r in report["results"]:
        status = "PASS" if r["passed"] else "FAIL"
        click.echo(f"{r['backend']} {r['dtype']}: max_abs_logit_err={r['max_abs_logit_err']:.2e} "
                   f"top1_agreement={r['top1_agreement']:.3f} greedy_match={r['greedy_match']:.3f} "
                   f"expert_loads={r['expert_loads']}  {status}", err=json_path == "-")
    _write_json(json_path, report)
    if not report["passed"]:
        click.echo("error: verify: a gate failed (see above)", err=True)
        sys.exit(1)


@cli.command(context_settings=CONTEXT)
def architectures() -> None:
    """List the supported source architectures and the named presets.

    \b
    Examples:
      cosmoe-export architectures
    """
    from cosmoe_export.adapters import supported_architectures
    from cosmoe_export.presets import PRESETS

    click.echo("architectures: " + ", ".join(supported_architectures()))
    click.echo("presets: " + ", ".join(PRESETS))


def _quiet_libraries() -> None:
    """transformers, torchao and torch print import-time warnings and progress bars that say nothing
    about the user's job; our one-line errors must not drown in them. Nothing is ever downloaded."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    for name in ("torchao", "torch.utils._pytree", "torch._logging"):
        logging.getLogger(name).setLevel(logging.ERROR)


def main() -> None:
    _quiet_libraries()
    cli()


if __name__ == "__main__":
    main()
