"""The worker's training loop: pull, compute on a local batch, push; repeat.

Everything the worker needs (task, data partition, shard map, consistency,
codec) comes from the coordinator's join reply.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time

import msgspec
import torch
import zmq

from paramserver import interrupts, tasks, transport
from paramserver.config import RunConfig, check_pipeline
from paramserver.errors import (
    ConfigError,
    DeadlineExceeded,
    Interrupted,
    RemoteError,
    ServerUnavailable,
)
from paramserver.events import EventLog
from paramserver.protocol import ErrorCode
from paramserver.sharding import Layout, flatten_, views

from .client import ShardClient
from .config import WorkerConfig, WorkerResult
from .overlap import ShardReadiness, shard_ranges
from .session import Session
from .steps import Pace, StepLog, local_update

log = logging.getLogger(__name__)


class Trainer:
    def __init__(self, cfg: WorkerConfig, ctx: zmq.Context, on_step=None):
        self.cfg, self.ctx = cfg, ctx
        if cfg.local_steps < 0 or cfg.local_lr < 0 or cfg.max_clock < 0:
            raise ConfigError("local steps, local lr and max clock must be >= 0")
        if cfg.pipeline and cfg.overlap:
            raise ConfigError("--pipeline and --overlap do not combine: a pipelined push is sent "
                              "before the next backward begins, so there is nothing left to overlap")
        self.pace = Pace(cfg.speed)  # first: it refuses a speed out of range
        self.session = Session(ctx, route(cfg.server, cfg.routes), cfg.timeouts, cfg.keys)
        self.steps, self.loss = 0, float("nan")
        self.events = EventLog(cfg.event_log, "worker")
        self.on_step = on_step  # called as on_step(trainer) after every step: progress bars
        self.failing_since: float | None = None  # first data-path failure since the last good step
        self.backoff = 0.0
        self.paced = 0.0  # the injected delay per step, once Pace has measured the full speed
        self.sent_before = self.received_before = 0  # bytes of the shard clients closed on rejoins
        self.joined = False  # from here on a first Ctrl-C or SIGTERM lets the run end cleanly
        self.interrupted = ""  # the signal that asked the loop to end

    def interrupt(self, name: str) -> None:
        """Ctrl-C or SIGTERM (run_worker's handlers): the first, once joined, ends the loop
        before its next step (at once, if it comes while the task is set up) and the worker
        leaves, as at --max-steps; one that comes as the worker leaves by itself lets it
        finish leaving. A second, or one before joining (nothing to leave), stops at once."""
        if self.interrupted or not self.joined:
            raise KeyboardInterrupt(name)
        self.interrupted = name
        log.warning("worker %s: %s: leaving after this step (Ctrl-C or SIGTERM again to stop at once)",
                    self.session.worker_id, name)
        # from a thread: the handler runs between two bytecodes of the main thread, which may
        # hold the event's lock at that moment (inside its wait), and the lock is not reentrant
        threading.Thread(target=self.session.finish.set, name="interrupt", daemon=True).start()

    def run(self) -> WorkerResult:
        torch.set_num_threads(self.cfg.threads)
        try:
            joined = self.session.join(self.cfg.worker_id)
        except ServerUnavailable as e:
            self.events.emit("give_up", server=self.cfg.server, error=str(e))
            self.events.close()
            raise
        self.events.emit("join", worker=joined.worker_id, incarnation=joined.incarnation, clock=joined.clock,
                         server=self.cfg.server)
        # beat from the moment we are a member: building the task can take seconds
        self.session.start_heartbeats()
        self.joined = True
        run = RunConfig.from_wire(joined.config)
        try:
            self._setup(run, joined)
        except BaseException:
            self.session.close()
            self.session.leave()  # refused here, not dropped: the server need not wait out our heartbeats
            if hasattr(self, "client"):  # its open sockets would block the context's term
                self.client.close()
            raise
        log.info("worker %d training %s (%s), partition %d", joined.worker_id, run.task, run.consistency, joined.partition)
        started = time.monotonic()
        try:
            reason = self._loop(run)
            seconds = time.monotonic() - started
            self.session.leave()
            self.events.emit("leave", worker=self.session.worker_id, steps=self.steps, clock=self.clock, reason=reason)
        except ServerUnavailable as e:
            self.events.emit("give_up", worker=self.session.worker_id, steps=self.steps, error=str(e))
            raise
        finally:
            self.session.close()
            self.client.close()
            self.events.close()
            self.steplog.close()
        return WorkerResult(self.session.worker_id, self.steps, self.clock, self.loss,
                            self.bytes_sent, self.bytes_received, reason, seconds)

    @property
    def bytes_sent(self) -> int:
        return self.sent_before + self.client.bytes_sent

    @property
    def bytes_received(self) -> int:
        return self.received_before + self.client.bytes_received

    def _setup(self, run: RunConfig, joined) -> None:
        if self.cfg.pipeline:  # before any socket is made
            check_pipeline(run.consistency)
        self.task = tasks.build(run.task, run.seed)
        self.layout = Layout.of(self.task.model)
        self.params, self.grads = flatten_(self.task.model, self.layout)
        self.codec = self.cfg.codec or run.codec
        self.pull_codec = self.cfg.pull_codec or run.pull_codec
        self.client = ShardClient(self.ctx, self._routed(joined.shards), self.codec, self.cfg.keys, self.pull_codec)
        indices = tasks.partition(len(self.task.train[0]), run.partitions, joined.partition, run.seed,
                                  run.partition, self.task.train[1])
        self.batches = tasks.Batches(indices, run.batch_size, seed=(run.seed, joined.partition))
        self.bsp = run.consistency.mode == "bsp"
        self.clock = joined.clock
        self.local_steps = self.cfg.local_steps or run.local_steps
        if self.local_steps > 1:  # plain SGD, as FedAvg's clients take; momentum would outlive a push
            self.local_sgd = torch.optim.SGD(self.task.model.parameters(), lr=self.cfg.local_lr or run.local_lr)
        self.readiness = None
        self._watch_shards()
        self.steplog = StepLog(self.cfg.metrics_csv)
        if self.cfg.pipeline:  # a second gradient buffer, taking turns with the first
            self._grad_bufs = [self.grads, torch.zeros_like(self.grads)]
            self._grad_views = [views(b, self.layout) for b in self._grad_bufs]
            self._sent_from: list = [None, None]  # per buffer: the last push sent from it

    def _watch_shards(self) -> None:
        """(Re)build the backward hooks for the client's shard map, when overlap applies:
        not with local steps (the delta exists only after K steps), nor with one shard,
        whose range holds the input layer and so is final only as backward ends (measured:
        no gain, bench/findings.md)."""
        if self.readiness is not None:
            self.readiness.close()
            self.readiness = None
        if self.cfg.overlap and self.local_steps <= 1 and len(self.client.channels) > 1:
            self.readiness = ShardReadiness(list(self.task.model.parameters()), self.layout,
                                            shard_ranges(self.client.chunks))

    def _loop(self, run: RunConfig) -> str:
        if self.cfg.pipeline:
            return self._pipelined_loop()
        started = time.monotonic()
        timeouts = self.cfg.timeouts
        wait = timeouts.pull_wait + timeouts.request_timeout
        cancel = self._cancelled
        got = None  # set when self.params already hold the weights for self.clock
        while True:
            reason = self._ended()
            if reason:
                return reason
            if self.session.dropped.is_set():
                self._rejoin()
                got = None
            step_started = time.monotonic()
            # the step log's byte counts: summed over the shards' channels, so only when logging
            sent, received = (self.bytes_sent, self.bytes_received) if self.steplog.on else (0, 0)
            try:
                if got is None:
                    got = self.client.pull(self.params, self.session.worker_id, self.clock, wait, cancel=cancel)
                if got.finished:
                    return "finished"
                if self.bsp:
                    self.clock = got.version  # in bsp the round number is the clock
                    if self.cfg.max_clock and self.clock >= self.cfg.max_clock:
                        return "clock"
                # from here on a failure pulls again: part of this push may already be out
                base, got = got.version, None
                # one exchange per step: the push's answer carries the next weights
                out = self.client.start_push(self.grads, self.session.worker_id, self.session.incarnation,
                                             self.clock, base, pull=True)
                computed = time.monotonic()
                slept = self._compute(out, self.clock)
                computed = time.monotonic() - computed
                got = self.client.finish_push(out, timeouts.request_timeout, cancel=cancel,
                                              retry_for=timeouts.reconnect_timeout, pull_into=self.params,
                                              pull_wait=wait)
            except (RemoteError, Interrupted, DeadlineExceeded) as e:
                self._failed(e)
                continue
            self.failing_since, self.backoff = None, 0.0
            self._stepped(got, time.monotonic() - step_started, slept, computed, sent, received)
            self._report(started)

    def _pipelined_loop(self) -> str:
        """asp with one push always in flight (--pipeline): the gradient of step k is
        computed while the push of step k-1 and its answer travel, so a step costs about
        the longer of compute and exchange instead of their sum. Each gradient lands one
        update staler than without (its push names the weights it was computed on, so the
        shard counts that staleness). Two gradient buffers take turns: one is computed
        into while zmq may still read the other. A failure drops the push in flight and
        the gradient computed meanwhile, and starts again from a pull."""
        started = time.monotonic()
        timeouts = self.cfg.timeouts
        wait = timeouts.pull_wait + timeouts.request_timeout
        cancel = self._cancelled
        base = None  # the version of the weights in self.params; None: pull them first
        flight = None  # (Outgoing, the byte counters before it): the push whose answer is owed
        while True:
            if self.session.dropped.is_set():
                self._rejoin()
                base = flight = None
            reason = self._ended(ahead=flight is not None)
            if reason == "finished" or (reason and flight is None):
                return reason
            step_started = time.monotonic()
            got = None
            try:
                if base is None:
                    got = self.client.pull(self.params, self.session.worker_id, self.clock, wait, cancel=cancel)
                    if got.finished:
                        return "finished"
                    base = got.version
                turn, slept, computed = None, 0.0, 0.0
                if not reason:  # another push fits the run's limits: its gradient, meanwhile
                    turn = self._take_turn(flight)
                    computed = time.monotonic()
                    slept = self._compute(None, self.clock + (flight is not None), wait_sent=False)
                    computed = time.monotonic() - computed
                if flight is not None:
                    out, fsent, freceived = flight
                    flight = None
                    got = self.client.finish_push(out, timeouts.request_timeout, cancel=cancel,
                                                  retry_for=timeouts.reconnect_timeout, pull_into=self.params,
                                                  pull_wait=wait)
                    self.failing_since, self.backoff = None, 0.0
                    # a step's time is the loop's period: this turn's compute ran alongside the push
                    self._stepped(got, time.monotonic() - step_started, slept, computed, fsent, freceived)
                    self._report(started)
                    if got.finished:
                        return "finished"
                if turn is None:
                    continue  # the last push is answered: the loop's top says why it ends
                sent, received = (self.bytes_sent, self.bytes_received) if self.steplog.on else (0, 0)
                out = self.client.start_push(self._grad_bufs[turn], self.session.worker_id, self.session.incarnation,
                                             self.clock, base, pull=True)
                self._sent_from[turn] = out  # first: a send that fails part way has frames out too
                self.client.send_all(out)
                flight = (out, sent, received)
                if got is not None:
                    base = got.version
            except (RemoteError, Interrupted, DeadlineExceeded) as e:
                base = flight = None
                self._failed(e)

    def _take_turn(self, flight) -> int:
        """Point the model's .grad at the gradient buffer the push in flight does not
        read, once zmq has let go of the frames the push before it sent from there."""
        turn = 0 if flight is None or flight[0].grads is self._grad_bufs[1] else 1
        if self._sent_from[turn] is not None:
            self.client.wait_sent(self.cfg.timeouts.request_timeout, self._sent_from[turn])
        if self.grads is not self._grad_bufs[turn]:
            for p, view in zip(self.task.model.parameters(), self._grad_views[turn]):
                p.grad = view
            self.grads = self._grad_bufs[turn]
        return turn

    def _ended(self, ahead: bool = False) -> str:
        """Why the loop is to end now ('' if it is not), counting a push in flight (`ahead`)."""
        if self.session.finish.is_set():
            return "interrupted" if self.interrupted else "finished"
        if self.cfg.max_steps and self.steps + ahead >= self.cfg.max_steps:
            return "steps"
        if self.cfg.max_clock and self.clock + ahead >= self.cfg.max_clock:
            return "clock"
        return ""

    def _failed(self, e: Exception) -> None:
        """The step's exchange failed: what to do before the loop tries again."""
        if isinstance(e, RemoteError):
            self._recover(e)
        elif isinstance(e, Interrupted):
            self.client.reset()  # drop replies still owed to the abandoned requests
        else:
            self._check_server(e)

    def _stepped(self, got, seconds: float, slept: float, computed: float, sent: int, received: int) -> None:
        """A step's push was acknowledged: count it, pace the next one, log it."""
        self.clock += 1
        self.steps += 1
        self.paced = self.pace.delay(seconds - slept)  # measured without the delay it injects
        if not self.steplog.on:
            return
        self.steplog.row(time=round(time.time(), 6), worker=self.session.worker_id,
                         incarnation=self.session.incarnation, step=self.steps, clock=self.clock,
                         loss=round(self.loss, 6), staleness=got.staleness, step_seconds=round(seconds, 6),
                         compute_seconds=round(computed, 6), bytes_sent=self.bytes_sent - sent,
                         bytes_received=self.bytes_received - received)

    def _compute(self, out, clock: int, wait_sent: bool = True) -> float:
        """Fill self.grads with what the push at `clock` sends (with overlap, sending
        `out`'s shard messages as their gradients become final); returns the seconds slept
        to play a slower device (--delay, --speed), which the step's measured time leaves out."""
        k = self.local_steps
        if wait_sent:  # the last push's zero-copy frames read self.grads until zmq is done with them
            self.client.wait_sent(self.cfg.timeouts.request_timeout)
        if k > 1:
            batches = [self.batches.at(clock * k + j) for j in range(k)]
            self.loss = local_update(self.task, self.params, self.grads, self.local_sgd, batches)
        else:
            batch = self.batches.at(clock)
            x, y = self.task.train[0][batch], self.task.train[1][batch]
            self.grads.zero_()
            loss = self.task.loss(self.task.model(x), y)
            if self.readiness is None:
                loss.backward()  # accumulates into self.grads: the parameters' .grad are views of it
            else:
                with self.readiness.armed(lambda shard: self.client.send_part(out, shard)):
                    loss.backward()
            self.loss = loss.item()
        slept = self.cfg.delay + self.paced
        if slept:
            self.session.finish.wait(slept)
        return slept

    def _report(self, started: float) -> None:
        s = self.session
        s.clock, s.loss = self.clock, self.loss
        s.steps_per_s = self.steps / max(1e-9, time.monotonic() - started)
        if self.on_step is not None:
            self.on_step(self)

    def _recover(self, e: RemoteError) -> None:
        if e.code in (ErrorCode.STALE, ErrorCode.WAIT_TIMEOUT):
            log.debug("worker %d: %s; pulling again", self.session.worker_id, e)
        elif e.code == ErrorCode.NOT_MEMBER:
            # the coordinator's word has not reached the shard yet, or we were dropped
            # (then the next heartbeat says so and the loop rejoins)
            self.session.finish.wait(self.cfg.timeouts.heartbeat_interval)
        elif e.code == ErrorCode.FINISHED:
            self.session.finish.set()
        else:
            raise e

    def _cancelled(self) -> bool:
        return self.session.finish.is_set() or self.session.dropped.is_set()

    def _rejoin(self) -> None:
        """Rejoin with our id (dropped, or the server restarted) and take its shard map anew."""
        log.warning("worker %d rejoining the coordinator", self.session.worker_id)
        joined = self.session.join(self.session.worker_id)
        self.events.emit("rejoin", worker=joined.worker_id, incarnation=joined.incarnation, clock=joined.clock)
        self.sent_before, self.received_before = self.bytes_sent, self.bytes_received
        self.client.close()
        self.client = ShardClient(self.ctx, self._routed(joined.shards), self.codec, self.cfg.keys, self.pull_codec)
        self._watch_shards()
        self.clock = joined.clock

    def _routed(self, shards):
        return [msgspec.structs.replace(s, address=route(s.address, self.cfg.routes)) for s in shards]

    def _check_server(self, e: DeadlineExceeded) -> None:
        """A request timed out: retry with backoff, up to the reconnect deadline."""
        now = time.monotonic()
        self.failing_since = self.failing_since or now
        if now - self.failing_since > self.cfg.timeouts.reconnect_timeout:
            raise ServerUnavailable(
                f"no answer from the server for {now - self.failing_since:.0f}s (--reconnect-timeout): {e}") from e
        self.backoff = min(max(0.1, self.backoff * 2), 2.0)
        log.warning("worker %d: %s; retrying in %.1fs", self.session.worker_id, e, self.backoff)
        self.client.reset()
        self.session.finish.wait(self.backoff)


def route(address: str, routes: tuple[tuple[str, str], ...]) -> str:
    """Where to connect for `address`: its route if it has one, else itself."""
    return dict(routes).get(address, address)


def run_worker(cfg: WorkerConfig, ctx: zmq.Context | None = None, on_step=None,
               handle_signals: bool = False) -> WorkerResult:
    """Join the server at cfg.server and train until the run ends, cfg.max_steps or
    cfg.max_clock. `on_step(trainer)`, if given, is called after every step. With
    `handle_signals` (a process of its own, as `ps-worker join`), the first Ctrl-C or
    SIGTERM while training ends the loop after its step and leaves (Trainer.interrupt)."""
    own = ctx is None
    if own:  # a process of its own, most likely: before zmq's I/O thread allocates
        transport.tune_allocator()
    ctx = ctx or zmq.Context()
    try:
        trainer = Trainer(cfg, ctx, on_step)
        with interrupts.handled(trainer.interrupt) if handle_signals else contextlib.nullcontext():
            return trainer.run()
    finally:
        if own:
            ctx.term()
