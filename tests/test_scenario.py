"""Simulation scenarios without processes or sockets: the option parsers, Scenario,
Director's decisions, Fleet's bookkeeping (fake processes), the worker's Pace,
local_update (against torch.optim.SGD), StepLog, the report merge, and where a
returning worker's clock starts (membership.Members.join)."""

from __future__ import annotations

import copy
import csv
import json
import math
import random
import signal
import statistics
import types

import numpy as np
import pytest
import torch

from paramserver import scenario, sharding, simreport, tasks
from paramserver.errors import ConfigError
from paramserver.membership import Members
from paramserver.protocol import VERSION, Heartbeat
from paramserver.scenario import (
    KILL,
    LEAVE,
    START,
    Churn,
    Director,
    Fleet,
    Scenario,
    parse_schedule,
    parse_speeds,
)
from workers.steps import Pace, StepLog, local_update

# -- parse_speeds ------------------------------------------------------------------


@pytest.mark.parametrize(("text", "workers", "speeds"), [
    ("1,1,0.5,0.25", 4, (1.0, 1.0, 0.5, 0.25)),
    ("2,1,0.5", 3, (1.0, 0.5, 0.25)),  # scaled so that the fastest is 1
    ("4,4", 2, (1.0, 1.0)),
    ("1,0.5", 3, (1.0, 0.5, 1.0)),  # a worker left out runs at full speed
    ("0.5", 2, (0.5, 1.0)),  # ... that is, at 1, before the scaling
    ("1,,0.5", 3, (1.0, 1.0, 0.5)),  # an empty entry keeps its place
    ("", 2, (1.0, 1.0)),
    (" 1 , 0.5 ", 2, (1.0, 0.5)),
])
def test_parse_speeds(text, workers, speeds):
    assert parse_speeds(text, workers) == pytest.approx(speeds)


@pytest.mark.parametrize(("text", "workers"), [
    ("0", 2), ("1,-1", 2), ("x", 2), ("nan", 1), ("inf", 1), ("1e400", 1), ("1;0.5", 2),
    ("1,1,1", 2),  # more speeds than workers
])
def test_parse_speeds_refuses_what_is_not_one_positive_speed_per_worker(text, workers):
    with pytest.raises(ConfigError, match="--speeds"):
        parse_speeds(text, workers)


# -- parse_schedule ----------------------------------------------------------------


@pytest.mark.parametrize(("text", "schedule"), [
    ("2@100,3@150", ((2, 100), (3, 150))),
    (" 2@100 , ", ((2, 100),)),
    ("3@7,0@7,3@9", ((3, 7), (0, 7), (3, 9))),  # in the order given; Scenario.plan sorts
    ("", ()),
])
def test_parse_schedule(text, schedule):
    assert parse_schedule(text, "--kill", 4) == schedule


@pytest.mark.parametrize("option", ["--kill", "--rejoin"])
@pytest.mark.parametrize("text", ["4@1", "-1@5", "2@-1", "2", "2@", "@5", "2@x", "2@1.5", "2@100@3", "two@1"])
def test_parse_schedule_refuses_a_bad_item_and_names_the_option(option, text):
    with pytest.raises(ConfigError, match=option):
        parse_schedule(text, option, 4)


def test_a_kill_is_at_step_1_or_later():
    """A process kills itself after a step, and kill_at 0 means never: --kill takes first=1."""
    with pytest.raises(ConfigError, match="step >= 1"):
        parse_schedule("1@0", "--kill", 2, first=1)
    assert parse_schedule("1@1", "--kill", 2, first=1) == ((1, 1),)
    assert Director(Scenario(kills=((1, 1),)), workers=2, steps=10, rng=random.Random(0)).kill_at(1) == 1


# -- Churn.parse -------------------------------------------------------------------


@pytest.mark.parametrize(("text", "churn", "active"), [
    ("leave:0.1,join:0.2", Churn(0.1, 0.2), True),
    ("join:0.2 , leave:0.1", Churn(0.1, 0.2), True),
    ("leave:0.5", Churn(0.5, 0.0), True),
    ("join:1", Churn(0.0, 1.0), True),
    ("leave:0,join:0", Churn(), False),
    ("", Churn(), False),
    ("leave:0.1,join:0.2,graceful:0.5", Churn(0.1, 0.2, 0.5), True),
    ("graceful:1", Churn(graceful=1.0), False),  # a share of no departures
])
def test_churn_parse(text, churn, active):
    parsed = Churn.parse(text)
    assert parsed == churn and bool(parsed) is active


@pytest.mark.parametrize("text", ["leave", "leave:", "leave:-1", "leave:x", "leave:inf", "join:nan", "stay:1",
                                  "leave:1,leave:2", "leave=1", "graceful:1.5", "graceful:-0.1", "graceful:x"])
def test_churn_parse_refuses_a_bad_item(text):
    with pytest.raises(ConfigError, match="--churn"):
        Churn.parse(text)


# -- Scenario ----------------------------------------------------------------------


def test_plan_sorts_a_workers_events_and_puts_a_kill_before_a_return_at_the_same_step():
    s = Scenario(kills=((2, 300), (2, 100), (1, 50)), rejoins=((2, 200), (1, 50)))
    assert s.plan(2) == [(100, 0, KILL), (200, 1, START), (300, 0, KILL)]
    assert s.plan(1) == [(50, 0, KILL), (50, 1, START)]
    assert s.plan(0) == []


