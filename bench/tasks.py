"""Synthetic tasks for the benchmarks, loaded by name: `--task bench.tasks:flat_16mb`.

`flat_*` are "models" of one flat float32 tensor of the given size (decimal MB),
for timing the transport; nothing trains on them. `wide_mlp` is an MLP of about
25M parameters on a synthetic 10-class problem, the bandwidth-bound workload.
"""

from __future__ import annotations

import torch
from torch import nn

from .common import MB


class Flat(nn.Module):
    """One parameter of `numel` float32 zeros: zeros are instant to build, even at 400 MB."""

    def __init__(self, numel: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(numel))

    def forward(self, x):  # never trained; here so that the task is complete
        return x @ self.weight[: x.shape[1] * 2].view(x.shape[1], 2)


def flat(nbytes: int) -> dict:
    x = torch.zeros(4, 4)
    y = torch.zeros(4, dtype=torch.long)
    return {"model": Flat(nbytes // 4), "train": (x, y), "test": (x, y), "loss": nn.functional.cross_entropy}


def flat_4kb() -> dict:
    return flat(4096)


def flat_1mb() -> dict:
    return flat(1 * MB)


def flat_16mb() -> dict:
    return flat(16 * MB)


def flat_100mb() -> dict:  # also the 25M-parameter model of the apply benchmark
    return flat(100 * MB)


def flat_400mb() -> dict:
    return flat(400 * MB)


FLAT = {4096: "flat_4kb", 1 * MB: "flat_1mb", 16 * MB: "flat_16mb", 100 * MB: "flat_100mb", 400 * MB: "flat_400mb"}


def flat_task(nbytes: int) -> str:
    return f"bench.tasks:{FLAT[nbytes]}"


def _blobs(n: int, dim: int, classes: int, gen: torch.Generator, centers: torch.Tensor):
    """n points (n, dim) around one of `classes` centers, and their labels (n,)."""
    y = torch.randint(0, classes, (n,), generator=gen)
    x = centers[y] + torch.randn(n, dim, generator=gen)
    return x, y


def wide_mlp() -> dict:
    """1024 -> 4096 -> 4096 -> 1024 -> 10: 25,185,290 parameters (100.7 MB of float32)."""
    model = nn.Sequential(
        nn.Linear(1024, 4096), nn.ReLU(),
        nn.Linear(4096, 4096), nn.ReLU(),
        nn.Linear(4096, 1024), nn.ReLU(),
        nn.Linear(1024, 10),
    )
    # the data has its own generator: identical in every process whatever the run seed
    gen = torch.Generator().manual_seed(1234)
    centers = 0.15 * torch.randn(10, 1024, generator=gen)
    train = _blobs(4096, 1024, 10, gen, centers)
    test = _blobs(1024, 1024, 10, gen, centers)
    return {"model": model, "train": train, "test": test, "loss": nn.functional.cross_entropy}
