"""What a worker is told to do (`WorkerConfig`) and what it reports when it ends
(`WorkerResult`): the values `ps-worker join`'s options map to, one default each."""

from __future__ import annotations

from dataclasses import dataclass, field

from paramserver.config import Timeouts
from paramserver.security import Keys


@dataclass(frozen=True)
class WorkerConfig:
    server: str = "tcp://127.0.0.1:5555"
    worker_id: int = -1  # -1: a new id; set to rejoin as a worker that left
    max_steps: int = 0  # 0: train until the server ends the run
    threads: int = 1  # torch threads; workers and shards share the cores
    # extra seconds slept per step, to play a slower device in simulations and tests
    delay: float = 0.0
    # relative compute speed in (0, 1]: each step sleeps so that it takes 1/speed times
    # the worker's measured full-speed step (steps.Pace)
    speed: float = 1.0
    # stop once the clock reaches this (0: no limit); a rejoining simulated worker
    # trains to the same clock as the others
    max_clock: int = 0
    local_steps: int = 0  # > 0: this worker's K for FedAvg-style local steps (0: the server's)
    local_lr: float = 0.0  # > 0: this worker's local SGD learning rate (0: the server's)
    # send each shard's push during backward, as soon as its gradients are final
    # (workers/overlap.py); off by default: on 2 shared cores it did not pay with 2
    # workers and gained a few percent with 4 (bench/findings.md). Never with local steps > 1 (their delta exists only
    # after K steps) nor with one shard (nothing to overlap)
    overlap: bool = False
    # asp only: compute the next gradient while the last push and its answer travel, one
    # push always in flight (each gradient one update staler; Trainer._pipelined_loop)
    pipeline: bool = False
    metrics_csv: str = ""  # a CSV file for one row per step (steps.StepLog.FIELDS)
    codec: str = ""  # "" takes the server's default
    pull_codec: str = ""  # "" takes the server's default
    event_log: str = ""  # a JSON-lines file for this worker's events (join, rejoin, leave, give up)
    keys: Keys | None = None  # CURVE client keys (security.client_keys); None: plain sockets
    timeouts: Timeouts = field(default_factory=Timeouts)
    # (address, connect here instead) pairs for the coordinator and shard addresses the
    # server gives: a link emulator's proxy, or `tcp://SOURCE:0;HOST:PORT` to send from
    # SOURCE (ps-sim --link); addresses not listed are used as given
    routes: tuple[tuple[str, str], ...] = ()


@dataclass
class WorkerResult:
    worker_id: int
    steps: int
    clock: int
    loss: float
    bytes_sent: int
    bytes_received: int
    reason: str  # why the loop ended: steps | clock | finished | interrupted
    train_seconds: float = 0.0  # in the training loop: from the first pull to the last step
