# SuperExec image for E-3SFC: Flower's flwr/superexec plus this project's dependencies.
#
# One image serves both sides of a process-isolation deployment (docker-compose.yml):
# `superexec-serverapp` runs the ServerApp next to the SuperLink, `superexec-clientapp-*`
# run the ClientApps next to each SuperNode. The app code itself is NOT baked in: it
# arrives in the FAB that `flwr run` uploads. Runtime dependency installation stays off
# (flower-superexec's default), so what is installed here is exactly what runs.
#
#   docker build -f docker/superexec.Dockerfile -t e3sfc-superexec:cpu \
#       --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu .
#   docker build -f docker/superexec.Dockerfile -t e3sfc-superexec:gpu .   # CUDA torch
#
# Build args:
#   FLWR_VERSION     Flower image tag; must equal the flwr version the CLI/SuperLink use
#   TORCH_INDEX_URL  where torch/torchvision come from. Empty (default): PyPI, whose Linux
#                    x86_64 wheels are CUDA-enabled (they bundle the CUDA runtime, so the
#                    non-CUDA base image is fine; the host needs the NVIDIA driver and the
#                    NVIDIA Container Toolkit). https://download.pytorch.org/whl/cpu: the
#                    much smaller CPU-only build. https://download.pytorch.org/whl/cu126 (or
#                    another CUDA tag): a specific CUDA build.
ARG FLWR_VERSION=1.41.0
FROM flwr/superexec:${FLWR_VERSION}

ARG FLWR_VERSION=1.41.0
ARG TORCH_INDEX_URL=""

WORKDIR /app
COPY --chown=app:app pyproject.toml .

# [project].dependencies without the flwr line (the base image's flwr stays as it is),
# split into torch/torchvision (from TORCH_INDEX_URL) and the rest (from PyPI).
RUN python -c "import re, tomllib; \
deps = tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']; \
name = lambda d: re.split(r'[<>=!~ ;\[]', d, maxsplit=1)[0].strip().lower(); \
keep = [d for d in deps if name(d) != 'flwr']; \
open('requirements.txt', 'w').write('\n'.join(keep) + '\n'); \
open('requirements-torch.txt', 'w').write('\n'.join(d for d in keep if name(d) in ('torch', 'torchvision')) + '\n')" \
 && if [ -n "${TORCH_INDEX_URL}" ]; then \
        python -m pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" -r requirements-torch.txt; \
    fi \
 && python -m pip install --no-cache-dir -r requirements.txt "flwr==${FLWR_VERSION}" \
 && python -c "import torch, torchvision, sklearn, pydantic, flwr; print('torch', torch.__version__, 'flwr', flwr.__version__)" \
 && mkdir -p /app/outputs /app/data /app/state

ENV FLWR_TELEMETRY_ENABLED=0 \
    E3SFC_BASE_DIR=/app

ENTRYPOINT ["flower-superexec"]
