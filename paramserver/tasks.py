"""Tasks: a model, a training set split by worker, a loss and an evaluation.

Built-ins train on scikit-learn's digits set (ships with the package, no
download). A user's task is `--task package.module:build`, where `build()`
returns a `Task` or a dict with the same fields::

    def build():
        return {"model": MyNet(), "train": (X_train, y_train), "test": (X_test, y_test),
                "loss": torch.nn.functional.cross_entropy}

The model is built with torch's RNG seeded from the run seed, so the
coordinator, every shard and every worker build identical initial weights.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .config import parse_partition
from .errors import ConfigError
from .sharding import Layout, unflatten

Pair = tuple[torch.Tensor, torch.Tensor]  # (inputs (n, ...), targets (n,))


@dataclass
class Task:
    model: nn.Module
    train: Pair
    test: Pair
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    name: str = ""

    def evaluate(self, model: nn.Module | None = None) -> dict:
        """Test accuracy and mean loss of `model` (default: the task's own)."""
        model = model or self.model
        x, y = self.test
        with torch.no_grad():
            out = model(x)
            loss = float(self.loss(out, y))
            accuracy = float((out.argmax(dim=1) == y).float().mean()) if out.dim() == 2 else float("nan")
        return {"accuracy": accuracy, "loss": loss}

    def evaluate_flat(self, flat: torch.Tensor) -> dict:
        """`evaluate` of the flat weights `flat` (shape (total,), as the server holds
        them), loaded into the task's own model."""
        self.model.load_state_dict(unflatten(flat, Layout.of(self.model)))
        return self.evaluate()


def _digits() -> tuple[Pair, Pair]:
    """scikit-learn's digits (1797 8x8 images), read from the file the package ships.

    Reading the file directly skips importing scikit-learn, about a second in
    every worker and shard process. The split is stratified, 20% test, fixed.
    """
    spec = importlib.util.find_spec("sklearn")
    if spec is None or spec.origin is None:
        raise ConfigError("the digits tasks need scikit-learn installed (pip install scikit-learn)")
    path = os.path.join(os.path.dirname(spec.origin), "datasets", "data", "digits.csv.gz")
    data = np.loadtxt(path, delimiter=",", dtype=np.float32)
    x, y = data[:, :-1] / 16.0, data[:, -1].astype(np.int64)  # pixels 0..16 -> 0..1
    test = np.zeros(len(y), dtype=bool)
    rng = np.random.default_rng(0)
    for label in np.unique(y):
        members = rng.permutation(np.flatnonzero(y == label))
        test[members[: round(0.2 * len(members))]] = True
    as_pair = lambda m: (torch.from_numpy(np.ascontiguousarray(x[m])), torch.from_numpy(y[m]))  # noqa: E731
    return as_pair(~test), as_pair(test)


def digits_mlp() -> Task:
    train, test = _digits()
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    return Task(model, train, test, nn.functional.cross_entropy, "digits-mlp")


class _DigitsCnn(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # (n,16,4,4)
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # (n,32,2,2)
            nn.Flatten(), nn.Linear(128, 10),
        )

    def forward(self, x):  # x: (n, 64) flat 8x8 images
        return self.body(x.view(-1, 1, 8, 8))


def digits_cnn() -> Task:
    train, test = _digits()
    return Task(_DigitsCnn(), train, test, nn.functional.cross_entropy, "digits-cnn")


BUILTIN = {"digits-mlp": digits_mlp, "digits-cnn": digits_cnn}


def build(name: str, seed: int = 0) -> Task:
    """Build a task by name (built-in or `package.module:function`) with seeded weights."""
    factory = _factory(name)
    torch.manual_seed(seed)
    made = factory()
    task = made if isinstance(made, Task) else _from_dict(made, name)
    task.name = name
    task.train, task.test = _pair(task.train, "train"), _pair(task.test, "test")
    return task


def _factory(name: str) -> Callable:
    if name in BUILTIN:
        return BUILTIN[name]
    if ":" not in name:
        raise ConfigError(f"unknown task {name!r}: use {', '.join(BUILTIN)} or package.module:build")
    module_name, _, attr = name.partition(":")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"cannot load task {name!r}: {e}") from e


def _from_dict(made, name: str) -> Task:
    try:
        return Task(made["model"], made["train"], made["test"], made["loss"], name)
    except (KeyError, TypeError) as e:
        raise ConfigError(f"task {name!r}: build() must return a Task or a dict with model, train, test, loss ({e})") from e


def _pair(data, what: str) -> Pair:
    if hasattr(data, "tensors"):  # torch.utils.data.TensorDataset
        data = data.tensors
    if not (isinstance(data, (tuple, list)) and len(data) == 2):
        raise ConfigError(f"task {what} data must be (inputs, targets) tensors or a TensorDataset")
    x, y = (torch.as_tensor(t) for t in data)
    if len(x) != len(y):
        raise ConfigError(f"task {what} data: {len(x)} inputs but {len(y)} targets")
    return x, y


def partition(n: int, parts: int, index: int, seed: int, scheme: str = "iid", labels=None) -> np.ndarray:
    """Indices of partition `index` of `parts` (0 parts: all of them), shuffled by seed.

    scheme (every worker computes the same split from the seed, and takes its part):
      iid            equal random parts
      dirichlet:A    label-skewed: each class is spread over the parts in proportions
                     drawn from Dirichlet(A, ..., A); small A, few classes per part
      shards:K       sorted by label, cut into parts*K shards, K shards per part
                     (each part sees about K classes)
    `labels` (shape (n,)) is needed by the label-skewed schemes.
    """
    rng = np.random.default_rng(seed)
    order = rng.permutation(n)
    if parts <= 0:
        return order
    kind, value = parse_partition(scheme)
    if kind == "iid":
        return np.array_split(order, parts)[index % parts]
    labels = np.asarray(labels)[order]
    if kind == "shards":
        by_label = order[np.argsort(labels, kind="stable")]
        shards = np.array_split(by_label, parts * int(value))
        mine = rng.permutation(len(shards)).reshape(parts, int(value))[index % parts]
        return np.concatenate([shards[s] for s in sorted(mine)])
    out = []
    for c in np.unique(labels):
        members = order[labels == c]
        share = rng.dirichlet(np.full(parts, value))
        cuts = (np.cumsum(share)[:-1] * len(members)).astype(int)
        out.append(np.split(members, cuts)[index % parts])
    return np.concatenate(out)



class Batches:
    """The batch for each step, a pure function of (seed, step): epochs reshuffle.

    A worker takes the batch of its clock, so a run rolled back to a checkpoint
    replays exactly the batches it had lost and ends where an uninterrupted run
    ends.
    """

    def __init__(self, indices: np.ndarray, batch_size: int, seed: tuple[int, ...]):
        self.indices, self.batch_size, self.seed = indices, batch_size, tuple(seed)
        self.per_epoch = max(1, len(indices) // batch_size)
        self._epoch, self._order = -1, indices

    def at(self, step: int) -> np.ndarray:
        epoch, i = divmod(step, self.per_epoch)
        if epoch != self._epoch:
            self._epoch = epoch
            self._order = np.random.default_rng((*self.seed, epoch)).permutation(self.indices)
        return self._order[i * self.batch_size : (i + 1) * self.batch_size]
