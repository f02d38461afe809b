"""`topk:RATIO[:noef]`: only the k = ceil(RATIO * n) largest-magnitude entries of a chunk.

Error feedback is on by default: what is not sent stays in the worker's
residual for that chunk and joins the next gradient (`:noef` turns it off,
for ablations). One frame per chunk, dtype uint8, packed as

    k indices, strictly increasing: uint16 if n <= 65536 else int32 (little-endian)
    k values as bfloat16 bit patterns (uint16)

so an entry costs 4 bytes (6 for chunks over 65536 elements) instead of 8:
at RATIO=0.01 that is 100x (66x) less than float32 before the header. The
values' bf16 rounding is carried by error feedback like everything else unsent.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..errors import ConfigError
from .base import Codec, Encoded, ErrorFeedback, bad, expect, feedback_flag, raw_bytes
from .bf16 import from_bf16_bits, to_bf16_bits


def index_dtype(numel: int) -> np.dtype:
    return np.dtype("<u2") if numel <= 1 << 16 else np.dtype("<i4")


class TopKCodec(Codec):
    name = "topk"

    def __init__(self, ratio: str = "0.01", *options: str):
        try:
            self.ratio = float(ratio)
        except ValueError:
            self.ratio = math.nan
        if not 0 < self.ratio <= 1:
            raise ConfigError(f"topk ratio must be in (0, 1], got {ratio!r}: e.g. topk:0.01")
        self.feedback = ErrorFeedback(feedback_flag(options, "topk"))
        self.name = f"topk:{ratio}" + ("" if self.feedback.enabled else ":noef")

    def count(self, numel: int) -> int:
        """k for a chunk of numel elements; the shard computes the same k to check the frame."""
        return min(numel, max(1, math.ceil(self.ratio * numel)))

    def encode(self, key, chunk):
        p = self.feedback.corrected(key, chunk)  # (n,), fresh
        flat, n, k = p.numpy(), p.numel(), self.count(p.numel())
        # argpartition: O(n), about 4x faster than torch.topk on a CPU; NaN counts as largest
        idx = np.sort(np.argpartition(np.abs(flat), n - k)[n - k :]) if k else np.zeros(0, np.int64)  # (k,)
        values = to_bf16_bits(torch.from_numpy(flat[idx]))  # (k,) uint16
        flat[idx] -= from_bf16_bits(values)
        self.feedback.keep(key, p)  # the dropped entries and the values' rounding
        itype = index_dtype(n)
        buf = np.empty(k * (itype.itemsize + 2), dtype=np.uint8)
        buf[: k * itype.itemsize] = idx.astype(itype).view(np.uint8)
        buf[k * itype.itemsize :] = values.view(np.uint8)
        return Encoded("uint8", [buf.size], {}, buf)

    def decode(self, meta, buf, numel):
        k, itype = self.count(numel), index_dtype(numel)
        cut = k * itype.itemsize
        expect(meta, "uint8", [cut + 2 * k])
        raw = raw_bytes(buf)
        idx = raw[:cut].view(itype)
        if k and (idx[0] < 0 or idx[-1] >= numel or bool((idx[1:] <= idx[:-1]).any())):
            raise bad(meta, f"indices must be strictly increasing and within [0, {numel})")
        out = np.zeros(numel, dtype=np.float32)
        out[idx] = from_bf16_bits(raw[cut:].view("<u2"))
        return out
