"""One fixture for real clusters: server and workers as spawned processes on loopback.

Every process a test starts is ended by pid at teardown, and a test that leaves
a child process behind fails.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import queue as queue_mod
import random
import socket
import subprocess
import sys
import threading
import time

import psutil
import pytest
import torch
import zmq

from paramserver import admin, cluster, protocol, sharding, tasks
from paramserver.config import Consistency, RunConfig, Timeouts
from paramserver.errors import DeadlineExceeded
from paramserver.shard import ShardCore, ShardServer
from paramserver.sim import worker_main
from workers import WorkerConfig
from workers.client import ShardClient, fetch_weights

# short enough that membership tests finish quickly, long enough for a loaded 2-core box
FAST = Timeouts(heartbeat_interval=0.2, heartbeat_timeout=2.0, request_timeout=10.0, pull_wait=20.0,
                reconnect_timeout=30.0, shutdown_grace=3.0, startup=60.0)


def _below_ephemeral() -> int:
    """The first port the kernel hands out as a connection's source port."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def free_port_block(n: int) -> int:
    """A port p with p..p+n-1 all free right now (a coordinator and its shards).

    Below the source-port range, so that no client's connection, nor a connect that
    loops back to itself before the server is up, takes a port the server is to bind.
    """
    top = _below_ephemeral() - n
    for _ in range(100):
        base = random.randint(20000, top) if top > 21000 else random.randint(20000, 60000)
        socks = []
        try:
            for p in range(base, base + n):
                s = socket.socket()
                s.bind(("127.0.0.1", p))
                socks.append(s)
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free port block")


class Cluster:
    """A running server (coordinator + shards) and the workers a test adds to it."""

    def __init__(self, run: RunConfig, shards: int, timeouts: Timeouts, **server):
        self.run, self.timeouts = run, timeouts
        self.ctx = zmq.Context()
        self.results = cluster.SPAWN.Queue()
        self.workers: list = []
        self.servers: list = []
        self.keys = None  # a tool's CURVE keys, for servers started with security
        self.spec = cluster.ServerSpec(run=run, shards=shards, timeouts=timeouts, log_level="warning", **server)
        self.start_server()

    def start_server(self, **changes) -> None:
        """Start (or, after a crash, restart) the server process; same port if it had one."""
        self.spec = dataclasses.replace(self.spec, **changes)
        # kept: server_main puts (None, reason) here if the run ends in an error after start-up
        self.ready = ready = cluster.SPAWN.Queue()
        self.server = cluster.SPAWN.Process(target=cluster.server_main, name="test-server", args=(self.spec, ready))
        self.server.start()
        self.servers.append(self.server)
        address, error = ready.get(timeout=self.timeouts.startup)
        assert error is None, error
        self.address = address

    def add_worker(self, **overrides):
        cfg = WorkerConfig(server=self.address, timeouts=self.timeouts, **overrides)
        p = cluster.SPAWN.Process(target=worker_main, name=f"test-worker-{len(self.workers)}",
                                  args=(cfg, self.results, "warning"))
        p.start()
        self.workers.append(p)
        return p

    def status(self) -> dict:
        return admin.status(self.address, timeout=5.0, ctx=self.ctx, keys=self.keys)

    def weights(self) -> torch.Tensor:
        return fetch_weights(self.ctx, self.address, keys=self.keys)[1]

    def accuracy(self) -> float:
        return tasks.build(self.run.task, self.run.seed).evaluate_flat(self.weights())["accuracy"]

    def wait_workers(self, timeout: float) -> list[dict]:
        """Wait for every worker process to exit; their results, by worker id."""
        deadline = time.monotonic() + timeout
        for p in self.workers:
            p.join(max(0.1, deadline - time.monotonic()))
            assert not p.is_alive(), f"{p.name} still running after {timeout}s"
        out = []
        while True:
            try:
                out.append(self.results.get(timeout=0.5))
            except queue_mod.Empty:
                return sorted(out, key=lambda r: r.get("worker_id", -1))

    def wait_live(self, n: int, min_clock: int = 0, timeout: float = 60.0) -> dict:
        """Wait until exactly `n` workers are live, each at `min_clock` or beyond; the status."""
        return self.wait_for(lambda s: len(s["workers"]) == n and all(w["clock"] >= min_clock for w in s["workers"]),
                             timeout, f"{n} live workers at clock {min_clock} or beyond")

    def wait_for(self, predicate, timeout: float, what: str):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                info = self.status()
            except DeadlineExceeded:  # one late answer on a loaded machine: ask again
                continue
            if predicate(info):
                return info
            time.sleep(0.1)
        raise AssertionError(f"timed out after {timeout}s waiting for {what}")

    def close(self) -> None:
        try:
            admin.stop(self.address, timeout=2.0, ctx=self.ctx, keys=self.keys)
        except Exception:  # already gone is fine: we kill by pid below
            pass
        cluster.stop_processes([*self.workers, *self.servers], self.timeouts.shutdown_grace + 5)
        self.ctx.term()


@pytest.fixture
def make_cluster():
    made: list[Cluster] = []

    def make(run: RunConfig | None = None, shards: int = 2, timeouts: Timeouts = FAST, **server) -> Cluster:
        c = Cluster(run or RunConfig(), shards, timeouts, **server)
        made.append(c)
        return c

    before = {p.pid for p in _alive_children()}
    yield make
    for c in made:
        c.close()
    _assert_no_leaks(before)