@pytest.mark.parametrize(("kills", "rejoins"), [
    ((), ((1, 10),)),  # a return with no kill before it
    (((1, 10), (1, 20)), ()),  # killed twice
    (((1, 20),), ((1, 10),)),  # back before it was killed
    (((1, 10),), ((1, 20), (1, 30))),  # back twice
])
def test_kills_and_returns_must_alternate_starting_with_a_kill(kills, rejoins):
    with pytest.raises(ConfigError, match="worker 1: --kill and --rejoin must alternate"):
        Scenario(kills=kills, rejoins=rejoins)


@pytest.mark.parametrize(("s", "active"), [
    (Scenario(), False),
    (Scenario(speeds=(1.0, 0.5)), False),  # speeds alone change nobody's membership
    (Scenario(kills=((0, 5),)), True),
    (Scenario(churn=Churn(join=0.1)), True),
])
def test_scenario_active(s, active):
    assert s.active is active


# -- Director ----------------------------------------------------------------------


class Draws:
    """A stand-in for random.Random that hands out given values and fails when they run out,
    so a test also sees which draws were made."""

    def __init__(self, *values: float):
        self.values = list(values)

    def random(self) -> float:
        assert self.values, "the director drew more random numbers than expected"
        return self.values.pop(0)


def director(kills=(), rejoins=(), churn: Churn | None = None, workers=3, steps=100, rng=None) -> Director:
    return Director(Scenario(kills=kills, rejoins=rejoins, churn=churn or Churn()), workers, steps, rng or Draws())


def test_kill_at_is_the_next_scheduled_kill_and_advances_as_the_plan_is_carried_out():
    d = director(kills=((1, 5), (1, 20)), rejoins=((1, 10),))
    assert (d.kill_at(0), d.kill_at(1)) == (0, 5)
    assert d.decide(0.1, {0: 6}, {0}, killed={1}) == []
    assert d.kill_at(1) == 0  # down, due back: its next process must not kill itself
    assert d.decide(0.1, {0: 10}, {0}) == [(START, 1)]
    assert d.kill_at(1) == 20 and d.down == set()


@pytest.mark.parametrize(("clocks", "alive", "started"), [
    ({0: 9, 2: 9}, {0, 2}, False),
    ({0: 10, 2: 3}, {0, 2}, True),  # the run's step is the largest clock, not the smallest
    ({0: 14}, {0}, True),
    ({0: 9, 2: 9}, set(), True),  # nobody left to move the run on: back at once
    ({}, set(), True),
])
def test_a_scheduled_return_waits_for_the_runs_step_or_for_an_empty_run(clocks, alive, started):
    d = director(kills=((1, 5),), rejoins=((1, 10),))
    assert d.decide(0.1, {0: 6, 2: 4}, {0, 2}, killed={1}) == []
    assert d.decide(0.1, clocks, alive) == ([(START, 1)] if started else [])
    later = d.decide(0.1, {0: 50, 2: 50}, {0, 2})
    assert later == ([] if started else [(START, 1)])  # started exactly once
    assert d.decide(0.1, {0: 60, 1: 50, 2: 60}, {0, 1, 2}) == [] and d.down == set()


def test_a_return_already_due_when_the_kill_is_reported_happens_in_the_same_look():
    d = director(kills=((1, 5),), rejoins=((1, 10),))
    assert d.decide(0.1, {0: 12}, {0, 2}, killed={1}) == [(START, 1)]
    assert d.run_step == 12


def test_the_runs_step_never_goes_back():
    d = director(kills=((1, 5),), rejoins=((1, 10),))
    d.decide(0.1, {0: 11, 2: 3}, {0, 2})  # before the kill
    # the leader's clock is missing from this look, but the run has been at 11
    assert d.decide(0.1, {2: 4}, {0, 2}, killed={1}) == [(START, 1)]
    assert d.run_step == 11


def test_without_a_scheduled_return_a_killed_worker_stays_down():
    d = director(kills=((1, 5),))
    assert d.decide(0.1, {0: 6}, {0}, killed={1}) == []
    assert d.decide(0.1, {}, set()) == []
    assert d.down == {1} and not d.waiting


@pytest.mark.parametrize(("rate", "dt"), [(0.1, 0.1), (1.0, 0.5), (2.0, 3.0)])
@pytest.mark.parametrize("side", [-1, 1])
def test_churn_kills_a_live_worker_with_probability_1_minus_exp_of_rate_times_dt(rate, dt, side):
    """A draw just under 1 - exp(-rate*dt) kills, one just over does not (rate*dt, or a
    rate per look, would decide these differently)."""
    p = 1 - math.exp(-rate * dt)
    d = director(churn=Churn(leave=rate), workers=1, rng=Draws(p + side * 1e-9))
    assert d.decide(dt, {0: 3}, {0}) == ([(KILL, 0)] if side < 0 else [])
    assert d.down == ({0} if side < 0 else set())


