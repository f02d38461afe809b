"""Starting and stopping server processes: shards and the coordinator.

Every child is started with multiprocessing's `spawn` (ZeroMQ contexts and
torch thread pools do not survive `fork`), and every wait for one has a
deadline. A shard exits by itself when its launcher disappears.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import multiprocessing
import os
import queue as queue_mod
import signal
import socket
import time
from dataclasses import dataclass, field

import torch
import zmq

from . import checkpoint, interrupts, protocol, sharding, tasks, transport
from . import log as logsetup
from .config import CheckpointConfig, RunConfig, Timeouts
from .coordinator import Coordinator
from .errors import ConfigError, PSError
from .events import EventLog
from .security import ServerSecurity
from .shard import ShardCore, ShardServer

log = logging.getLogger(__name__)
SPAWN = multiprocessing.get_context("spawn")


def initial_weights(run: RunConfig) -> tuple[sharding.Layout, torch.Tensor]:
    """The task's seeded initial weights as one flat float32 vector, shape (total,)."""
    model = tasks.build(run.task, run.seed).model
    layout = sharding.Layout.of(model)
    return layout, torch.cat([p.detach().reshape(-1).float() for p in model.parameters()])


@dataclass(frozen=True)
class ServerSpec:
    """Everything `ps-server start` needs; picklable, so a spawned process can take it."""

    run: RunConfig
    host: str = "127.0.0.1"
    port: int = 0  # 0: random ports (tests, simulations)
    shards: int = 1
    timeouts: Timeouts = field(default_factory=Timeouts)
    checkpoints: CheckpointConfig = field(default_factory=CheckpointConfig)
    resume: str = ""  # a checkpoint root to resume from
    log_level: str = "info"
    # the host name workers are told to connect to; "" : the bind host, or this
    # machine's name when binding every interface
    advertise: str = ""
    security: ServerSecurity | None = None  # CURVE keys and allow-list; None: plain sockets
    metrics_port: int = 0  # > 0: Prometheus metrics, coordinator here, shard i at +1+i
    event_log: str = ""  # a JSON-lines file every server process appends its events to

    @property
    def public_host(self) -> str:
        if self.advertise:
            return self.advertise
        return socket.gethostname() if self.host in WILDCARDS else self.host


WILDCARDS = ("0.0.0.0", "*", "::", "[::]")
LOOPBACK = ("127.", "localhost", "::1", "[::1]")


def check_bind(host: str, insecure: bool, secure: bool) -> None:
    """Refuse to expose an unauthenticated server beyond this machine unless told to."""
    if host.startswith(LOOPBACK) or insecure or secure:
        return
    raise ConfigError(
        f"binding {host} without CURVE would let anyone who reaches it push, pull and stop the run. "
        "Make keys with `ps-server keygen --out keys --name server` (and one per worker), then start with "
        "--curve-secret-key keys/server.key_secret --authorized-keys DIR_OF_WORKER_KEYS; "
        "or pass --insecure to bind anyway on a network you trust")


def _public(address: str, host: str) -> str:
    """`address` with its host replaced by `host` (tcp only)."""
    if not address.startswith("tcp://"):
        return address
    return f"tcp://{host}:{address.rsplit(':', 1)[1]}"


def shard_main(index, chunks, spec: ServerSpec, address, resume_file, ready, parent_pid, restart: bool = False):
    transport.tune_allocator()  # first: before zmq's I/O thread allocates
    # Ctrl-C in a terminal reaches the whole process group: the coordinator finishes
    # the run and then stops us, so the last checkpoint still gets written
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logsetup.setup(spec.log_level)
    torch.set_num_threads(1)
    run, timeouts = spec.run, spec.timeouts
    _, flat = initial_weights(run)
    lo, hi = (chunks[0].start, chunks[-1].stop) if chunks else (0, 0)
    ctx = zmq.Context()
    if spec.security:
        spec.security.start(ctx)
    try:
        core = ShardCore(index, chunks, flat[lo:hi], run, timeouts.min_workers_wait)
        if resume_file:
            core.restore(*checkpoint.load_shard(resume_file))
        events = EventLog(spec.event_log, f"shard-{index}")
        server = ShardServer(ctx, core, address, timeouts, spec.checkpoints.directory, spec.security, events)
        if spec.metrics_port:
            server.metrics.serve(spec.host, spec.metrics_port + 1 + index)
        events.emit("start", shard=index, address=server.address, version=core.version, resumed_from=resume_file)
    except (zmq.ZMQError, PSError, OSError) as e:
        taken = isinstance(e, zmq.ZMQError) and e.errno == errno.EADDRINUSE
        hint = "" if not taken else (
            "; the port was free when the run started: another process has taken it since" if restart
            else "; the shards take the ports after --port's: choose another --port")
        ready.put((index, None, f"shard {index} at {address}: {e}{hint}"))
        _end(ctx, spec)
        return
    ready.put((index, server.address, None))
    log.info("shard %d serving %d parameters at %s (version %d)", index, hi - lo, server.address, core.version)
    server.serve(parent_pid=parent_pid)
    _end(ctx, spec)


