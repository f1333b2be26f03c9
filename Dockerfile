# cosmoe-export, CPU only. Build:  docker build -t cosmoe-export .
# Use in a pipeline: mount the checkpoint read-only and a directory for the bundle, e.g.
#   docker run --rm -v "$PWD/ckpt:/in:ro" -v "$PWD/out:/out" cosmoe-export split /in -o /out/bundle
FROM python:3.11.7-slim-bookworm

# PyPI's Linux torch wheel pulls CUDA; the CPU build of the same version comes from PyTorch's index.
ENV PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN useradd --create-home --uid 10001 cosmoe
WORKDIR /opt/cosmoe-export
COPY --chown=cosmoe:cosmoe pyproject.toml README.md ./
COPY --chown=cosmoe:cosmoe cosmoe_export ./cosmoe_export
COPY --chown=cosmoe:cosmoe runtime_py ./runtime_py
COPY --chown=cosmoe:cosmoe recipes ./recipes
COPY --chown=cosmoe:cosmoe scripts ./scripts
USER 10001
# The same install path as the README and CI.
RUN VENV=/opt/cosmoe-export/.venv bash scripts/install.sh

ENV PATH=/opt/cosmoe-export/.venv/bin:$PATH
WORKDIR /work
ENTRYPOINT ["cosmoe-export"]
CMD ["--help"]
