"""`delta` pulls: only the weights that changed since the worker's last answer.

Not a push codec: it needs what the worker already holds. A shard keeps, per
worker that asks for deltas, a copy of the weights it last sent that worker
(`view`) and a token naming it; the worker sends the token back with its next
pull (`have`). When the token matches, each chunk travels as the entries that
differ from the view, exactly (new float32 values, not differences, so no
rounding accumulates); otherwise, or when more than half of a chunk changed,
the chunk travels whole. One frame per chunk, dtype uint8, packed as

    k indices, strictly increasing, int32 little-endian
    k values, float32 little-endian

Entries change only where updates touch them: plain SGD applying sparse
gradients (topk pushes) changes few; momentum, Adam and weight decay change
nearly all, and the chunks then go whole.
"""

from __future__ import annotations

import numpy as np

from ..errors import ProtocolError
from ..protocol import ErrorCode, TensorMeta

NAME = "delta"
_INDEX, _VALUE = np.dtype("<i4"), np.dtype("<f4")
ENTRY_BYTES = _INDEX.itemsize + _VALUE.itemsize


def encode(key: int, current: np.ndarray, view: np.ndarray) -> tuple[TensorMeta, np.ndarray]:
    """One chunk's frame: what changed from `view` to `current` (both float32 (n,));
    `view` is updated to `current`. A frame of its own memory, never `current`'s."""
    n = current.size
    changed = np.flatnonzero(current != view)  # (k,)
    if changed.size * ENTRY_BYTES >= n * _VALUE.itemsize // 2:
        view[:] = current
        return TensorMeta(key=key, dtype="float32", shape=[n]), current.copy()
    values = current[changed]
    view[changed] = values
    frame = np.empty(changed.size * ENTRY_BYTES, dtype=np.uint8)
    frame[: changed.size * _INDEX.itemsize] = changed.astype(_INDEX).view(np.uint8)
    frame[changed.size * _INDEX.itemsize :] = values.view(np.uint8)
    return TensorMeta(key=key, dtype="uint8", shape=[frame.size], codec=NAME), frame


def apply(into: np.ndarray, meta: TensorMeta, buf) -> None:
    """Write a delta frame into `into` (float32 (n,), the chunk as the worker holds it)."""
    raw = np.frombuffer(buf, dtype=np.uint8)
    if meta.dtype != "uint8" or raw.size % ENTRY_BYTES:
        raise ProtocolError(f"delta frame of {raw.size} bytes is not whole (index, value) entries",
                            ErrorCode.BAD_TENSOR)
    k = raw.size // ENTRY_BYTES
    index = raw[: k * _INDEX.itemsize].view(_INDEX)
    if k and (index.min() < 0 or index.max() >= into.size):
        raise ProtocolError(f"delta index out of range for a chunk of {into.size}", ErrorCode.BAD_TENSOR)
    into[index] = raw[k * _INDEX.itemsize :].view(_VALUE)
