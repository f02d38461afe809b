"""What happens to the simulated workers: relative speeds, crashes and returns.

- `--speeds 1,1,0.5,0.25`: each worker's compute speed relative to the fastest
  (workers.steps.Pace makes a step take 1/speed times its measured full-speed step).
- `--kill 2@100,3@150`: worker 2 is killed (SIGKILL, as a device that loses power
  or network) when its clock reaches 100 (the process kills itself there, so the
  step is exact however fast steps are); `--rejoin 2@200`: it comes back, with
  its old id, once the run reaches step 200 (the largest clock among the live
  workers; in bsp the round).
- `--churn leave:R,join:R`: every live worker leaves at random at rate R per
  second of training, and every one that left comes back at rate R per second.
  A departure is a crash (SIGKILL), or with `graceful:F` a graceful leave with
  probability F: SIGTERM, upon which the worker ends its step, says goodbye and
  exits (a device its user switches off), SIGKILL if it has not within
  `LEAVE_GRACE` seconds.

`Director` decides (pure: clock, randomness and observations are handed in);
`Fleet` owns the worker processes and carries the decisions out.
"""

from __future__ import annotations

import logging
import math
import os
import random
import signal
from dataclasses import dataclass, field

from .errors import ConfigError

log = logging.getLogger(__name__)

KILL, LEAVE, START = "kill", "leave", "start"
LEAVE_GRACE = 10.0  # seconds a worker asked to leave has to exit before it is killed


def parse_speeds(text: str, workers: int) -> tuple[float, ...]:
    """Relative speeds, scaled so that the fastest is 1; a missing or empty entry is 1
    (`0.5` with two workers: worker 0 at half the speed of worker 1)."""
    items = [x.strip() for x in text.split(",")] if text.strip() else []
    try:
        speeds = [float(x) if x else 1.0 for x in items]
    except ValueError:
        speeds = [-1.0]
    if not all(math.isfinite(s) and s > 0 for s in speeds):
        raise ConfigError(f"--speeds takes positive numbers, one per worker, e.g. 1,1,0.5,0.25; got {text!r}")
    if len(speeds) > workers:
        raise ConfigError(f"--speeds names {len(speeds)} workers but there are {workers} (--workers)")
    speeds += [1.0] * (workers - len(speeds))
    top = max(speeds, default=1.0)
    return tuple(s / top for s in speeds)


def parse_schedule(text: str, option: str, workers: int, first: int = 0) -> tuple[tuple[int, int], ...]:
    """(worker, step) pairs from `W@S,W@S`, each step at least `first`."""
    out = []
    for item in (x.strip() for x in text.split(",")):
        if not item:
            continue
        w, at, s = item.partition("@")
        try:
            pair = (int(w), int(s))
        except ValueError:
            pair = (-1, -1)
        if not at or pair[1] < first or not 0 <= pair[0] < workers:
            raise ConfigError(f"{option} takes WORKER@STEP items (worker 0..{workers - 1}, step >= {first}), "
                              f"e.g. 2@100,3@150; got {item!r}")
        out.append(pair)
    return tuple(out)


@dataclass(frozen=True)
class Churn:
    leave: float = 0.0  # per live worker, departures per second
    join: float = 0.0  # per departed worker, returns per second
    graceful: float = 0.0  # the share of departures that are graceful leaves, not crashes

    @classmethod
    def parse(cls, text: str) -> Churn:
        rates = {}
        for item in (x.strip() for x in text.split(",")):
            if not item:
                continue
            name, _, value = item.partition(":")
            try:
                rate = float(value)
            except ValueError:
                rate = -1.0
            if (name not in ("leave", "join", "graceful") or name in rates or not (math.isfinite(rate) and rate >= 0)
                    or (name == "graceful" and rate > 1)):
                raise ConfigError(f"--churn takes leave:RATE,join:RATE (per second, >= 0) and graceful:SHARE "
                                  f"(0 to 1), e.g. leave:0.1,join:0.1,graceful:0.5; got {item!r}")
            rates[name] = rate
        return cls(**rates)

    def __bool__(self) -> bool:
        return self.leave > 0 or self.join > 0


