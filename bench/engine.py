"""Training runs for benchmarks 3 and 4: paramserver (the real worker loop against a
real server) and torch DDP with gloo, on one pool of worker processes.

The pool's processes are spawned once and take one job at a time, so a run
pays neither for importing torch nor for the stagger of process start-up: every
job of a run is handed out at the same moment, which is also the start barrier.

- ours: `cluster.serve` in a thread of this process (the coordinator is on the
  control path only), its shards as processes; each pool process runs
  `workers.trainer.Trainer`, subclassed only to timestamp steps and to check
  test accuracy every `eval_every` seconds on worker 0.
- DDP: `torch.distributed` with gloo on loopback, one rank per pool process,
  the same model, seed, batch per worker, data order and optimizer
  (paramserver.optim.make, as the shards use); a world of 1 is the
  single-process baseline.

Every run is measured the same way: t0 is the moment the last worker is
connected (joined the coordinator / passed DDP's start barrier); samples/s is
counted over the window where every worker is stepping (from the last worker's
first step to the first worker's last). Where there is no such window (one
worker took all its steps before another finished its first: a few steps of a
large model on a loaded machine), samples/s is every sample over the run, from t0
to the last step, and the run says so (`rate_over`). Time to target is the first
accuracy check at or above it, minus t0.
"""

from __future__ import annotations

import faulthandler
import gc
import importlib
import logging
import os
import queue as queue_mod
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, replace
from datetime import timedelta

import torch
import zmq

from paramserver import admin, cluster, optim, tasks, transport
from paramserver.config import Consistency, OptimizerConfig, RunConfig, Timeouts

from .common import SPAWN, Procs, children, get, parent_gone, reap_children

log = logging.getLogger(__name__)
TIMEOUTS = Timeouts()


@dataclass(frozen=True)
class Workload:
    name: str
    task: str
    steps: int  # per worker
    shards: int
    lr: float  # Adam, on the shards for ours, on every rank for DDP
    eval_every: float = 0.0  # seconds between test-accuracy checks on worker 0; 0: none
    target: float = 0.95
    batch_size: int = 32
    seed: int = 0
    timeout: float = 180.0  # one run, start-up included

    def optimizer(self) -> OptimizerConfig:
        return OptimizerConfig("adam", lr=self.lr)


# -- inside a pool process --------------------------------------------------------------


def pool_main(inbox, outbox, stop_at, parent_pid: int, index: int) -> None:
    transport.tune_allocator()  # as ps-worker does: DDP's ranks run in these processes too
    logging.basicConfig(level=logging.WARNING)
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # Pool.restart asks for stacks of a stuck run
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    importlib.import_module("torch.distributed")  # imported now, not inside a timed run
    importlib.import_module("workers.trainer")

    outbox.put((index, "ready"))
    while not parent_gone(parent_pid):
        try:
            job = inbox.get(timeout=1.0)
        except queue_mod.Empty:
            continue
        if job is None:
            return
        target, args = job
        try:
            module, _, name = target.partition(":")
            out = getattr(importlib.import_module(module), name)(stop_at=stop_at, **args)
        except Exception as e:  # noqa: BLE001 (reported to the bench as a failed run)
            out = {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()}
        outbox.put((index, out))


def _trainer_class():
    from workers.trainer import Trainer

    class TimedTrainer(Trainer):
        """The real worker loop; records when it joined, each step's end, and accuracy checks."""

        def __init__(self, cfg, ctx, eval_every: float, target: float, stop_at):
            super().__init__(cfg, ctx)
            self.eval_every, self.target, self.stop_at = eval_every, target, stop_at
            self.joined_at, self.stamps, self.evals, self._last = None, [], [], -1e9

        def _setup(self, run, joined):
            self.joined_at = time.monotonic()
            super()._setup(run, joined)

        def _report(self, started):
            super()._report(started)
            now = time.monotonic()
            self.stamps.append(now)
            if self.eval_every and now - self._last >= self.eval_every:
                self._last = now
                acc = self.task.evaluate()["accuracy"]  # the weights this step pulled
                self.evals.append((now, acc))
                if acc >= self.target and self.stop_at is not None:
                    self.stop_at.value = 1
            if self.stop_at is not None and self.stop_at.value:
                self.session.finish.set()  # the loop ends before its next pull

    return TimedTrainer


