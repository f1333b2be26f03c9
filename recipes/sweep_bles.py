"""Trade-off of the BlES loss weight: short runs of the tiny recipe, one per weight, measured on
held-out text (perplexity, ExRep, ΔUniform, LRU hit rate at half the experts).

    .venv/bin/python recipes/sweep_bles.py --corpus ../shared/data/pydocs-3.11.txt \
        --text ../shared/data/wikitext-2/valid.txt --weights 0 1 4 16 --steps 300 --json /tmp/sweep.json

Weight 0 is the ``moe`` variant. Everything but the BlES weight is the recipe's default; the runs
are shorter than the shipped models', so read the curve's shape, not its absolute numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
import torch  # noqa: E402

from cosmoe_export.release import analyze as A  # noqa: E402
from cosmoe_export.text import windows  # noqa: E402
from cosmoe_export.training import train as T  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", nargs="+", type=Path, required=True, help="Plain-text training files.")
    ap.add_argument("--text", type=Path, required=True, help="Held-out text to measure on.")
    ap.add_argument("--weights", nargs="+", type=float, required=True, help="BlES weights; 0 = moe.")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lb-weight", type=float, default=T.TrainConfig.lb_weight)
    ap.add_argument("--max-tokens", type=int, default=32768, help="Held-out tokens measured per run.")
    ap.add_argument("--json", type=Path, default=None, help="Write the rows as JSON here.")
    args = ap.parse_args(argv)

    torch.set_num_threads(1)
    tok = T.train_tokenizer(args.corpus, 4096)
    ids = T.encode_corpus(tok, args.corpus)
    eot = tok.token_to_id(T.EOT)
    # The sweep's tokenizer lives in memory only (nothing saved), so it encodes the text itself.
    held_out = tok.encode(args.text.read_text(encoding="utf-8")).ids[:args.max_tokens]
    rows = []
    print("weight  perplexity  ExRep %  ΔUniform  LRU@4/8  final bles", file=sys.stderr)
    for w in args.weights:
        variant = "bles" if w else "moe"
        tc = T.TrainConfig(variant=variant, seed=args.seed, steps=args.steps, lb_weight=args.lb_weight,
                           bles_weight=w)
        config = T.tiny_config(variant, vocab_size=tok.get_vocab_size(), bos_token_id=eot, eos_token_id=eot)
        result = T.train(config, ids, tc, log_every=args.steps)
        report, _ = A.routing_report(result.model, windows(held_out, config.max_position_embeddings))
        half = config.num_experts // 2
        row = {"bles_weight": w, "steps": args.steps, "perplexity": report["perplexity"], "exrep": report["exrep"],
               "delta_uniform": report["delta_uniform"], "lru_hit_rate_half": report["hit_rate_curve"]["lru"][half - 1],
               "train_log": result.log[-1]}
        rows.append(row)
        print(f"{w:6g}  {row['perplexity']:10.2f}  {row['exrep']:7.2f}  {row['delta_uniform']:8.2f}  "
              f"{100 * row['lru_hit_rate_half']:6.1f} %  {row['train_log'].get('bles', 0):.4f}", file=sys.stderr)
        if args.json:
            args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
