# cosmoe-export, CPU only. Build:  docker build -t cosmoe-export .
# Use in a pipeline: mount the checkpoint read-only and a directory for the output, name a shipped
# recipe (recipes/*.toml, in the image) or mount your own; exit code 0 pass, 1 a gate failed, 2 bad input:
#   docker run --rm -v "$PWD/ckpt:/in:ro" -v "$PWD/out:/out" cosmoe-export build mixtral --source /in -o /out/mixtral
#   docker run --rm -v "$PWD/out:/out" cosmoe-export build demo -o /out/demo
FROM python:3.11.7-slim-bookworm

# PyPI's Linux torch wheel pulls CUDA; the CPU build of the same version comes from PyTorch's index.
ENV PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

# The native runner (runtime_native/) is C++ built against the executorch wheel's SDK; nlohmann/json
# is its one header-only dependency (scripts/install.sh builds it).
RUN apt-get update && apt-get install -y --no-install-recommends g++=4:12.2.0-3 nlohmann-json3-dev=3.11.2-2 \
    && rm -rf /var/lib/apt/lists/*
RUN useradd --create-home --uid 10001 cosmoe
WORKDIR /opt/cosmoe-export
COPY --chown=cosmoe:cosmoe pyproject.toml README.md ./
COPY --chown=cosmoe:cosmoe cosmoe_export ./cosmoe_export
COPY --chown=cosmoe:cosmoe runtime_py ./runtime_py
COPY --chown=cosmoe:cosmoe recipes ./recipes
# The shipped recipes calibrate and verify on the project's own code and documentation.
COPY --chown=cosmoe:cosmoe docs ./docs
COPY --chown=cosmoe:cosmoe scripts ./scripts
COPY --chown=cosmoe:cosmoe runtime_native ./runtime_native
USER 10001
# The same install path as the README and CI.
RUN VENV=/opt/cosmoe-export/.venv bash scripts/install.sh

# matplotlib (the report's plots) needs a writable config directory under any --user.
ENV PATH=/opt/cosmoe-export/.venv/bin:$PATH \
    MPLCONFIGDIR=/tmp/matplotlib
WORKDIR /work
ENTRYPOINT ["cosmoe-export"]
CMD ["--help"]
