"""The local multi-process simulation: a server and W workers as real processes on
loopback, run to the end, evaluated, and written up as a report.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import queue as queue_mod
import time
from dataclasses import dataclass, field

import torch
import zmq

from . import admin, cluster, linkemu, netfault, tasks
from . import log as logsetup
from .config import RunConfig, Timeouts
from .errors import DeadlineExceeded, PSError
from .linkemu import LinkSpec
from .sharding import Layout, unflatten

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SimConfig:
    workers: int = 4
    shards: int = 2
    steps: int = 300  # per worker
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
    # `curve`), and note when test accuracy first reaches `target`
    eval_every: float = 0.0
    target: float = 0.95
    timeouts: Timeouts = field(default_factory=Timeouts)


def worker_main(cfg, results, log_level="warning"):
    """Entry point of a spawned worker process."""
    from workers import run_worker

    logsetup.setup(log_level)
    try:
        results.put(dataclasses.asdict(run_worker(cfg)))
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
    procs = []
    ctx = zmq.Context()
    try:
        net.open()
        server.start()
        procs.append(server)
        address = _server_address(ready, server, sim.timeouts.startup)
        _start_workers(ctx, address, sim, net, results, procs)
        curve = _Curve(ctx, address, run, sim)
        trained_from, membership = _watch(ctx, address, procs[1:], sim, deadline, on_began=net.begin, curve=curve)
        failed = [f"{p.name} (exit code {p.exitcode})" for p in procs[1:] if p.exitcode != 0]
        if failed:
            raise PSError(f"{', '.join(failed)} failed; see the log above")
        worker_results = _drain(results, sim.workers)
        report = _evaluate(ctx, address, run, sim, worker_results)
        report["wall_seconds"] = time.monotonic() - started
        report["train_seconds"] = time.monotonic() - trained_from
        report["membership_events"] = membership
        if sim.eval_every > 0:
            curve.point(time.monotonic(), report["final_accuracy"], report["final_loss"], report["updates"])
            report["curve"], report["target"] = curve.resolved(trained_from), sim.target
            report["time_to_target"] = next((p["t"] for p in report["curve"] if p["accuracy"] >= sim.target), None)
        report["link"] = net.close()  # the rules go before anything else can fail
        admin.stop(address, ctx=ctx)
        _write(report, sim.report)
        return report
    finally:
        try:
            net.close()
        finally:
            cluster.stop_processes(procs, sim.timeouts.shutdown_grace + 5)
            ctx.term()


def _start_workers(ctx, address: str, sim: SimConfig, net: _Network, results, procs: list) -> None:
    """Spawn the worker processes (appended to procs), each routed over its own link."""
    from workers import WorkerConfig

    # the shard addresses the coordinator will hand out at join, so that links can proxy them too
    shards = [s["address"] for s in admin.status(address, timeout=10.0, ctx=ctx)["shard_map"]] if net.specs else []
    for i in range(sim.workers):
        delay = sim.delays[i] if i < len(sim.delays) else 0.0
        cfg = WorkerConfig(server=address, max_steps=sim.steps, delay=delay, timeouts=sim.timeouts,
                           routes=net.routes(i, [address, *shards]))
        p = cluster.SPAWN.Process(target=worker_main, name=f"ps-worker-{i}", args=(cfg, results, sim.log_level))
        p.start()
        procs.append(p)


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


def _watch(ctx, address: str, workers, sim: SimConfig, deadline: float, on_began=None,
           curve=None) -> tuple[float, list[dict]]:
    """Follow the run until every worker process has exited.

    Returns when training began (every worker seen) and the membership changes seen.
    """
    progress = _Progress(sim.workers * sim.steps, sim.progress)
    members = _Members(workers)
    best: dict[int, int] = {}
    began = None
    try:
        while any(p.is_alive() for p in workers):
            if time.monotonic() > deadline:
                raise DeadlineExceeded(f"simulation did not finish within {sim.timeout}s")
            try:
                info = admin.status(address, timeout=2.0, ctx=ctx)
            except DeadlineExceeded:
                continue
            members.observe(info["workers"], time.monotonic())
            for w in info["workers"]:
                best[w["id"]] = max(best.get(w["id"], 0), w["clock"])
            if began is None and len(best) >= sim.workers:
                began = time.monotonic()
                if on_began is not None:
                    on_began()
            losses = [w["loss"] for w in info["workers"] if not math.isnan(w["loss"])]
            progress.update(sum(min(c, sim.steps) for c in best.values()), losses)
            if curve is not None and began is not None:
                curve.maybe(info["updates"])
            time.sleep(0.2)
    finally:
        progress.close()
    began = began or time.monotonic()
    return began, members.resolved(began)


class _Members:
    """Joins, departures and rejoins of the worker processes, as seen by polling status."""

    def __init__(self, workers):
        self.index = {p.pid: i for i, p in enumerate(workers)}
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
        self.events.append({"t": t, "id": wid, "worker": self.index.get(pid, -1), "incarnation": inc, "event": what})

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
        self.ctx, self.address, self.every = ctx, address, sim.eval_every
        self.task = tasks.build(run.task, run.seed) if sim.eval_every > 0 else None
        self.points: list[dict] = []
        self._next = 0.0

    def maybe(self, updates: int) -> None:
        now = time.monotonic()
        if self.task is None or now < self._next:
            return
        from workers.client import fetch_weights

        self._next = now + self.every
        try:
            _, flat = fetch_weights(self.ctx, self.address, timeout=5.0)
        except DeadlineExceeded:
            return
        self.task.model.load_state_dict(unflatten(flat, Layout.of(self.task.model)))
        m = self.task.evaluate()
        self.point(now, m["accuracy"], m["loss"], updates)

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


def _evaluate(ctx, address: str, run: RunConfig, sim: SimConfig, worker_results: list[dict]) -> dict:
    from workers.client import fetch_weights

    info, flat = fetch_weights(ctx, address)
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


def _write(report: dict, folder: str) -> None:
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "report.json"), "w") as f:
        json.dump(report, f, indent=2, default=float)


class _Progress:
    """A rich progress bar on a terminal; silent otherwise."""

    def __init__(self, total: int, enabled: bool):
        self.bar = None
        if enabled:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
            )

            self.bar = Progress(TextColumn("training"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("{task.fields[rate]} steps/s  loss {task.fields[loss]}"), TimeElapsedColumn())
            self.task = self.bar.add_task("train", total=total, rate="-", loss="-")
            self.bar.start()
            self.t0, self.total = time.monotonic(), total

    def update(self, done: int, losses: list[float]) -> None:
        if self.bar is None:
            return
        loss = f"{sum(losses) / len(losses):.3f}" if losses else "-"
        rate = f"{done / max(1e-9, time.monotonic() - self.t0):.0f}"
        self.bar.update(self.task, completed=done, rate=rate, loss=loss)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=self.total)
            self.bar.stop()