def ps_job(server: str, steps: int, delay: float, eval_every: float, target: float,
           early_stop: bool, stop_at, overlap: bool = False, pipeline: bool = False) -> dict:
    from workers import WorkerConfig

    cfg = WorkerConfig(server=server, max_steps=steps, delay=delay, timeouts=TIMEOUTS, overlap=overlap, pipeline=pipeline)
    ctx = zmq.Context()
    try:
        trainer = _trainer_class()(cfg, ctx, eval_every, target, stop_at if early_stop else None)
        trainer.run()
    finally:
        ctx.term()
    return {"joined": trainer.joined_at, "stamps": trainer.stamps, "evals": trainer.evals}


def ddp_job(rank: int, world: int, store: str, workload: Workload, delay: float, eval_every: float,
            early_stop: bool, stop_at) -> dict:
    import torch.distributed as dist

    task = tasks.build(workload.task, workload.seed)
    if world > 1:
        # a file store: no port to pick and lose to another process in between
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                                timeout=timedelta(seconds=workload.timeout))
    try:
        out = _ddp_train(task, rank, world, workload, delay, eval_every, early_stop, stop_at)
        if world > 1:
            # the DDP wrapper died with _ddp_train's frame; tear the group down only once every
            # rank is past that (destroying it under a live wrapper can hang gloo's threads)
            gc.collect()
            dist.barrier()
    finally:
        if world > 1:
            dist.destroy_process_group()
    return out


def _ddp_train(task, rank: int, world: int, w: Workload, delay: float, eval_every: float,
               early_stop: bool, stop_at) -> dict:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    model = task.model
    net = DistributedDataParallel(model) if world > 1 else model
    opt = optim.make(list(model.parameters()), w.optimizer())
    x, y = task.train
    batches = tasks.Batches(tasks.partition(len(x), 0, rank, w.seed), w.batch_size, seed=(w.seed, rank))
    if world > 1:
        dist.barrier()
    t0, stamps, evals, last = time.monotonic(), [], [], -1e9
    for step in range(w.steps):
        # every rank stops at the same step: ranks are within one step of each other
        if early_stop and stop_at.value and step >= stop_at.value:
            break
        idx = batches.at(step)
        opt.zero_grad()
        task.loss(net(x[idx]), y[idx]).backward()
        if delay:
            time.sleep(delay)
        opt.step()
        now = time.monotonic()
        stamps.append(now)
        if rank == 0 and eval_every and now - last >= eval_every:
            last = now
            evals.append((now, task.evaluate(model)["accuracy"]))
            if early_stop and evals[-1][1] >= w.target and not stop_at.value:
                stop_at.value = step + 3
    final = task.evaluate(model)["accuracy"] if rank == 0 else None
    if final is not None and eval_every:
        evals.append((time.monotonic(), final))  # the end state counts as a check too
    return {"joined": t0, "stamps": stamps, "evals": evals, "final_accuracy": final}


# -- in the bench process ------------------------------------------------------------------