@pytest.mark.parametrize(("rate", "dt"), [(0.1, 0.1), (1.0, 0.5), (2.0, 3.0)])
@pytest.mark.parametrize("side", [-1, 1])
def test_churn_brings_a_crashed_worker_back_with_probability_1_minus_exp_of_rate_times_dt(rate, dt, side):
    p = 1 - math.exp(-rate * dt)
    # worker 1 has finished (clock = steps): it is alive but never drawn for
    d = director(churn=Churn(leave=1.0, join=rate), workers=2, rng=Draws(0.0, p + side * 1e-9))
    assert d.decide(0.5, {0: 5, 1: 100}, {0, 1}) == [(KILL, 0)]
    assert d.waiting
    assert d.decide(dt, {1: 100}, {1}) == ([(START, 0)] if side < 0 else [])
    assert d.churned == (set() if side < 0 else {0})


@pytest.mark.parametrize(("draw", "kind"), [(0.29, LEAVE), (0.31, KILL)])
def test_with_graceful_a_second_draw_makes_a_departure_a_leave_with_that_probability(draw, kind):
    d = director(churn=Churn(leave=1.0, join=1.0, graceful=0.3), workers=1, rng=Draws(0.0, draw, 0.0))
    assert d.decide(0.5, {0: 3}, {0}) == [(kind, 0)]
    assert d.down == {0} and d.churned == {0} and d.waiting
    assert d.decide(0.5, {}, set()) == [(START, 0)]  # back as a crashed worker comes back


def test_churn_brings_a_crashed_worker_back_at_once_when_nobody_is_alive():
    d = director(churn=Churn(leave=1.0, join=0.01), workers=1, rng=Draws(0.0, 0.999))
    assert d.decide(0.5, {0: 5}, {0}) == [(KILL, 0)]
    assert d.decide(0.1, {}, set()) == [(START, 0)]


def test_churn_draws_only_for_live_workers_that_are_not_down_or_done():
    # worker 0: finished; worker 1: down as scheduled; worker 3: starting again this look
    d = director(kills=((1, 5), (3, 5)), rejoins=((3, 6),), churn=Churn(leave=1.0), workers=5,
                 rng=Draws(0.0, 0.0))
    actions = d.decide(1.0, {0: 100, 1: 5, 2: 7, 3: 5, 4: 8}, {0, 2, 4}, killed={1, 3})
    assert actions == [(START, 3), (KILL, 2), (KILL, 4)]  # two draws: workers 2 and 4, in order
    assert d.down == {1, 2, 4} and d.churned == {2, 4} and d.done == {0}


def test_churn_with_the_same_seed_makes_the_same_decisions():
    def play(seed: int) -> list:
        d = Director(Scenario(churn=Churn(leave=0.5, join=0.5)), 4, 10_000, random.Random(seed))
        out = []
        for look in range(200):
            live = set(range(4)) - d.down
            out.append(d.decide(0.2, dict.fromkeys(live, look), live))
        return out

    first = play(7)
    assert first == play(7)
    assert first != play(8)
    kinds = [k for actions in first for k, _ in actions]
    assert KILL in kinds and START in kinds  # the run did churn: the comparison means something


@pytest.mark.parametrize(("d", "killed", "waiting"), [
    (director(kills=((1, 5),), rejoins=((1, 10),)), set(), False),  # nobody down yet
    (director(kills=((1, 5),), rejoins=((1, 10),)), {1}, True),
    (director(kills=((1, 5),)), {1}, False),  # down for good
])
def test_waiting_for_a_scheduled_return(d, killed, waiting):
    d.decide(0.1, {0: 6}, {0, 2}, killed=killed)
    assert d.waiting is waiting


@pytest.mark.parametrize(("join", "waiting"), [(0.5, True), (0.0, False)])
def test_waiting_for_a_churned_worker_depends_on_the_join_rate(join, waiting):
    d = director(churn=Churn(leave=1.0, join=join), workers=1, rng=Draws(0.0))
    assert d.decide(1.0, {0: 5}, {0}) == [(KILL, 0)]
    assert d.waiting is waiting


def test_a_worker_churn_took_before_its_scheduled_kill_is_not_due_back_with_join_0():
    d = director(kills=((1, 50),), churn=Churn(leave=1.0), workers=2, rng=Draws(0.0, 0.0))
    assert d.decide(5.0, {0: 5, 1: 5}, {0, 1}) == [(KILL, 0), (KILL, 1)]
    assert not d.waiting


# -- Fleet (fake processes) --------------------------------------------------------


class FakeProcess:
    def __init__(self, pid: int, name: str):
        self.pid, self.name, self.exitcode = pid, name, None
        self.on_sigterm: int | None = 0  # its exit code on SIGTERM (0: left); None: it goes on
        self.reached = types.SimpleNamespace(value=0)  # the clock it kills itself at, once it has

    def kill_itself(self, clock: int) -> None:
        self.reached.value, self.exitcode = clock, -signal.SIGKILL

    def is_alive(self) -> bool:
        return self.exitcode is None

    def join(self, timeout=None) -> None:
        pass


