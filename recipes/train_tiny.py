"""Train one of the tiny CoSMoE fixture models on CPU (one thread) and save it as a checkpoint dir.

    .venv/bin/python recipes/train_tiny.py --variant bles --bles-weight 2 \
        --corpus ../shared/data/pydocs-3.11.txt --seed 0 --out recipes/models/tiny-bles

Variants differ only in the expert setup (see cosmoe_export/training/train.py). The same corpus, seed and
machine give the same bytes. The exact commands for the shipped models are in recipes/models/README.md.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

# One thread: the result must not depend on the core count, and the machine is shared.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
import torch  # noqa: E402

from cosmoe_export.training import train as T  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", choices=T.VARIANTS, required=True)
    ap.add_argument("--corpus", nargs="+", type=Path, required=True, help="Plain-text training files.")
    ap.add_argument("--out", type=Path, required=True, help="Checkpoint directory to write.")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=T.TrainConfig.steps)
    ap.add_argument("--batch-size", type=int, default=T.TrainConfig.batch_size)
    ap.add_argument("--lb-weight", type=float, default=T.TrainConfig.lb_weight)
    ap.add_argument("--bles-weight", type=float, default=0.0, help="BlES loss weight (bles variant only).")
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--context", type=int, default=256)
    args = ap.parse_args(argv)

    torch.set_num_threads(1)
    if args.variant == "bles" and not args.bles_weight:
        ap.error("--variant bles needs --bles-weight > 0")
    try:
        tc = T.TrainConfig(variant=args.variant, seed=args.seed, steps=args.steps, batch_size=args.batch_size,
                           lb_weight=args.lb_weight, bles_weight=args.bles_weight)
    except ValueError as e:
        ap.error(str(e))
    tok = T.train_tokenizer(args.corpus, args.vocab_size)
    ids = T.encode_corpus(tok, args.corpus)
    eot = tok.token_to_id(T.EOT)
    config = T.tiny_config(args.variant, vocab_size=tok.get_vocab_size(), bos_token_id=eot, eos_token_id=eot,
                           context=args.context)
    print(f"{args.variant}: {ids.numel():,} training tokens, vocab {tok.get_vocab_size()}", file=sys.stderr)
    result = T.train(config, ids, tc, on_log=lambda e: print(e, file=sys.stderr))
    recipe = {"train": T.train_config_dict(tc), "corpus": [p.name for p in args.corpus],
              "vocab_size": args.vocab_size, "context": args.context, "log": result.log}
    T.save_checkpoint(args.out, result.model, tok, recipe=recipe)
    print(f"wrote {args.out} ({result.seconds / 60:.1f} min)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
