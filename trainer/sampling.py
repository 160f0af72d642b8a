"""One epoch sampler for every case: shuffled or weighted, single process or DDP rank."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


class EpochSampler(Sampler[int]):
    """Draws a permutation (or, with weights, a sample with replacement) of the dataset.

    Every rank draws the same global order from (seed, epoch) and keeps every
    world_size-th index, so ranks see disjoint shards of equal length, as
    DistributedSampler does, and oversampling works under DDP too.
    """

    def __init__(self, num_samples: int, seed: int, weights: torch.Tensor | None = None,
                 rank: int = 0, world_size: int = 1) -> None:
        if num_samples <= 0:
            raise ValueError("cannot sample from an empty dataset")
        self.num_samples, self.seed, self.weights = num_samples, seed, weights
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self.per_rank = -(-num_samples // world_size)  # ceil: pad so every rank gets the same

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        total = self.per_rank * self.world_size
        if self.weights is None:
            order = torch.randperm(self.num_samples, generator=generator)
            order = torch.cat([order, order[: total - self.num_samples]])
        else:
            order = torch.multinomial(self.weights, total, replacement=True, generator=generator)
        return iter(order[self.rank :: self.world_size].tolist())

    def __len__(self) -> int:
        return self.per_rank