class Spawner:
    """spawn(worker, run, kill_at) as Fleet expects; remembers every call and process."""

    def __init__(self):
        self.calls: list[tuple[int, int, int]] = []
        self.by_pid: dict[int, FakeProcess] = {}

    def __call__(self, worker: int, run: int, kill_at: int) -> FakeProcess:
        self.calls.append((worker, run, kill_at))
        p = FakeProcess(1000 + len(self.calls), f"ps-worker-{worker}" + (f".{run}" if run else ""))
        self.by_pid[p.pid] = p
        return p


@pytest.fixture
def spawner(monkeypatch):
    """A fake spawn, and os.kill replaced so that Fleet.kill ends a fake process, never a real one."""
    s = Spawner()
    s.signals = []

    def kill(pid, sig):
        s.signals.append((pid, sig))
        p = s.by_pid[pid]
        p.exitcode = p.on_sigterm if sig == signal.SIGTERM else -sig

    monkeypatch.setattr(scenario.os, "kill", kill)
    return s


def newest(fleet: Fleet, worker: int) -> FakeProcess:
    return fleet.procs[worker][-1]


def test_fleet_carries_out_a_scheduled_kill_and_return(spawner):
    fleet = Fleet(spawner, director(kills=((1, 5),), rejoins=((1, 8),), workers=2))
    for w in (0, 1):
        fleet.start(w, t=0.0)
    assert spawner.calls == [(0, 0, 0), (1, 0, 5)]  # worker 1's process kills itself at clock 5
    fleet.step(0.1, 1.0, {0: 3, 1: 3})
    newest(fleet, 1).kill_itself(5)  # it did
    fleet.step(0.1, 2.0, {0: 6})
    assert fleet.director.down == {1} and len(spawner.calls) == 2
    fleet.step(0.1, 3.0, {0: 8})
    assert spawner.calls[2] == (1, 1, 0)  # run 1, nothing more to kill
    assert fleet.alive() == {0, 1} and fleet.failed() == []
    assert fleet.events == [{"t": 2.0, "worker": 1, "event": "killed", "clock": 5},
                            {"t": 3.0, "worker": 1, "event": "restarted", "clock": 8}]
    assert spawner.signals == []  # the worker ended itself; the fleet sent nothing


def test_fleet_reports_a_scheduled_self_kill_once():
    spawn = Spawner()
    fleet = Fleet(spawn, director(kills=((0, 5),), workers=1))
    fleet.start(0, t=0.0)
    assert fleet.self_killed(1.0) == set()
    newest(fleet, 0).kill_itself(5)
    assert fleet.self_killed(2.0) == {0}
    assert fleet.self_killed(3.0) == set()
    assert [e["event"] for e in fleet.events] == ["killed"]


def test_fleet_reports_the_clock_a_process_really_killed_itself_at():
    """A late joiner starts at the others' clock, so its first step can be past the kill's."""
    fleet = Fleet(Spawner(), director(kills=((0, 5),), workers=1))
    fleet.start(0, t=0.0)
    newest(fleet, 0).kill_itself(9)
    fleet.self_killed(1.0)
    assert fleet.events == [{"t": 1.0, "worker": 0, "event": "killed", "clock": 9}]


@pytest.mark.parametrize("exitcode", [0, 1, -signal.SIGKILL])
def test_fleet_only_counts_a_sigkill_of_a_process_meant_to_kill_itself(exitcode):
    fleet = Fleet(Spawner(), director(kills=((0, 5),), workers=2))
    fleet.start(0, t=0.0)
    fleet.start(1, t=0.0)  # worker 1 has no scheduled kill
    newest(fleet, 0).exitcode = exitcode
    newest(fleet, 1).exitcode = -signal.SIGKILL
    assert fleet.self_killed(1.0) == ({0} if exitcode == -signal.SIGKILL else set())


def test_fleet_kills_a_churned_worker_with_sigkill_and_starts_it_again(spawner):
    d = director(churn=Churn(leave=1.0, join=1.0), workers=2, rng=Draws(0.0, 0.99, 0.99, 0.0))
    fleet = Fleet(spawner, d)
    fleet.start(0, t=0.0)
    fleet.start(1, t=0.0)
    fleet.step(0.5, 1.0, {0: 4, 1: 7})  # draws: worker 0 leaves, worker 1 stays
    assert spawner.signals == [(newest(fleet, 0).pid, signal.SIGKILL)]
    assert fleet.alive() == {1}
    fleet.step(0.5, 2.0, {1: 9})  # draws: worker 1 stays, worker 0 returns
    assert spawner.calls[-1] == (0, 1, 0) and fleet.alive() == {0, 1}
    assert fleet.failed() == []  # killed on purpose: not a failure
    assert fleet.events == [{"t": 1.0, "worker": 0, "event": "killed", "clock": 4},
                            {"t": 2.0, "worker": 0, "event": "restarted", "clock": 9}]


