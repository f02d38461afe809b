"""The local multi-process simulation: a server and W workers as real processes on
loopback, run to the end, evaluated, and written up as a report.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import queue as queue_mod
import random
import signal
import time
from dataclasses import dataclass, field

import torch
import zmq

from . import admin, cluster, linkemu, netfault, simreport, tasks
from . import log as logsetup
from .config import SIM_EVAL_EVERY, RunConfig, Timeouts
from .errors import DeadlineExceeded, PSError
from .linkemu import LinkSpec
from .progress import Bar
from .scenario import Director, Fleet, Scenario
from .sharding import Layout, unflatten

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SimConfig:
    workers: int = 4
    shards: int = 2
    steps: int = 300  # per worker; a worker started again trains until its clock reaches this
    report: str = "runs/sim"
    host: str = "127.0.0.1"
    # per-worker extra seconds per step (a slow device); missing entries are 0
    delays: tuple[float, ...] = ()
    timeout: float = 900.0  # the whole run, start-up included
    # per-worker network links (linkemu.per_worker); missing entries: a plain loopback link
    links: tuple[LinkSpec, ...] = ()
    progress: bool = True
    log_level: str = "warning"
    # > 0: evaluate the server's weights about this often while training (the report's
    # `curve` and accuracy plot), and note when test accuracy first reaches `target`
    eval_every: float = SIM_EVAL_EVERY
    target: float = 0.95
    until_target: bool = False  # end the run as soon as an evaluation reaches `target`
    pipeline: bool = False  # the workers' --pipeline (asp)
    # relative speeds, kills, returns and churn of the workers (scenario.py)
    scenario: Scenario = field(default_factory=Scenario)
    timeouts: Timeouts = field(default_factory=Timeouts)


def worker_main(cfg, results, log_level="warning", kill_at: int = 0, reached=None):
    """Entry point of a spawned worker process; with `kill_at`, it kills itself
    (SIGKILL, no goodbye: a crash) once its clock reaches that step, first writing
    that clock into the shared cell `reached` (a late joiner starts at the others'
    clock, so it may be past `kill_at` at its first step)."""
    from workers import run_worker

    def crash(trainer):
        if trainer.clock >= kill_at:
            reached.value = trainer.clock
            os.kill(os.getpid(), signal.SIGKILL)

    logsetup.setup(log_level)
    try:
        results.put(dataclasses.asdict(run_worker(cfg, on_step=crash if kill_at else None)))
    except PSError as e:
        results.put({"error": str(e), "worker_id": cfg.worker_id})
        raise


def simulate(run: RunConfig, sim: SimConfig) -> dict:
    """Run the simulation to the end; returns the report (also written to sim.report)."""
    if run.consistency.mode == "bsp" and not run.min_workers:
        # the simulation knows how many workers are coming: no round before all are in
        run = dataclasses.replace(run, min_workers=sim.workers)
    started = time.monotonic()
    deadline = started + sim.timeout
    net = _Network(sim)  # refuses loss/down here, before anything starts, if it cannot drop packets
    ready, results = cluster.SPAWN.Queue(), cluster.SPAWN.Queue()
    spec = cluster.ServerSpec(run=run, host=sim.host, shards=sim.shards, timeouts=sim.timeouts, log_level=sim.log_level)
    server = cluster.SPAWN.Process(target=cluster.server_main, name="ps-server", args=(spec, ready))
    fleet = None
    ctx = zmq.Context()
    try:
        net.open()
        server.start()
        address = _server_address(ready, server, sim.timeouts.startup)
        director = Director(sim.scenario, sim.workers, sim.steps, random.Random(run.seed))
        fleet = _fleet(ctx, address, sim, net, results, director)
        curve = _Curve(ctx, address, run, sim)
        watched = _watch(ctx, address, fleet, sim, deadline, results, on_began=net.begin, curve=curve)
        failed = fleet.failed()
        if failed:
            raise PSError(f"{', '.join(failed)} failed; see the log above")
        ended = sum(p.exitcode == 0 for p in fleet.all())
        worker_results = watched.results + _drain(results, ended - len(watched.results))
        report = _evaluate(watched.final or _fetch(ctx, address), run, sim, worker_results)
        report["wall_seconds"] = time.monotonic() - started
        _what_happened(report, sim, watched, fleet, curve)
        report["link"] = net.close()  # the rules go before anything else can fail
        if watched.final is None:
            admin.stop(address, ctx=ctx)
        rows = simreport.merge_step_logs(sim.report, watched.began_wall)
        report["worker_summary"] = simreport.worker_summary(rows)
        simreport.write(report, rows, sim.report)
        return report
    finally:
        try:
            net.close()
        finally:
            cluster.stop_processes([server, *(fleet.all() if fleet else [])], sim.timeouts.shutdown_grace + 5)
            ctx.term()


def _fleet(ctx, address: str, sim: SimConfig, net: _Network, results, director: Director) -> Fleet:
    """Spawn the worker processes, each as id i and routed over its own link."""
    import shutil

    from workers import WorkerConfig

    # the shard addresses the coordinator will hand out at join, so that links can proxy them too
    shards = [s["address"] for s in admin.status(address, timeout=10.0, ctx=ctx)["shard_map"]] if net.specs else []
    logs = simreport.step_log_dir(sim.report)
    shutil.rmtree(logs, ignore_errors=True)  # a report folder used again: only this run's steps
    os.makedirs(logs)

    speeds = sim.scenario.speeds

    def spawn(i: int, n: int, kill_at: int):
        delay = sim.delays[i] if i < len(sim.delays) else 0.0
        speed = speeds[i] if i < len(speeds) else 1.0
        # the first process trains --steps steps; one started again trains until its clock reaches them
        budget = {"max_steps": sim.steps} if n == 0 else {"max_clock": sim.steps}
        cfg = WorkerConfig(server=address, worker_id=i, delay=delay, speed=speed, timeouts=sim.timeouts, pipeline=sim.pipeline,
                           routes=net.routes(i, [address, *shards]),
                           metrics_csv=simreport.step_log_path(sim.report, i, n), **budget)
        reached = cluster.SPAWN.Value("q", 0, lock=False)  # one writer, read after it is dead
        p = cluster.SPAWN.Process(target=worker_main, name=f"ps-worker-{i}" + (f".{n}" if n else ""),
                                  args=(cfg, results, sim.log_level, kill_at, reached))
        p.start()
        p.reached = reached
        return p

    fleet = Fleet(spawn, director)
    for i in range(sim.workers):
        fleet.start(i, time.monotonic())
    return fleet


def _what_happened(report: dict, sim: SimConfig, watched: _Watched, fleet: Fleet, curve: _Curve) -> None:
    """The run's timeline into the report: training time, the scenario and its events,
    the accuracy curve; every `t` in seconds since training began."""
    s = sim.scenario
    report["train_seconds"] = time.monotonic() - watched.began
    report["membership_events"] = watched.membership
    report["scenario"] = {"speeds": list(s.speeds), "delays": list(sim.delays),
                          "kills": [f"{w}@{t}" for w, t in s.kills], "rejoins": [f"{w}@{t}" for w, t in s.rejoins],
                          "churn": dataclasses.asdict(s.churn)}
    report["worker_events"] = [{**e, "t": round(e["t"] - watched.began, 3)} for e in fleet.events]
    if sim.eval_every > 0:
        curve.point(time.monotonic(), report["final_accuracy"], report["final_loss"], report["updates"])
        report["curve"], report["target"] = curve.resolved(watched.began), sim.target
        report["time_to_target"] = next((p["t"] for p in report["curve"] if p["accuracy"] >= sim.target), None)


class _Network:
    """The simulated links: proxies for delay/jitter/rate, nftables for loss/down."""

    def __init__(self, sim: SimConfig):
        self.specs = {i: s for i, s in enumerate(sim.links[: sim.workers]) if s}
        dropping = {i: s for i, s in self.specs.items() if s.drops}
        if dropping:
            netfault.check_available()
        self.faults = netfault.NetFaults(dropping) if dropping else None
        self.emulator: linkemu.LinkEmulator | None = None
        self.summary: dict = {}

    def open(self) -> None:
        if self.faults:
            self.faults.open()
        if any(s.shapes for s in self.specs.values()):
            self.emulator = linkemu.LinkEmulator()

    def routes(self, worker: int, addresses: list[str]) -> tuple[tuple[str, str], ...]:
        """Worker's (server address, where to connect instead) pairs: through its proxy, from its source."""
        spec = self.specs.get(worker)
        if not spec:
            return ()
        source = self.faults.addresses.get(worker) if self.faults else None
        if spec.shapes:
            return tuple((a, self.emulator.proxy(worker, a, spec, source)) for a in addresses)
        # loss/down only: connect straight, from the worker's own address (ZeroMQ's SOURCE;HOST:PORT)
        return tuple((a, a.replace("tcp://", f"tcp://{source}:0;", 1)) for a in addresses)

    def begin(self) -> None:
        if self.faults:
            self.faults.begin()

    def close(self) -> dict:
        """Remove every rule and proxy (idempotent); what the links did, for the report."""
        if self.faults:
            self.faults.close()
        if self.emulator:
            self.emulator.close()
        if self.specs and not self.summary:
            self.summary = {"specs": {str(i): str(s) for i, s in self.specs.items()},
                            "proxies": {str(i): v for i, v in (self.emulator.stats() if self.emulator else {}).items()},
                            **(self.faults.summary() if self.faults else {})}
        return self.summary


