#!/usr/bin/env bash
# The README's main command: install, then split and verify the embedded default model.
# (For now the default is the `tiny` preset; the trained fixture and the full build replace it.)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
OUT="${OUT:-build/demo}"
mkdir -p "$(dirname "$OUT")"
.venv/bin/cosmoe-export inspect tiny
.venv/bin/cosmoe-export split tiny -o "$OUT" --force
.venv/bin/cosmoe-export verify "$OUT" --reference tiny --json "$OUT.report.json"
echo "demo: bundle in $OUT, report in $OUT.report.json"