@pytest.mark.parametrize(("on_sigterm", "signals", "event"), [
    (0, [signal.SIGTERM], "left"),  # ended its step, said goodbye, exited
    (-signal.SIGTERM, [signal.SIGTERM], "killed"),  # caught before it had joined: the signal ended it
    (None, [signal.SIGTERM, signal.SIGKILL], "killed"),  # did not exit within the grace
])
def test_fleet_asks_a_worker_to_leave_with_sigterm_and_kills_it_if_it_does_not(spawner, on_sigterm, signals, event):
    fleet = Fleet(spawner, director(churn=Churn(leave=1.0, graceful=1.0), workers=2, rng=Draws(0.0, 0.0, 0.99)))
    fleet.start(0, t=0.0)
    fleet.start(1, t=0.0)
    newest(fleet, 0).on_sigterm = on_sigterm
    fleet.step(0.5, 1.0, {0: 4, 1: 7})  # draws: worker 0 leaves, gracefully; worker 1 stays
    assert spawner.signals == [(newest(fleet, 0).pid, s) for s in signals]
    assert fleet.alive() == {1} and fleet.director.down == {0}
    assert fleet.events == [{"t": 1.0, "worker": 0, "event": event, "clock": 4}]
    assert fleet.failed() == []  # ended on purpose, however it ended


def test_fleet_kill_of_a_process_already_gone_sends_nothing(spawner):
    fleet = Fleet(spawner, director(workers=1))
    fleet.start(0, t=0.0)
    newest(fleet, 0).exitcode = 1
    fleet.kill(0, 1.0, clock=3)
    assert spawner.signals == []
    assert fleet.failed() == ["ps-worker-0 (exit code 1)"]  # it had crashed on its own


@pytest.mark.parametrize(("exitcode", "failed"), [(None, False), (0, False), (1, True), (-signal.SIGSEGV, True),
                                                  (-signal.SIGKILL, True)])
def test_fleet_failed_lists_processes_that_ended_badly(exitcode, failed):
    fleet = Fleet(Spawner(), director(workers=2))
    fleet.start(0, t=0.0)
    fleet.start(1, t=0.0)
    newest(fleet, 0).exitcode, newest(fleet, 1).exitcode = exitcode, 0
    assert fleet.failed() == ([f"ps-worker-0 (exit code {exitcode})"] if failed else [])
    assert len(fleet.all()) == 2


def test_fleet_failed_does_not_count_a_scheduled_self_kill_no_look_saw():
    fleet = Fleet(Spawner(), director(kills=((1, 5),), workers=2))
    fleet.start(0, t=0.0)
    fleet.start(1, t=0.0)
    newest(fleet, 0).exitcode, newest(fleet, 1).exitcode = 0, -signal.SIGKILL
    assert fleet.failed() == []


def test_a_run_whose_last_process_kills_itself_as_scheduled_still_waits_for_its_return():
    d = director(kills=((1, 90),), rejoins=((1, 95),), workers=2)
    fleet = Fleet(Spawner(), d)
    fleet.start(0, t=0.0)
    fleet.start(1, t=0.0)
    fleet.step(0.1, 1.0, {0: 100, 1: 60})
    newest(fleet, 0).exitcode = 0  # worker 0 finished
    fleet.step(0.1, 2.0, {1: 80})
    newest(fleet, 1).kill_itself(90)
    assert not fleet.alive() and fleet.busy()  # the kill is still to be looked at
    fleet.step(0.1, 3.0, {})
    assert [e["event"] for e in fleet.events][-2:] == ["killed", "restarted"] and fleet.busy()


# -- Pace --------------------------------------------------------------------------


@pytest.mark.parametrize("speed", [0.0, -0.5, 1.01, 2.0, float("nan"), float("inf")])
def test_pace_refuses_a_speed_outside_0_1(speed):
    with pytest.raises(ConfigError, match="speed"):
        Pace(speed)


WARMUP_STEPS = [50.0, 40.0, 60.0]  # slow first steps, which the measurement must leave out
MEASURED_STEPS = [3.0, 9.0, 1.0, 7.0, 5.0, 2.0, 10.0, 4.0, 8.0, 6.0]  # median 5.5


@pytest.mark.parametrize("speed", [0.25, 0.5, 0.8, 1.0])
def test_pace_measures_the_median_full_speed_step_then_delays_by_a_fixed_amount(speed):
    assert len(WARMUP_STEPS) == Pace.WARMUP and len(MEASURED_STEPS) == Pace.MEASURED
    pace = Pace(speed)
    steps = WARMUP_STEPS + MEASURED_STEPS
    delays = [pace.delay(s) for s in steps]
    assert delays[:-1] == [0.0] * (len(steps) - 1)  # no delay while measuring
    expected = statistics.median(MEASURED_STEPS) * (1 / speed - 1)
    assert delays[-1] == pytest.approx(expected)
    # from then on fixed: the slower steps the delay itself causes (bsp) do not feed back
    assert [pace.delay(s) for s in (0.1, 100.0, 5.5)] == pytest.approx([expected] * 3)


# -- local_update ------------------------------------------------------------------

BATCH = 32


def batches(task, k: int) -> list[np.ndarray]:
    b = tasks.Batches(np.arange(len(task.train[0])), BATCH, seed=(0, 0))
    return [b.at(j) for j in range(k)]


def flat_worker(seed: int = 0):
    """A worker's model as the trainer holds it: parameters and grads views of flat buffers."""
    task = tasks.build("digits-mlp", seed)
    params, grads = sharding.flatten_(task.model, sharding.Layout.of(task.model))
    return task, params, grads


