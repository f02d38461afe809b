"""An example of your own task: a small classifier on synthetic data.

Run it with any command that takes --task, with this folder on the import path:

    PYTHONPATH=launch ps-sim run --task example_task:build --steps 50
    PYTHONPATH=launch ps-server start --task example_task:build
    PYTHONPATH=launch ps-worker join          # every worker host needs the module too

`build()` runs in every process (the server, each shard, each worker), after
paramserver has seeded torch's RNG from the run's --seed, so every process builds
the same initial weights. The data must come out identical in every process as
well: here it is drawn from a numpy generator with a fixed seed. Keep build()
cheap and free of downloads; it runs once per process.
"""

import numpy as np
import torch
from torch import nn

FEATURES, CLASSES, SAMPLES = 16, 4, 2000


def _blobs(rng: np.random.Generator, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n points around CLASSES fixed centres: inputs (n, FEATURES) float32, labels (n,) int64."""
    centres = np.random.default_rng(1234).normal(0.0, 1.0, (CLASSES, FEATURES))
    labels = rng.integers(0, CLASSES, n)
    points = centres[labels] + rng.normal(0.0, 0.8, (n, FEATURES))
    return torch.from_numpy(points.astype(np.float32)), torch.from_numpy(labels.astype(np.int64))


def build():
    rng = np.random.default_rng(0)  # fixed: the same data in every process
    train = _blobs(rng, SAMPLES)
    test = _blobs(rng, SAMPLES // 4)
    model = nn.Sequential(nn.Linear(FEATURES, 32), nn.ReLU(), nn.Linear(32, CLASSES))
    return {
        "model": model,  # any torch.nn.Module; its float32 parameters are what the server holds
        "train": train,  # (inputs, targets) tensors or a TensorDataset; workers sample batches from it
        "test": test,  # used by ps-sim's final evaluation (accuracy = argmax of a 2-d output)
        "loss": nn.functional.cross_entropy,  # loss(model(x), y) -> scalar tensor
    }
