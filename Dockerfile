# CUDA image: same launch scripts as on CPU, with the CUDA builds of torch and fbgemm-gpu.
#   docker build -t smes-rec .
#   docker run --gpus all --ipc=host smes-rec bash launch/torchrun.sh trainer.device=cuda
# The stack is PyPI's: torch 2.13.0 and fbgemm-gpu 1.8.0 are both CUDA 13 builds there (torch
# brings the CUDA 13.0 libraries as wheels), so the base image is CUDA 13.0 and the host needs
# an NVIDIA driver for CUDA 13 (580 or newer). `python launch/check_cuda_stack.py` resolves these
# pins for this image's Python and checks that the three agree.
FROM nvidia/cuda:13.0.0-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

RUN apt-get update \
    && apt-get install -y --no-install-recommends software-properties-common \
    && add-apt-repository -y ppa:deadsnakes/ppa \
    && apt-get update \
    && apt-get install -y --no-install-recommends python3.11 python3.11-venv python3.11-dev build-essential \
    && rm -rf /var/lib/apt/lists/* \
    && python3.11 -m venv /opt/venv

WORKDIR /app
COPY requirements/ requirements/
# torchrec last and without deps (its metadata would otherwise pull another fbgemm-gpu);
# the constraints pin every transitive package as on CPU. DS_BUILD_OPS=0: DeepSpeed ops JIT-build on use.
RUN DS_BUILD_OPS=0 pip install -r requirements/cuda.txt -c requirements/constraints.txt \
    && pip install --no-deps -r requirements/torchrec.txt \
    && python -c "import torch, torchrec, hydra, wandb, deepspeed; print(torch.__version__)"

COPY . .
RUN useradd --create-home --uid 1000 trainer && chown -R trainer /app
USER 1000
ENV PYTHON=/opt/venv/bin/python
CMD ["bash", "launch/torchrun.sh", "trainer.device=cuda"]
