"""ONNX Runtime's MatMulNBits accuracy_level, measured: decode speed and parity for levels 0-4.

    .venv/bin/python bench/onnx_accuracy.py BUNDLE [--fp32 FLOAT_BUNDLE] [--tokens 64] [--rounds 3]

BUNDLE is a quantized bundle lowered to ONNX. For each level (0: the attribute absent, as before;
1 fp32, 2 fp16, 3 bf16, 4 int8 compute with the activations quantized per block) a copy of the
bundle gets every MatMulNBits node's accuracy_level set and its manifest's sizes and hashes
rewritten; then, interleaved over --rounds rounds in one run, greedy decode tok/s on onnxruntime
(every expert resident, 2 threads) and the max |logit| error against the bundle's own math (the
PyTorch reference runtime on the dequantized weights, fp32 activations) over a 64-token prompt.
One JSON line per level. ONNX Runtime falls back to fp32 for a level its CPU kernels lack.
With --fp32 (the float bundle BUNDLE was quantized from, lowered to ONNX) its decode speed joins
the same interleaved rounds, one more line: the peer the quantized programs must beat.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import statistics
import tempfile
from pathlib import Path

import onnx
import torch

from cosmoe_export.reference import TorchRuntime
from runtime_py.bundle import Bundle
from runtime_py.runner import Runner

LEVELS = (0, 1, 2, 3, 4)


def with_level(src: Path, dest: Path, level: int) -> Path:
    shutil.copytree(src, dest)
    manifest = json.loads((dest / "manifest.json").read_text())
    for entry in manifest["files"]:
        if entry.get("target") != "onnx":
            continue
        path = dest / entry["path"]
        model = onnx.load(str(path))
        for node in model.graph.node:
            if node.op_type == "MatMulNBits":
                kept = [a for a in node.attribute if a.name != "accuracy_level"]
                del node.attribute[:]
                node.attribute.extend(kept)
                if level:
                    node.attribute.append(onnx.helper.make_attribute("accuracy_level", level))
        onnx.save(model, str(path))
        data = path.read_bytes()
        entry["bytes"], entry["sha256"] = len(data), hashlib.sha256(data).hexdigest()
    (dest / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return dest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--fp32", type=Path, default=None, help="The float bundle, lowered to ONNX: timed alike.")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="onnx-accuracy-"))
    copies = {level: with_level(args.bundle, work / f"level{level}", level) for level in LEVELS}
    cfg = Bundle.open(args.bundle).config
    prompt = torch.randint(0, cfg.vocab_size, (1, 64), generator=torch.Generator().manual_seed(0))
    want = TorchRuntime(Bundle.open(args.bundle)).logits(prompt)
    errors, top1, speeds = {}, {}, {level: [] for level in LEVELS}
    timed = dict(copies)
    if args.fp32 is not None:
        timed["fp32"] = args.fp32
        speeds["fp32"] = []
    for level, path in copies.items():
        with Runner(Bundle.open(path), backend="onnxruntime") as r:
            got = r.logits(prompt)
        errors[level] = float((got - want).abs().max())
        top1[level] = float((got.argmax(-1) == want.argmax(-1)).float().mean())
    for _ in range(args.rounds):
        for level, path in timed.items():
            with Runner(Bundle.open(path), backend="onnxruntime") as r:
                speeds[level].append(r.generate(prompt[0, :8].tolist(), args.tokens).metrics["decode_tok_s"])
    for level in LEVELS:
        print(json.dumps({"accuracy_level": level, "decode_tok_s": round(statistics.median(speeds[level]), 1),
                          "decode_tok_s_rounds": [round(s, 1) for s in speeds[level]],
                          "max_abs_logit_err": round(errors[level], 6), "top1_agreement": top1[level],
                          "max_abs_logit": round(float(want.abs().max()), 4)}))
    if args.fp32 is not None:
        print(json.dumps({"bundle": str(args.fp32), "decode_tok_s": round(statistics.median(speeds["fp32"]), 1),
                          "decode_tok_s_rounds": [round(s, 1) for s in speeds["fp32"]]}))
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
