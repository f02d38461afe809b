"""The coordinator: membership by heartbeat, the clock table, the shard map, the run's end.

`membership.Members` is the pure core (the clock is passed in); `Coordinator` is the shell:
a ROUTER for workers and tools, and one control channel per shard over which
it sends the live set and receives each shard's statistics.
"""

from __future__ import annotations

import logging
import time
import uuid

import msgspec
import zmq

from . import checkpoint, protocol, transport
from .config import CheckpointConfig, RunConfig, Timeouts
from .errors import DeadlineExceeded, ProtocolError
from .events import EventLog
from .membership import Members
from .metrics import CoordinatorMetrics
from .protocol import VERSION, ErrorCode
from .security import ServerSecurity, user_id
from .sharding import Layout

log = logging.getLogger(__name__)
DRAIN_MAX = 1000  # messages handled from one socket before the next tick
TRAFFIC_FIELDS = protocol.Traffic.__struct_fields__


class Coordinator:
    def __init__(self, ctx: zmq.Context, address: str, run: RunConfig, shards: list[protocol.ShardSpec],
                 timeouts: Timeouts, layout: Layout | None = None, checkpoints: CheckpointConfig | None = None,
                 resume: checkpoint.Checkpoint | None = None, security: ServerSecurity | None = None,
                 events: EventLog | None = None):
        self.run, self.shards, self.timeouts, self.layout = run, shards, timeouts, layout
        self.events = events or EventLog()
        self.security = security
        self.keys = security.keys if security else None  # also our client identity towards the shards
        self.sock, self.address = transport.listen(ctx, address, self.keys)
        self.channels = [transport.Channel(ctx, s.address, f"shard {s.index}", self.keys) for s in shards]
        self.members = Members(timeouts.heartbeat_timeout, run.partitions)
        self.stats: dict[int, protocol.ShardStats] = {}
        self.state = "run"  # run -> finish -> stopped
        self.finish_deadline = float("inf")
        self._sent_version, self._sent_at = -1, 0.0
        self.started = self.idle_since = time.monotonic()
        self.epoch = 0  # bumps when the shards are restarted from a checkpoint
        self.restarting = ""  # the checkpoint the shards are being restarted from, until they are up
        self._round_rate, self._rate_mark = 0.0, {}
        self.run_id = resume.manifest["run_id"] if resume else uuid.uuid4().hex
        self.checkpoints = checkpoint.Orchestrator(checkpoints or CheckpointConfig(), self.run_id, resume.number if resume else 0,
                                                   timeouts.checkpoint_write)
        if resume:
            self.members.restore(resume.manifest["members"])
            self.events.emit("resume", checkpoint=resume.path, number=resume.number, updates=resume.manifest["updates"],
                             run_id=self.run_id)
        self.metrics = self._metrics()  # served only if serve_metrics is called
        self.handlers = {
            protocol.Join: self.on_join,
            protocol.Heartbeat: self.on_heartbeat,
            protocol.Leave: self.on_leave,
            protocol.Status: self.on_status,
            protocol.Stop: self.on_stop,
        }

    def __repr__(self) -> str:
        return f"<Coordinator {self.address} {self.state} live={len(self.members.live)}>"

    def _metrics(self) -> CoordinatorMetrics:
        m = CoordinatorMetrics()
        # read at scrape time, from the metrics thread: plain reads of ints and dict sizes
        m.live_workers.set_function(lambda: len(self.members.live))
        m.updates.set_function(self.updates)
        cp = self.checkpoints
        m.checkpoint_age.set_function(lambda: -1 if cp.published_at is None else cp.now() - cp.published_at)
        return m

    def serve(self, until: float = float("inf"), watch=None) -> None:
        """Serve until the run ends or `until` (monotonic); `watch()` runs every tick."""
        try:
            while self.state != "stopped" and time.monotonic() < until:
                try:
                    self.serve_once(100)
                    if watch is not None:
                        watch(self)
                except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM (interrupts.handled in cluster.serve)
                    self._interrupted(str(e) or "Ctrl-C")
        finally:
            self.close()

    def serve_once(self, timeout_ms: int) -> None:
        """Handle what arrives within `timeout_ms` (all of it that is queued), then tick."""
        self._pump(timeout_ms)
        self.tick(time.monotonic())

    def _interrupted(self, by: str) -> None:
        """First Ctrl-C or SIGTERM: finish the run as --max-steps would. Second: stop now."""
        if self.state == "run":
            log.warning("interrupted (%s): telling workers to finish (Ctrl-C or SIGTERM again to stop at once)", by)
            self.finish(time.monotonic(), by)
        else:
            log.warning("interrupted again (%s): stopping now", by)
            self._stop_shards()

    def _pump(self, timeout_ms: int) -> None:
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        for ch in self.channels:
            poller.register(ch.sock, zmq.POLLIN)
        for sock, _ in poller.poll(timeout_ms):
            # all that is queued, not one message: after a stall (a loaded host, a paused
            # VM) a worker's heartbeat may wait behind others, and the tick's expiry must
            # see it before it drops a worker that kept beating
            for _ in range(DRAIN_MAX):
                self._dispatch(sock)
                if sock.closed or not sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                    break

    def _dispatch(self, sock: zmq.Socket) -> None:
        if sock is self.sock:
            self.handle(transport.recv(self.sock))
            return
        try:
            msg = protocol.decode(transport.recv(sock))
        except ProtocolError as e:
            log.warning("malformed reply from a shard: %s", e)
            return
        h = msg.header
        if isinstance(h, protocol.REQUESTS):
            # our membership message came back: that channel is connected to itself
            next(ch for ch in self.channels if ch.sock is sock).let_go_of_loop()
        elif isinstance(h, protocol.ShardStats):
            self._observe_rate(h)
            self.stats[h.index] = h
        elif isinstance(h, protocol.CheckpointOk):
            self.checkpoints.on_reply(h)
        elif isinstance(h, protocol.Error) and h.code == ErrorCode.CHECKPOINT_MISSED:
            self.checkpoints.abandon(h.message)
        elif isinstance(h, protocol.Error):
            log.warning("a shard answered with an error: %s: %s", h.code, h.message)

    def tick(self, now: float) -> None:
        for m in self.members.expire(now):
            self.metrics.drops.inc()
            self.events.emit("drop", worker=m.worker_id, host=m.host, incarnation=m.incarnation,
                             reason=f"no heartbeat for {self.timeouts.heartbeat_timeout}s")
            log.warning("worker %d (%s) missed heartbeats for %.1fs: dropped", m.worker_id, m.host, self.timeouts.heartbeat_timeout)
        # while the shards restart there is no one to tell; restart() has the next tick tell the new ones
        if not self.restarting and (self.members.version != self._sent_version
                                    or now - self._sent_at > self.timeouts.heartbeat_interval):
            self._tell_shards(now)
        self._tick_checkpoints()
        if self.members.live:
            self.idle_since = now
        if self.state == "run" and self._run_over():
            log.info("run complete after %d updates; telling workers to finish", self.updates())
            self.finish(now, "max steps")
        idle = self.timeouts.exit_when_idle
        if self.state == "run" and idle and now - self.idle_since > idle:
            log.info("no worker for %.0fs (--exit-when-idle); ending the run", idle)
            self.finish(now, "idle")
        if self.state == "finish" and (not self.members.live or now > self.finish_deadline):
            self.final_checkpoint()
            self._stop_shards()

    def _observe_rate(self, h: protocol.ShardStats) -> None:
        """Rounds per second, smoothed: how far ahead a bsp checkpoint must aim."""
        now, last = time.monotonic(), self._rate_mark.get(h.index)
        self._rate_mark[h.index] = (now, h.version)
        if last and now > last[0] and h.version >= last[1]:
            rate = (h.version - last[1]) / (now - last[0])
            self._round_rate = 0.7 * self._round_rate + 0.3 * rate

    def finish(self, now: float, reason: str) -> None:
        """Workers are told to finish from here on; the shards stop once they have left."""
        self.events.emit("finish", updates=self.updates(), reason=reason)
        self.state, self.finish_deadline = "finish", now + self.timeouts.shutdown_grace

    # -- checkpoints ------------------------------------------------------------------

    def _tick_checkpoints(self) -> None:
        cp = self.checkpoints
        if cp.complete(len(self.shards)):
            path = cp.publish(self._manifest())
            self.metrics.checkpoints.inc()
            self.events.emit("checkpoint", number=cp.number, path=path, updates=self.updates())
        elif cp.expired():
            cp.abandon(f"not every shard answered within {self.timeouts.checkpoint_write}s")
        elif cp.due() and self.state == "run" and not self.restarting and len(self.stats) == len(self.shards):
            self._start_checkpoint(final=False)

    def _start_checkpoint(self, final: bool) -> None:
        # bsp shards may be a round apart: ask all for the same round, one ahead, unless
        # nothing will advance them (no live worker, or the run is ending)
        exact = self.run.consistency.mode == "bsp" and not final and bool(self.members.live)
        # far enough ahead that no shard has passed it by the time the request lands
        ahead = 2 + int(self._round_rate * 2 * self.timeouts.heartbeat_interval)
        at = max((s.version for s in self.stats.values()), default=0) + ahead if exact else 0
        name, number = self.checkpoints.start()
        for i, ch in enumerate(self.channels):
            seq = ch.next_seq()
            self.checkpoints.current.seqs[i] = seq
            try:
                ch.send(protocol.Checkpoint(v=VERSION, seq=seq, directory=name, number=number, at_version=at, exact=exact))
            except DeadlineExceeded:
                self.checkpoints.abandon(f"{ch} is not reachable")
                return

    def final_checkpoint(self) -> None:
        """One last checkpoint before the shards stop (clean shutdown), bounded by its deadline."""
        cp = self.checkpoints
        if not cp.enabled:
            return
        if cp.current is not None:
            cp.abandon("superseded by the final checkpoint")
        self._start_checkpoint(final=True)
        while cp.current is not None and not cp.expired() and not cp.complete(len(self.shards)):
            self._pump(100)
        self._tick_checkpoints()

    def restart(self, shards: list[protocol.ShardSpec], ckpt: checkpoint.Checkpoint) -> None:
        """The shards were restarted from `ckpt`: every worker rejoins and pulls again."""
        if self.checkpoints.current is not None:
            self.checkpoints.abandon("shards restarted")
        ctx = self.sock.context
        for ch in self.channels:
            ch.close()
        self.shards, self.stats = shards, {}
        self.channels = [transport.Channel(ctx, s.address, f"shard {s.index}", self.keys) for s in shards]
        self.members.reset(ckpt.manifest["members"])
        self.epoch += 1
        self.restarting = ""
        self.events.emit("restart", checkpoint=ckpt.path, number=ckpt.number, epoch=self.epoch)
        self._sent_version = -1

    def _manifest(self) -> dict:
        layout = self.layout
        return {
            "config": self.run.to_wire(),
            "signature": checkpoint.signature(layout) if layout else "",
            "total": layout.total if layout else 0,
            "layout": [{"name": e.name, "shape": list(e.shape), "offset": e.offset, "numel": e.numel}
                       for e in (layout.entries if layout else ())],
            "shards": [{"index": s.index, "address": s.address, "chunks": [list(c) for c in s.chunks]} for s in self.shards],
            "members": self.members.snapshot(),
        }

    def _run_over(self) -> bool:
        if not self.run.max_steps or len(self.stats) < len(self.shards):
            return False
        return self.updates() >= self.run.max_steps

    def updates(self) -> int:
        return min((s.updates for s in self.stats.values()), default=0)

    def _tell_shards(self, now: float) -> None:
        live = self.members.table()
        for ch in self.channels:
            try:
                ch.send(protocol.Membership(v=VERSION, seq=ch.next_seq(), live=live))
            except DeadlineExceeded:
                log.warning("%s is not reachable; the live set goes out again next tick", ch)
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
            if self.security and not self.security.allow.allows(user_id(body[0])):
                raise ProtocolError("key not authorized (removed from --authorized-keys?)", ErrorCode.NOT_AUTHORIZED)
            msg = protocol.decode(body)
            handler = self.handlers.get(type(msg.header))
            if handler is None:
                raise ProtocolError(f"the coordinator does not serve {type(msg.header).__name__}", ErrorCode.UNKNOWN_OP)
            reply = handler(msg.header)
        except ProtocolError as e:
            self.metrics.rejected.labels(e.code).inc()
            self.events.rejected(e.code, str(e))
            log.warning("coordinator rejected a message: %s", e)
            reply = protocol.error(protocol.seq_of(body), e.code, str(e))
        except Exception as e:  # a bug must cost one request, never the coordinator
            self.metrics.rejected.labels(ErrorCode.INTERNAL).inc()
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
        self.metrics.joins.inc()
        self.events.emit("join", worker=m.worker_id, host=h.host, worker_pid=h.pid, incarnation=m.incarnation,
                         clock=m.clock, asked_for=h.worker_id)
        log.info("worker %d joined from %s (pid %d), incarnation %d, clock %d", m.worker_id, h.host, h.pid, m.incarnation, m.clock)
        self._tell_shards(time.monotonic())
        return protocol.JoinOk(
            v=VERSION, seq=h.seq, worker_id=m.worker_id, incarnation=m.incarnation, clock=m.clock, epoch=self.epoch,
            heartbeat_interval=self.timeouts.heartbeat_interval,
            partition=m.partition, config=self.run.to_wire(), shards=self.shards,
        )

    def on_heartbeat(self, h: protocol.Heartbeat):
        known = self.members.heartbeat(h, time.monotonic())
        state = "finish" if self.state != "run" else ("run" if known else "rejoin")
        return protocol.HeartbeatOk(v=VERSION, seq=h.seq, state=state, epoch=self.epoch)

    def on_leave(self, h: protocol.Leave):
        if self.members.leave(h.worker_id, h.incarnation):
            log.info("worker %d left", h.worker_id)
            self.events.emit("leave", worker=h.worker_id, incarnation=h.incarnation)
            self._tell_shards(time.monotonic())
        return protocol.Ack(v=VERSION, seq=h.seq)

    def on_status(self, h: protocol.Status):
        return protocol.StatusOk(v=VERSION, seq=h.seq, info=self.status())

    def on_stop(self, h: protocol.Stop):
        log.info("stop requested")
        if self.state == "run":
            self.finish(time.monotonic(), "stop")
        return protocol.Ack(v=VERSION, seq=h.seq)

    def traffic(self) -> dict[int, dict]:
        """Bytes each worker (live or gone) pushed and pulled, over all shards: raw
        (as float32) and as they went on the wire."""
        out: dict[int, dict] = {}
        for s in self.stats.values():
            for worker, t in s.traffic.items():
                sums = out.setdefault(worker, dict.fromkeys(TRAFFIC_FIELDS, 0))
                for name in TRAFFIC_FIELDS:
                    sums[name] += getattr(t, name)
        return out

    def status(self) -> dict:
        now = time.monotonic()
        waiting = sorted({w for s in self.stats.values() for w in s.waiting_for})
        traffic = self.traffic()
        return {
            "state": self.state,
            "address": self.address,
            "run_id": self.run_id,
            "epoch": self.epoch,
            "restarting": self.restarting,
            "checkpoints_written": self.checkpoints.written,
            "uptime": now - self.started,
            "config": self.run.to_wire(),
            "updates": self.updates(),
            "waiting_for": waiting,
            "shard_map": [msgspec.to_builtins(s) for s in self.shards],
            "workers": [
                {"id": m.worker_id, "incarnation": m.incarnation, "host": m.host, "pid": m.pid, "clock": m.clock,
                 "partition": m.partition, "loss": m.loss, "steps_per_s": m.steps_per_s,
                 "last_seen": now - m.last_seen, "resources": m.resources,
                 "traffic": traffic.get(m.worker_id, dict.fromkeys(TRAFFIC_FIELDS, 0))}
                for m in self.members.live.values()
            ],
            "traffic": {str(w): t for w, t in sorted(traffic.items())},
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
        self.metrics.close()
        self.events.close()
