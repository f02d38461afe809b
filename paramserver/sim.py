"""The local multi-process simulation: a server and W workers as real processes on
loopback, run to the end, evaluated, and written up as a report.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import queue as queue_mod
import random
import signal
import time
from dataclasses import dataclass, field

import torch
import zmq

from . import admin, cluster, linkemu, netfault, simreport, simwatch, tasks
from . import log as logsetup
from .config import SIM_EVAL_EVERY, RunConfig, Timeouts
from .errors import PSError
from .linkemu import LinkSpec
from .scenario import Director, Fleet, Scenario

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
    # a graceful leave of --churn is decided on a status a look old, so its SIGTERM can come
    # after this worker has ended by itself: outside the run it does nothing, and the result
    # still reaches the report (during the run, run_worker's handler takes it: end the step
    # and leave). Ignored once the run is over: interpreter shutdown puts a Python handler
    # back to the default, which would kill the process, but leaves an ignored signal ignored.
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    try:
        result = run_worker(cfg, on_step=crash if kill_at else None, handle_signals=True)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        results.put(dataclasses.asdict(result))
    except PSError as e:
        results.put({"error": str(e), "worker_id": cfg.worker_id})
        raise


def simulate(run: RunConfig, sim: SimConfig) -> dict:
    """Run the simulation to the end; returns the report (also written to sim.report)."""
    if not run.min_workers:
        # the simulation knows how many workers are coming: no training before all are in
        # (bsp: no round; asp, ssp: no weights), else the first ones train alone meanwhile
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
        curve = simwatch.Curve(ctx, address, run, sim)
        watched = simwatch.watch(ctx, address, fleet, sim, deadline, results, on_began=net.begin, curve=curve)
        failed = fleet.failed()
        if failed:
            raise PSError(f"{', '.join(failed)} failed; see the log above")
        ended = sum(p.exitcode == 0 for p in fleet.all())
        worker_results = watched.results + _drain(results, ended - len(watched.results))
        report = _evaluate(watched.final or simwatch.fetch(ctx, address), run, sim, worker_results)
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


def _what_happened(report: dict, sim: SimConfig, watched: simwatch.Watched, fleet: Fleet, curve: simwatch.Curve) -> None:
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


def _drain(results, count: int) -> list[dict]:
    out = []
    for _ in range(count):
        try:
            out.append(results.get(timeout=1.0))
        except queue_mod.Empty:
            break
    return out


def _evaluate(fetched: tuple[dict, torch.Tensor], run: RunConfig, sim: SimConfig, worker_results: list[dict]) -> dict:
    info, flat = fetched
    metrics = tasks.build(run.task, run.seed).evaluate_flat(flat)
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