def _server_address(ready, server, timeout: float) -> str:
    try:
        address, error = ready.get(timeout=timeout)
    except queue_mod.Empty:
        raise PSError(f"server did not start within {timeout}s (exit code {server.exitcode})") from None
    if error:
        raise PSError(error)
    return address


@dataclass(frozen=True)
class _Watched:
    began: float  # monotonic: when every worker had been seen
    began_wall: float  # the same moment in Unix time (the workers' step logs use it)
    membership: list[dict]
    final: tuple | None = None  # until_target: (status, weights) when the target was reached
    results: list = field(default_factory=list)  # workers' results, as they came in


def _watch(ctx, address: str, fleet: Fleet, sim: SimConfig, deadline: float, results, on_began=None,
           curve=None) -> _Watched:
    """Follow the run, killing and restarting workers as the scenario says, until no
    worker process runs and none is due back. `results`: the queue finished workers put
    their results on, taken as they come so that the bar counts their last steps (a
    finished worker has left the status, and its process takes a while to exit)."""
    watch = _Watch(ctx, address, fleet, sim, on_began, curve)
    poll = 0.1 if sim.scenario.active else 0.2
    with Bar("training", sim.workers * sim.steps, "{rate} steps/s  loss {loss}  test accuracy {accuracy}",
             sim.progress) as bar:
        while fleet.alive() if watch.final is not None else fleet.busy():
            if time.monotonic() > deadline:
                raise DeadlineExceeded(f"simulation did not finish within {sim.timeout}s")
            try:
                info = admin.status(address, timeout=2.0, ctx=ctx)
            except DeadlineExceeded:
                continue
            watch.look(info, time.monotonic())
            watch.collect(results)
            watch.show(bar, info)
            time.sleep(poll)
        watch.collect(results)  # the last to finish may have exited since the last look
        watch.show(bar)
    return watch.result()