class Pool:
    """`size` spawned processes that each run one job at a time.

    A job is ("package.module:function", kwargs); the function also gets `stop_at`,
    a shared integer that one job of a run can set for the others to see.
    """

    def __init__(self, size: int):
        self.size = size
        self._start()

    def _start(self) -> None:
        self.procs = Procs()
        self.inboxes = [SPAWN.Queue() for _ in range(self.size)]
        self.outbox = SPAWN.Queue()
        self.stop_at = SPAWN.Value("i", 0)
        self.workers = [self.procs.spawn(pool_main, q, self.outbox, self.stop_at, os.getpid(), i, name=f"bench-worker-{i}")
                        for i, q in enumerate(self.inboxes)]
        for _ in range(self.size):
            get(self.outbox, 120, "worker pool start-up", self.workers)

    def run(self, jobs: list[tuple[str, dict]], timeout: float) -> list[dict]:
        """Hand job i to process i, all at once; their results in order. On a timeout the pool restarts."""
        self.stop_at.value = 0
        for q, job in zip(self.inboxes, jobs):
            q.put(job)
        deadline, outs = time.monotonic() + timeout, {}
        try:
            while len(outs) < len(jobs):
                index, out = get(self.outbox, max(0.1, deadline - time.monotonic()), "training run", self.workers)
                outs[index] = out
                if "error" in out:  # the others may wait on it forever (a collective): not for long
                    deadline = min(deadline, time.monotonic() + 10.0)
        except (TimeoutError, RuntimeError) as e:
            self.restart()
            failed = [o["error"] for o in outs.values() if "error" in o]
            raise RuntimeError(f"{e}; {failed[0]}" if failed else str(e)) from None
        errors = [o["error"] for o in outs.values() if "error" in o]
        if errors:
            raise RuntimeError(f"{len(errors)} worker(s) failed: {errors[0]}")
        return [outs[i] for i in range(len(jobs))]

    def restart(self) -> None:
        log.warning("restarting the worker pool; the stacks of its processes follow on stderr")
        for p in self.workers:
            if p.is_alive():
                print(f"---- stacks of {p.name} (pid {p.pid})", file=sys.stderr, flush=True)
                os.kill(p.pid, signal.SIGUSR1)
                time.sleep(0.5)
        self.procs.close(grace=0.0)
        self._start()

    def close(self) -> None:
        for q in self.inboxes:
            q.put(None)
        self.procs.close()


class Server:
    """`cluster.serve` on a thread of this process; its shards are spawned processes."""

    def __init__(self, run: RunConfig, shards: int):
        self.spec = cluster.ServerSpec(run=run, shards=shards, timeouts=TIMEOUTS, log_level="warning")
        self._ready: queue_mod.Queue = queue_mod.Queue()
        self.thread = threading.Thread(target=self._serve, name="bench-server", daemon=True)
        self.thread.start()
        try:
            got = self._ready.get(timeout=TIMEOUTS.startup + 10)
        except queue_mod.Empty:
            raise TimeoutError("server did not start") from None
        if isinstance(got, BaseException):
            raise RuntimeError(f"server failed to start: {got}") from got
        self.address = got

    def _serve(self) -> None:
        try:
            cluster.serve(self.spec, on_ready=self._ready.put)
        except BaseException as e:  # noqa: BLE001 (handed to the bench thread)
            self._ready.put(e)

    def stop(self, ctx: zmq.Context) -> None:
        """Ask the run to end; `join` waits for the shards to be gone."""
        try:
            admin.stop(self.address, timeout=5.0, ctx=ctx)
        except Exception as e:  # noqa: BLE001 (join's deadline and the pool's reaping cover it)
            log.warning("server did not acknowledge stop: %s", e)

    def join(self) -> None:
        self.thread.join(TIMEOUTS.shutdown_grace + TIMEOUTS.request_timeout + 10)
        if self.thread.is_alive():
            log.warning("server thread still running after its deadline")


class Evaluator:
    """Test accuracy of a flat weight vector, for the final model of our runs."""

    def __init__(self):
        self.tasks: dict = {}

    def __call__(self, workload: Workload, flat: torch.Tensor) -> float:
        if workload.task not in self.tasks:
            self.tasks[workload.task] = tasks.build(workload.task, workload.seed)
        return self.tasks[workload.task].evaluate_flat(flat)["accuracy"]


