"""What the transport-type benchmarks (1, 2, 5) drive: the bare echo peer, and our
shards behind a real ShardClient.

Our shards run `paramserver.cluster.shard_main`, the entry point of every shard
process, inside `ShardHosts`: processes spawned once that run one shard after
another, so that each model size does not pay again for a process start
(importing torch takes seconds here). Each shard is stopped with the protocol's
Stop message, as the coordinator does.
"""

from __future__ import annotations

import logging
import os
import queue as queue_mod
import time

import numpy as np
import torch
import zmq

from paramserver import cluster, protocol, sharding, transport
from paramserver.config import RunConfig, Timeouts
from paramserver.protocol import VERSION
from paramserver.transport import Channel
from workers.client import ShardClient

from .common import MB, SPAWN, Procs, get
from .echo import PASSES, echo_main, floor_main

log = logging.getLogger(__name__)
FRAME = 4 * MB  # the bare echo's frame size: the fastest for pyzmq here (DESIGN.md)
TIMEOUT = 120.0  # one round trip of 400 MB takes about a second; a stuck one fails the run


class _Servers:
    """`servers` processes of `target(ready, parent_pid, *args)`, each reporting its address
    on `ready`, and a DEALER connected to each."""

    def __init__(self, procs: Procs, target, args: tuple, servers: int, name: str):
        ready = SPAWN.Queue()
        started = [procs.spawn(target, ready, os.getpid(), *args, name=f"{name}-{i}") for i in range(servers)]
        addresses = [get(ready, 60, f"{name} start", started) for _ in range(servers)]
        self.ctx = zmq.Context()
        self.socks = []
        try:
            for a in addresses:
                s = self.ctx.socket(zmq.DEALER)
                self.socks.append(s)
                s.setsockopt(zmq.LINGER, 0)
                s.connect(a)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for s in self.socks:
            s.close(linger=0)
        self.ctx.term()


