# One image for every visionloop service: TorchServe, the retrain scheduler, the ML backend
# and webhook. `make image` builds it with podman from the local base image
# (deploy/base-image.sh) and the project's wheel (build/dist/, nothing else is in the
# context: .dockerignore). Where a registry serves images:
#   docker build --build-arg BASE=python:3.11-slim-bookworm -t visionloop .
ARG BASE=visionloop-base:bookworm
FROM ${BASE}
# cpu -> onnxruntime, gpu -> onnxruntime-gpu (never both in one environment)
ARG ORT=cpu
# Extra pip arguments for the pinned torch: `make image` passes the host's own wheel
# indexes (mounted read-only into the build), so the build installs the same torch files
# as the host, with no download of several GB.
ARG TORCH_PIP_ARGS=
# procps: TorchServe unregisters a version by running `kill -9 PID`; without the binary
# (slim and minbase images lack it) the DELETE fails with 500 "Interrupted while cleaning
# resources" and the old version stays registered.
RUN apt-get update \
 && apt-get install -y --no-install-recommends openjdk-17-jre-headless catatonit procps \
 && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/visionloop
ENV PATH=/opt/visionloop/bin:$PATH PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# torch first and pinned, so no resolver picks another build
RUN pip install $TORCH_PIP_ARGS torch==2.14.1 torchvision==0.29.1
COPY build/dist/ /tmp/dist/
RUN pip install "$(ls /tmp/dist/visionloop-*.whl)[${ORT}]" && pip check && rm -rf /tmp/dist
# an unprivileged user owns the shared volumes' mount points
RUN useradd --create-home --uid 1000 visionloop \
 && mkdir -p /srv/model_store /srv/captures /srv/labels /srv/torchserve /srv/data \
 && chown -R visionloop /srv
USER visionloop
WORKDIR /srv
ENTRYPOINT ["visionloop"]