class Runner:
    """Runs training jobs on one pool; ours and DDP measured alike (see the module docstring).

    A stopped server finishes shutting down while the next run's server starts,
    and is joined before the next run is timed.
    """

    def __init__(self, size: int = 4):
        self.before = children()
        self.pool, self.ctx, self.evaluate = Pool(size), zmq.Context(), Evaluator()
        self.stopping: list[Server] = []

    def ours(self, w: Workload, workers: int, mode: str, delays=(), early_stop: bool = False,
             overlap: bool = False, pipeline: bool = False) -> dict:
        from workers.client import fetch_weights

        c = Consistency.parse(mode)
        run = RunConfig(task=w.task, consistency=c, optimizer=w.optimizer(), batch_size=w.batch_size, seed=w.seed,
                        min_workers=workers)  # no worker trains before all are in, as DDP's ranks do not
        server = Server(run, w.shards)
        self._join_stopped()
        try:
            jobs = [("bench.engine:ps_job", {"server": server.address, "steps": w.steps, "delay": _delay(delays, i),
                                             "eval_every": w.eval_every if i == 0 else 0.0, "target": w.target,
                                             "early_stop": early_stop, "overlap": overlap, "pipeline": pipeline})
                    for i in range(workers)]
            outs = self.pool.run(jobs, w.timeout)
            final = self.evaluate(w, fetch_weights(self.ctx, server.address)[1])
        finally:
            server.stop(self.ctx)
            self.stopping.append(server)
        return measure(outs, w, final)

    def ddp(self, w: Workload, workers: int, delays=(), early_stop: bool = False) -> dict:
        self._join_stopped()
        folder = tempfile.mkdtemp(prefix="bench-ddp-")
        try:
            jobs = [("bench.engine:ddp_job", {"rank": i, "world": workers, "store": os.path.join(folder, "store"),
                                              "workload": w, "delay": _delay(delays, i), "eval_every": w.eval_every,
                                              "early_stop": early_stop})
                    for i in range(workers)]
            outs = self.pool.run(jobs, w.timeout)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        return measure(outs, w, outs[0]["final_accuracy"])

    def _join_stopped(self) -> None:
        for s in self.stopping:
            s.join()
        self.stopping.clear()

    def close(self) -> None:
        try:
            self._join_stopped()
            self.pool.close()
            self.ctx.term()
        finally:
            reap_children(self.before)


def _delay(delays, i: int) -> float:
    return delays[i] if i < len(delays) else 0.0


def measure(outs: list[dict], w: Workload, final_accuracy: float) -> dict:
    stamps = [o["stamps"] for o in outs]
    if any(not s for s in stamps):
        raise RuntimeError("a worker took no steps")
    t0 = max(o["joined"] for o in outs)
    first, last = max(s[0] for s in stamps), min(s[-1] for s in stamps)
    inside = sum(1 for s in stamps for t in s if first < t <= last)
    if last > first and inside:
        rate, over = inside * w.batch_size / (last - first), "window"
    else:  # a slower measure, with the first pulls and the tail in it, but a measure
        end = max(s[-1] for s in stamps)
        rate, over = sum(map(len, stamps)) * w.batch_size / (end - t0) if end > t0 else None, "whole run"
    hit = next((t for t, acc in outs[0]["evals"] if acc >= w.target), None)
    if hit is None and w.eval_every and final_accuracy >= w.target:
        hit = max(s[-1] for s in stamps)  # reached between the last check and the end
    return {
        "samples_per_s": rate,
        "rate_over": over,
        "time_to_target": max(0.0, hit - t0) if hit is not None else None,
        "final_accuracy": final_accuracy,
        "steps": [len(s) for s in stamps],
        "train_seconds": max(s[-1] for s in stamps) - t0,
        "trace": [(round(t - t0, 4), acc) for t, acc in outs[0]["evals"]],
    }


def with_steps(w: Workload, steps: int) -> Workload:
    return replace(w, steps=steps)