def sgd_oracle(seed: int, chosen: list[np.ndarray], **opts) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
    """torch.optim.SGD on a fresh copy of the model: (start, end) flat weights and the losses."""
    ref = tasks.build("digits-mlp", seed)
    flat = lambda: torch.cat([p.detach().reshape(-1) for p in ref.model.parameters()])  # noqa: E731
    start, opt, losses = flat().clone(), torch.optim.SGD(ref.model.parameters(), **opts), []
    for b in chosen:
        opt.zero_grad()
        loss = ref.loss(ref.model(ref.train[0][b]), ref.train[1][b])
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return start, flat(), losses


@pytest.mark.parametrize(("k", "opts"), [(1, {"lr": 0.1}), (4, {"lr": 0.05}), (3, {"lr": 0.1, "momentum": 0.9})])
def test_local_update_leaves_the_sgd_delta_in_grads_and_the_start_weights_in_params(k, opts):
    task, params, grads = flat_worker()
    chosen = batches(task, k)
    start, end, losses = sgd_oracle(0, chosen, **opts)
    torch.testing.assert_close(params, start, rtol=0, atol=0)  # the same model to begin with
    loss = local_update(task, params, grads, torch.optim.SGD(task.model.parameters(), **opts), chosen)
    assert not torch.equal(start, end)  # training moved the weights: the delta is not trivially 0
    torch.testing.assert_close(grads, start - end)
    torch.testing.assert_close(params, start, rtol=0, atol=0)
    assert loss == pytest.approx(statistics.mean(losses), rel=1e-5)
    # the model still trains the flat buffers: a later pull into params reaches it
    layout = sharding.Layout.of(task.model)
    assert all(p.data_ptr() == params[e.offset:].data_ptr() for e, p in zip(layout.entries, task.model.parameters()))


def test_local_update_twice_from_the_same_weights_gives_the_same_delta():
    task, params, grads = flat_worker()
    sgd = torch.optim.SGD(task.model.parameters(), lr=0.1)
    chosen = batches(task, 3)
    first_loss = local_update(task, params, grads, sgd, chosen)
    first = grads.clone()
    assert local_update(task, params, grads, sgd, chosen) == first_loss
    torch.testing.assert_close(grads, first, rtol=0, atol=0)


# -- StepLog -----------------------------------------------------------------------


def step_row(t: float, worker: int = 0, clock: int = 1, **changes) -> dict:
    row = {"time": t, "worker": worker, "incarnation": 0, "step": clock, "clock": clock, "loss": 0.5,
           "staleness": 0, "step_seconds": 0.01, "compute_seconds": 0.004, "bytes_sent": 100,
           "bytes_received": 200}
    assert set(row) == set(StepLog.FIELDS)  # every field a worker logs, no other
    return {**row, **changes}


def csv_line(row: dict) -> str:
    return ",".join(str(row[f]) for f in StepLog.FIELDS)


def read_csv(path) -> list[list[str]]:
    with open(path, newline="") as f:
        return list(csv.reader(f))


def test_steplog_without_a_path_writes_no_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    log = StepLog()
    log.row(**step_row(1.0))
    log.close()
    assert list(tmp_path.iterdir()) == []


def test_steplog_writes_a_header_then_one_row_per_step_each_on_disk_at_once(tmp_path):
    path = tmp_path / "steps.csv"
    log = StepLog(str(path))
    first = step_row(1.5, clock=1)
    log.row(**first)
    # not closed: a process killed now must have left this row behind
    assert read_csv(path) == [list(StepLog.FIELDS), csv_line(first).split(",")]
    log.close()
    again = StepLog(str(path))  # a second process with the same file appends, with no second header
    again.row(**step_row(2.5, clock=2))
    again.close()
    assert [r[0] for r in read_csv(path)] == ["time", "1.5", "2.5"]


# -- simreport ---------------------------------------------------------------------


def write_log(folder, worker: int, run: int, rows: list[dict], tail: str = "") -> None:
    path = simreport.step_log_path(str(folder), worker, run)
    (folder / "steps").mkdir(exist_ok=True)
    log = StepLog(path)
    for r in rows:
        log.row(**r)
    log.close()
    with open(path, "a") as f:
        f.write(tail)


def test_step_log_path():
    assert simreport.step_log_path("rep", 2, 1) == "rep/steps/worker-2-1.csv"


def test_merge_step_logs_reads_every_workers_rows_sorted_by_time_since_the_start(tmp_path):
    began = 1_700_000_000.0
    write_log(tmp_path, 0, 0, [step_row(began + 0.5, 0, 1), step_row(began + 2.0, 0, 2)])
    write_log(tmp_path, 1, 0, [step_row(began + 1.0, 1, 1, loss=0.25, staleness=2)])
    write_log(tmp_path, 1, 1, [step_row(began + 3.0, 1, 2, incarnation=1)])
    rows = simreport.merge_step_logs(str(tmp_path), began)
    assert [(r["t"], r["worker"], r["process"], r["incarnation"], r["clock"]) for r in rows] == [
        (0.5, 0, 0, 0, 1), (1.0, 1, 0, 0, 1), (2.0, 0, 0, 0, 2), (3.0, 1, 1, 1, 2)]
    assert set(rows[1]) == set(simreport.COLUMNS)
    assert (rows[1]["loss"], rows[1]["staleness"], rows[1]["compute_seconds"], rows[1]["bytes_received"]) == (
        0.25, 2, 0.004, 200)
    assert all(isinstance(rows[0][k], int) for k in ("worker", "step", "clock", "bytes_sent"))


