"""A compromised device, as a task: digits-mlp whose loss is scaled on some workers.

Every process of a run builds the task named by the server, so a worker cannot
pick another task. What differs between processes is the environment: in a
process where HOSTILE_GRADIENT_SCALE is set (say -100, or nan), the loss, and
so every gradient that worker pushes, is multiplied by it. The server, the
shards and the honest workers build plain digits-mlp, with the same model and
data. Use it as `--task tests.hostile_task:build`.
"""

from __future__ import annotations

import os

from paramserver import tasks

ENV = "HOSTILE_GRADIENT_SCALE"


def build() -> tasks.Task:
    task = tasks.digits_mlp()
    scale = os.environ.get(ENV)
    if scale:
        honest, factor = task.loss, float(scale)
        task.loss = lambda out, y: factor * honest(out, y)
    return task
