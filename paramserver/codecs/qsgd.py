"""`qsgd:BITS`: stochastic quantization (Alistarh et al. 2017), unbiased, no error feedback.

With s = 2**(BITS-1) - 1 levels per sign, entry g_i of a chunk is sent as
norm * sign(g_i) * l_i / s, where l_i is |g_i| / norm * s rounded up or down at
random so that the mean is exact: E[decoded] = g and |decoded_i - g_i| <= norm / s.
norm is max |g_i| (the L-inf variant, as TernGrad): with the paper's L2 norm
most entries of a large chunk round to 0 and the variance grows with sqrt(n).
BITS in 2..8 (2 is ternary: -1, 0, +1).
Frame: each entry as the unsigned level l_i * sign(g_i) + s in BITS bits,
packed MSB first (uint8[ceil(n * BITS / 8)]); params: {"norm": float}.
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import ConfigError
from .base import Codec, Encoded, bad, expect, param, raw_bytes


class QsgdCodec(Codec):
    name = "qsgd"

    def __init__(self, bits: str = "4", seed: int | None = None):
        self.bits = int(bits) if str(bits).isdigit() else 0
        if not 2 <= self.bits <= 8:
            raise ConfigError(f"qsgd bits must be 2..8, got {bits!r}: e.g. qsgd:4")
        self.levels = 2 ** (self.bits - 1) - 1
        self.name = f"qsgd:{self.bits}"
        # each worker its own stream (seed None: fresh entropy), or the rounding noise correlates
        self.rng = np.random.default_rng(seed)

    def encode(self, key, chunk):
        s, n = self.levels, chunk.numel()
        norm = float(chunk.abs().max()) if n else 0.0
        scaled = chunk.abs().div_(norm).mul_(s) if norm > 0 else torch.zeros(n)  # (n,) in [0, s]
        level = scaled.add_(torch.from_numpy(self.rng.random(n, dtype=np.float32))).floor_().clamp_(max=s)
        unsigned = level.copysign_(chunk).add_(s).to(torch.uint8).numpy()  # (n,) in [0, 2s]
        packed = unsigned if self.bits == 8 else self._pack(unsigned)
        return Encoded("uint8", [(n * self.bits + 7) // 8], {"norm": norm}, packed)

    def decode(self, meta, buf, numel):
        expect(meta, "uint8", [(numel * self.bits + 7) // 8], ("norm",))
        step = np.float32(param(meta, "norm") / self.levels)
        raw = raw_bytes(buf)
        unsigned = raw if self.bits == 8 else self._unpack(raw, numel)
        if numel and int(unsigned.max()) > 2 * self.levels:
            raise bad(meta, f"level above {2 * self.levels}")
        return (unsigned.astype(np.float32) - self.levels) * step

    def _pack(self, unsigned: np.ndarray) -> np.ndarray:
        """(n,) uint8 < 2**bits -> the bit stream, entry after entry, MSB first."""
        rows = np.empty((unsigned.size, self.bits), dtype=np.uint8)  # (n, bits): one bit plane a column
        for j in range(self.bits):
            np.bitwise_and(unsigned >> (self.bits - 1 - j), 1, out=rows[:, j])
        return np.packbits(rows)

    def _unpack(self, raw: np.ndarray, numel: int) -> np.ndarray:
        rows = np.unpackbits(raw, count=numel * self.bits).reshape(numel, self.bits)
        unsigned = np.zeros(numel, dtype=np.uint8)
        for j in range(self.bits):
            unsigned |= rows[:, j] << (self.bits - 1 - j)
        return unsigned
