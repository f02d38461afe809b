"""Starting and stopping server processes: shards and the coordinator.

Every child is started with multiprocessing's `spawn` (ZeroMQ contexts and
torch thread pools do not survive `fork`), and every wait for one has a
deadline. A shard exits by itself when its launcher disappears.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import queue as queue_mod
import time

import torch
import zmq

from . import log as logsetup
from . import protocol, sharding, tasks
from .config import RunConfig, Timeouts
from .coordinator import Coordinator
from .errors import ConfigError, PSError
from .shard import ShardCore, ShardServer

log = logging.getLogger(__name__)
SPAWN = multiprocessing.get_context("spawn")


def initial_weights(run: RunConfig) -> tuple[sharding.Layout, torch.Tensor]:
    """The task's seeded initial weights as one flat float32 vector, shape (total,)."""
    model = tasks.build(run.task, run.seed).model
    layout = sharding.Layout.of(model)
    return layout, torch.cat([p.detach().reshape(-1).float() for p in model.parameters()])


def shard_main(index, chunks, run, address, timeouts, ready, parent_pid, log_level="info"):
    logsetup.setup(log_level)
    torch.set_num_threads(1)
    _, flat = initial_weights(run)
    lo, hi = (chunks[0].start, chunks[-1].stop) if chunks else (0, 0)
    ctx = zmq.Context()
    try:
        core = ShardCore(index, chunks, flat[lo:hi], run, timeouts.min_workers_wait)
        server = ShardServer(ctx, core, address, timeouts)
    except zmq.ZMQError as e:
        ready.put((index, None, f"shard {index} cannot bind {address}: {e}"))
        return
    ready.put((index, server.address, None))
    log.info("shard %d serving %d parameters at %s", index, hi - lo, server.address)
    try:
        server.serve(parent_pid=parent_pid)
    except KeyboardInterrupt:  # Ctrl-C reaches the whole process group; the launcher stops us
        pass
    ctx.term()


def shard_address(host: str, port: int, index: int) -> str:
    return f"tcp://{host}:{port + 1 + index if port else 0}"


def start_shards(run: RunConfig, host: str, port: int, count: int, timeouts: Timeouts, log_level: str = "info"):
    """Spawn `count` shard processes; returns (processes, shard specs) once all are bound."""
    layout, _ = initial_weights(run)
    plan = sharding.plan(layout.total, count, run.chunk_elems)
    ready = SPAWN.Queue()
    procs = []
    for i, chunks in enumerate(plan):
        p = SPAWN.Process(target=shard_main, name=f"ps-shard-{i}",
                          args=(i, chunks, run, shard_address(host, port, i), timeouts, ready, os.getpid(), log_level))
        p.start()
        procs.append(p)
    try:
        addresses = _collect(ready, count, procs, timeouts.startup)
    except BaseException:
        stop_processes(procs, 1.0)
        raise
    specs = [protocol.ShardSpec(index=i, address=addresses[i], chunks=[(c.key, c.start, c.stop) for c in chunks])
             for i, chunks in enumerate(plan)]
    return procs, specs


def _collect(ready, count: int, procs, timeout: float) -> dict[int, str]:
    addresses, deadline = {}, time.monotonic() + timeout
    while len(addresses) < count:
        if time.monotonic() > deadline:
            raise PSError(f"shards did not start within {timeout}s")
        try:
            index, address, error = ready.get(timeout=0.2)
        except queue_mod.Empty:
            dead = [p.name for p in procs if p.exitcode not in (None, 0)]
            if dead:
                raise PSError(f"{', '.join(dead)} exited during start-up; see its log above") from None
            continue
        if error:
            raise ConfigError(f"{error}; choose another --port")
        addresses[index] = address
    return addresses


def stop_processes(procs, timeout: float) -> None:
    """Wait for processes to end by themselves, then terminate, then kill; by pid, bounded."""
    deadline = time.monotonic() + timeout
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.terminate()
            p.join(2.0)
        if p.is_alive():
            p.kill()
            p.join(2.0)


def serve(run: RunConfig, host: str, port: int, shards: int, timeouts: Timeouts,
          log_level: str = "info", on_ready=None) -> dict:
    """Run a whole server (S shard processes + the coordinator here) until the run ends."""
    procs, specs = start_shards(run, host, port, shards, timeouts, log_level)
    ctx = zmq.Context()
    try:
        try:
            coordinator = Coordinator(ctx, f"tcp://{host}:{port}", run, specs, timeouts)
        except zmq.ZMQError as e:
            raise ConfigError(f"cannot bind tcp://{host}:{port}: {e}; choose another --port") from e
        log.info("coordinator at %s; %d shards; %s", coordinator.address, shards, run.consistency)
        if on_ready:
            on_ready(coordinator.address)
        try:
            coordinator.serve()
        except KeyboardInterrupt:
            log.info("interrupted; stopping shards")
            coordinator._stop_shards()
        return coordinator.status()
    finally:
        stop_processes(procs, timeouts.shutdown_grace)
        ctx.term()


def server_main(run, host, port, shards, timeouts, ready, log_level="info"):
    """Entry point of a spawned server process (used by ps-sim and the tests)."""
    logsetup.setup(log_level)
    torch.set_num_threads(1)
    try:
        serve(run, host, port, shards, timeouts, log_level, on_ready=lambda a: ready.put((a, None)))
    except PSError as e:
        ready.put((None, str(e)))
