"""Our training step's images/s against a bare PyTorch loop, same model and batches, one run.

Both loops consume the same pre-decoded batches of real Fashion-MNIST images (data
loading is excluded from both), on the same model and optimizer. Ours adds what
training really runs: the imbalance loss, the LR scheduler, device-side loss
accumulation and the progress bar. Rounds alternate the two loops so drift in the
machine's speed hits both; the median of the rounds is reported.

    python -m bench.train_throughput [--arch efficientnet_lite0 --image-size 32 --batches 20]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from torch.nn import functional as F

from visionloop.core.manifest import Preprocessing
from visionloop.core.preprocess import preprocess_image
from visionloop.trainer import fashion_mnist
from visionloop.trainer.engine import train_one_epoch
from visionloop.trainer.imbalance import build_loss
from visionloop.trainer.models import build_model
from visionloop.trainer.optim import build_optimizer, build_scheduler, parameter_groups

Batch = tuple[torch.Tensor, torch.Tensor]


def real_batches(args: argparse.Namespace, pre: Preprocessing) -> list[Batch]:
    images = fashion_mnist.read_idx(fashion_mnist.DEBIAN_DIR / "train-images-idx3-ubyte.gz")
    labels = fashion_mnist.read_idx(fashion_mnist.DEBIAN_DIR / "train-labels-idx1-ubyte.gz")
    count = args.batches * args.batch_size
    x = torch.stack([preprocess_image(torch.from_numpy(np.array(img))[None], pre)
                     for img in images[:count]])
    y = torch.from_numpy(labels[:count].astype(np.int64))
    return list(zip(x.split(args.batch_size), y.split(args.batch_size), strict=True))


def bare_loop(model, batches, optimizer) -> float:
    model.train()
    start = time.perf_counter()
    for images, labels in batches:
        loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return sum(len(y) for _, y in batches) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="efficientnet_lite0")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    device = torch.device("cpu")
    built = build_model(args.arch, 10, "DEFAULT")
    pre = Preprocessing(args.image_size, args.image_size, built.mean, built.std)
    batches = real_batches(args, pre)
    model = built.model
    groups = parameter_groups(model, built.head_prefix, 1e-3, 0.25, 0.05)
    optimizer = build_optimizer("adamw", groups, 1e-3)
    steps = len(batches) * (2 * args.rounds + 1)
    scheduler = build_scheduler(optimizer, steps, warmup_steps=len(batches), schedule="cosine")
    loss_fn = build_loss("logit_adjust", [6000] * 7 + [60] * 3)
    ours_runs, bare_runs = [], []
    train_one_epoch(model, batches, loss_fn, optimizer, scheduler, device,
                    show_progress=False)  # warm-up: allocator, kernels
    for _ in range(args.rounds):
        ours_runs.append(train_one_epoch(model, batches, loss_fn, optimizer, scheduler, device,
                                         show_progress=True)["images_per_s"])
        bare_runs.append(bare_loop(model, batches, optimizer))
    ours, bare = statistics.median(ours_runs), statistics.median(bare_runs)
    print(f"{args.arch} {args.image_size}px batch {args.batch_size}, {torch.get_num_threads()} "
          f"threads, {args.rounds} rounds of {args.batches} batches")
    print(f"bare PyTorch loop : {bare:8.1f} img/s  (rounds: {[round(r, 1) for r in bare_runs]})")
    print(f"visionloop step   : {ours:8.1f} img/s  (rounds: {[round(r, 1) for r in ours_runs]})")
    print(f"ratio             : {ours / bare:.3f}  (goal >= 0.9)")


if __name__ == "__main__":
    main()
