"""One training epoch and batched inference: the loops, nothing else."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable

import torch
from torch import nn
from torch.optim.lr_scheduler import LRScheduler
from tqdm import tqdm


def autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA when enabled; a no-op elsewhere (CPU bf16 is slower here)."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def to_device(images: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    images = images.to(device, non_blocking=True)
    return images.contiguous(memory_format=torch.channels_last) if channels_last else images


def freeze_norm_statistics(model: nn.Module) -> None:
    """Every batch norm in eval mode (its running statistics fixed): a partial or
    parameter-efficient tune started from a linear probe keeps the features the probe was
    fit on. Not for a whole-network fine-tune: there, even in its head-only first epochs,
    the statistics adapting to the new images is what lifts it (tests/
    test_train_end_to_end.py: a 4-epoch fine-tune at 32 px fell from 0.52 to 0.41 test
    accuracy when its frozen epoch kept ImageNet's statistics)."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()


def train_one_epoch(model: nn.Module, loader: Iterable, loss_fn: nn.Module,
                    optimizer: torch.optim.Optimizer, scheduler: LRScheduler,
                    device: torch.device, *, amp: bool = False, channels_last: bool = False,
                    description: str = "train", show_progress: bool = True,
                    freeze_all_norm_statistics: bool = False) -> dict[str, float]:
    model.train()
    if freeze_all_norm_statistics:
        freeze_norm_statistics(model)
    total_loss = torch.zeros((), device=device)
    seen, start = 0, time.perf_counter()
    # disable=None: a bar on a terminal only; logs get the per-epoch summary line instead.
    bar = tqdm(loader, desc=description, unit="batch", disable=None if show_progress else True,
               leave=False)
    for images, labels in bar:
        images = to_device(images, device, channels_last)
        labels = labels.to(device, non_blocking=True)
        with autocast(device, amp):
            loss = loss_fn(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        # Accumulate on the device: .item() every step would force a sync.
        total_loss += loss.detach() * len(labels)
        seen += len(labels)
        bar.set_postfix(img_s=f"{seen / (time.perf_counter() - start):.0f}", refresh=False)
    elapsed = time.perf_counter() - start
    return {"loss": float(total_loss) / max(seen, 1), "images_per_s": seen / elapsed,
            "seconds": elapsed}


@torch.no_grad()
def predict_logits(model: nn.Module, loader: Iterable, device: torch.device, *,
                   amp: bool = False, channels_last: bool = False,
                   show_progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """All logits (float32, on CPU) and labels of a loader, in loader order."""
    model.eval()
    all_logits, all_labels = [], []
    for images, labels in tqdm(loader, desc="eval", unit="batch", disable=not show_progress,
                               leave=False):
        with autocast(device, amp):
            logits = model(to_device(images, device, channels_last))
        all_logits.append(logits.float().cpu())
        all_labels.append(labels)
    return torch.cat(all_logits), torch.cat(all_labels)