def _end(ctx: zmq.Context, spec: ServerSpec) -> None:
    if spec.security:
        spec.security.stop()
    # destroy, not term: a socket left open on some error path would make term wait forever
    ctx.destroy(linger=0)


def shard_address(host: str, port: int, index: int) -> str:
    return f"tcp://{host}:{port + 1 + index if port else 0}"


def start_shards(spec: ServerSpec, resume: checkpoint.Checkpoint | None = None):
    """Spawn the shard processes; returns (processes, shard specs) once all are bound."""
    starting = ShardStart(spec, resume)
    try:
        while (specs := starting.poll(0.2)) is None:
            pass
    except BaseException:
        stop_processes(starting.procs, 1.0)
        raise
    return starting.procs, specs


class ShardStart:
    """Shard processes on their way up. `poll` collects the addresses they report
    without blocking the caller for longer than it asks, so that a coordinator that
    restarts its shards keeps answering while they import torch and load the checkpoint."""

    def __init__(self, spec: ServerSpec, resume: checkpoint.Checkpoint | None = None, restart: bool = False):
        # restart: these shards replace ones that died mid-run, on the same ports
        layout, _ = initial_weights(spec.run)
        self.plan = sharding.plan(layout.total, spec.shards, spec.run.chunk_elems)
        self.spec, self.ready, self.procs, self.addresses = spec, SPAWN.Queue(), [], {}
        self.deadline = time.monotonic() + spec.timeouts.startup
        for i, chunks in enumerate(self.plan):
            resume_file = resume.shard_file(i) if resume else ""
            p = SPAWN.Process(target=shard_main, name=f"ps-shard-{i}",
                              args=(i, chunks, spec, shard_address(spec.host, spec.port, i), resume_file, self.ready,
                                    os.getpid(), restart))
            p.start()
            self.procs.append(p)

    def poll(self, wait: float = 0.0) -> list[protocol.ShardSpec] | None:
        """The shard map once every shard has bound its socket, None while one has not
        (after waiting up to `wait` seconds for it); ConfigError or PSError if a shard
        failed to start or they did not all start within `Timeouts.startup`."""
        while len(self.addresses) < len(self.procs):
            try:
                index, address, error = self.ready.get(timeout=wait) if wait else self.ready.get_nowait()
            except queue_mod.Empty:
                dead = [p.name for p in self.procs if p.exitcode not in (None, 0)]
                if dead:
                    raise PSError(f"{', '.join(dead)} exited during start-up; see its log above") from None
                if time.monotonic() > self.deadline:
                    raise PSError(f"shards did not start within {self.spec.timeouts.startup}s") from None
                return None
            if error:
                raise ConfigError(error)
            self.addresses[index] = address
        host = self.spec.public_host
        return [protocol.ShardSpec(index=i, address=_public(self.addresses[i], host),
                                   chunks=[(c.key, c.start, c.stop) for c in chunks])
                for i, chunks in enumerate(self.plan)]


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


def prepare(spec: ServerSpec) -> tuple[ServerSpec, checkpoint.Checkpoint | None]:
    """Check the checkpoint options; on --resume, the run config comes from the checkpoint."""
    if not spec.resume:
        if spec.checkpoints.directory and checkpoint.complete(spec.checkpoints.directory):
            raise ConfigError(f"{spec.checkpoints.directory} already holds checkpoints; continue that run with "
                              f"--resume {spec.checkpoints.directory}, or choose an empty --checkpoint-dir")
        return spec, None
    ckpt = checkpoint.latest(spec.resume)
    saved = RunConfig.from_wire(ckpt.manifest["config"])
    if saved.task != spec.run.task:
        raise ConfigError(f"{ckpt.path} is a checkpoint of task {saved.task!r}, not {spec.run.task!r}; "
                          "pass the same --task (or none) to resume it")
    layout, _ = initial_weights(saved)
    if checkpoint.signature(layout) != ckpt.manifest["signature"]:
        raise ConfigError(f"{ckpt.path}: the model of task {saved.task!r} no longer matches the checkpoint "
                          "(parameter names or shapes changed)")
    if len(ckpt.manifest["shards"]) != spec.shards:
        raise ConfigError(f"{ckpt.path} was written by {len(ckpt.manifest['shards'])} shards; "
                          f"resume with --shards {len(ckpt.manifest['shards'])}")
    saved = dataclasses.replace(saved, max_steps=spec.run.max_steps or saved.max_steps)
    directory = spec.checkpoints.directory or spec.resume
    return dataclasses.replace(spec, run=saved, checkpoints=dataclasses.replace(spec.checkpoints, directory=directory)), ckpt


