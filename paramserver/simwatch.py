"""What a simulation sees while it runs: the status polled for the progress bar,
the scenario's kills and returns carried out on time, the workers' joins and
departures, and the test accuracy of the server's weights over time.
"""

from __future__ import annotations

import math
import queue as queue_mod
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from . import admin, tasks
from .config import RunConfig
from .errors import DeadlineExceeded
from .progress import Bar
from .scenario import Fleet

if TYPE_CHECKING:
    from .sim import SimConfig


@dataclass(frozen=True)
class Watched:
    began: float  # monotonic: when every worker had been seen
    began_wall: float  # the same moment in Unix time (the workers' step logs use it)
    membership: list[dict]
    final: tuple | None = None  # until_target: (status, weights) when the target was reached
    results: list = field(default_factory=list)  # workers' results, as they came in


def watch(ctx, address: str, fleet: Fleet, sim: SimConfig, deadline: float, results, on_began=None,
          curve=None) -> Watched:
    """Follow the run, killing and restarting workers as the scenario says, until no
    worker process runs and none is due back. `results`: the queue finished workers put
    their results on, taken as they come so that the bar counts their last steps (a
    finished worker has left the status, and its process takes a while to exit)."""
    seen = Watch(ctx, address, fleet, sim, on_began, curve)
    poll = 0.1 if sim.scenario.active else 0.2
    with Bar("training", sim.workers * sim.steps, "{rate} steps/s  loss {loss}  test accuracy {accuracy}",
             sim.progress) as bar:
        while fleet.alive() if seen.final is not None else fleet.busy():
            if time.monotonic() > deadline:
                raise DeadlineExceeded(f"simulation did not finish within {sim.timeout}s")
            try:
                info = admin.status(address, timeout=2.0, ctx=ctx)
            except DeadlineExceeded:
                continue
            seen.look(info, time.monotonic())
            seen.collect(results)
            seen.show(bar, info)
            time.sleep(poll)
        seen.collect(results)  # the last to finish may have exited since the last look
        seen.show(bar)
    return seen.result()


class Watch:
    """What the watch loop has seen, and what it does on each look at the status."""

    def __init__(self, ctx, address: str, fleet: Fleet, sim: SimConfig, on_began, curve):
        self.ctx, self.address, self.fleet, self.sim = ctx, address, fleet, sim
        self.on_began, self.curve = on_began, curve
        self.members = MemberEvents()
        self.best: dict[int, int] = {}  # worker -> the largest clock seen
        self.began = self.began_wall = self.final = None
        self.last = time.monotonic()
        self.results: list[dict] = []

    def look(self, info: dict, now: float) -> None:
        self.members.observe(info["workers"], now)
        clocks = {w["id"]: w["clock"] for w in info["workers"]}
        for w, c in clocks.items():
            self.best[w] = max(self.best.get(w, 0), c)
        if self.began is None and len(self.best) >= self.sim.workers:
            self.began, self.began_wall = now, time.time()
            if self.on_began is not None:
                self.on_began()
        if self.final is None:  # churn begins with training: before, no time passes for it
            self.fleet.step(now - self.last if self.began is not None else 0.0, now, clocks)
            if self.began is not None and self.curve.maybe(info["updates"]) and self.sim.until_target:
                # the weights that reached the target are the result; the workers
                # finish at their next heartbeat
                self.final = (info, self.curve.weights)
                admin.stop(self.address, ctx=self.ctx)
        self.last = now

    def collect(self, results) -> None:
        """The results finished workers have put on `results` so far, and their last clocks."""
        while True:
            try:
                r = results.get_nowait()
            except queue_mod.Empty:
                return
            self.results.append(r)
            if "clock" in r:
                self.best[r["worker_id"]] = max(self.best.get(r["worker_id"], 0), r["clock"])

    def show(self, bar: Bar, info: dict | None = None) -> None:
        """The bar as of the last look; the mean loss of the workers in `info`, if any
        (once they have finished and left, the bar keeps the last one shown)."""
        fields = {}
        losses = [w["loss"] for w in info["workers"] if not math.isnan(w["loss"])] if info else []
        if losses:
            fields["loss"] = f"{sum(losses) / len(losses):.3f}"
        accuracy = self.curve.latest
        bar.update(sum(min(c, self.sim.steps) for c in self.best.values()),
                   accuracy=f"{accuracy:.3f}" if accuracy is not None else "-", **fields)

    def result(self) -> Watched:
        if self.began is None:
            self.began, self.began_wall = time.monotonic(), time.time()
        return Watched(self.began, self.began_wall, self.members.resolved(self.began), self.final, self.results)


