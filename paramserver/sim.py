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

from . import admin, cluster, tasks
from . import log as logsetup
from .config import RunConfig, Timeouts
from .errors import DeadlineExceeded, PSError
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
    progress: bool = True
    log_level: str = "warning"
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
    from workers import WorkerConfig

    if run.consistency.mode == "bsp" and not run.min_workers:
        # the simulation knows how many workers are coming: no round before all are in
        run = dataclasses.replace(run, min_workers=sim.workers)
    started = time.monotonic()
    deadline = started + sim.timeout
    ready, results = cluster.SPAWN.Queue(), cluster.SPAWN.Queue()
    spec = cluster.ServerSpec(run=run, host=sim.host, shards=sim.shards, timeouts=sim.timeouts, log_level=sim.log_level)
    server = cluster.SPAWN.Process(target=cluster.server_main, name="ps-server", args=(spec, ready))
    server.start()
    procs = [server]
    ctx = zmq.Context()
    try:
        address = _server_address(ready, server, sim.timeouts.startup)
        for i in range(sim.workers):
            delay = sim.delays[i] if i < len(sim.delays) else 0.0
            cfg = WorkerConfig(server=address, max_steps=sim.steps, delay=delay, timeouts=sim.timeouts)
            p = cluster.SPAWN.Process(target=worker_main, name=f"ps-worker-{i}", args=(cfg, results, sim.log_level))
            p.start()
            procs.append(p)
        trained_from = _watch(ctx, address, procs[1:], sim, deadline)
        failed = [f"{p.name} (exit code {p.exitcode})" for p in procs[1:] if p.exitcode != 0]
        if failed:
            raise PSError(f"{', '.join(failed)} failed; see the log above")
        worker_results = _drain(results, sim.workers)
        report = _evaluate(ctx, address, run, sim, worker_results)
        report["wall_seconds"] = time.monotonic() - started
        report["train_seconds"] = time.monotonic() - trained_from
        admin.stop(address, ctx=ctx)
        _write(report, sim.report)
        return report
    finally:
        cluster.stop_processes(procs, sim.timeouts.shutdown_grace + 5)
        ctx.term()


def _server_address(ready, server, timeout: float) -> str:
    try:
        address, error = ready.get(timeout=timeout)
    except queue_mod.Empty:
        raise PSError(f"server did not start within {timeout}s (exit code {server.exitcode})") from None
    if error:
        raise PSError(error)
    return address


def _watch(ctx, address: str, workers, sim: SimConfig, deadline: float) -> float:
    """Follow the run until every worker process has exited; returns when training began."""
    progress = _Progress(sim.workers * sim.steps, sim.progress)
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
            for w in info["workers"]:
                best[w["id"]] = max(best.get(w["id"], 0), w["clock"])
            if began is None and len(best) >= sim.workers:
                began = time.monotonic()
            losses = [w["loss"] for w in info["workers"] if not math.isnan(w["loss"])]
            progress.update(sum(min(c, sim.steps) for c in best.values()), losses)
            time.sleep(0.2)
    finally:
        progress.close()
    return began or time.monotonic()


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
        "max_staleness_observed": max((s["max_staleness"] for s in shards), default=0),
        "rejected_messages": sum(s["rejected"] for s in shards),
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
