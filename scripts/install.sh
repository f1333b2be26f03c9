#!/usr/bin/env bash
# The one install path (README, CI and the Dockerfile use it): a virtual environment in .venv
# with the pinned versions from pyproject.toml. EXTRAS=test adds the test tools.
#
# torch==2.13.0 must be the CPU build. PyPI's Linux wheel pulls several GB of CUDA packages, so on
# a machine without a local CPU wheel set PIP_EXTRA_INDEX_URL to PyTorch's CPU index (the
# Dockerfile does).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null || PYTHON=python3
VENV="${VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
spec="."
[ -n "${EXTRAS:-}" ] && spec=".[${EXTRAS}]"
# torch first, alone: then every later requirement sees 2.13.0 installed and pulls nothing more.
"$VENV/bin/python" -m pip install --quiet "torch==2.13.0"
"$VENV/bin/python" -m pip install --quiet -e "$spec"
if "$VENV/bin/python" -m pip list 2>/dev/null | grep -qi '^nvidia-'; then
  echo "install.sh: CUDA packages were installed; use a CPU torch wheel (see the comment above)" >&2
  exit 1
fi