def serve(spec: ServerSpec, on_ready=None, on_tick=None) -> dict:
    """Run a whole server (shard processes + the coordinator here) until the run ends;
    `on_tick(coordinator)`, if given, runs on every turn of the coordinator's loop."""
    spec, resume = prepare(spec)
    if resume:
        log.info("resuming run %s from %s (step %d)", resume.manifest["run_id"], resume.path, resume.manifest["updates"])
    _check_port(spec)
    procs, specs = start_shards(spec, resume)
    ctx = zmq.Context()
    if spec.security:
        spec.security.start(ctx)
    try:
        try:
            coordinator = Coordinator(ctx, f"tcp://{spec.host}:{spec.port}", spec.run, specs, spec.timeouts,
                                      initial_weights(spec.run)[0], spec.checkpoints, resume, spec.security,
                                      EventLog(spec.event_log, "coordinator"))
        except zmq.ZMQError as e:  # taken since _check_port
            raise _port_taken(spec, e) from e
        if spec.metrics_port:
            try:
                coordinator.metrics.serve(spec.host, spec.metrics_port)
            except OSError as e:
                coordinator.close()
                raise ConfigError(f"cannot serve metrics on {spec.host}:{spec.metrics_port}: {e}; "
                                  "choose another --metrics-port") from e
        log.info("coordinator at %s; %d shards; %s", coordinator.address, spec.shards, spec.run.consistency)
        if on_ready:
            on_ready(_public(coordinator.address, spec.public_host))
        supervisor = _Supervisor(spec, procs)

        def watch(c: Coordinator) -> None:
            supervisor.watch(c)
            if on_tick is not None:
                on_tick(c)

        # SIGTERM as Ctrl-C: the run finishes, final checkpoint included, so a service
        # manager's stop (systemd, `docker stop`, `kill`) loses nothing acknowledged since
        # the last periodic checkpoint; a second one stops at once (Coordinator._interrupted)
        with interrupts.handled(interrupts.interrupt, (signal.SIGTERM,)):
            coordinator.serve(watch=watch)
        if supervisor.failed:
            raise PSError(supervisor.failed)
        return coordinator.status()
    finally:
        stop_processes(procs, spec.timeouts.shutdown_grace)
        _end(ctx, spec)


def _check_port(spec: ServerSpec) -> None:
    """ConfigError now if the coordinator's port is taken, rather than after the shards
    have started (seconds: each imports torch) and been stopped again."""
    if not spec.port:
        return
    ctx = zmq.Context()
    try:
        sock, _ = transport.listen(ctx, f"tcp://{spec.host}:{spec.port}")
        sock.close(linger=0)
    except zmq.ZMQError as e:
        raise _port_taken(spec, e) from e
    finally:
        ctx.term()


def _port_taken(spec: ServerSpec, e: zmq.ZMQError) -> ConfigError:
    return ConfigError(f"cannot bind tcp://{spec.host}:{spec.port}: {e}; choose another --port")


class _Supervisor:
    """Restarts every shard from the newest checkpoint when one dies (the shards must agree).

    Called on every turn of the coordinator's loop, it never waits there: the new shards
    are collected over the turns that follow, while the coordinator goes on answering
    heartbeats and status (a restart takes seconds: each shard imports torch and loads
    its part of the checkpoint)."""

    def __init__(self, spec: ServerSpec, procs: list):
        self.spec, self.procs, self.failed = spec, procs, ""
        self.starting: tuple[ShardStart, checkpoint.Checkpoint] | None = None

    def watch(self, coordinator: Coordinator) -> None:
        if coordinator.state == "stopped":
            return
        if self.starting is not None:
            self._collect(coordinator)
            return
        dead = [p for p in self.procs if p.exitcode is not None]
        if not dead:
            return
        names = ", ".join(f"{p.name} (exit {p.exitcode})" for p in dead)
        root = self.spec.checkpoints.directory
        if coordinator.state != "run" or not (root and checkpoint.complete(root)):
            why = "the run was finishing" if coordinator.state != "run" else "there is no checkpoint to restart from"
            self.failed = f"{names} died and {why}; run ended"
            log.error(self.failed)
            coordinator.state = "stopped"
            return
        ckpt = checkpoint.latest(root)
        log.error("%s died; restarting all shards from %s (step %d)", names, ckpt.path, ckpt.manifest["updates"])
        stop_processes(self.procs, 0.0)
        coordinator.restarting = ckpt.path
        starting = ShardStart(dataclasses.replace(self.spec, resume=root), ckpt, restart=True)
        self.procs[:] = starting.procs  # from now on these are the ones stopped at the end
        self.starting = (starting, ckpt)

    def _collect(self, coordinator: Coordinator) -> None:
        starting, ckpt = self.starting
        try:
            specs = starting.poll()
        except PSError as e:  # ConfigError too: a shard that cannot load its checkpoint
            self.failed = f"restarting the shards from {ckpt.path} failed: {e}; run ended"
            log.error(self.failed)
            coordinator.state = "stopped"
            return
        if specs is not None:
            self.starting = None
            coordinator.restart(specs, ckpt)


def server_main(spec: ServerSpec, ready):
    """Entry point of a spawned server process (used by ps-sim and the tests)."""
    logsetup.setup(spec.log_level)
    torch.set_num_threads(1)
    try:
        serve(spec, on_ready=lambda a: ready.put((a, None)))
    except PSError as e:
        ready.put((None, str(e)))
