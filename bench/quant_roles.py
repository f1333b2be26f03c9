"""Benchmark: what does quantizing each part of a model cost in quality and routing?

Takes a float bundle and a text, and for each role of cosmoe_export.quantization.quantize.ROLES (experts,
attention, embedding, output head, router) and each scheme, rounds only that role's weights through
the scheme (runtime_py.quant.fake_quantize: the exact values a quantized bundle runs with) and
measures against the float model, over the text's windows:

    ppl / dppl %     perplexity and its change
    kl               mean KL(float || quantized) of the next-token distributions, nats
    top1             share of positions whose argmax agrees
    sel flips %      share of (token, layer) whose top-k expert set differs from the float run (end to end:
                     upstream changes move downstream routing too)
    ExRep %          CoSMoEs Eq. 5 expert replacement rate, mean over layers (float: first row)
    router flips %   router rows only: top-k sets that differ when the *same* hidden state goes through
                     the rounded router (the router's own effect, no upstream drift)
    bytes saved      what the role's weights would save vs the bundle's float dtype

plus a "float, bf16 math" row (the float weights run in bf16 arithmetic: the metrics' noise floor),
"expert L<l>" rows (int4 experts of one layer only), and a per-layer table: router logit gaps and
the int8 router's logit error, and the int4 experts' calibration error relative to the MoE output
and to the layer output, next to that layer's KL (which normalisation mixed precision should use).

    .venv/bin/python bench/quant_roles.py /tmp/tiny-bles --text ../shared/data/wikitext-2/test.txt \
        --max-tokens 65536 --json roles.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cosmoe_export import text as textlib  # noqa: E402
from cosmoe_export.quantization import calibrate  # noqa: E402
from cosmoe_export.quantization.quantize import role_of  # noqa: E402
from cosmoe_export.reference import TorchRuntime  # noqa: E402
from runtime_py import quant, routing_metrics  # noqa: E402
from runtime_py.bundle import Bundle  # noqa: E402
from runtime_py.routers import route  # noqa: E402

ROLES = ("expert", "attention", "embedding", "head", "router")


def canonical_params(runtime: TorchRuntime) -> dict[str, torch.nn.Parameter]:
    """Every weight of the model under its canonical name, experts loaded."""
    cfg = runtime.config
    params = dict(runtime.model.named_parameters())
    for layer in range(cfg.num_hidden_layers):
        for e in range(cfg.num_experts):
            for n, p in runtime.store.get(layer, e).named_parameters():
                params[f"layers.{layer}.moe.experts.{e}.{n}"] = p
    return params


@torch.inference_mode()
def run(runtime: TorchRuntime, batches: list[torch.Tensor], router_weights: dict[int, torch.Tensor] | None = None):
    """-> (log-probs per batch [b, T, V], selections per layer [B, T, K], isolated router flips or None)."""
    cfg = runtime.config
    sels: list[list[np.ndarray]] = [[] for _ in range(cfg.num_hidden_layers)]
    flips = [0, 0]

    def hook(module, inputs, output, b_t):
        _, logits = output
        _, idx = route(logits, module.config, module.score_bias)  # [N, K]
        sels[module.layer].append(idx.view(*b_t, -1).numpy().copy())
        if router_weights is not None:  # same hidden state, rounded router
            _, idx_q = route(F.linear(inputs[0], router_weights[module.layer]), module.config, module.score_bias)
            flips[0] += int((idx.sort(-1).values != idx_q.sort(-1).values).any(-1).sum())
            flips[1] += idx.shape[0]

    out = []
    for chunk in batches:
        handles = [layer.moe.register_forward_hook(lambda m, i, o, bt=tuple(chunk.shape): hook(m, i, o, bt))
                   for layer in runtime.model.layers]
        try:
            out.append(F.log_softmax(runtime.model(chunk).float(), -1))
        finally:
            for h in handles:
                h.remove()
    return out, [np.concatenate(s) for s in sels], (flips[0] / flips[1] if router_weights is not None else None)


@torch.inference_mode()
def layer_statistics(runtime: TorchRuntime, batches: list[torch.Tensor], group: int, float_name: str) -> list[dict]:
    """Per layer, on the float model's own inputs: router logit gaps, the int8 router's logit error, and
    the int4 experts' output error relative to the MoE output's and to the layer output's energy."""
    cfg, model = runtime.config, runtime.model
    out = []
    hidden = [model.embed(ids) for ids in batches]  # [b, T, D]
    for layer in range(cfg.num_hidden_layers):
        moe = model.layers[layer].moe
        taps: dict[str, list[torch.Tensor]] = {"x": [], "y": []}

        def tap(module, args, output, taps=taps) -> None:  # returns None: a hook's return value replaces the output
            taps["x"].append(args[0])
            taps["y"].append(output[0])

        handle = moe.register_forward_hook(tap)
        try:
            hidden, calib = calibrate._run_layer(runtime, layer, hidden, set())
        finally:
            handle.remove()
        x, y = torch.cat(taps["x"]), torch.cat(taps["y"])  # [N, D] x2
        w = moe.router.weight  # [E, D]
        logits = F.linear(x, w).sort(-1, descending=True).values  # [N, E]
        w8 = quant.fake_quantize(w, quant.choose_encoding("int8", tuple(w.shape), group, float_name))
        err8 = (F.linear(x, w8) - F.linear(x, w)).abs().amax(-1)  # [N]
        err = 0.0
        for e in calib.routed_experts:
            routed = calib.routed(e)
            expert = runtime.store.get(layer, e)
            rounded = {n: quant.fake_quantize(p, quant.choose_encoding("int4", tuple(p.shape), group, float_name))
                       for n, p in expert.named_parameters()}
            err += calibrate.output_error(expert, rounded, routed)
        out.append({"layer": layer, "router_gap": float((logits[:, 1] - logits[:, 2]).median()),
                    "router_int8_err": float(err8.median()),
                    "err_moe": err / float(y.double().pow(2).sum()), "err_layer": err / calib.out_energy})
    return out


