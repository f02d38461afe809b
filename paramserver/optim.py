"""Server-side optimizers by name: real `torch.optim` over a shard's flat tensor."""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from .config import OptimizerConfig


def make(params: list[torch.Tensor], cfg: OptimizerConfig) -> torch.optim.Optimizer:
    # foreach given: the default makes torch decide on every step (tens of us); one tensor
    # (a shard of one chunk) steps faster alone: foreach first groups tensors by device and dtype
    foreach = len(params) > 1
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                               foreach=foreach)
    if cfg.name == "adam":
        # fused: one kernel over the flat buffer, ~5x the default on these CPUs
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    if cfg.name == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    return torch.optim.Adagrad(params, lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=foreach)


def stepper(optimizer: torch.optim.Optimizer) -> Callable[[list[torch.Tensor]], None]:
    """`step(grads)`: one update of the optimizer's parameters (one group) with
    `grads`, one tensor per parameter in order, the same update as setting each
    `.grad` and calling `optimizer.step()`, bit for bit, with less around it.

    A shard steps once per push, and for a small shard what torch.optim does around
    its kernel costs more than the kernel: the profiler's wrapper (15-20 us a call
    here), then per step `_init_group`'s walk over the parameters and the grouping
    of tensors by device and dtype. Fused Adam and AdamW are called as their own
    `_fused_adam` ends up calling them, on the optimizer's own state (docs/architecture.md,
    departures): 29 -> 10 us a step at 9,610 parameters. Every other
    case (the first step, which creates the state; other optimizers or settings)
    runs the optimizer's own step, without the profiler's wrapper only: what is
    lost there is its "Optimizer.step" label and step hooks, which shards do not use.
    """
    step = type(optimizer).step
    inner = getattr(step, "__wrapped__", None)
    plain = functools.partial(inner, optimizer) if getattr(step, "hooked", False) and inner else optimizer.step
    params = optimizer.param_groups[0]["params"]

    def with_grads(grads: list[torch.Tensor]) -> None:
        for p, g in zip(params, grads):
            p.grad = g
        plain()
        for p in params:
            p.grad = None

    if _fusable(optimizer):
        return functools.partial(_fused_adam_step, optimizer, with_grads)
    return with_grads


def _fusable(optimizer: torch.optim.Optimizer) -> bool:
    if not isinstance(optimizer, torch.optim.Adam) or len(optimizer.param_groups) != 1:
        return False
    g = optimizer.param_groups[0]
    return (bool(g["fused"]) and not (g["amsgrad"] or g["maximize"] or g["capturable"] or g["differentiable"])
            and all(p.device.type == "cpu" and p.dtype == torch.float32 for p in g["params"])
            and getattr(optimizer, "grad_scale", None) is None and hasattr(torch, "_fused_adam_"))


def _fused_adam_step(optimizer: torch.optim.Adam, fallback, grads: list[torch.Tensor]) -> None:
    group = optimizer.param_groups[0]
    params = group["params"]
    states = [optimizer.state.get(p) for p in params]
    if not all(states):  # the first step makes the state, as torch.optim makes it
        fallback(grads)
        return
    beta1, beta2 = group["betas"]
    decoupled = group.get("decoupled_weight_decay", isinstance(optimizer, torch.optim.AdamW))
    kernel = torch._fused_adamw_ if decoupled else torch._fused_adam_
    with torch.no_grad():  # the parameters are leaves that require grad, updated in place
        steps = [s["step"] for s in states]
        torch._foreach_add_(steps, 1)
        kernel(params, grads, [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states], [], steps,
               amsgrad=False, lr=group["lr"], beta1=beta1, beta2=beta2, weight_decay=group["weight_decay"],
               eps=group["eps"], maximize=False, grad_scale=None, found_inf=None)
