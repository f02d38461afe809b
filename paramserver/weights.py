"""A shard's weights: one flat float32 buffer, the optimizer that steps it, the
frames of a push checked into gradients, and the frames that pull answers send from it.

Pure like `ShardCore`, which owns one: no sockets, no clocks. Split from the
consistency rules because the two change for different reasons: this part is
about memory (views, zero-copy frames still in flight, recycled buffers), that
one about who may push and pull when.
"""

from __future__ import annotations

import itertools
import math
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from . import checkpoint, codecs, optim, protocol, sharding
from .config import OptimizerConfig
from .errors import ProtocolError
from .protocol import ErrorCode
from .sharding import Chunk

# finite's squares of huge finite entries overflow on purpose: the exact check follows
warnings.filterwarnings("ignore", "overflow encountered in dot", RuntimeWarning, __name__)


class Weights:
    def __init__(self, chunks: list[Chunk], init: torch.Tensor, optimizer: OptimizerConfig, part_bytes: int):
        # init: the shard's slice of the flat initial weights, shape (numel,)
        self.chunks = chunks
        self.lo = chunks[0].start if chunks else 0
        self.numel = sum(c.numel for c in chunks)
        self.expected = {c.key: c.numel for c in chunks}  # what a push must hold
        self._param = init.detach().clone().float()  # flat, shape (numel,)
        # the optimizer steps one Parameter per chunk, each a view of `param`: a push's
        # frames then serve as gradients as received, without assembling a flat copy
        self._views = [torch.nn.Parameter(v) for v in self.slices(self._param)]
        self._optimizer = optim.make(self._views, optimizer)
        self._step = optim.stepper(self._optimizer)
        # a step started and not yet run through; the lock lets a thread that reads the
        # weights (a test, an in-process user) finish it
        self._pending: _Started | None = None
        self._stepping = threading.Lock()
        # what a whole float32 pull answer says of its frames: the same for every answer
        self._float32_metas = [protocol.TensorMeta(key=c.key, dtype="float32", shape=[c.numel]) for c in chunks]
        self._float32_parts = sharding.parts(chunks, part_bytes)
        # frames of pulls still being sent read param's memory in place (zero-copy);
        # pins are their trackers, retired buffers earlier param memory still in flight
        self._pins: list = []
        self._retired: list[tuple[torch.Tensor, list]] = []
        # delta pulls: worker -> (token, the weights as last sent to it)
        self._sent: dict[int, tuple[int, np.ndarray]] = {}
        self._tokens = itertools.count(1)

    def __repr__(self) -> str:
        return f"<Weights [{self.lo}:{self.lo + self.numel}] pins={len(self._pins)}>"

    def slices(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Views of `flat` (shape (numel,)), one per chunk in key order (the whole of it when there are none)."""
        if not self.chunks:
            return [flat]
        return [flat[c.start - self.lo : c.stop - self.lo] for c in self.chunks]

    def gradient(self, tensors: list[protocol.TensorMeta], buffers: list, clip_norm: float = 0.0) -> list[torch.Tensor]:
        """A push's frames as its gradient, one float32 tensor per chunk in key order,
        clipped to `clip_norm` (0: not clipped); raises ProtocolError unless they hold
        exactly this range's chunks, all finite. Frames of the `none` codec are used in
        place, not copied."""
        protocol.check_tensors(tensors, self.expected)
        grads: list[torch.Tensor | None] = [None] * len(self.chunks)
        for meta, buf in zip(tensors, buffers):
            i = meta.key - self.chunks[0].key
            values = codecs.for_wire(meta.codec).decode(meta, buf, self.chunks[i].numel)
            if not values.flags.aligned:  # a small frame can sit at any offset of zmq's receive buffer
                values = values.copy()
            if not finite(values):
                raise ProtocolError("gradient has NaN or Inf values; push refused", ErrorCode.NOT_FINITE)
            grads[i] = torch.from_numpy(values)
        if not grads:
            return [torch.zeros(0)]
        if clip_norm > 0:
            norm = float(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))))
            if norm > clip_norm:
                grads = torch._foreach_mul(grads, clip_norm / norm)  # frames stay untouched
        return grads

    @property
    def param(self) -> torch.Tensor:
        """The weights, flat, shape (numel,), with any started step run through."""
        self.settle()
        return self._param

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        self.settle()
        return self._optimizer

    def step(self, grads: list, done=None) -> None:
        """Start one optimizer step with `grads`: per chunk in key order, a float32 tensor
        or a function that makes it (bsp's mean, summed only when its part is stepped).

        The step runs part by part (the parts whole float32 answers travel in) as `settle`
        asks, so that an answer sends each part as soon as it is stepped while the next
        one is: the update overlaps the answer's time on the wire. Reading `param` or
        `optimizer` runs the rest first. Each chunk is one Parameter of its own, and these
        optimizers keep their state per Parameter, so stepping them a part at a time is the
        same step. `done(seconds)` is called once the whole step has run.
        """
        self.make_writable()  # which runs the step before this one through first
        self._pending = _Started(grads, done)

    def settle(self, parts: int | None = None) -> None:
        """Run the started step through its first `parts` parts (all of them: None)."""
        if self._pending is None:
            return
        with self._stepping:
            step = self._pending
            if step is None:
                return
            runs = self._float32_parts
            stop = len(runs) if parts is None else min(parts, len(runs))
            started = time.perf_counter()
            for a, b in runs[step.ran:stop]:
                for p, g in zip(self._views[a:b], step.grads[a:b]):
                    p.grad = g() if callable(g) else g
                self._step()  # steps only the Parameters that have a grad
                for p in self._views[a:b]:
                    p.grad = None
            step.seconds += time.perf_counter() - started
            step.ran = max(step.ran, stop)
            if step.ran < len(runs):
                return
            self._pending = None
        if step.done is not None:
            step.done(step.seconds)

    def snapshot(self) -> tuple[list[protocol.TensorMeta], list[np.ndarray]]:
        """The current weights as (metas, buffers), one float32 frame per chunk.

        The buffers are param's own memory: whoever sends them without a copy
        must `pin` the send, so that the next update leaves them alone. A step that
        has started is not run here: part k of it must be run (`settle(k + 1)`) before
        the buffers of part k are read.
        """
        flat = self._param.numpy()
        return self._float32_metas, [flat[c.start - self.lo : c.stop - self.lo] for c in self.chunks]

    def parts(self, codec: str) -> list[tuple[int, int]]:
        """The answer's messages as [start, stop) runs of its chunks. Only whole float32
        answers are cut: the others are encoded (a copy) before they go, and are smaller."""
        return self._float32_parts if codec == "none" else [(0, len(self.chunks))]

    def encoded(self, codec: str, worker: int, have: int, keep: bool) -> tuple[list[protocol.TensorMeta], list[np.ndarray], int]:
        """The current weights for a pull asking for `codec` other than none, in frames of
        their own memory: (metas, buffers, token); token is 0 unless codec is delta.
        `keep`: remember what a delta answer sent, as the base of the worker's next one
        (members only: the table must stay bounded)."""
        if codec != codecs.delta.NAME:
            enc = codecs.for_wire(codec)
            metas, buffers = [], []
            for c, view in zip(self.chunks, self.slices(self.param)):
                dtype, shape, params, buf = enc.encode(c.key, view)
                metas.append(protocol.TensorMeta(key=c.key, dtype=dtype, shape=shape, codec=codec, params=params))
                buffers.append(buf)
            return metas, buffers, 0
        flat = self.param.numpy()
        token, sent = self._sent.get(worker, (0, None))
        if sent is None or not have or have != token:
            sent = np.full(self.numel, np.nan, dtype=np.float32)  # matches nothing: every chunk goes whole
        metas, buffers = [], []
        for c in self.chunks:
            a, b = c.start - self.lo, c.stop - self.lo
            meta, buf = codecs.delta.encode(c.key, flat[a:b], sent[a:b])
            metas.append(meta)
            buffers.append(buf)
        token = next(self._tokens)
        if keep:
            self._sent[worker] = (token, sent)
        return metas, buffers, token

    def forget(self, keep) -> None:
        """Drop the delta bases of workers not in `keep`."""
        self._sent = {w: v for w, v in self._sent.items() if w in keep}

    def pin(self, trackers: list) -> None:
        """Frames that read the current weights in place are in flight until each `.done`."""
        self._pins.extend(trackers)

    def make_writable(self) -> None:
        """Before param changes in place: if frames in flight still read its memory,
        leave that memory to them and move param to a copy (a free retired buffer
        when there is one: fresh large allocations page-fault)."""
        self.settle()
        self._pins = [p for p in self._pins if not p.done]
        if not self._pins:
            return
        busy = [(b, ps) for b, ps in self._retired if not all(p.done for p in ps)]
        free = [b for b, ps in self._retired if all(p.done for p in ps)]
        target = free.pop() if free else torch.empty_like(self._param)
        target.copy_(self._param)
        busy.append((self._param, self._pins))
        self._param = target
        for p, view in zip(self._views, self.slices(target)):
            p.data = view
        self._retired = busy + [(b, []) for b in free[:1]]
        self._pins = []

    def load(self, tensors: dict[str, torch.Tensor], groups: list) -> None:
        """The weights and optimizer state of a checkpoint of this range (the caller checked that it is)."""
        self.make_writable()
        with torch.no_grad():
            self.param.copy_(tensors["param"])
        checkpoint.restore_optimizer(self.optimizer, tensors, groups)


@dataclass
class _Started:
    """A step `Weights.step` started: its gradients (tensors, or functions that make them),
    what to call once it has all run, the parts run so far and the seconds they took."""

    grads: list
    done: Callable[[float], None] | None
    ran: int = 0
    seconds: float = 0.0


def finite(a: np.ndarray) -> bool:
    """No NaN or Inf in `a` (float32, shape (n,)).

    One pass without a temporary: the dot product a . a is finite unless `a` holds a
    NaN or an Inf, or its squares overflow float32 (entries near 1e19 and beyond);
    only then does the exact check run, to tell the two apart. numpy's dot, not
    torch's: the same single-threaded pass, but a shorter call, which is what a
    small push pays for (with cold caches, as a shard between messages has them:
    2.6 us against 7 us at 4 KB, 20 us against 30 us at 1 MB).
    """
    if math.isfinite(np.dot(a, a)):
        return True
    return bool(np.isfinite(a).all())
