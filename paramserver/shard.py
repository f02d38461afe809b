"""A shard: one range of the model's flat parameters (`weights.Weights`, with its
optimizer), and the rules that decide when a push is applied and when a pull may be served.

`ShardCore` is pure (values in, values out, no sockets); `ShardServer` is the
thin I/O shell around it: one ROUTER socket, one thread, a handler table.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from dataclasses import dataclass

import torch
import zmq

from . import checkpoint, consistency, protocol, transport
from .config import RunConfig, Timeouts
from .consistency import APPLY, DUPLICATE, QUEUE, STALE
from .errors import ConfigError, ProtocolError
from .events import EventLog
from .metrics import ShardMetrics
from .protocol import VERSION, ErrorCode
from .security import ServerSecurity, user_id
from .sharding import Chunk
from .weights import Weights

log = logging.getLogger(__name__)


@dataclass
class Outcome:
    version: int
    applied: bool
    finished: bool
    staleness: int = 0  # of the applied push: versions between its base and its update


class ShardCore:
    def __init__(self, index: int, chunks: list[Chunk], init: torch.Tensor, run: RunConfig,
                 min_workers_wait: float = Timeouts.min_workers_wait, clock=time.monotonic):
        # init: the shard's slice of the flat initial weights, shape (hi - lo,)
        self.index, self.chunks, self.run = index, chunks, run
        self.min_workers_wait, self.now = min_workers_wait, clock
        self._short_since = None  # when --min-workers first held a round (bsp) or a pull (asp, ssp) back
        # --min-workers holds rounds (bsp) or pulls (asp, ssp) back only until the shard has
        # once had that many workers: it is for the start of a run, not for a run that later
        # shrinks (workers that finished or left)
        self._filled = not run.min_workers
        self.weights = Weights(chunks, init, run.optimizer, run.pull_part_bytes)
        self.lo, self.numel = self.weights.lo, self.weights.numel
        self.policy = consistency.policy(run.consistency)
        self.aggregate = consistency.aggregator(run.aggregate)
        self._mean_out: list[torch.Tensor] | None = None  # bsp: where a round's mean is summed
        # told of every update: on_apply(staleness, seconds the step took)
        self.on_apply = None
        self.version = self.updates = 0
        self.live: dict[int, tuple[int, int]] = {}  # worker -> (incarnation, start clock)
        self.clocks: dict[int, int] = {}  # live worker -> pushes it has completed
        self.pending: dict[int, list[torch.Tensor]] = {}  # bsp: worker -> gradient for the open round
        self.high_water: dict[int, tuple[int, int]] = {}  # worker -> (incarnation, last push seq)
        self.max_staleness = self.pushes = self.pulls = self.rejected = 0
        self.max_clock_gap = 0  # the most a served pull's clock led the slowest live worker

    def __repr__(self) -> str:
        return f"<ShardCore {self.index} [{self.lo}:{self.lo + self.numel}] v{self.version} {self.policy.name}>"

    @property
    def finished(self) -> bool:
        return bool(self.run.max_steps) and self.updates >= self.run.max_steps

    def set_live(self, live: dict[int, tuple[int, int]]) -> None:
        for worker, (incarnation, clock) in live.items():
            if self.live.get(worker, (None,))[0] != incarnation:
                self.clocks[worker] = clock  # new or re-joined: starts at the clock it was given
        self.live = dict(live)
        self.clocks = {w: c for w, c in self.clocks.items() if w in live}
        self.weights.forget(live)
        self._maybe_close_round()

    def split(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """A flat gradient of shape (numel,) in the per-chunk form `push` takes."""
        return self.weights.slices(flat)

    def decode_push(self, header: protocol.Push, buffers: list[memoryview]) -> list[torch.Tensor]:
        """The validated gradient of a push, one float32 tensor per chunk in key order;
        raises ProtocolError. Frames of the `none` codec are used in place, not copied."""
        return self.weights.gradient(header.tensors, buffers, self.run.clip_norm)

    def push(self, header: protocol.Push, grads: list[torch.Tensor]) -> Outcome:
        """Admit one validated push (`grads` as decode_push gives them); raises
        ProtocolError (not_member, stale) without changing state."""
        worker = header.worker_id
        if self.live.get(worker, (None,))[0] != header.incarnation:
            raise ProtocolError(f"worker {worker} is not a live member here; rejoin", ErrorCode.NOT_MEMBER)
        if self.finished:
            return Outcome(self.version, False, True)
        if self._is_duplicate(worker, header.incarnation, header.seq):
            return Outcome(self.version, worker not in self.pending, self.finished)
        verdict = self.policy.on_push(worker, header.clock, self.version, self.pending)
        if verdict == STALE:
            raise ProtocolError(f"push for round {header.clock} but round {self.version} is open; pull again", ErrorCode.STALE)
        self.high_water[worker] = (header.incarnation, header.seq)
        self.pushes += 1
        self.clocks[worker] = max(self.clocks.get(worker, 0), header.clock + 1)
        if verdict == DUPLICATE:
            return Outcome(self.version, False, self.finished)
        if verdict == QUEUE:
            self.pending[worker] = grads
            applied = self._maybe_close_round()
            return Outcome(self.version, applied, self.finished)
        assert verdict == APPLY
        staleness = self._apply(grads, header.base_version)
        return Outcome(self.version, True, self.finished, staleness)

    def _is_duplicate(self, worker: int, incarnation: int, seq: int) -> bool:
        last = self.high_water.get(worker)
        return last is not None and last[0] == incarnation and seq <= last[1]

    def _maybe_close_round(self) -> bool:
        if not self.policy.round_ready(self.live, self.pending) or self._short_of_workers(len(self.pending)):
            return False
        pushes = list(self.pending.values())
        self.pending.clear()
        if self._mean_out is None:
            self._mean_out = self.weights.slices(torch.empty(self.numel, dtype=torch.float32))
        # each chunk's mean is summed when its part of the step runs
        self._apply([functools.partial(self.aggregate, [g[i] for g in pushes], out=out)
                     for i, out in enumerate(self._mean_out)], self.version)
        return True

    def _short_of_workers(self, have: int) -> bool:
        """--min-workers: True while `have` (bsp: workers in the open round; asp and ssp:
        live workers) is short of it and the wait, bounded by min_workers_wait, goes on."""
        if self._filled or have >= self.run.min_workers:
            self._filled, self._short_since = True, None
            return False
        now = self.now()
        if self._short_since is None:
            self._short_since = now
            log.info("shard %d: %d of %d workers (--min-workers) in; %s up to %.0fs", self.index, have,
                     self.run.min_workers, "the round waits" if self.policy.name == "bsp" else "pulls wait",
                     self.min_workers_wait)
        if now - self._short_since < self.min_workers_wait:
            return True
        log.warning("shard %d: going on with %d of %d workers after waiting %.0fs",
                    self.index, have, self.run.min_workers, self.min_workers_wait)
        self._short_since, self._filled = None, True
        return False

    def tick(self) -> bool:
        """Time-driven work (a --min-workers wait running out); True if a round closed
        or held pulls may now be served."""
        if self.policy.name != "bsp":
            return self._short_since is not None and not self._held_for_start()  # the wait ran out
        return bool(self.pending) and self._maybe_close_round()

    @property
    def holding_start(self) -> bool:
        """Whether asp or ssp pulls still wait for --min-workers workers to be live."""
        return not self._filled and self.policy.name != "bsp"

    def _held_for_start(self) -> bool:
        """asp and ssp with --min-workers: no weights go out to workers, so none starts
        training alone, until that many are live (bsp holds its rounds instead)."""
        return self.holding_start and self._short_of_workers(len(self.live))

    def _apply(self, grads: list, base_version: int) -> int:
        """Start the update: its parts run as the answer carrying them goes out, the rest
        when the weights are next read (Weights.step), so the version counts it at once."""
        staleness = self.version - base_version
        self.max_staleness = max(self.max_staleness, staleness)
        done = None if self.on_apply is None else functools.partial(self.on_apply, staleness)
        self.weights.step(grads, done)
        self.version += 1
        self.updates += 1
        return staleness

    def pull_ready(self, header: protocol.Pull) -> bool:
        if header.observer or self.finished:
            return True
        if not self._filled and self._held_for_start():  # _filled first: this is every pull's path
            return False
        ready = self.policy.pull_ready(header.worker_id, header.clock, self.clocks, self.pending)
        if ready and self.clocks and header.worker_id in self.live:
            self.max_clock_gap = max(self.max_clock_gap, header.clock - min(self.clocks.values()))
        return ready

    def meta(self) -> dict:
        """What a checkpoint keeps besides the tensors."""
        return {
            "index": self.index, "lo": self.lo, "numel": self.numel, "version": self.version,
            "updates": self.updates, "max_staleness": self.max_staleness,
            "high_water": [[w, inc, seq] for w, (inc, seq) in self.high_water.items()],
        }

    def restore(self, tensors: dict[str, torch.Tensor], meta: dict, groups: list) -> None:
        """Load a checkpoint written by this shard index; ConfigError if it does not fit."""
        if meta["lo"] != self.lo or tensors["param"].numel() != self.numel:
            raise ConfigError(f"shard {self.index}: checkpoint holds [{meta['lo']}:+{tensors['param'].numel()}], "
                              f"this shard [{self.lo}:+{self.numel}]")
        self.weights.load(tensors, groups)
        self.version, self.updates = meta["version"], meta["updates"]
        self.max_staleness = meta.get("max_staleness", 0)
        self.high_water = {w: (inc, seq) for w, inc, seq in meta.get("high_water", [])}

    def waiting_for(self) -> list[int]:
        if self.policy.name != "bsp" or not self.pending:
            return []
        return sorted(w for w in self.live if w not in self.pending)


class ShardServer:
    """The I/O shell: a ROUTER socket serving workers (data) and the coordinator (control)."""

    def __init__(self, ctx: zmq.Context, core: ShardCore, address: str, timeouts: Timeouts,
                 checkpoint_root: str = "", security: ServerSecurity | None = None, events: EventLog | None = None):
        self.core, self.timeouts, self.checkpoint_root = core, timeouts, checkpoint_root
        self.events = events or EventLog()
        self.security = security
        self.metrics = ShardMetrics(core.index)  # served only if serve_metrics is called
        self._last_update: float | None = None
        core.on_apply = self._applied
        self.sock, self.address = transport.listen(ctx, address, security.keys if security else None)
        self.deferred: list[tuple[bytes, protocol.Pull, float, float]] = []  # (.., deadline, arrived)
        self.checkpoint_request: tuple[bytes, protocol.Checkpoint] | None = None
        self.bytes_pushed = self.bytes_pulled = 0
        self.traffic: dict[int, protocol.Traffic] = {}  # by member worker: what it pushed and pulled here
        self.running = True
        self.handlers = {
            protocol.Pull: self.on_pull,
            protocol.Push: self.on_push,
            protocol.Membership: self.on_membership,
            protocol.Stop: self.on_stop,
            protocol.Checkpoint: self.on_checkpoint,
        }
        self._control = {self.on_membership, self.on_stop, self.on_checkpoint}

    def __repr__(self) -> str:
        return f"<ShardServer {self.core.index} {self.address}>"

    def _applied(self, staleness: int, seconds: float) -> None:
        now = time.monotonic()
        since = None if self._last_update is None else now - self._last_update
        self._last_update = now
        self.metrics.applied(staleness, seconds, since, self.core.version)

    def serve(self, until: float = float("inf"), parent_pid: int | None = None) -> None:
        """Serve until stopped, `until` (monotonic) passes, or the parent process is gone."""
        poller = transport.poller(self.sock)
        while self.running and time.monotonic() < until:
            if poller.poll(100):
                self.handle(transport.recv(self.sock))
            if self.core.tick():
                self._serve_deferred()
                self.core.weights.settle()
                self._maybe_checkpoint()
            self._expire_deferred()
            if parent_pid is not None and os.getppid() != parent_pid:
                log.warning("shard %d: launcher is gone; exiting", self.core.index)
                break
        self.sock.close(linger=0)
        self.metrics.close()
        self.events.close()

    def handle(self, frames: list) -> None:
        if len(frames) < 2:
            return
        identity, body = frames[0].bytes, frames[1:]
        try:
            # without CURVE there is no key to ask for (and asking raises, at a cost per message)
            peer = user_id(body[0]) if self.security else None
            if self.security and not self.security.allow.allows(peer):
                raise ProtocolError("key not authorized (removed from --authorized-keys?)", ErrorCode.NOT_AUTHORIZED)
            msg = protocol.decode(body)
            handler = self.handlers.get(type(msg.header))
            if handler is None:
                raise ProtocolError(f"a shard does not serve {type(msg.header).__name__}", ErrorCode.UNKNOWN_OP)
            if self.security and handler in self._control and not self.security.is_server(peer):
                raise ProtocolError(f"{type(msg.header).__name__} is for the coordinator only", ErrorCode.NOT_AUTHORIZED)
            handler(identity, msg)
            self.core.weights.settle()  # an update no answer carried (all of it) runs now
            self._maybe_checkpoint()
        except ProtocolError as e:
            self.core.rejected += 1
            self.metrics.refused(e.code)
            self.events.rejected(e.code, str(e))
            if self.core.rejected <= 10 or self.core.rejected % 1000 == 0:
                log.warning("shard %d rejected a message (%d so far): %s", self.core.index, self.core.rejected, e)
            self.reply(identity, protocol.error_reply(protocol.seq_of(body), e.code, str(e)))
        except Exception as e:  # a bug must cost one request, never the shard
            self.core.rejected += 1
            self.metrics.refused(ErrorCode.INTERNAL)
            self.events.rejected(ErrorCode.INTERNAL, repr(e))
            log.exception("shard %d failed on a request", self.core.index)
            self.reply(identity, protocol.error_reply(protocol.seq_of(body), ErrorCode.INTERNAL, repr(e)))

    def reply(self, identity: bytes, frames: list, trackers: list | None = None) -> int:
        try:
            return transport.send(self.sock, [identity, *frames], zmq.NOBLOCK, trackers)
        except zmq.Again:
            log.warning("shard %d: reply dropped, peer not reading", self.core.index)
            return 0

    def on_push(self, identity: bytes, msg: protocol.Decoded) -> None:
        h = msg.header
        arrived = time.monotonic()
        grad = self.core.decode_push(h, msg.buffers)
        out = self.core.push(h, grad)
        self.bytes_pushed += msg.wire_bytes
        t = self._traffic(h.worker_id)
        if t is not None:
            raw = 4 * self.core.numel
            t.pushed_raw += raw
            t.pushed_wire += msg.wire_bytes
            self.metrics.pushed(h.worker_id, raw, msg.wire_bytes, time.monotonic() - arrived)
        if h.pull:  # answered with the weights for the worker's next clock, when it may have them
            self._serve_deferred()
            pull = protocol.Pull(v=VERSION, seq=h.seq, worker_id=h.worker_id, clock=h.clock + 1,
                                 codec=h.pull_codec, have=h.have)
            if self._answer_pull(identity, pull, arrived, out.staleness):
                return
            # the weights wait for the consistency rule: acknowledge the push now, so that
            # the worker knows it landed and does not resend it while it waits
        self.reply(identity, protocol.encode(protocol.PushOk(v=VERSION, seq=h.seq, version=out.version, applied=out.applied, finished=out.finished, staleness=out.staleness)))
        self._serve_deferred()

    def on_pull(self, identity: bytes, msg: protocol.Decoded) -> None:
        self._answer_pull(identity, msg.header, time.monotonic())

    def _answer_pull(self, identity: bytes, h: protocol.Pull, arrived: float, staleness: int = 0) -> bool:
        """Send the weights now (True) or park the pull until the consistency rule allows (False).

        `staleness`: of the push this pull rides on, told to the worker with its weights."""
        self.core.pulls += 1
        if self.core.pull_ready(h):
            self._send_weights(identity, h, arrived, staleness)
            return True
        self.deferred.append((identity, h, arrived + self.timeouts.pull_wait, arrived))
        return False

    def _send_weights(self, identity: bytes, h: protocol.Pull, arrived: float, staleness: int = 0) -> None:
        trackers, token = [], 0
        weights = self.core.weights
        if h.codec == "none":
            metas, buffers = weights.snapshot()
        else:
            # observers and strangers get whole weights, nothing kept
            metas, buffers, token = weights.encoded(h.codec, h.worker_id, h.have, keep=h.worker_id in self.core.live)
            trackers = None  # frames of their own: nothing to pin
        runs, sent = weights.parts(h.codec), 0
        for part, (a, b) in enumerate(runs):
            weights.settle(part + 1)  # an update in progress runs this part first (encoded: ran whole already)
            header = protocol.PullOk(v=VERSION, seq=h.seq, version=self.core.version, tensors=metas[a:b],
                                     finished=self.core.finished, token=token, staleness=staleness,
                                     part=part, parts=len(runs))
            n = self.reply(identity, protocol.encode(header, buffers[a:b]), trackers)
            if not n:
                break  # dropped: the parts after it could not complete the answer
            sent += n
        if trackers:
            weights.pin(trackers)
        self.bytes_pulled += sent
        t = None if h.observer else self._traffic(h.worker_id)
        if t is not None:
            raw = 4 * self.core.numel
            t.pulled_raw += raw
            t.pulled_wire += sent
            self.metrics.pulled(h.worker_id, raw, sent, time.monotonic() - arrived)

    def _traffic(self, worker: int) -> protocol.Traffic | None:
        """The worker's byte counters; None for a worker that is not a member (a pull
        names any id it likes, and the table must stay bounded)."""
        if worker not in self.core.live or (worker not in self.traffic and len(self.traffic) >= 1 << 16):
            return None
        t = self.traffic.get(worker)
        if t is None:
            t = self.traffic[worker] = protocol.Traffic()
        return t

    def on_membership(self, identity: bytes, msg: protocol.Decoded) -> None:
        self.core.set_live(dict(msg.header.live))
        c = self.core
        stats = protocol.ShardStats(
            v=VERSION, seq=msg.header.seq, index=c.index, version=c.version, updates=c.updates,
            clocks=dict(c.clocks), waiting_for=c.waiting_for(), pushes=c.pushes, pulls=c.pulls,
            rejected=c.rejected, bytes_pushed=self.bytes_pushed, bytes_pulled=self.bytes_pulled,
            max_staleness=c.max_staleness, max_clock_gap=c.max_clock_gap, pid=os.getpid(),
            traffic=dict(self.traffic),
        )
        self.reply(identity, protocol.encode(stats))
        self._serve_deferred()

    def on_stop(self, identity: bytes, msg: protocol.Decoded) -> None:
        self.reply(identity, protocol.encode(protocol.Ack(v=VERSION, seq=msg.header.seq)))
        self.running = False

    def on_checkpoint(self, identity: bytes, msg: protocol.Decoded) -> None:
        h = msg.header
        # only a directory name under our own root: a message must not choose where we write
        if not self.checkpoint_root or os.path.basename(h.directory) != h.directory \
                or not h.directory.startswith(checkpoint.TMP):
            raise ProtocolError(f"checkpoint directory {h.directory!r} refused (root {self.checkpoint_root!r})")
        self.checkpoint_request = (identity, h)

    def _maybe_checkpoint(self) -> None:
        """Write a requested checkpoint once the shard is at the version asked for.

        Called after every handled message: a message advances the version by at
        most one, so an exact request is never stepped over.
        """
        if self.checkpoint_request is None:
            return
        identity, h = self.checkpoint_request
        if h.exact and self.core.version < h.at_version:
            return
        self.checkpoint_request = None
        if h.exact and self.core.version > h.at_version:
            msg = f"shard {self.core.index} is at version {self.core.version}, past {h.at_version}"
            reply = protocol.error_reply(h.seq, ErrorCode.CHECKPOINT_MISSED, msg)
        else:
            name = f"shard-{self.core.index}.safetensors"
            try:
                path = os.path.join(self.checkpoint_root, h.directory, name)
                weights = self.core.weights
                digest = checkpoint.save_shard(path, weights.param, weights.optimizer, self.core.meta())
            except Exception as e:  # disk full, directory removed (abandoned): the run goes on
                log.warning("shard %d: checkpoint write failed: %s", self.core.index, e)
                reply = protocol.error_reply(h.seq, ErrorCode.INTERNAL, f"checkpoint write failed: {e}")
            else:
                self.events.emit("checkpoint_write", file=path, version=self.core.version, number=h.number)
                reply = protocol.encode(protocol.CheckpointOk(
                    v=VERSION, seq=h.seq, index=self.core.index, file=name, sha256=digest,
                    version=self.core.version, updates=self.core.updates))
        self.reply(identity, reply)

    def _serve_deferred(self) -> None:
        waiting = []
        for identity, header, deadline, arrived in self.deferred:
            if self.core.pull_ready(header):
                self._send_weights(identity, header, arrived)
            else:
                waiting.append((identity, header, deadline, arrived))
        self.deferred = waiting

    def _expire_deferred(self) -> None:
        now = time.monotonic()
        if not any(d[2] <= now for d in self.deferred):
            return
        core = self.core
        why = (f"{len(core.live)} of {core.run.min_workers} workers (--min-workers) live" if core.holding_start
               else "blocked by consistency")
        for identity, header, deadline, _ in self.deferred:
            if deadline <= now:
                msg = f"pull at clock {header.clock} still waiting after {self.timeouts.pull_wait}s: {why}"
                self.reply(identity, protocol.error_reply(header.seq, ErrorCode.WAIT_TIMEOUT, msg))
        self.deferred = [d for d in self.deferred if d[2] > now]