GOOD = csv_line(step_row(1_700_000_009.0, 0, 3))


@pytest.mark.parametrize("bad", [
    ",".join(GOOD.split(",")[:7]),  # cut short by a SIGKILL mid-write
    ",".join(GOOD.split(",")[:-1]),  # one field short
    GOOD[:8],  # cut inside the first field
    GOOD.replace(",3,3,", ",3,x,"),  # not a number
    GOOD.replace(",3,3,", ",3,3.5,"),  # a clock that is not an integer
    GOOD.replace(",0,0,3,", ",,0,3,"),  # an empty field
])
def test_merge_step_logs_skips_a_row_cut_short_or_malformed(tmp_path, bad):
    assert bad != GOOD
    began = 1_700_000_000.0
    last = csv_line(step_row(began + 2.0, 0, 2))  # a good row after the bad one, with no newline at the end
    write_log(tmp_path, 0, 0, [step_row(began + 1.0, 0, 1)], tail=f"{bad}\n{last}")
    rows = simreport.merge_step_logs(str(tmp_path), began)
    assert [(r["t"], r["clock"]) for r in rows] == [(1.0, 1), (2.0, 2)]


def test_merge_step_logs_reads_only_worker_logs(tmp_path):
    write_log(tmp_path, 0, 0, [step_row(11.0)])
    text = (tmp_path / "steps" / "worker-0-0.csv").read_text()
    (tmp_path / "steps" / "other.csv").write_text(text)
    (tmp_path / "worker-0-0.csv").write_text(text)
    assert [r["t"] for r in simreport.merge_step_logs(str(tmp_path), 10.0)] == [1.0]
    assert simreport.merge_step_logs(str(tmp_path / "nothing-here"), 10.0) == []


def lag_oracle(rows: list[dict], every: float) -> dict[int, float]:
    """Over the grid t0, t0+every, ... <= the last row's t: at each point, the workers between
    their first and last row are in the run; each of them adds the leader's clock (among
    them) minus its own, clocks as last logged; the mean is over a worker's own points."""
    workers = {r["worker"] for r in rows}
    first = {w: min(r["t"] for r in rows if r["worker"] == w) for w in workers}
    last = {w: max(r["t"] for r in rows if r["worker"] == w) for w in workers}
    t0, end = min(first.values()), max(last.values())
    sums, counts = dict.fromkeys(workers, 0), dict.fromkeys(workers, 0)
    for t in [t0 + k * every for k in range(int((end - t0) / every) + 1)]:
        active = [w for w in workers if first[w] <= t <= last[w]]
        clocks = {w: max(r["clock"] for r in rows if r["worker"] == w and r["t"] <= t) for w in active}
        for w in active:
            sums[w] += max(clocks.values()) - clocks[w]
            counts[w] += 1
    return {w: sums[w] / counts[w] for w in workers}


def test_worker_summary_against_a_direct_computation():
    # worker 10 leads, then stalls; worker 2 trails, then overtakes. Row times sit between the
    # grid's points (every 0.1 s from 0.1), so no float rounding moves a row across one.
    trace = [(0.1, 10, 1, 0.1), (0.12, 10, 2, 0.1), (0.2, 2, 1, 0.3), (0.34, 10, 3, 0.2), (0.46, 10, 4, 0.1),
             (0.65, 2, 2, 0.5), (0.92, 2, 3, 0.4), (1.23, 2, 4, 0.3), (1.55, 2, 5, 0.3), (1.75, 10, 5, 0.2),
             (1.86, 2, 6, 0.3)]
    rows = [{"t": t, "worker": w, "clock": c, "step_seconds": s, "compute_seconds": s / 2} for t, w, c, s in trace]
    summary = simreport.worker_summary(rows, every=0.1)
    assert list(summary) == ["2", "10"]
    lags = lag_oracle(rows, every=0.1)
    # worker 2 is in the run at 0.2 .. 1.8 (17 points) and trails by 1 (0.2, 0.3), 2 (0.4),
    # 3 (0.5, 0.6), 2 (0.7 .. 0.9), 1 (1.0 .. 1.2), 0 after; worker 10 is in at 0.1 .. 1.7
    # (17 points) and trails by 1 at 1.6 and 1.7: the oracle agrees by hand
    assert lags == pytest.approx({2: 19 / 17, 10: 2 / 17})
    for w in (2, 10):
        mine = [r for r in rows if r["worker"] == w]
        assert summary[str(w)] == pytest.approx({
            "steps": len(mine), "clock": mine[-1]["clock"], "finished_at": mine[-1]["t"],
            "mean_step_seconds": statistics.mean(r["step_seconds"] for r in mine),
            "mean_compute_seconds": statistics.mean(r["compute_seconds"] for r in mine),
            "mean_lag": lags[w]}, abs=1e-3)


def test_worker_summary_of_no_rows_is_empty():
    assert simreport.worker_summary([]) == {}