def compare(ref_lp, lp, batches, ref_sel, sel, num_experts) -> dict[str, float]:
    kl = agree = pos = 0.0
    nll = pred = 0.0
    for r, q, chunk in zip(ref_lp, lp, batches, strict=True):
        kl += float((r.exp() * (r - q)).sum(-1).double().sum())
        agree += int((r.argmax(-1) == q.argmax(-1)).sum())
        pos += chunk.numel()
        nll -= float(q[:, :-1].gather(-1, chunk[:, 1:, None]).double().sum())
        pred += chunk.shape[0] * (chunk.shape[1] - 1)
    flips = np.mean([(np.sort(a, -1) != np.sort(b, -1)).any(-1).mean() for a, b in zip(ref_sel, sel, strict=True)])
    return {"ppl": math.exp(nll / pred), "kl": kl / pos, "top1": agree / pos, "sel_flips": float(flips),
            "exrep": float(np.mean([routing_metrics.exrep(s, num_experts) for s in sel]))}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle", type=Path, help="A float bundle (cosmoe-export split).")
    ap.add_argument("--text", type=Path, required=True)
    ap.add_argument("--max-tokens", type=int, default=65536)
    ap.add_argument("--schemes", nargs="+", default=["int8", "int4"])
    ap.add_argument("--group-size", type=int, default=32)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)

    bundle = Bundle.open(args.bundle)
    cfg = bundle.config
    ids = textlib.windows(textlib.encode_file(bundle, args.text, max_tokens=args.max_tokens, purpose="bench"),
                          cfg.max_position_embeddings)
    batches = textlib.batches(ids, cfg.vocab_size)
    runtime = TorchRuntime(bundle)
    params = canonical_params(runtime)
    original = {n: p.detach().clone() for n, p in params.items()}
    float_bits = quant.FLOAT_BITS[bundle.backbone.dtype]

    ref_lp, ref_sel, _ = run(runtime, batches)
    rows = [{"role": "float", "scheme": "none", "bytes_saved": 0,
             **compare(ref_lp, ref_lp, batches, ref_sel, ref_sel, cfg.num_experts)}]
    # The noise floor of these metrics: the same float weights, bf16 arithmetic.
    lp16, sel16, _ = run(TorchRuntime(bundle, torch.bfloat16), batches)
    rows.append({"role": "float", "scheme": "bf16 math", "bytes_saved": 0,
                 **compare(ref_lp, lp16, batches, ref_sel, sel16, cfg.num_experts)})
    groups = [(role, [n for n in params if params[n].dim() == 2 and role_of(n) == role], args.schemes)
              for role in ROLES]
    # Per-layer expert sensitivity (int4 only): which layer's experts matter (mixed precision's objective).
    groups += [(f"expert L{layer}", [n for n in params if n.startswith(f"layers.{layer}.moe.experts.")], ["int4"])
               for layer in range(cfg.num_hidden_layers)]
    for role, names, schemes in groups:
        if not names:
            continue
        for scheme in schemes:
            saved = 0
            with torch.no_grad():
                for n in names:
                    enc = quant.choose_encoding(scheme, tuple(params[n].shape), args.group_size, bundle.backbone.dtype)
                    params[n].copy_(quant.fake_quantize(original[n], enc))
                    stored = quant.stored_specs(n, tuple(params[n].shape), enc, torch.float32)
                    bytes_q = sum(math.prod(s) * torch.empty((), dtype=d).element_size() for d, s in stored.values())
                    saved += params[n].numel() * float_bits // 8 - bytes_q
            router = ({int(n.split(".")[1]): params[n].detach().clone() for n in names} if role == "router" else None)
            if router is not None:  # isolated flips: float model, rounded router on the side
                with torch.no_grad():
                    for n in names:
                        params[n].copy_(original[n])
                _, _, iso = run(runtime, batches, router)
                with torch.no_grad():
                    for n in names:
                        params[n].copy_(router[int(n.split(".")[1])])
            lp, sel, _ = run(runtime, batches)
            row = {"role": role, "scheme": scheme, "bytes_saved": int(saved),
                   **compare(ref_lp, lp, batches, ref_sel, sel, cfg.num_experts)}
            if router is not None:
                row["router_flips"] = iso
            rows.append(row)
            with torch.no_grad():
                for n in names:
                    params[n].copy_(original[n])

    ppl0 = rows[0]["ppl"]
    print(f"{args.bundle}: {ids.numel():,} tokens of {args.text.name}, int4 group {args.group_size}")
    print(f"{'role':10} {'scheme':9} {'ppl':>9} {'dppl %':>8} {'kl':>9} {'top1':>7} {'sel flips %':>11} "
          f"{'ExRep %':>8} {'router flips %':>14} {'bytes saved':>12}")
    for r in rows:
        rf = f"{100 * r['router_flips']:14.2f}" if "router_flips" in r else f"{'':14}"
        print(f"{r['role']:10} {r['scheme']:9} {r['ppl']:9.3f} {100 * (r['ppl'] / ppl0 - 1):+8.2f} {r['kl']:9.5f} "
              f"{r['top1']:7.4f} {100 * r['sel_flips']:11.2f} {r['exrep']:8.2f} {rf} {r['bytes_saved']:12,}")

    layers = layer_statistics(runtime, batches, args.group_size, bundle.backbone.dtype)
    print("\nper layer: router logit gap (2nd - 3rd largest, median), int8 router logit error (median of the max"
          " over experts),\nint4 expert error sum_t w^2 ||dE||^2 relative to the MoE output's energy and to the"
          " layer output's energy,\nand KL when only that layer's experts are int4 (rows 'expert L*' above)")
    kl_by_layer = {int(r["role"][len("expert L"):]): r["kl"] for r in rows if r["role"].startswith("expert L")}
    print(f"{'layer':>5} {'gap':>8} {'int8 err':>9} {'err/moe':>9} {'err/layer':>10} {'KL':>9} "
          f"{'KL/(err/moe)':>13} {'KL/(err/layer)':>15}")
    for st in layers:
        kl = kl_by_layer[st["layer"]]
        print(f"{st['layer']:5d} {st['router_gap']:8.4f} {st['router_int8_err']:9.4f} {st['err_moe']:9.5f} "
              f"{st['err_layer']:10.6f} {kl:9.5f} {kl / st['err_moe']:13.3f} {kl / st['err_layer']:15.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"bundle": str(args.bundle), "text": str(args.text),
                                               "tokens": int(ids.numel()), "rows": rows, "layers": layers},
                                              indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
