"""Server-side optimizers by name: real `torch.optim` over a shard's flat tensor."""

from __future__ import annotations

import torch

from .config import OptimizerConfig


def make(params: list[torch.Tensor], cfg: OptimizerConfig) -> torch.optim.Optimizer:
    if cfg.name == "sgd":
        # foreach given: the default makes torch decide on every step (tens of us)
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                               foreach=True)
    if cfg.name == "adam":
        # fused: one kernel over the flat buffer, ~5x the default on these CPUs
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    if cfg.name == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    return torch.optim.Adagrad(params, lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=True)
