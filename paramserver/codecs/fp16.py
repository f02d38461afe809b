"""`fp16`: IEEE half precision, 2x smaller; relative error <= 2**-11 in the normal range."""

from __future__ import annotations

import numpy as np
import torch

from .base import Codec, Encoded, clamp_finite, expect

FP16_MAX = 65504.0


class Fp16Codec(Codec):
    name = "fp16"

    def encode(self, key, chunk):
        # clamp first: a finite gradient beyond fp16's range must not arrive as inf
        half = clamp_finite(chunk, FP16_MAX).to(torch.float16)
        return Encoded("float16", [chunk.numel()], {}, half.numpy())

    def decode(self, meta, buf, numel):
        expect(meta, "float16", [numel])
        return np.frombuffer(buf, dtype=np.float16).astype(np.float32)
