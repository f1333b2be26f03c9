#!/usr/bin/env bash
# The README's test command (and CI's): install with test tools, lint, run the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS=test,gguf bash scripts/install.sh  # gguf: llama.cpp, for the GGUF parity tests
.venv/bin/ruff check cosmoe_export runtime_py tests bench recipes
.venv/bin/hadolint Dockerfile
# runtime_py ships next to device builds: it must never import the exporter.
if grep -rnE '^\s*(from|import) cosmoe_export' runtime_py; then
  echo "runtime_py imports cosmoe_export" >&2; exit 1
fi
# Every core (the machines CI runs on have 2), any test on any worker (tests/conftest.py says why not
# grouped); `bash scripts/test.sh -n 0` runs them in this process.
.venv/bin/python -m pytest -p no:cacheprovider -n auto --dist load tests "$@"