class _Watch:
    """What the watch loop has seen, and what it does on each look at the status."""

    def __init__(self, ctx, address: str, fleet: Fleet, sim: SimConfig, on_began, curve):
        self.ctx, self.address, self.fleet, self.sim = ctx, address, fleet, sim
        self.on_began, self.curve = on_began, curve
        self.members = _Members()
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

    def result(self) -> _Watched:
        if self.began is None:
            self.began, self.began_wall = time.monotonic(), time.time()
        return _Watched(self.began, self.began_wall, self.members.resolved(self.began), self.final, self.results)


class _Members:
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


class _Curve:
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
            _, flat = _fetch(self.ctx, self.address, timeout=5.0)
        except DeadlineExceeded:
            return False
        self.task.model.load_state_dict(unflatten(flat, Layout.of(self.task.model)))
        m = self.task.evaluate()
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


def _drain(results, count: int) -> list[dict]:
    out = []
    for _ in range(count):
        try:
            out.append(results.get(timeout=1.0))
        except queue_mod.Empty:
            break
    return out


def _fetch(ctx, address: str, timeout: float = 10.0) -> tuple[dict, torch.Tensor]:
    """The server's status and weights (workers imported here: they import paramserver)."""
    from workers.client import fetch_weights

    return fetch_weights(ctx, address, timeout)


def _evaluate(fetched: tuple[dict, torch.Tensor], run: RunConfig, sim: SimConfig, worker_results: list[dict]) -> dict:
    info, flat = fetched
    metrics = evaluate_flat(run, flat)
    shards = info["shards"]
    return {
        "final_accuracy": metrics["accuracy"],
        "final_loss": metrics["loss"],
        "steps": sim.steps,
        "updates": info["updates"] if shards else 0,
        "workers": sim.workers,
        "shards": sim.shards,
        "consistency": str(run.consistency),
        "codec": run.codec,
        "pull_codec": run.pull_codec,
        "local_steps": run.local_steps,
        "task": run.task,
        "optimizer": run.optimizer.name,
        "lr": run.optimizer.lr,
        "batch_size": run.batch_size,
        "seed": run.seed,
        "bytes_pushed": sum(s["bytes_pushed"] for s in shards),
        "bytes_pulled": sum(s["bytes_pulled"] for s in shards),
        # per worker id, over all shards: raw (float32) and wire bytes pushed and pulled
        "traffic_by_worker": info.get("traffic", {}),
        "max_staleness_observed": max((s["max_staleness"] for s in shards), default=0),
        "rejected_messages": sum(s["rejected"] for s in shards),
        # per shard: pushes admitted (a resent duplicate is acknowledged, not counted) and updates applied
        "shard_pushes": [{"index": s["index"], "pushes": s["pushes"], "updates": s["updates"]} for s in shards],
        "worker_results": sorted(worker_results, key=lambda r: r.get("worker_id", -1)),
    }


def evaluate_flat(run: RunConfig, flat: torch.Tensor) -> dict:
    """Test accuracy and loss of the flat weights (shape (total,)) on the run's task."""
    task = tasks.build(run.task, run.seed)
    task.model.load_state_dict(unflatten(flat, Layout.of(task.model)))
    return task.evaluate()
