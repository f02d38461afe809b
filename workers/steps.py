"""What one worker step computes, and how it is paced and recorded.

- `Pace` plays a slower device (`--speed`): a step at speed 0.25 takes four times
  as long as the worker's own measured full-speed step.
- `local_update` is FedAvg-style local training (`--local-steps K`): K steps of
  plain SGD on the worker's copy, then the model delta goes out in place of a
  gradient, so the server's optimizer treats it as a pseudo-gradient.
- `StepLog` writes one CSV row per step (`--metrics-csv`), which `ps-sim` turns
  into the report's metrics.csv and plots.
"""

from __future__ import annotations

import csv
import logging
import statistics

import torch

from paramserver.errors import ConfigError

log = logging.getLogger(__name__)


class Pace:
    """The extra seconds to sleep after each step, so the worker runs at `speed`.

    The full-speed step time is measured, not assumed: the median of the steps
    after a short warm-up, taken before any delay is injected. Measuring once
    (rather than continuously) matters in bsp: a step there includes waiting for
    the slowest worker, and a delay that followed that wait would feed on itself.
    """

    WARMUP, MEASURED = 3, 10

    def __init__(self, speed: float = 1.0):
        if not 0 < speed <= 1:
            raise ConfigError(f"speed must be in (0, 1] (a fraction of full speed), got {speed}")
        self.speed = speed
        self.samples: list[float] = []
        self.base: float | None = None  # the full-speed step time, once measured

    def __repr__(self) -> str:
        return f"<Pace speed={self.speed} base={self.base}>"

    def delay(self, step_seconds: float) -> float:
        """Seconds to sleep after a step that took `step_seconds` (delay excluded)."""
        if self.speed == 1:
            return 0.0
        if self.base is None:
            self.samples.append(step_seconds)
            if len(self.samples) < self.WARMUP + self.MEASURED:
                return 0.0
            self.base = statistics.median(self.samples[self.WARMUP :])
            log.info("full-speed step %.2f ms; running at speed %.2f", self.base * 1e3, self.speed)
        return self.base * (1 / self.speed - 1)


def local_update(task, params: torch.Tensor, grads: torch.Tensor, sgd: torch.optim.Optimizer,
                 batches: list) -> float:
    """Take one SGD step per batch on the model (whose weights are views of `params`),
    then leave the model delta start - end in `grads` and the start weights in
    `params`. Returns the mean loss. `params`, `grads`: flat float32, shape (total,).

    The start weights go back into `params` because the next pull may be a delta
    against exactly those weights.
    """
    start = params.clone()
    total = 0.0
    for batch in batches:
        x, y = task.train[0][batch], task.train[1][batch]
        grads.zero_()
        loss = task.loss(task.model(x), y)
        loss.backward()
        sgd.step()
        total += loss.item()
    torch.sub(start, params, out=grads)
    params.copy_(start)
    return total / len(batches)


class StepLog:
    """One CSV row per completed step; no path, no file. Line-buffered: a row is
    written as its step ends (one small write, microseconds against a step's
    milliseconds), so a worker that is killed loses no step it finished."""

    FIELDS = ("time", "worker", "incarnation", "step", "clock", "loss", "staleness", "step_seconds",
              "compute_seconds", "bytes_sent", "bytes_received")

    def __init__(self, path: str = ""):
        self._file = open(path, "a", newline="", buffering=1) if path else None  # noqa: SIM115 (closed in close())
        self._writer = csv.writer(self._file, lineterminator="\n") if self._file else None
        if self._file is not None and self._file.tell() == 0:
            self._writer.writerow(self.FIELDS)

    @property
    def on(self) -> bool:
        return self._writer is not None

    def row(self, **values) -> None:
        if self._writer is not None:
            self._writer.writerow([values[f] for f in self.FIELDS])

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = self._writer = None
