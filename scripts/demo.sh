#!/usr/bin/env bash
# The README's main command: install, then build the embedded default recipe, recipes/demo.toml
# (the committed, trained tiny-bles fixture -> int4 experts, int8 backbone, ExecuTorch + ONNX
# programs, verified on every backend under a memory budget), and re-hash what it shipped.
# Exit code: 0 every gate passed, 1 a gate failed, 2 bad input.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
OUT="${OUT:-build/demo}"
.venv/bin/cosmoe-export build recipes/demo.toml -o "$OUT"
.venv/bin/cosmoe-export verify "$OUT/bundle" --integrity
echo "demo: bundle in $OUT/bundle, report in $OUT/report.md"
