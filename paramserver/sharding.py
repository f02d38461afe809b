"""Who holds which bytes: the model as one flat float32 vector, cut into shards and chunks.

Both sides build the same `Layout` from the task's model, so only chunk keys and
ranges cross the wire. Shards get equal ranges of the flat vector (balanced
bytes); a tensor that crosses a cut is split between shards. Each shard's range
is cut again into chunks of at most `chunk_elems`, the unit of one frame.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Entry:
    name: str
    shape: tuple[int, ...]
    offset: int
    numel: int


@dataclass(frozen=True)
class Chunk:
    key: int
    start: int  # [start, stop) over the flat vector
    stop: int

    @property
    def numel(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class Layout:
    entries: tuple[Entry, ...]
    total: int

    @classmethod
    def of(cls, model: torch.nn.Module) -> Layout:
        entries, offset = [], 0
        for name, p in model.named_parameters():
            entries.append(Entry(name, tuple(p.shape), offset, p.numel()))
            offset += p.numel()
        return cls(tuple(entries), offset)

    def signature(self) -> list:
        return [[e.name, list(e.shape)] for e in self.entries]


def plan(total: int, shards: int, chunk_elems: int) -> list[list[Chunk]]:
    """Chunks per shard: shard s holds [total*s//S, total*(s+1)//S), in chunks of <= chunk_elems."""
    if shards < 1:
        raise ValueError("need at least one shard")
    out, key = [], 0
    for s in range(shards):
        lo, hi = total * s // shards, total * (s + 1) // shards
        chunks = []
        for start in range(lo, hi, chunk_elems):
            chunks.append(Chunk(key, start, min(start + chunk_elems, hi)))
            key += 1
        out.append(chunks)
    return out


def parts(chunks: list[Chunk], part_bytes: int) -> list[tuple[int, int]]:
    """How a whole float32 answer of `chunks` travels: [start, stop) runs of them, one per message.

    Several messages only when that pays: more than one chunk and at least twice
    `part_bytes` in all (0: never); then each run closes once it holds `part_bytes`.
    """
    if part_bytes <= 0 or len(chunks) < 2 or 4 * sum(c.numel for c in chunks) < 2 * part_bytes:
        return [(0, len(chunks))]
    out, start, held = [], 0, 0
    for i, c in enumerate(chunks):
        held += 4 * c.numel
        if held >= part_bytes:
            out.append((start, i + 1))
            start, held = i + 1, 0
    if start < len(chunks):
        out.append((start, len(chunks)))
    return out


def views(flat: torch.Tensor, layout: Layout) -> list[torch.Tensor]:
    """Views of `flat` (shape (layout.total,)) shaped as the model's parameters, in order."""
    return [flat[e.offset : e.offset + e.numel].view(e.shape) for e in layout.entries]


def flatten_(model: torch.nn.Module, layout: Layout) -> tuple[torch.Tensor, torch.Tensor]:
    """Re-home the model's parameters and gradients as views of two flat buffers.

    Returns (params, grads), each float32 of shape (layout.total,). Autograd
    accumulates into the existing `.grad` in place, so backward writes straight
    into `grads` and a push sends slices of it without any torch.cat.
    """
    params = torch.empty(layout.total, dtype=torch.float32)
    grads = torch.zeros(layout.total, dtype=torch.float32)
    for p, view, grad in zip(model.parameters(), views(params, layout), views(grads, layout)):
        view.copy_(p.detach())
        p.data = view
        p.grad = grad
    return params, grads


def unflatten(flat: torch.Tensor, layout: Layout) -> dict[str, torch.Tensor]:
    """A state dict of `flat`'s values, keyed by parameter name (for export and eval)."""
    return {e.name: flat[e.offset : e.offset + e.numel].view(e.shape).clone() for e in layout.entries}
