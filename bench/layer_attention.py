"""Time per decode call of one ExecuTorch layer program, attention written two ways, in one run.

``before``: F.scaled_dot_product_attention on kv heads repeated to the query heads (what the
layer programs did until the grouped form). torch.export decomposes SDPA into 4-D matmuls (expand
copies of the keys and values) and a guard against fully masked rows (where / any /
logical_not); XNNPACK takes none of those, so each splits the layer's delegate and runs as a
portable kernel over the whole cache on every token.
``grouped``: ``cosmoe_export.lower.units.grouped_attention``, two batched matmuls over the kv heads.

Layer 0 of BUNDLE (its own integers) is exported both ways; each program runs T = 1 with S cached
slots, rounds interleaved, median of the calls; the counts of delegate calls and of portable
kernel calls come from the serialized program.

    .venv/bin/python bench/layer_attention.py build/bench-native/h512-int4
"""

from __future__ import annotations

import argparse
import collections
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from cosmoe_export.lower import units
from cosmoe_export.lower.targets import TARGETS
from runtime_py.bundle import Bundle

SLOTS = (1, 64, 256, 1024)


def sdpa_on_repeated_kv(q, keys, values, mask, scale):
    """The formulation before units.grouped_attention: q [1, H, T, Dh], keys/values [1, G, S, W]."""
    rep = q.shape[1] // keys.shape[1]
    keys, values = (torch.cat([z[:, g:g + 1] for g in range(z.shape[1]) for _ in range(rep)], dim=1)
                    for z in (keys, values))
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scale)


FORMS = {"before": sdpa_on_repeated_kv, "grouped": units.grouped_attention}


def export(bundle: Bundle, form: str) -> bytes:
    cfg = bundle.config
    raw = units.backbone_weights(bundle)
    kept, units.grouped_attention = units.grouped_attention, FORMS[form]
    try:
        unit = units.build_layer(cfg, units.dequantized(raw), 0)
        TARGETS["executorch"].backbone_integers(unit, units.layer_linears(cfg, 0), raw)
        return TARGETS["executorch"].module(unit, units.layer_example_inputs(cfg), units.layer_dynamic_shapes(cfg),
                                            units.LAYER_INPUTS, units.LAYER_OUTPUTS)
    finally:
        units.grouped_attention = kept


def instructions(data: bytes) -> tuple[int, int]:
    """(delegate calls, portable kernel calls other than views and shape reads) of "forward"."""
    from executorch.exir._serialize._program import deserialize_pte_binary

    program = deserialize_pte_binary(data)
    plan = getattr(program, "program", program).execution_plan[0]
    kinds = collections.Counter()
    for chain in plan.chains:
        for ins in chain.instructions:
            args = ins.instr_args
            if type(args).__name__ == "DelegateCall":
                kinds["delegate"] += 1
            elif type(args).__name__ == "KernelCall":
                name = plan.operators[args.op_index].name
                kinds["kernel" if not any(s in name for s in ("view", "sym_size", "prim::")) else "view"] += 1
    return kinds["delegate"], kinds["kernel"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle")
    ap.add_argument("--calls", type=int, default=200, help="calls per program and S in each round")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    from executorch.runtime import Runtime

    bundle = Bundle.open(Path(args.bundle))
    cfg = bundle.config
    slots = [s for s in SLOTS if s < cfg.max_position_embeddings]
    methods, counts = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for form in FORMS:
            data = export(bundle, form)
            counts[form] = instructions(data)
            path = Path(tmp) / f"{form}.pte"
            path.write_bytes(data)
            methods[form] = Runtime.get().load_program(path).load_method("forward")
        calls = {(f, s): [] for f in FORMS for s in slots}
        for _ in range(args.rounds):
            for s in slots:
                inputs = list(units.layer_example_inputs(cfg, 1, s))
                for form, method in methods.items():
                    method.execute(inputs)
                    for _ in range(args.calls):
                        t = time.perf_counter()
                        method.execute(inputs)
                        calls[form, s].append(time.perf_counter() - t)
    print(f"{args.bundle} layer 0 (hidden {cfg.hidden_size}, {cfg.num_attention_heads} heads, "
          f"{cfg.num_key_value_heads} kv heads), T = 1; median us per call of {args.rounds} x {args.calls}")
    print("| attention | delegate calls | portable kernels | " + " | ".join(f"S = {s}" for s in slots) + " |")
    print("|---|---|---|" + "---|" * len(slots))
    for form in FORMS:
        cells = [f"{statistics.median(calls[form, s]) * 1e6:.0f}" for s in slots]
        print(f"| {form} | {counts[form][0]} | {counts[form][1]} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
