"""Optimizer with per-group learning rates and weight decay, and the warmup schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

from visionloop.trainer.config import OPTIMIZERS, SCHEDULES


def parameter_groups(model: nn.Module, head_prefix: str, lr: float, backbone_lr_scale: float,
                     weight_decay: float) -> list[dict]:
    """Four groups: {backbone, head} x {decayed, not decayed}. Norm weights and biases
    (every parameter with fewer than 2 dimensions) get no weight decay."""
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        key = (name.startswith(head_prefix), param.ndim >= 2)
        groups.setdefault(key, []).append(param)
    return [
        {"params": params, "lr": lr if is_head else lr * backbone_lr_scale,
         "weight_decay": weight_decay if decayed else 0.0}
        for (is_head, decayed), params in sorted(groups.items())
    ]


def build_optimizer(name: str, groups: list[dict], lr: float) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=0.9, nesterov=True)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    raise ValueError(f"unknown optimizer {name!r}; choose from {OPTIMIZERS}")


def lr_factor(step: int, total_steps: int, warmup_steps: int, schedule: str,
              step_every: int = 0, gamma: float = 0.1) -> float:
    """Multiplier on each group's base lr at `step`: linear warmup, then cosine or step decay."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "cosine":
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    if schedule == "step":
        every = step_every or max(1, total_steps // 3)
        return gamma ** ((step - warmup_steps) // every)
    raise ValueError(f"unknown schedule {schedule!r}; choose from {SCHEDULES}")


def build_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int,
                    schedule: str) -> torch.optim.lr_scheduler.LambdaLR:
    lr_factor(0, total_steps, warmup_steps, schedule)  # fail now on a bad schedule name
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total_steps, warmup_steps, schedule))
