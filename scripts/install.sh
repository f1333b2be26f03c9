#!/usr/bin/env bash
# The one install path (README, CI and the Dockerfile use it): a virtual environment in .venv
# with the pinned versions from pyproject.toml. EXTRAS names optional extras, comma-separated:
# EXTRAS=test adds the test tools (and ray, which the tests use), EXTRAS=ray only what
# `--executor ray` needs (docs/SCALE.md), EXTRAS=gguf llama.cpp for `verify --backend llamacpp` (below).
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
# EXTRAS with gguf: llama.cpp itself (llama-cpp-python, `verify --backend llamacpp`), built from its sdist
# once per version and flags into a wheel under ~/.cache/cosmoe-export (pip's own wheel cache would not
# see a change of CMAKE_ARGS). CPU only, this machine's instructions, nothing but the library. Without
# AMX: ggml's AMX kernels crash (SIGSEGV) on the matmuls of small models here (rows of 64); without
# them ggml runs its AVX-512 repacked kernels, as on any CPU without AMX.
if [[ ",${EXTRAS:-}," == *",gguf,"* ]]; then
  LCP_VERSION=0.3.36
  LCP_FLAGS="-DGGML_NATIVE=ON -DCMAKE_C_FLAGS=-mno-amx-tile\ -mno-amx-int8\ -mno-amx-bf16 -DCMAKE_CXX_FLAGS=-mno-amx-tile\ -mno-amx-int8\ -mno-amx-bf16 -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF"
  WHEELS="${XDG_CACHE_HOME:-$HOME/.cache}/cosmoe-export/llama-cpp-python-$LCP_VERSION-$(echo "$LCP_FLAGS" | sha256sum | cut -c1-12)"
  if ! ls "$WHEELS"/llama_cpp_python-*.whl >/dev/null 2>&1; then
    echo "install.sh: building llama-cpp-python $LCP_VERSION from its sdist (minutes, once)" >&2
    rm -rf "$WHEELS.tmp"
    CMAKE_ARGS="$LCP_FLAGS" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" "$VENV/bin/python" -m pip wheel --quiet \
      --no-cache-dir --no-deps --no-binary llama-cpp-python "llama-cpp-python==$LCP_VERSION" -w "$WHEELS.tmp"
    mv "$WHEELS.tmp" "$WHEELS"
  fi
  # This build, even over a llama-cpp-python of the same version built otherwise; its dependencies come below.
  "$VENV/bin/python" -m pip install --quiet --no-deps --force-reinstall "$WHEELS"/llama_cpp_python-*.whl
fi
"$VENV/bin/python" -m pip install --quiet -e "$spec"
if "$VENV/bin/python" -m pip list 2>/dev/null | grep -qi '^nvidia-'; then
  echo "install.sh: CUDA packages were installed; use a CPU torch wheel (see the comment above)" >&2
  exit 1
fi
# The native runner (runtime_native/, docs/NATIVE.md) against the ExecuTorch SDK in the executorch
# wheel: cosmoe-run and libcosmoe go into the venv. Its one C++ dependency, nlohmann/json, is
# header-only: Debian's nlohmann-json3-dev, pinned (the Dockerfile installs it as root).
if [ ! -f /usr/include/nlohmann/json.hpp ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq && apt-get install -y -qq --no-install-recommends nlohmann-json3-dev=3.11.2-2 >/dev/null
  else
    echo "install.sh: the native runner needs nlohmann/json: apt-get install nlohmann-json3-dev=3.11.2-2" >&2
    exit 1
  fi
fi
VENV="$(cd "$VENV" && pwd)"  # CMake records these paths: absolute ones
ET_DIR="$("$VENV/bin/python" -c 'import executorch; print(list(executorch.__path__)[0])')"
"$VENV/bin/cmake" -S runtime_native -B build/native -G Ninja -DCMAKE_MAKE_PROGRAM="$VENV/bin/ninja" \
  -DCMAKE_BUILD_TYPE=Release -Dexecutorch_DIR="$ET_DIR/share/cmake" -DCMAKE_INSTALL_PREFIX="$VENV" >/dev/null
"$VENV/bin/cmake" --build build/native >/dev/null
"$VENV/bin/cmake" --install build/native >/dev/null