@dataclass(frozen=True)
class Scenario:
    speeds: tuple[float, ...] = ()
    kills: tuple[tuple[int, int], ...] = ()
    rejoins: tuple[tuple[int, int], ...] = ()
    churn: Churn = field(default_factory=Churn)

    def __post_init__(self):
        for w in {w for w, _ in self.kills + self.rejoins}:
            kinds = [k for _, _, k in self.plan(w)]
            if any(a == b for a, b in zip(kinds, kinds[1:])) or kinds[0] == START:
                raise ConfigError(f"worker {w}: --kill and --rejoin must alternate, starting with a kill "
                                  f"(got {', '.join(f'{k} at {s}' for s, _, k in self.plan(w))})")

    def plan(self, worker: int) -> list[tuple[int, int, str]]:
        """The worker's scheduled (step, order, kill|start), in the order they happen;
        at the same step a kill comes before a return."""
        return sorted([(s, 0, KILL) for w, s in self.kills if w == worker]
                      + [(s, 1, START) for w, s in self.rejoins if w == worker])

    @property
    def active(self) -> bool:
        return bool(self.kills or self.rejoins or self.churn)


class Director:
    """Decides, at each look at the run, which workers to kill and which to start again."""

    def __init__(self, scenario: Scenario, workers: int, steps: int, rng: random.Random):
        self.scenario, self.steps, self.rng = scenario, steps, rng
        self.pending = {w: [(s, k) for s, _, k in scenario.plan(w)] for w in range(workers)}
        self.down: set[int] = set()  # killed, not started again yet
        self.churned: set[int] = set()  # of those, the ones churn took (churn brings them back)
        self.done: set[int] = set()  # trained to the last step
        self.run_step = 0  # the largest clock seen

    def kill_at(self, worker: int) -> int:
        """The clock at which the worker's next process is to kill itself (0: never;
        scheduled kills are at step 1 or later: the process ends itself after a step)."""
        events = self.pending[worker]
        return events[0][0] if events and events[0][1] == KILL else 0

    def decide(self, dt: float, clocks: dict[int, int], alive: set[int], killed: set[int] = frozenset()
               ) -> list[tuple[str, int]]:
        """Actions for a look `dt` seconds after the last one. `clocks`: the live
        workers' clocks; `alive`: the workers whose process runs; `killed`: those
        whose process has killed itself, as scheduled, since the last look."""
        self.done |= {w for w, c in clocks.items() if c >= self.steps}
        for w in killed:
            if self.kill_at(w):
                self.pending[w].pop(0)
            self.down.add(w)
        self.run_step = run_step = max(self.run_step, *clocks.values()) if clocks else self.run_step
        actions = []
        for w, events in self.pending.items():
            if events and events[0][1] == START and w in self.down and (run_step >= events[0][0] or not alive):
                actions.append((START, w))  # with nobody left to move the run on: come back now
                events.pop(0)
        actions += self._churn(dt, clocks, alive, {w for _, w in actions})
        for kind, w in actions:
            if kind in (KILL, LEAVE):
                self.down.add(w)
            else:
                self.down.discard(w)
                self.churned.discard(w)
        return actions

    def _churn(self, dt: float, clocks: dict[int, int], alive: set[int], taken: set[int]) -> list[tuple[str, int]]:
        churn, out = self.scenario.churn, []
        if not churn:
            return out
        p_leave, p_join = 1 - math.exp(-churn.leave * dt), 1 - math.exp(-churn.join * dt)
        for w in sorted(set(clocks) - self.down - self.done - taken):
            if self.rng.random() < p_leave:
                # drawn only with graceful leaves on: a seed's crashes stay what they were
                graceful = churn.graceful > 0 and self.rng.random() < churn.graceful
                out.append((LEAVE if graceful else KILL, w))
                self.churned.add(w)
        for w in sorted(self.churned - taken):
            # with nobody left to move the run on, a worker that is coming back comes now
            if w in self.down and churn.join > 0 and (self.rng.random() < p_join or not alive):
                out.append((START, w))
        return out

    @property
    def waiting(self) -> bool:
        """A worker is down and due back: the run is not over while no process runs."""
        scheduled = any(self.pending[w] and self.pending[w][0][1] == START for w in self.down)
        return scheduled or bool(self.churned and self.scenario.churn.join > 0)


