"""Gradient codecs: how a float32 chunk travels as frames, chosen by name.

One small interface: `encode(chunk) -> (TensorMeta fields, buffer)` on the
sender and `decode(meta, buffer, numel) -> float32 tensor` on the receiver.
`decode` checks what only the codec knows (sizes of its own encoding); the
caller checks keys and finiteness.
"""

from __future__ import annotations

import numpy as np
import torch

from .errors import ConfigError, ProtocolError
from .protocol import ErrorCode


class NoneCodec:
    """Raw float32: lossless, zero-copy on both ends."""

    name = "none"

    def encode(self, chunk: torch.Tensor):
        # shape (n,) float32 contiguous -> its own memory, sent without a copy
        return "float32", [chunk.numel()], {}, chunk.numpy()

    def decode(self, meta, buf: memoryview, numel: int) -> np.ndarray:
        _expect(meta, "float32", numel)
        return np.frombuffer(buf, dtype=np.float32)


FP16_MAX = 65504.0


class Fp16Codec:
    name = "fp16"

    def encode(self, chunk: torch.Tensor):
        # clamp first: a finite gradient beyond fp16's range must not arrive as inf
        return "float16", [chunk.numel()], {}, chunk.clamp(-FP16_MAX, FP16_MAX).to(torch.float16).numpy()

    def decode(self, meta, buf: memoryview, numel: int) -> np.ndarray:
        _expect(meta, "float16", numel)
        return np.frombuffer(buf, dtype=np.float16).astype(np.float32)


def _expect(meta, dtype: str, numel: int) -> None:
    if meta.dtype != dtype or meta.shape != [numel]:
        raise ProtocolError(
            f"key {meta.key}: codec {meta.codec} expects {dtype}[{numel}], got {meta.dtype}{meta.shape}",
            ErrorCode.BAD_TENSOR,
        )


CODECS = {c.name: c for c in (NoneCodec, Fp16Codec)}


def get(name: str):
    try:
        return CODECS[name]()
    except KeyError:
        raise ConfigError(f"unknown codec {name!r}: use one of {', '.join(CODECS)}") from None


def for_wire(name: str):
    """The codec a received message names; an unknown name is a protocol error, not a crash."""
    if name not in CODECS:
        raise ProtocolError(f"unknown codec {name!r}", ErrorCode.BAD_TENSOR)
    return CODECS[name]()
