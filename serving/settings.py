"""The TorchServe settings a deployer tunes, read from the environment, with defaults
derived from the machine. Every archive a promotion builds and every server we start
takes them from here, so one set of variables (an env file in compose) rules them all.

    VISIONLOOP_TS_WORKERS             workers per model version
    VISIONLOOP_TS_BATCH_SIZE          requests TorchServe batches into one inference
    VISIONLOOP_TS_MAX_BATCH_DELAY_MS  how long it waits to fill a batch
    VISIONLOOP_TS_JOB_QUEUE_SIZE      requests queued per model before 503s
    VISIONLOOP_TS_TOKEN_AUTH          1: TorchServe's keys on every API (serving.server)

Defaults: on CPU batch 8 and 10 ms with one worker on up to 7 cores (measured on 2 cores,
bench/results/serving-cpu.md: 2 workers were slower than 1, each runs torch on every
core), one per 4 cores above that (not measured); on a GPU one worker per device and
batch 32 (not measured here). The queue holds 100, TorchServe's own default.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from visionloop.core.errors import InputError

# --backend: the artifact an archive serves -> its name in the manifest
BACKENDS = {"torchscript": "torchscript", "onnx": "onnx", "onnx-fp16": "onnx_fp16"}

PREFIX = "VISIONLOOP_TS_"


def _gpus() -> int:
    try:
        import torch
    except ImportError:
        return 0
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def token_auth_from_env(env: Mapping[str, str] | None = None) -> bool:
    """$VISIONLOOP_TS_TOKEN_AUTH alone: without looking at the machine (no torch import),
    for the CLI's flag default."""
    env = os.environ if env is None else env
    auth = env.get(PREFIX + "TOKEN_AUTH", "")
    if auth not in ("", "0", "1"):
        raise InputError(f"{PREFIX}TOKEN_AUTH must be 0 or 1, got {auth!r}")
    return auth == "1"


@dataclass(frozen=True)
class ServingSettings:
    workers: int
    batch_size: int
    max_batch_delay_ms: int
    job_queue_size: int
    token_auth: bool

    @classmethod
    def for_machine(cls, cpus: int | None = None, gpus: int | None = None) -> ServingSettings:
        cpus = cpus if cpus is not None else (os.cpu_count() or 1)
        gpus = gpus if gpus is not None else _gpus()
        if gpus:
            return cls(workers=gpus, batch_size=32, max_batch_delay_ms=10, job_queue_size=100,
                       token_auth=False)
        return cls(workers=max(1, cpus // 4), batch_size=8, max_batch_delay_ms=10,
                   job_queue_size=100, token_auth=False)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> ServingSettings:
        """The machine's defaults, each overridden by its variable where set."""
        env = os.environ if env is None else env
        base = cls.for_machine()

        def integer(name: str, default: int, least: int) -> int:
            raw = env.get(PREFIX + name)
            if raw in (None, ""):
                return default
            try:
                value = int(raw)
            except ValueError:
                raise InputError(f"{PREFIX}{name} must be an integer, got {raw!r}") from None
            if value < least:
                raise InputError(f"{PREFIX}{name} must be >= {least}, got {value}")
            return value

        return cls(workers=integer("WORKERS", base.workers, 1),
                   batch_size=integer("BATCH_SIZE", base.batch_size, 1),
                   max_batch_delay_ms=integer("MAX_BATCH_DELAY_MS", base.max_batch_delay_ms, 0),
                   job_queue_size=integer("JOB_QUEUE_SIZE", base.job_queue_size, 1),
                   token_auth=token_auth_from_env(env))