class Fleet:
    """The worker processes of a simulation: worker i always joins as id i, so a
    process started again takes over that worker's id, partition and clock."""

    def __init__(self, spawn, director: Director):
        # spawn(worker, run number, kill_at) -> a started multiprocessing.Process whose
        # `reached.value` is the clock at which it killed itself, once it has
        self.spawn = spawn
        self.director = director
        self.procs: dict[int, list] = {}  # worker -> its processes, the newest last
        self.killed: set[int] = set()  # pids ended on purpose (by us, or by themselves as scheduled)
        self.self_killing: set[int] = set()  # pids of processes that kill themselves at a clock
        self.events: list[dict] = []

    def start(self, worker: int, t: float, clock: int | None = None) -> None:
        runs = self.procs.setdefault(worker, [])
        kill_at = self.director.kill_at(worker)
        runs.append(self.spawn(worker, len(runs), kill_at))
        if kill_at:
            self.self_killing.add(runs[-1].pid)
        if runs[:-1]:
            self.events.append({"t": t, "worker": worker, "event": "restarted", "clock": clock})

    def _killed_itself(self, p) -> bool:
        """The process ended by its own scheduled SIGKILL."""
        return p.pid in self.self_killing and p.exitcode == -signal.SIGKILL

    def self_killed(self, t: float) -> set[int]:
        """Workers whose newest process has killed itself as scheduled since the last call."""
        out = set()
        for w, runs in self.procs.items():
            p = runs[-1]
            if self._killed_itself(p) and p.pid not in self.killed:
                self.killed.add(p.pid)
                self.events.append({"t": t, "worker": w, "event": "killed", "clock": p.reached.value})
                out.add(w)
        return out

    def kill(self, worker: int, t: float, clock: int | None, graceful: bool = False) -> None:
        """SIGKILL, a crash; `graceful`: SIGTERM first, upon which the worker ends its step,
        leaves and exits 0, and SIGKILL only if it has not within LEAVE_GRACE seconds."""
        p = self.procs[worker][-1]
        event = "left" if graceful else "killed"
        if p.is_alive():
            # ended on purpose, however it ends: one asked to leave before it had joined dies of the signal
            self.killed.add(p.pid)
            if graceful:
                os.kill(p.pid, signal.SIGTERM)
                p.join(LEAVE_GRACE)
            if p.is_alive():
                os.kill(p.pid, signal.SIGKILL)
                p.join(5)
            event = "left" if p.exitcode == 0 else "killed"
            log.info("worker %d (pid %d) %s at clock %s", worker, p.pid, event, clock)
        self.events.append({"t": t, "worker": worker, "event": event, "clock": clock})

    def alive(self) -> set[int]:
        return {w for w, runs in self.procs.items() if runs[-1].is_alive()}

    def busy(self) -> bool:
        """A process runs, a worker is due back, or a scheduled kill has not been looked
        at yet (its return may be due): the simulation goes on."""
        unseen = any(self._killed_itself(runs[-1]) and runs[-1].pid not in self.killed
                     for runs in self.procs.values())
        return bool(self.alive()) or unseen or self.director.waiting

    def all(self) -> list:
        return [p for runs in self.procs.values() for p in runs]

    def failed(self) -> list[str]:
        """Processes that ended badly, not counting those killed on purpose."""
        return [f"{p.name} (exit code {p.exitcode})" for p in self.all()
                if p.exitcode not in (0, None) and p.pid not in self.killed and not self._killed_itself(p)]

    def step(self, dt: float, t: float, clocks: dict[int, int]) -> None:
        """One look at the run: let the director decide, and do what it says."""
        killed = self.self_killed(t)
        actions = self.director.decide(dt, clocks, self.alive(), killed)
        for kind, w in actions:
            if kind in (KILL, LEAVE):
                self.kill(w, t, clocks.get(w), graceful=kind == LEAVE)
            else:  # noted with the run's step: the largest live clock
                self.start(w, t, self.director.run_step)