REPORT = {"task": "digits-mlp", "consistency": "asp", "workers": 2, "shards": 1, "train_seconds": 2.0,
          "updates": 4, "final_accuracy": 0.9, "final_loss": 0.3, "codec": "none",
          "worker_events": [{"t": 0.7, "worker": 1, "event": "killed", "clock": 1}]}


@pytest.mark.parametrize(("n_rows", "plots"), [
    (4, ["accuracy.png", "progress.png", "staleness.png", "bytes.png"]),
    (0, ["accuracy.png"]),  # no step rows: nothing to draw per step
])
def test_write_makes_report_json_metrics_csv_and_png_plots(tmp_path, n_rows, plots):
    rows = [{"t": 0.5 * i, "process": 0, **{k: v for k, v in step_row(0.0, i % 2, i // 2 + 1, staleness=i % 3).items()
                                            if k != "time"}} for i in range(n_rows)]
    folder = tmp_path / "report"
    simreport.write(copy.deepcopy(REPORT), rows, str(folder))
    report = json.loads((folder / "report.json").read_text())
    assert report["plots"] == plots and report["final_accuracy"] == 0.9
    for name in plots:
        assert (folder / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in folder.glob("*.png")) == sorted(plots)
    written = read_csv(folder / "metrics.csv")
    assert written[0] == list(simreport.COLUMNS)
    assert written[1:] == [[str(r[c]) for c in simreport.COLUMNS] for r in rows]


# -- membership.Members.join: where a returning worker's clock starts ---------------


def members_at(clocks: dict[int, int]) -> Members:
    """Members with workers 0..n-1 live, each having reported the given clock."""
    m = Members(heartbeat_timeout=2.0, partitions=0)
    for w, c in sorted(clocks.items()):
        assert m.join(w, "h", w, now=0.0).worker_id == w
        assert m.heartbeat(Heartbeat(v=VERSION, seq=1, worker_id=w, incarnation=0, clock=c), now=1.0)
    return m


def expire_only(m: Members, worker: int) -> None:
    for other in set(m.live) - {worker}:
        m.live[other].last_seen = 9.0
    assert [d.worker_id for d in m.expire(now=4.0)] == [worker]


@pytest.mark.parametrize(("clocks", "gone", "requested", "clock"), [
    # its old incarnation still live (a crashed process's last heartbeat): the others decide
    ({0: 9, 1: 4, 2: 7}, [], 1, 7),
    ({0: 9, 1: 12, 2: 7}, [], 1, 7),
    ({1: 5}, [], 1, 5),  # nobody else live: where it was
    # left or expired, and back to an empty run: where it was
    ({1: 5}, ["leave 1"], 1, 5),
    ({1: 5}, ["expire 1"], 1, 5),
    ({0: 9, 1: 5}, ["leave 1", "leave 0"], 1, 5),
    # back to a run with others live: the slowest of them
    ({0: 9, 1: 5, 2: 7}, ["leave 1"], 1, 7),
    ({0: 9, 1: 5, 2: 7}, ["expire 1"], 1, 7),
    # a newcomer: the slowest live clock, or 0 in an empty run (not someone else's old clock)
    ({0: 9, 1: 4}, [], -1, 4),
    ({0: 9, 1: 4}, ["leave 1"], -1, 9),
    ({0: 9}, ["leave 0"], -1, 0),
])
def test_join_starts_a_returning_worker_at_the_right_clock(clocks, gone, requested, clock):
    m = members_at(clocks)
    for step in gone:
        how, w = step.split()
        if how == "leave":
            assert m.leave(int(w), 0)
        else:
            expire_only(m, int(w))
    joined = m.join(requested, "h", 99, now=5.0)
    assert joined.clock == clock
    assert m.live[joined.worker_id].clock == clock


def test_a_worker_that_leaves_again_resumes_at_its_latest_clock():
    m = members_at({0: 5})
    assert m.leave(0, 0)
    assert m.join(0, "h", 2, now=2.0).clock == 5
    assert m.leave(0, 1)  # left again at once, before any heartbeat: still at 5
    assert m.join(0, "h", 3, now=3.0).clock == 5
    assert m.heartbeat(Heartbeat(v=VERSION, seq=2, worker_id=0, incarnation=2, clock=9), now=3.5)
    assert m.leave(0, 2) and m.join(0, "h", 4, now=4.0).clock == 9  # not the clock saved the first time
    other = members_at({0: 5, 1: 8})
    assert other.leave(0, 0) and other.join(0, "h", 2, now=2.0).clock == 8  # others live: theirs
    assert other.leave(1, 0) and other.leave(0, 1)
    assert other.join(0, "h", 3, now=3.0).clock == 8  # the clock it left with this time


def test_read_metrics_gives_back_the_rows_as_write_typed_them(tmp_path):
    began = 1_700_000_000.0
    write_log(tmp_path, 0, 0, [step_row(began + 0.5, 0, 1), step_row(began + 1.5, 0, 2, loss=0.25)])
    rows = simreport.merge_step_logs(str(tmp_path), began)
    report = {"consistency": "asp", "workers": 1, "shards": 1, "curve": [], "target": 0.95, "time_to_target": None}
    simreport.write(report, rows, str(tmp_path / "report"))
    assert simreport.read_metrics(str(tmp_path / "report")) == rows