def _assert_no_leaks(before: set[int]) -> None:
    """Fail if a process this test started outlives it (multiprocessing's own tracker aside)."""
    deadline = time.monotonic() + 10
    while True:
        leaked = [p for p in _alive_children() if p.pid not in before]
        if not leaked or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    for p in leaked:
        p.kill()
    assert not leaked, f"test leaked processes: {[(p.pid, p.name()) for p in leaked]}"


def _alive_children() -> list[psutil.Process]:
    out = []
    for p in psutil.Process().children(recursive=True):
        try:
            if p.status() != psutil.STATUS_ZOMBIE and "resource_tracker" not in " ".join(p.cmdline()):
                out.append(p)
        except psutil.NoSuchProcess:
            pass
    return out


class ShardThread:
    """A real ShardServer on a loopback port, served from a thread of the test process."""

    def __init__(self, run: RunConfig, timeouts: Timeouts = FAST):
        layout, flat = cluster.initial_weights(run)
        self.chunks = sharding.plan(layout.total, 1, run.chunk_elems)[0]
        self.ctx = zmq.Context()
        self.server = ShardServer(self.ctx, ShardCore(0, self.chunks, flat, run), "tcp://127.0.0.1:0", timeouts)
        self.core = self.server.core
        self.sockets: list[zmq.Socket] = []
        self.thread = threading.Thread(target=self.server.serve, name="test-shard", daemon=True)
        self.thread.start()

    def dealer(self) -> zmq.Socket:
        s = self.ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.connect(self.server.address)
        self.sockets.append(s)
        return s

    def close(self) -> None:
        for s in self.sockets:
            s.close(linger=0)
        self.server.running = False
        self.thread.join(5)
        assert not self.thread.is_alive(), "shard thread did not stop"
        self.ctx.term()


@pytest.fixture
def shard_thread():
    made: list[ShardThread] = []

    def make(run: RunConfig | None = None, timeouts: Timeouts = FAST) -> ShardThread:
        s = ShardThread(run or RunConfig(consistency=Consistency("asp")), timeouts)
        made.append(s)
        return s

    yield make
    for s in made:
        s.close()


class ShardSet:
    """S real ShardServers on loopback, each served from a thread; worker 0 is a member."""

    def __init__(self, run: RunConfig, shards: int):
        layout, flat = cluster.initial_weights(run)
        self.plan = sharding.plan(layout.total, shards, run.chunk_elems)
        self.ctx = zmq.Context()
        self.servers = []
        for index, chunks in enumerate(self.plan):
            core = ShardCore(index, chunks, flat[chunks[0].start : chunks[-1].stop], run)
            core.set_live({0: (0, 0)})
            self.servers.append(ShardServer(self.ctx, core, "tcp://127.0.0.1:0", Timeouts()))
        self.specs = [protocol.ShardSpec(index=i, address=s.address, chunks=[(c.key, c.start, c.stop) for c in chunks])
                      for i, (s, chunks) in enumerate(zip(self.servers, self.plan))]
        self.threads = [threading.Thread(target=s.serve, name=f"test-shard-{i}", daemon=True)
                        for i, s in enumerate(self.servers)]
        for t in self.threads:
            t.start()
        self.clients: list[ShardClient] = []

    def client(self, codec: str = "none", pull_codec: str = "none") -> ShardClient:
        self.clients.append(ShardClient(self.ctx, self.specs, codec, pull_codec=pull_codec))
        return self.clients[-1]

    def bytes_per_push(self) -> float:
        return sum(s.bytes_pushed for s in self.servers) / sum(s.core.pushes for s in self.servers)

    def close(self) -> None:
        for c in self.clients:
            c.close()
        for s in self.servers:
            s.running = False
        for t in self.threads:
            t.join(5)
            assert not t.is_alive(), f"{t.name} did not stop"
        self.ctx.term()


@pytest.fixture
def shard_set():
    made: list[ShardSet] = []

    def make(run: RunConfig, shards: int) -> ShardSet:
        made.append(ShardSet(run, shards))
        return made[-1]

    yield make
    for s in made:
        s.close()


BIN = os.path.dirname(sys.executable)


class Procs:
    """Command-line processes a test starts (`ps-server`, `ps-worker`, ...), ended by pid."""

    def __init__(self):
        self.procs: list[subprocess.Popen] = []

    def start(self, *args, env=None, preexec_fn=None) -> subprocess.Popen:
        p = subprocess.Popen([os.path.join(BIN, args[0]), *args[1:]], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, env={**os.environ, **(env or {})}, preexec_fn=preexec_fn)
        self.procs.append(p)
        return p

    def kill_all(self):
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            p.communicate(timeout=10)


@pytest.fixture
def procs():
    p = Procs()
    yield p
    p.kill_all()


def cli(*args, timeout=60, env=None) -> subprocess.CompletedProcess:
    """Run one of the project's commands to the end; its output captured."""
    return subprocess.run([os.path.join(BIN, args[0]), *args[1:]], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def rows_of(path) -> list[dict]:
    """The rows of a CSV file (a step log, a report's metrics.csv), as text."""
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def run_sim(report, *args: str, timeout: float = 300) -> tuple[subprocess.CompletedProcess, dict]:
    """`ps-sim run ARGS --report REPORT --no-progress` as a process; (the finished process, report.json)."""
    out = subprocess.run([sys.executable, "-c", "from paramserver.cli import sim; sim()", "run", *args,
                          "--report", str(report), "--no-progress"], capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stderr[-2000:]
    with open(f"{report}/report.json") as f:
        return out, json.load(f)