def _split(buf: np.ndarray, servers: int, frame: int) -> list[tuple[list[np.ndarray], int]]:
    """`buf` cut into `servers` equal runs, one per server, each as `frame`-long frames:
    [(frames, start)] with start the run's offset in `buf`."""
    cuts = [buf.size * i // servers for i in range(servers + 1)]
    return [([buf[o : min(o + frame, hi)] for o in range(lo, hi, frame)], lo) for lo, hi in zip(cuts, cuts[1:])]


class Bare(_Servers):
    """Up to `servers` echo processes; a round trip sends each 1/n of the bytes, in parallel."""

    def __init__(self, procs: Procs, servers: int):
        super().__init__(procs, echo_main, (), servers, "bench-echo")
        self.parts: list[tuple[list[np.ndarray], int]] = []

    def use(self, nbytes: int, servers: int) -> None:
        """A payload of `nbytes` split over the first `servers` echoes, in FRAME-sized frames."""
        self.payload = np.random.default_rng(0).integers(0, 255, nbytes, dtype=np.uint8)
        self.parts = _split(self.payload, servers, FRAME)
        self.copy_recv = nbytes // servers < zmq.COPY_THRESHOLD  # small: bytes are cheaper than Frames

    def round_trip(self) -> None:
        for sock, (frames, _) in zip(self.socks, self.parts):
            sock.send_multipart(frames, copy=False)
        deadline = time.monotonic() + TIMEOUT
        for sock in self.socks[: len(self.parts)]:
            if not sock.poll(max(1, int((deadline - time.monotonic()) * 1000))):
                raise TimeoutError("bare echo did not answer")
            sock.recv_multipart(copy=self.copy_recv)


class Floor(_Servers):
    """Up to `servers` `echo.floor_main` processes making `passes` (of echo.PASSES) with SGD
    rate `lr`; a round trip sends each 1/n of the gradients, in parallel, as Bare does, in
    FRAME-sized float32 frames, and takes the weights back one message a frame, each copied
    into a flat buffer here when "copy" is among the passes (as a worker copies the answer
    into its model)."""

    def __init__(self, procs: Procs, passes: tuple[str, ...], lr: float, servers: int = 1):
        unknown = set(passes) - set(PASSES)
        if unknown:
            raise ValueError(f"unknown passes {sorted(unknown)}; known: {', '.join(PASSES)}")
        self.passes = tuple(passes)
        super().__init__(procs, floor_main, (self.passes, lr), servers, f"bench-floor-{'+'.join(passes)}")
        self.use_grads(np.zeros(0, dtype=np.float32))

    def use(self, nbytes: int, servers: int = 1) -> None:
        """Gradients of `nbytes` (float32), small random values as a worker's are, over the first `servers`."""
        self.use_grads(torch.empty(nbytes // 4).uniform_(-1e-3, 1e-3).numpy(), servers)

    def use_grads(self, grads: np.ndarray, servers: int = 1) -> None:
        # NaN until an answer is copied in: a pass that copied nothing shows
        self.grads, self.weights = grads, np.full_like(grads, np.nan)
        self.parts = _split(grads, servers, FRAME // 4)

    def round_trip(self) -> None:
        copy = "copy" in self.passes
        for sock, (frames, _) in zip(self.socks, self.parts):
            transport.send(sock, frames)
        deadline = time.monotonic() + TIMEOUT
        for sock, (frames, start) in zip(self.socks, self.parts):
            for _ in frames:
                if not sock.poll(max(1, int((deadline - time.monotonic()) * 1000))):
                    raise TimeoutError("floor server did not answer")
                status, *values = sock.recv_multipart(copy=False)
                if status.bytes != b"ok":
                    raise RuntimeError(f"floor server refused the push: {status.bytes[:40]!r}")
                part = np.frombuffer(values[0].buffer, dtype=np.float32)
                if copy:
                    self.weights[start : start + part.size] = part
                start += part.size


def host_main(inbox, ready, idle, number: int) -> None:
    """Run `cluster.shard_main` for each job in `inbox`, one after another."""
    transport.tune_allocator()  # as shard_main does, but before this process's queue threads start
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    parent = os.getppid()
    idle.put(number)
    while os.getppid() == parent:
        try:
            job = inbox.get(timeout=1.0)
        except queue_mod.Empty:
            continue
        if job is None:
            return
        index, chunks, spec, address = job
        try:
            cluster.shard_main(index, chunks, spec, address, "", ready, parent)
        except Exception as e:  # noqa: BLE001 (the bench reads it from `ready` or times out)
            ready.put((index, None, f"{type(e).__name__}: {e}"))
        idle.put(number)


class ShardHosts:
    def __init__(self, count: int = 4):
        self.count = count
        self._start()

    def _start(self) -> None:
        self.procs = Procs()
        self.inboxes = [SPAWN.Queue() for _ in range(self.count)]
        self.ready, self.idle = SPAWN.Queue(), SPAWN.Queue()
        self.hosts = [self.procs.spawn(host_main, q, self.ready, self.idle, i, name=f"bench-shard-host-{i}")
                      for i, q in enumerate(self.inboxes)]
        self.wait_idle(self.count)

    def start(self, run: RunConfig, shards: int) -> list[protocol.ShardSpec]:
        """Shards 0..shards-1 of `run` on hosts 0..shards-1, as cluster.start_shards plans them."""
        spec = cluster.ServerSpec(run=run, shards=shards, timeouts=Timeouts(), log_level="warning")
        layout, _ = cluster.initial_weights(run)
        plan = sharding.plan(layout.total, shards, run.chunk_elems)
        for i, chunks in enumerate(plan):
            self.inboxes[i].put((i, chunks, spec, "tcp://127.0.0.1:0"))
        addresses = {}
        try:
            while len(addresses) < shards:
                index, address, error = get(self.ready, 120, "shard start", self.hosts)
                if error:
                    raise RuntimeError(error)
                addresses[index] = address
        except BaseException:
            self.restart()
            raise
        return [protocol.ShardSpec(index=i, address=addresses[i], chunks=[(c.key, c.start, c.stop) for c in chunks])
                for i, chunks in enumerate(plan)]

    def wait_idle(self, n: int) -> None:
        for _ in range(n):
            get(self.idle, 120, "shard host", self.hosts)

    def restart(self) -> None:
        log.warning("restarting the shard hosts")
        self.procs.close(grace=0.0)
        self._start()

    def close(self) -> None:
        for q in self.inboxes:
            q.put(None)
        self.procs.close()


def stop_shards(ctx: zmq.Context, specs) -> None:
    for spec in specs:
        ch = Channel(ctx, spec.address, f"shard {spec.index}")
        try:
            ch.request(protocol.Stop(v=VERSION, seq=ch.next_seq()), timeout=10.0)
        except Exception as e:  # noqa: BLE001 (the host is restarted below if it does not come back)
            log.warning("shard %d did not acknowledge stop: %s", spec.index, e)
        finally:
            ch.close()


class Ours:
    """`shards` shards of `run` on `hosts`, worker 0 made a member, and one ShardClient."""

    def __init__(self, hosts: ShardHosts, run: RunConfig, shards: int):
        self.hosts, self.ctx = hosts, zmq.Context()
        self.specs = hosts.start(run, shards)
        try:
            self._members({0: (0, 0)})
            self.client = ShardClient(self.ctx, self.specs)
        except BaseException:
            self.close()
            raise
        total = max(c[2] for s in self.specs for c in s.chunks)
        self.weights = torch.empty(total)
        self.grads = torch.empty(total).uniform_(-1e-3, 1e-3)
        self.clock = self.version = 0
        self.push_s: list[float] = []
        self.pull_s: list[float] = []

    def _members(self, live: dict) -> None:
        """What the coordinator would tell the shards: worker 0, incarnation 0, is live."""
        for spec in self.specs:
            ch = Channel(self.ctx, spec.address, f"shard {spec.index}")
            try:
                ch.request(protocol.Membership(v=VERSION, seq=ch.next_seq(), live=live), timeout=30.0)
            finally:
                ch.close()

    def push(self) -> None:
        got = self.client.push(self.grads, 0, 0, self.clock, self.version, TIMEOUT)
        self.clock, self.version = self.clock + 1, got.version

    def round_trip(self) -> None:
        """One worker step's exchange: the push, answered with the next weights."""
        got = self.client.push(self.grads, 0, 0, self.clock, self.version, TIMEOUT, pull_into=self.weights)
        self.clock, self.version = self.clock + 1, got.version

    def split_trip(self) -> None:
        """The same as two exchanges, a push and then a pull, timed apart."""
        t0 = time.perf_counter()
        self.client.push(self.grads, 0, 0, self.clock, self.version, TIMEOUT)
        t1 = time.perf_counter()
        got = self.client.pull(self.weights, 0, self.clock, TIMEOUT)
        self.push_s.append(t1 - t0)
        self.pull_s.append(time.perf_counter() - t1)
        self.clock, self.version = self.clock + 1, got.version

    def close(self) -> None:
        if hasattr(self, "client"):
            self.client.close()
        stop_shards(self.ctx, self.specs)
        self.ctx.term()
        try:
            self.hosts.wait_idle(len(self.specs))
        except (TimeoutError, RuntimeError):
            self.hosts.restart()
