"""Trade-off of the BlES loss and its levers: short runs of the tiny recipe, one per setting,
measured on held-out text (perplexity, ExRep, ΔUniform, LRU hit rate at half the experts).
"bles (run mean)" is the BlES loss averaged over all the run's steps.

    .venv/bin/python recipes/sweep_bles.py --corpus ../shared/data/pydocs-3.11.txt \\
        --text ../shared/data/wikitext-2/valid.txt --weights 0 0.5 --tau 1 4 --steps 300 --json /tmp/sweep.json

Every lever flag takes one or more values and the sweep runs their product (a BlES weight of 0 is
the ``moe`` variant, run once per steps / balance / z-loss setting, whatever the BlES-only levers):

- ``--weights``      BlES weight (CoSMoEs Eq. 7);
- ``--tau``          softmax temperature of Eq. 2 inside the BlES loss, W = softmax(tau R);
- ``--bles-warmup``  steps over which the BlES weight ramps linearly from 0;
- ``--lb-weight``    load-balancing weight, ``W`` (constant) or ``START:END`` (linear over the run);
- ``--z-weight``     router z-loss weight (ST-MoE);
- ``--steps``        training steps.

Everything else is the recipe's default. Each row is printed as a Markdown table row as soon as
its run ends; a BlES row also gets its ratios against the moe row with the same steps, balance
and z-loss, from this sweep or from ``--baseline`` (an earlier sweep's JSON, whose moe rows are
not rerun): ExRep cut moe/bles, ΔUniform bles/moe, perplexity change. The runs are shorter than
the shipped models', so read the curve's shape, not its absolute numbers.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
import torch  # noqa: E402

from cosmoe_export.release import analyze as A  # noqa: E402
from cosmoe_export.text import windows  # noqa: E402
from cosmoe_export.training import train as T  # noqa: E402

HEADER = ("| steps | lb weight | z weight | BlES weight | tau | BlES warm-up | perplexity | ExRep % | ΔUniform "
          "| LRU 4/8 | bles (run mean) | ExRep cut | ΔUniform × | perplexity Δ |\n" + "|---" * 14 + "|")


def lb_schedule(text: str) -> tuple[float, float | None]:
    """``W`` -> (W, None), constant; ``START:END`` -> (START, END), linear over the run."""
    start, _, end = text.partition(":")
    try:
        return float(start), (float(end) if end else None)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected W or START:END, got {text!r}") from None


def lb_text(start: float, end: float | None) -> str:
    return f"{start:g}" if end is None else f"{start:g}→{end:g}"


def configs(args) -> list[T.TrainConfig]:
    """The product of the lever values, moe duplicates removed (the BlES-only levers mean
    nothing at weight 0), in the order given: put weight 0 first to have each baseline first."""
    out: list[T.TrainConfig] = []
    for steps, (lb, lb_end), z, w, tau, warm in itertools.product(
            args.steps, args.lb_weight, args.z_weight, args.weights, args.tau, args.bles_warmup):
        bles = dict(bles_weight=w, bles_tau=tau, bles_warmup=warm) if w else {}
        tc = T.TrainConfig(variant="bles" if w else "moe", seed=args.seed, steps=steps, lb_weight=lb,
                           lb_weight_end=lb_end, z_weight=z, **bles)
        if tc not in out:
            out.append(tc)
    return out


def baseline_key(row: dict) -> tuple:
    """What a BlES row and its moe baseline must share."""
    return row["steps"], row["seed"], row["lb_weight"], row.get("lb_weight_end"), row.get("z_weight", 0.0)


def format_row(row: dict, base: dict | None) -> str:
    cells = [str(row["steps"]), lb_text(row["lb_weight"], row.get("lb_weight_end")), f"{row['z_weight']:g}",
             f"{row['bles_weight']:g}" if row["bles_weight"] else "0 (moe)",
             f"{row['bles_tau']:g}", str(row["bles_warmup"]), f"{row['perplexity']:.2f}", f"{row['exrep']:.2f}",
             f"{row['delta_uniform']:.2f}", f"{100 * row['lru_hit_rate_half']:.1f} %",
             f"{row['train_log'].get('bles', 0):.4f}"]
    if base is not None and row["bles_weight"]:
        cells += [f"{base['exrep'] / row['exrep']:.2f}×", f"{row['delta_uniform'] / base['delta_uniform']:.2f}×",
                  f"{100 * (row['perplexity'] / base['perplexity'] - 1):+.1f} %"]
    else:
        cells += ["–"] * 3
    return "| " + " | ".join(cells) + " |"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", nargs="+", type=Path, required=True, help="Plain-text training files.")
    ap.add_argument("--text", type=Path, required=True, help="Held-out text to measure on.")
    ap.add_argument("--weights", nargs="+", type=float, required=True, help="BlES weights; 0 = moe.")
    ap.add_argument("--tau", nargs="+", type=float, default=[T.TrainConfig.bles_tau],
                    help="Eq. 2 temperature in the BlES loss.")
    ap.add_argument("--bles-warmup", nargs="+", type=int, default=[T.TrainConfig.bles_warmup],
                    help="Steps of linear BlES-weight warm-up from 0.")
    ap.add_argument("--lb-weight", nargs="+", type=lb_schedule, default=[(T.TrainConfig.lb_weight, None)],
                    help="Load-balancing weight: W, or START:END for a linear ramp over the run.")
    ap.add_argument("--z-weight", nargs="+", type=float, default=[T.TrainConfig.z_weight],
                    help="Router z-loss weight.")
    ap.add_argument("--steps", nargs="+", type=int, default=[300])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-tokens", type=int, default=32768, help="Held-out tokens measured per run.")
    ap.add_argument("--baseline", type=Path, default=None, help="An earlier sweep's JSON: its moe rows are baselines.")
    ap.add_argument("--json", type=Path, default=None, help="Write the rows as JSON here.")
    args = ap.parse_args(argv)

    torch.set_num_threads(1)  # the result must not depend on the core count, and the machine is shared
    try:
        todo = configs(args)
    except ValueError as e:
        ap.error(str(e))
    tok = T.train_tokenizer(args.corpus, 4096)
    ids = T.encode_corpus(tok, args.corpus)
    eot = tok.token_to_id(T.EOT)
    # The sweep's tokenizer lives in memory only (nothing saved), so it encodes the text itself.
    held_out = tok.encode(args.text.read_text(encoding="utf-8")).ids[:args.max_tokens]
    baselines = {}
    if args.baseline:
        baselines = {baseline_key(r): r for r in json.loads(args.baseline.read_text()) if not r["bles_weight"]}
    rows = []
    print(HEADER, file=sys.stderr)
    for tc in todo:
        key = baseline_key(dataclasses.asdict(tc))
        if not tc.bles_weight and key in baselines:
            print(f"moe {key} taken from {args.baseline}", file=sys.stderr)  # measured already: not rerun
            continue
        config = T.tiny_config(tc.variant, vocab_size=tok.get_vocab_size(), bos_token_id=eot, eos_token_id=eot)
        t0 = time.perf_counter()
        result = T.train(config, ids, tc, log_every=tc.steps)
        report, _ = A.routing_report(result.model, windows(held_out, config.max_position_embeddings))
        half = config.num_experts // 2
        row = {**dataclasses.asdict(tc), "perplexity": report["perplexity"], "exrep": report["exrep"],
               "delta_uniform": report["delta_uniform"], "lru_hit_rate_half": report["hit_rate_curve"]["lru"][half - 1],
               "exrep_per_layer": [p["exrep"] for p in report["per_layer"]],
               "delta_uniform_per_layer": [p["delta_uniform"] for p in report["per_layer"]],
               "train_log": result.log[-1], "seconds": round(time.perf_counter() - t0, 1)}
        rows.append(row)
        if not tc.bles_weight:
            baselines[key] = row
        print(format_row(row, baselines.get(key)), file=sys.stderr, flush=True)
        if args.json:
            args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
