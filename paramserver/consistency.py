"""Consistency modes as pure rules: values in, decisions out (no sockets, no clocks).

DESIGN.md defines them; here, per shard:

- bsp: round r closes when every live worker has pushed clock r; the update is
  the aggregate (mean by default) of the round's gradients. A pull waits only
  while the puller's own push for the open round is pending.
- asp: every push is applied on arrival; pulls never wait.
- ssp:s: pushes applied on arrival; a pull at clock c waits while
  c - min(clock of live workers) > s.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

import torch

from .config import Consistency, parse_aggregate

APPLY, QUEUE, STALE, DUPLICATE = "apply", "queue", "stale", "duplicate"


class Bsp:
    name = "bsp"

    def on_push(self, worker: int, clock: int, round_: int, pending: Collection[int]) -> str:
        if clock != round_:
            return STALE
        return DUPLICATE if worker in pending else QUEUE

    def round_ready(self, live: Collection[int], pending: Collection[int]) -> bool:
        return bool(pending) and all(w in pending for w in live)

    def pull_ready(self, worker: int, clock: int, clocks: Mapping[int, int], pending: Collection[int]) -> bool:
        return worker not in pending


class Asp:
    name = "asp"

    def on_push(self, worker, clock, round_, pending) -> str:
        return APPLY

    def round_ready(self, live, pending) -> bool:
        return False

    def pull_ready(self, worker, clock, clocks, pending) -> bool:
        return True


class Ssp(Asp):
    name = "ssp"

    def __init__(self, staleness: int):
        self.staleness = staleness

    def pull_ready(self, worker, clock, clocks, pending) -> bool:
        # clocks holds live workers only; an empty table never blocks
        return not clocks or clock - min(clocks.values()) <= self.staleness


def policy(consistency: Consistency):
    if consistency.mode == "bsp":
        return Bsp()
    if consistency.mode == "asp":
        return Asp()
    return Ssp(consistency.staleness)


def mean(grads: list[torch.Tensor], out: torch.Tensor | None = None) -> torch.Tensor:
    """Coordinate-wise mean of same-shape gradients: shape (n,) each -> (n,).

    `out`, a buffer of the same shape, saves allocating the result (a fresh
    buffer of a model's size page-faults on every round).
    """
    if len(grads) == 1:
        return grads[0]
    out = torch.add(grads[0], grads[1], out=out) if out is not None else grads[0] + grads[1]
    for g in grads[2:]:
        out.add_(g)
    return out.div_(len(grads))


def median(grads: list[torch.Tensor], out: torch.Tensor | None = None) -> torch.Tensor:
    """Coordinate-wise median: robust to fewer than half the workers sending garbage."""
    if len(grads) <= 2:
        return mean(grads, out)
    return torch.stack(grads).median(dim=0).values


def trimmed_mean(fraction: float):
    """Coordinate-wise mean after dropping the `fraction` largest and smallest values."""

    def aggregate(grads: list[torch.Tensor], out: torch.Tensor | None = None) -> torch.Tensor:
        k = int(fraction * len(grads))
        if k == 0:
            return mean(grads, out)
        ordered = torch.stack(grads).sort(dim=0).values  # (n, numel)
        return ordered[k : len(grads) - k].mean(dim=0)

    return aggregate


def aggregator(name: str):
    """mean | median | trimmed-mean:F (0 <= F < 0.5); ConfigError for anything else."""
    kind, fraction = parse_aggregate(name)
    return trimmed_mean(fraction) if kind == "trimmed-mean" else {"mean": mean, "median": median}[kind]