class MemberEvents:
    """Joins, departures and rejoins of the workers (simulated worker i is id i), as seen by polling status."""

    def __init__(self):
        self.live: dict[int, tuple[int, int]] = {}  # worker id -> (incarnation, pid)
        self.events: list[dict] = []

    def observe(self, rows: list[dict], t: float) -> None:
        now = {w["id"]: (w["incarnation"], w["pid"]) for w in rows}
        for wid, (inc, pid) in now.items():
            if self.live.get(wid, (None,))[0] != inc:
                self._event(t, wid, inc, pid, "joined" if inc == 0 else "rejoined")
        for wid, (inc, pid) in self.live.items():
            if wid not in now:
                self._event(t, wid, inc, pid, "gone")
        self.live = now

    def _event(self, t: float, wid: int, inc: int, pid: int, what: str) -> None:
        # t: monotonic here; the report gives it in seconds after training began
        self.events.append({"t": t, "id": wid, "worker": wid, "pid": pid, "incarnation": inc, "event": what})

    def resolved(self, began: float) -> list[dict]:
        """Events with "gone" told apart: "dropped" if that id came back later, else "left"."""
        out = []
        for n, e in enumerate(self.events):
            back = e["event"] == "gone" and any(later["id"] == e["id"] for later in self.events[n + 1:])
            what = ("dropped" if back else "left") if e["event"] == "gone" else e["event"]
            out.append({**e, "t": round(e["t"] - began, 2), "event": what})
        return out


class Curve:
    """Test accuracy of the server's weights over the run (observer pulls, never waited on)."""

    def __init__(self, ctx, address: str, run: RunConfig, sim: SimConfig):
        self.ctx, self.address, self.every, self.target = ctx, address, sim.eval_every, sim.target
        self.task = tasks.build(run.task, run.seed) if sim.eval_every > 0 else None
        self.points: list[dict] = []
        self.weights: torch.Tensor | None = None  # those of the latest point
        self._next = 0.0

    def maybe(self, updates: int) -> bool:
        """Evaluate if one is due; True once test accuracy has reached the target."""
        now = time.monotonic()
        if self.task is None or now < self._next:
            return False
        self._next = now + self.every
        try:
            _, flat = fetch(self.ctx, self.address, timeout=5.0)
        except DeadlineExceeded:
            return False
        m = self.task.evaluate_flat(flat)
        self.point(now, m["accuracy"], m["loss"], updates)
        self.weights = flat
        return m["accuracy"] >= self.target

    @property
    def latest(self) -> float | None:
        return self.points[-1]["accuracy"] if self.points else None

    def point(self, t: float, accuracy: float, loss: float, updates: int) -> None:
        self.points.append({"t": t, "accuracy": accuracy, "loss": loss, "updates": updates})

    def resolved(self, began: float) -> list[dict]:
        """Points with `t` in seconds since training began (every worker seen)."""
        return [{**p, "t": round(p["t"] - began, 3)} for p in self.points]


def fetch(ctx, address: str, timeout: float = 10.0) -> tuple[dict, torch.Tensor]:
    """The server's status and weights (workers imported here: they import paramserver)."""
    from workers.client import fetch_weights

    return fetch_weights(ctx, address, timeout)
