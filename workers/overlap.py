"""Push a shard's gradients while backward is still running (`--overlap`).

Backward produces gradients from the output layer back to the input, and each
shard owns a contiguous range of the flat vector, so the shard(s) holding the
last layers have their whole range final before backward ends. `ShardReadiness`
counts, per shard, the parameters still to come (a parameter whose range spans
two shards counts for both) with torch's post-accumulate-grad hooks, and calls
`ready(shard)` the moment a count reaches zero: the trainer sends that shard's
push message right away, from the flat gradient buffer, without a copy.

Only what comes after a hook may be sent: a hook fires once per backward per
parameter, after its gradient is written, and nothing writes it again in that
backward, so the slice a ready shard sends is final. Whatever could not go out
during backward (a shard that holds an input layer, an unused parameter) goes
after it, as without overlap.
"""

from __future__ import annotations

import contextlib
import logging

import torch

from paramserver.sharding import Layout

log = logging.getLogger(__name__)


class ShardReadiness:
    """Per-shard countdown of parameters whose gradients are not final yet.

    `ranges[s]` is shard s's [lo, hi) over the flat vector; `params` are the
    model's parameters in `layout` order. The hooks stay registered for the
    model's life and do nothing unless armed.
    """

    def __init__(self, params: list[torch.Tensor], layout: Layout, ranges: list[tuple[int, int]]):
        # per parameter, the shards whose range it overlaps
        self.shards_of = [[s for s, (lo, hi) in enumerate(ranges) if e.offset < hi and e.offset + e.numel > lo]
                          for e in layout.entries]
        self.total = [sum(s in of for of in self.shards_of) for s in range(len(ranges))]
        self.left: list[int] | None = None  # None: disarmed
        self.ready = None
        self.error: BaseException | None = None
        self.handles = [p.register_post_accumulate_grad_hook(self._hook(i)) for i, p in enumerate(params)]

    def __repr__(self) -> str:
        return f"<ShardReadiness shards={len(self.total)} params={self.total} armed={self.left is not None}>"

    def _hook(self, index: int):
        def accumulated(_param: torch.Tensor) -> None:
            self._accumulated(index)
        return accumulated

    def _accumulated(self, index: int) -> None:
        if self.left is None or self.error is not None:
            return
        for s in self.shards_of[index]:
            self.left[s] -= 1
            if self.left[s] == 0:
                try:
                    self.ready(s)
                except Exception as e:  # noqa: BLE001 (re-raised after backward, not through autograd)
                    self.error = e
                    return

    @contextlib.contextmanager
    def armed(self, ready):
        """Within the block (one backward), call `ready(shard)` as each shard's gradients
        become final. An error `ready` raised is raised here once backward is done: the
        autograd engine is not left holding a half-finished pass."""
        self.left, self.ready, self.error = list(self.total), ready, None
        try:
            yield
        finally:
            self.left, self.ready = None, None
        if self.error is not None:
            error, self.error = self.error, None
            raise error

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


def shard_ranges(chunks: list[list]) -> list[tuple[int, int]]:
    """Each shard's [lo, hi) over the flat vector from its chunks (empty: (0, 0))."""
    return [(c[0].start, c[-1].stop) if c else (0, 0) for c in chunks]
