"""The coordinator: membership by heartbeat, the clock table, the shard map, the run's end.

`Members` is the pure core (the clock is passed in); `Coordinator` is the shell:
a ROUTER for workers and tools, and one control channel per shard over which
it sends the live set and receives each shard's statistics.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import msgspec
import zmq

from . import protocol, transport
from .config import RunConfig, Timeouts
from .errors import ProtocolError
from .protocol import VERSION, ErrorCode

log = logging.getLogger(__name__)


@dataclass
class Member:
    worker_id: int
    incarnation: int
    partition: int
    host: str
    pid: int
    clock: int
    joined: float
    last_seen: float
    loss: float = float("nan")
    steps_per_s: float = 0.0
    resources: dict = field(default_factory=dict)


class Members:
    """Who is alive. Pure: `now` comes from the caller."""

    def __init__(self, heartbeat_timeout: float, partitions: int):
        self.timeout, self.partitions = heartbeat_timeout, partitions
        self.live: dict[int, Member] = {}
        self.incarnations: dict[int, int] = {}  # every id ever seen -> its newest incarnation
        self.version = 0  # bumps on every change of the live set

    def join(self, requested: int, host: str, pid: int, now: float) -> Member:
        known = requested >= 0 and requested in self.incarnations
        worker = requested if known else max(self.incarnations, default=-1) + 1
        incarnation = self.incarnations.get(worker, -1) + 1
        self.incarnations[worker] = incarnation
        partition = worker % self.partitions if self.partitions else worker
        # a newcomer starts at the slowest live clock, so ssp never sees it as far behind
        clock = min((m.clock for m in self.live.values()), default=0)
        member = Member(worker, incarnation, partition, host, pid, clock, now, now)
        self.live[worker] = member
        self.version += 1
        return member

    def heartbeat(self, hb: protocol.Heartbeat, now: float) -> bool:
        m = self.live.get(hb.worker_id)
        if m is None or m.incarnation != hb.incarnation:
            return False
        m.last_seen, m.clock, m.loss = now, hb.clock, hb.loss
        m.steps_per_s, m.resources = hb.steps_per_s, dict(hb.resources)
        return True

    def leave(self, worker: int, incarnation: int) -> bool:
        m = self.live.get(worker)
        if m is None or m.incarnation != incarnation:
            return False
        del self.live[worker]
        self.version += 1
        return True

    def expire(self, now: float) -> list[Member]:
        dead = [m for m in self.live.values() if now - m.last_seen > self.timeout]
        for m in dead:
            del self.live[m.worker_id]
        if dead:
            self.version += 1
        return dead

    def table(self) -> dict[int, tuple[int, int]]:
        return {w: (m.incarnation, m.clock) for w, m in self.live.items()}


class Coordinator:
    def __init__(self, ctx: zmq.Context, address: str, run: RunConfig, shards: list[protocol.ShardSpec], timeouts: Timeouts):
        self.run, self.shards, self.timeouts = run, shards, timeouts
        self.sock = transport.socket(ctx, zmq.ROUTER)
        self.address = transport.bind(self.sock, address)
        self.channels = [transport.Channel(ctx, s.address, f"shard {s.index}") for s in shards]
        self.members = Members(timeouts.heartbeat_timeout, run.partitions)
        self.stats: dict[int, protocol.ShardStats] = {}
        self.state = "run"  # run -> finish -> stopped
        self.finish_deadline = float("inf")
        self._sent_version, self._sent_at = -1, 0.0
        self.started = time.monotonic()
        self.handlers = {
            protocol.Join: self.on_join,
            protocol.Heartbeat: self.on_heartbeat,
            protocol.Leave: self.on_leave,
            protocol.Status: self.on_status,
            protocol.Stop: self.on_stop,
        }

    def __repr__(self) -> str:
        return f"<Coordinator {self.address} {self.state} live={len(self.members.live)}>"

    def serve(self, until: float = float("inf")) -> None:
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        for ch in self.channels:
            poller.register(ch.sock, zmq.POLLIN)
        try:
            while self.state != "stopped" and time.monotonic() < until:
                for sock, _ in poller.poll(100):
                    self._dispatch(sock)
                self.tick(time.monotonic())
        finally:
            self.close()

    def _dispatch(self, sock: zmq.Socket) -> None:
        if sock is self.sock:
            self.handle(transport.recv(self.sock))
            return
        try:
            msg = protocol.decode(transport.recv(sock))
        except ProtocolError as e:
            log.warning("malformed reply from a shard: %s", e)
            return
        if isinstance(msg.header, protocol.ShardStats):
            self.stats[msg.header.index] = msg.header

    def tick(self, now: float) -> None:
        for m in self.members.expire(now):
            log.warning("worker %d (%s) missed heartbeats for %.1fs: dropped", m.worker_id, m.host, self.timeouts.heartbeat_timeout)
        if self.members.version != self._sent_version or now - self._sent_at > self.timeouts.heartbeat_interval:
            self._tell_shards(now)
        if self.state == "run" and self._run_over():
            log.info("run complete after %d updates; telling workers to finish", self.updates())
            self.state, self.finish_deadline = "finish", now + self.timeouts.shutdown_grace
        if self.state == "finish" and (not self.members.live or now > self.finish_deadline):
            self._stop_shards()

    def _run_over(self) -> bool:
        if not self.run.max_steps or len(self.stats) < len(self.shards):
            return False
        return self.updates() >= self.run.max_steps

    def updates(self) -> int:
        return min((s.updates for s in self.stats.values()), default=0)

    def _tell_shards(self, now: float) -> None:
        live, finishing = self.members.table(), self.state != "run"
        for ch in self.channels:
            try:
                ch.send(protocol.Membership(v=VERSION, seq=ch.next_seq(), live=live, finishing=finishing))
            except zmq.Again:
                pass
        self._sent_version, self._sent_at = self.members.version, now

    def _stop_shards(self) -> None:
        deadline = time.monotonic() + self.timeouts.request_timeout
        for ch in self.channels:
            try:
                ch.request(protocol.Stop(v=VERSION, seq=ch.next_seq()), timeout=max(0.1, deadline - time.monotonic()))
            except Exception as e:  # a dead shard must not keep the others running
                log.warning("%s did not acknowledge stop: %s", ch, e)
        self.state = "stopped"

    def handle(self, frames: list) -> None:
        if len(frames) < 2:
            return
        identity, body = frames[0].bytes, frames[1:]
        try:
            msg = protocol.decode(body)
            handler = self.handlers.get(type(msg.header))
            if handler is None:
                raise ProtocolError(f"the coordinator does not serve {type(msg.header).__name__}", ErrorCode.UNKNOWN_OP)
            reply = handler(msg.header)
        except ProtocolError as e:
            log.warning("coordinator rejected a message: %s", e)
            reply = protocol.error(protocol.seq_of(body), e.code, str(e))
        except Exception as e:  # a bug must cost one request, never the coordinator
            log.exception("coordinator failed on a request")
            reply = protocol.error(protocol.seq_of(body), ErrorCode.INTERNAL, repr(e))
        try:
            transport.send(self.sock, [identity, *protocol.encode(reply)], zmq.NOBLOCK)
        except zmq.Again:
            log.warning("coordinator: reply dropped, peer not reading")

    def on_join(self, h: protocol.Join):
        if self.state != "run":
            return protocol.Error(v=VERSION, seq=h.seq, code=ErrorCode.FINISHED, message="the run is over")
        m = self.members.join(h.worker_id, h.host, h.pid, time.monotonic())
        log.info("worker %d joined from %s (pid %d), incarnation %d, clock %d", m.worker_id, h.host, h.pid, m.incarnation, m.clock)
        self._tell_shards(time.monotonic())
        return protocol.JoinOk(
            v=VERSION, seq=h.seq, worker_id=m.worker_id, incarnation=m.incarnation, clock=m.clock,
            partition=m.partition, config=self.run.to_wire(), shards=self.shards,
        )

    def on_heartbeat(self, h: protocol.Heartbeat):
        known = self.members.heartbeat(h, time.monotonic())
        state = "finish" if self.state != "run" else ("run" if known else "rejoin")
        return protocol.HeartbeatOk(v=VERSION, seq=h.seq, state=state)

    def on_leave(self, h: protocol.Leave):
        if self.members.leave(h.worker_id, h.incarnation):
            log.info("worker %d left", h.worker_id)
            self._tell_shards(time.monotonic())
        return protocol.Ack(v=VERSION, seq=h.seq)

    def on_status(self, h: protocol.Status):
        return protocol.StatusOk(v=VERSION, seq=h.seq, info=self.status())

    def on_stop(self, h: protocol.Stop):
        log.info("stop requested")
        if self.state == "run":
            self.state, self.finish_deadline = "finish", time.monotonic() + self.timeouts.shutdown_grace
        return protocol.Ack(v=VERSION, seq=h.seq)

    def status(self) -> dict:
        now = time.monotonic()
        waiting = sorted({w for s in self.stats.values() for w in s.waiting_for})
        return {
            "state": self.state,
            "address": self.address,
            "uptime": now - self.started,
            "config": self.run.to_wire(),
            "updates": self.updates(),
            "waiting_for": waiting,
            "shard_map": [msgspec.to_builtins(s) for s in self.shards],
            "workers": [
                {"id": m.worker_id, "incarnation": m.incarnation, "host": m.host, "pid": m.pid, "clock": m.clock,
                 "partition": m.partition, "loss": m.loss, "steps_per_s": m.steps_per_s,
                 "last_seen": now - m.last_seen, "resources": m.resources}
                for m in self.members.live.values()
            ],
            "shards": [
                {"index": s.index, "address": self.shards[s.index].address, "version": s.version, "updates": s.updates,
                 "pushes": s.pushes, "pulls": s.pulls, "rejected": s.rejected, "bytes_pushed": s.bytes_pushed,
                 "bytes_pulled": s.bytes_pulled, "max_staleness": s.max_staleness, "max_clock_gap": s.max_clock_gap, "clocks": s.clocks, "pid": s.pid}
                for s in sorted(self.stats.values(), key=lambda s: s.index)
            ],
        }

    def close(self) -> None:
        for ch in self.channels:
            ch.close()
        self.sock.close(linger=0)
