# One image for TorchServe, the retrain scheduler and the ML backend. Build args pick the
# ONNX Runtime flavour: ORT=gpu installs onnxruntime-gpu (never both in one environment).
# Not built on the development boxes (no Docker engine there); see README, Deployment.
FROM python:3.11-slim-bookworm
ARG ORT=gpu
RUN apt-get update \
 && apt-get install -y --no-install-recommends openjdk-17-jre-headless curl \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /app
# torch first and pinned, so no resolver picks another build (the PyPI wheel carries CUDA)
RUN pip install --no-cache-dir torch==2.14.1 torchvision==0.29.1
COPY pyproject.toml README.md ./
COPY visionloop visionloop
COPY trainer trainer
COPY serving serving
COPY labeling labeling
RUN pip install --no-cache-dir ".[${ORT}]"
# an unprivileged user owns the shared volumes' mount points
RUN useradd --create-home --uid 1000 visionloop \
 && mkdir -p /srv/model_store /srv/captures /srv/labels /srv/torchserve /srv/data \
 && chown -R visionloop /srv
USER visionloop
ENTRYPOINT ["visionloop"]
