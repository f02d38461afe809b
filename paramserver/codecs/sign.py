"""`sign[:noef]`: one bit per entry and one per-tensor scale (EF-signSGD).

A chunk p (the gradient plus the residual) is sent as scale * sign(p) with
scale = mean(|p|); zeros count as positive. Error feedback is on by default
(`:noef` turns it off); without it signSGD is biased and may not converge.
Frame: uint8[ceil(n/8)], numpy.packbits order (first entry in the top bit);
params: {"scale": float}.
"""

from __future__ import annotations

import numpy as np
import torch

from .base import Codec, Encoded, ErrorFeedback, expect, feedback_flag, param, raw_bytes


class SignCodec(Codec):
    name = "sign"

    def __init__(self, *options: str):
        self.feedback = ErrorFeedback(feedback_flag(options, "sign"))
        self.name = "sign" if self.feedback.enabled else "sign:noef"

    def encode(self, key, chunk):
        p = self.feedback.corrected(key, chunk)  # (n,)
        # float32 scalar; summed in float64 so that huge finite gradients keep a finite scale
        scale = (p.abs().sum(dtype=torch.float64) / max(1, p.numel())).float()
        positive = p >= 0
        if self.feedback.enabled:
            p -= torch.where(positive, scale, -scale)  # exactly what decode will give
            self.feedback.keep(key, p)
        bits = np.packbits(positive.numpy())
        return Encoded("uint8", [bits.size], {"scale": scale.item()}, bits)

    def decode(self, meta, buf, numel):
        expect(meta, "uint8", [(numel + 7) // 8], ("scale",))
        scale = param(meta, "scale")
        positive = np.unpackbits(raw_bytes(buf), count=numel).view(bool)
        return np.where(positive, scale, -scale)
