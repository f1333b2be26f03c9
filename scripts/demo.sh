#!/usr/bin/env bash
# The README's main command: install, then take the embedded default model (the committed,
# trained `tiny-bles` fixture) through split -> lower -> verify on every backend.
# (The recipe-driven `build` with quantization replaces this as it lands.)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
MODEL=recipes/models/tiny-bles
OUT="${OUT:-build/demo}"
mkdir -p "$(dirname "$OUT")"
.venv/bin/cosmoe-export inspect "$MODEL"
.venv/bin/cosmoe-export split "$MODEL" -o "$OUT" --force
.venv/bin/cosmoe-export lower "$OUT" --target all
.venv/bin/cosmoe-export verify "$OUT" --reference "$MODEL" --json "$OUT.report.json"
echo "demo: bundle in $OUT, report in $OUT.report.json"
