"""What every codec shares: the interface, error feedback, and checks of what arrives.

A codec turns one float32 chunk (a 1-D view of the worker's flat gradient)
into one frame and back. `encode` runs on the worker and may keep state per
chunk key (error feedback); `decode` runs on the shard, keeps no state, and
trusts nothing it reads: any inconsistency is a ProtocolError(BAD_TENSOR).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch

from ..errors import ConfigError, ProtocolError
from ..protocol import ErrorCode, TensorMeta

F32_MAX = float(np.finfo(np.float32).max)


class Encoded(NamedTuple):
    """One chunk as it goes on the wire: the TensorMeta fields and exactly one frame."""

    dtype: str  # a protocol.DTYPES name
    shape: list[int]  # of the frame, in `dtype` elements (not the chunk's numel)
    params: dict[str, float]  # per-tensor scalars: scale, norm, ...
    buffer: np.ndarray  # the frame's bytes, C-contiguous; never written again once returned


class Codec:
    """The interface. A user codec subclasses this and is named `package.module:Class[:arg...]`.

    `get`/`for_wire` call `Class(*args)` with the strings after the class name,
    then set `name` to the whole spec: the shard rebuilds the codec from it.
    """

    name = "?"

    def encode(self, key: int, chunk: torch.Tensor) -> Encoded:
        """chunk: float32 (n,), a view of the worker's gradient: read it, never write it."""
        raise NotImplementedError

    def decode(self, meta: TensorMeta, buf: memoryview, numel: int) -> np.ndarray:
        """The chunk as float32 (numel,); ProtocolError(BAD_TENSOR) on anything malformed."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"


class ErrorFeedback:
    """What a lossy codec has not sent yet, per chunk key, added to that key's next gradient.

    It lives on the worker, in the codec instance of its ShardClient. Over any
    number of steps: sum(sent) + residuals[key] == sum(gradients), so nothing is
    lost, only delayed (Karimireddy et al. 2019, "Error feedback fixes SignSGD").
    """

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.residuals: dict[int, torch.Tensor] = {}  # key -> float32 (n,) of that chunk

    def corrected(self, key: int, chunk: torch.Tensor) -> torch.Tensor:
        """chunk + residual as a fresh tensor the codec may overwrite; chunk is untouched."""
        r = self.residuals.get(key)
        return chunk + r if r is not None and r.shape == chunk.shape else chunk.clone()

    def keep(self, key: int, unsent: torch.Tensor) -> None:
        if self.enabled:
            self.residuals[key] = unsent


def feedback_flag(spec_args: tuple[str, ...], codec: str) -> bool:
    """Error feedback is on unless the spec ends in `:noef`."""
    if spec_args not in ((), ("noef",)):
        raise ConfigError(f"codec {codec}: unexpected option {':'.join(spec_args)!r} (only 'noef')")
    return not spec_args


def clamp_finite(x: torch.Tensor, limit: float) -> torch.Tensor:
    """Clamp a finite gradient into a narrower float's range; let NaN/Inf through for the shard to refuse."""
    return x.clamp(-limit, limit) if bool(torch.isfinite(x).all()) else x


def expect(meta: TensorMeta, dtype: str, shape: list[int], params: tuple[str, ...] = ()) -> None:
    """The frame's dtype, shape and param names are exactly what the codec sends for this chunk."""
    if meta.dtype != dtype or meta.shape != shape:
        raise bad(meta, f"expects {dtype}{shape}, got {meta.dtype}{meta.shape}")
    if set(meta.params) != set(params):
        raise bad(meta, f"expects params {sorted(params)}, got {sorted(meta.params)}")


def param(meta: TensorMeta, name: str) -> np.float32:
    """A per-tensor scalar that must be finite, >= 0, and fit float32."""
    value = meta.params[name]
    if not (isinstance(value, (int, float)) and math.isfinite(value) and 0 <= value <= F32_MAX):
        raise bad(meta, f"param {name}={value!r} must be finite, >= 0 and within float32")
    return np.float32(value)


def bad(meta: TensorMeta, why: str) -> ProtocolError:
    return ProtocolError(f"key {meta.key}: codec {meta.codec} {why}", ErrorCode.BAD_TENSOR)


def raw_bytes(buf) -> np.ndarray:
    return np.frombuffer(buf, dtype=np.uint8)
