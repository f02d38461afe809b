"""Configuration: frozen dataclasses, the one source of every default.

Every timeout has a name and a default here, and nowhere else. The CLIs expose
these fields as click options that also read `PS_*` environment variables
(see docs/operations.md for the table).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from .errors import ConfigError
from .protocol import PULL_CODECS

CONSISTENCY_HELP = "bsp | asp | ssp:S (S = bounded staleness in clocks)"
OPTIMIZERS = ("sgd", "adam", "adamw", "adagrad")
AGGREGATE_HELP = "mean | median | trimmed-mean:F (bsp; F = fraction dropped at each end, < 0.5)"


def parse_aggregate(name: str) -> tuple[str, float]:
    """("mean" | "median" | "trimmed-mean", fraction) from an --aggregate value."""
    if name in ("mean", "median"):
        return name, 0.0
    if name.startswith("trimmed-mean:"):
        try:
            fraction = float(name.split(":", 1)[1])
        except ValueError:
            fraction = -1.0
        if 0 <= fraction < 0.5:
            return "trimmed-mean", fraction
    raise ConfigError(f"unknown aggregate {name!r}: use {AGGREGATE_HELP}")


@dataclass(frozen=True)
class Timeouts:
    # a worker that misses heartbeats this long leaves `live` and every barrier;
    # the issue bounds it at 5 s so that a crash never stalls BSP for long
    heartbeat_interval: float = 0.5
    heartbeat_timeout: float = 3.0
    # one request/reply attempt on the data or control path
    request_timeout: float = 10.0
    # a pull deferred by bsp/ssp waits at most this long on the shard, then gets
    # an error reply and the worker asks again (membership will have moved on)
    pull_wait: float = 30.0
    # a worker keeps trying to reach a server that is not (yet) there, or that
    # went away, this long before it gives up with an error
    reconnect_timeout: float = 120.0
    # after the run ends, how long the coordinator waits for workers to say goodbye
    shutdown_grace: float = 5.0
    # how long a launcher waits for a spawned shard to bind and report its address
    startup: float = 60.0
    # bsp with --min-workers: a round short of workers waits this long, then closes anyway
    min_workers_wait: float = 60.0
    # end the run once no worker has been live this long; 0: never
    exit_when_idle: float = 0.0
    # how long the shards get to write one checkpoint before it is abandoned
    checkpoint_write: float = 60.0


@dataclass(frozen=True)
class CheckpointConfig:
    directory: str = ""  # "" : no checkpoints
    every: float = 30.0  # seconds between checkpoints (and one at clean shutdown)
    keep: int = 3  # newest complete checkpoints kept on disk


@dataclass(frozen=True)
class Consistency:
    mode: str = "bsp"  # bsp | asp | ssp
    staleness: int = 0  # only for ssp

    @classmethod
    def parse(cls, text: str) -> Consistency:
        text = text.strip().lower()
        if text in ("bsp", "asp"):
            return cls(text, 0)
        if text.startswith("ssp:"):
            try:
                s = int(text[4:])
            except ValueError:
                s = -1
            if s >= 0:
                return cls("ssp", s)
        raise ConfigError(f"unknown consistency {text!r}: use {CONSISTENCY_HELP}")

    def __str__(self) -> str:
        return f"ssp:{self.staleness}" if self.mode == "ssp" else self.mode


@dataclass(frozen=True)
class OptimizerConfig:
    name: str = "adam"
    lr: float = 3e-3  # adam on digits reaches 0.95 in ~300 bsp rounds of 4x32
    momentum: float = 0.9  # sgd only
    weight_decay: float = 0.0

    def __post_init__(self):
        if self.name not in OPTIMIZERS:
            raise ConfigError(f"unknown optimizer {self.name!r}: use one of {', '.join(OPTIMIZERS)}")
        if not self.lr > 0:
            raise ConfigError(f"learning rate must be > 0, got {self.lr}")


def check_pipeline(consistency: Consistency) -> None:
    """A pipelined worker (--pipeline) needs an asp server: each of its gradients is one
    update staler than without, more than ssp's bound and bsp's rounds allow."""
    if consistency.mode != "asp":
        raise ConfigError(f"--pipeline needs asp consistency, not {consistency}: a pipelined gradient is one "
                          "update staler than ssp's bound and bsp's rounds allow")


def check_pull_codec(name: str) -> str:
    if name not in PULL_CODECS:
        raise ConfigError(f"unknown pull codec {name!r}: use {' | '.join(PULL_CODECS)}")
    return name


# ps-sim: seconds between evaluations of the server's weights during a run; cheap for
# the built-in tasks, and what the report's accuracy curve and plot are drawn from
SIM_EVAL_EVERY = 0.5

PARTITION_HELP = "iid | dirichlet:ALPHA (label-skewed, smaller is more skewed) | shards:K (about K classes per worker)"


def parse_partition(scheme: str) -> tuple[str, float]:
    """("iid", 0) | ("dirichlet", alpha > 0) | ("shards", K >= 1); ConfigError otherwise."""
    kind, _, arg = scheme.partition(":")
    try:
        if kind == "iid" and not arg:
            return "iid", 0.0
        if kind == "dirichlet" and 0 < float(arg) <= 1e6:
            return "dirichlet", float(arg)
        if kind == "shards" and int(arg) >= 1:
            return "shards", int(arg)
    except ValueError:
        pass
    raise ConfigError(f"unknown partition scheme {scheme!r}: use {PARTITION_HELP}")


@dataclass(frozen=True)
class RunConfig:
    """What the coordinator tells every worker at join, and what shards run with."""

    task: str = "digits-mlp"
    consistency: Consistency = field(default_factory=Consistency)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    batch_size: int = 32
    seed: int = 0
    # 0: every worker samples the whole training set with its own seed;
    # P > 0: worker i trains on partition i mod P only (data stays local)
    partitions: int = 0
    # how the data is cut into those partitions (PARTITION_HELP)
    partition: str = "iid"
    # 0 means no limit; a bsp round counts as one update, in asp/ssp each applied push
    max_steps: int = 0
    # bsp: a round closes only with pushes from at least this many workers (bounded
    # by Timeouts.min_workers_wait), so early joiners do not train alone
    min_workers: int = 0
    codec: str = "none"
    # how pulls travel unless a worker asks otherwise: none | fp16 | bf16 | delta
    pull_codec: str = "none"
    aggregate: str = "mean"
    # > 0: each push's gradient slice is scaled down to at most this L2 norm on the
    # shard that receives it (per shard: no shard sees the whole gradient)
    clip_norm: float = 0.0
    # 1M float32 = 4 MB: the frame size the transport is fastest with (DESIGN.md)
    chunk_elems: int = 1 << 20
    # a whole float32 pull answer of at least twice this many bytes, in several chunks,
    # travels as messages of about this size: the worker copies one in while the next is on
    # the wire (docs/protocol.md, pull_ok); 0: always one message
    pull_part_bytes: int = 4 << 20
    # FedAvg-style: K > 1 makes every push the model delta of K local SGD steps at
    # local_lr, which the server's optimizer applies as a gradient (sgd at lr 1.0
    # without momentum is FedAvg proper); 1 pushes the gradient of one batch
    local_steps: int = 1
    local_lr: float = 0.1

    def __post_init__(self):
        if self.batch_size < 1:
            raise ConfigError("batch size must be >= 1")
        if min(self.max_steps, self.partitions, self.min_workers) < 0:
            raise ConfigError("max steps, partitions and min workers must be >= 0")
        parse_aggregate(self.aggregate)
        check_pull_codec(self.pull_codec)
        if parse_partition(self.partition)[0] != "iid" and not self.partitions:
            raise ConfigError(f"--partition {self.partition} needs --partitions P > 0 (the number of data partitions)")
        if not self.clip_norm >= 0:
            raise ConfigError("--clip-norm must be >= 0")
        if self.local_steps < 1 or not self.local_lr > 0:
            raise ConfigError("--local-steps must be >= 1 and --local-lr > 0")
        if not 0 <= self.pull_part_bytes <= 1 << 40:
            raise ConfigError("--pull-part-bytes must be 0 (one message) to 2^40")
        if not 1024 <= self.chunk_elems <= 4 << 20:
            raise ConfigError("chunk size must be 1024 to 4194304 elements (16 MB frames at most)")

    def to_wire(self) -> dict:
        d = dataclasses.asdict(self)
        d["consistency"] = str(self.consistency)
        return d

    @classmethod
    def from_wire(cls, d: dict) -> RunConfig:
        try:
            d = dict(d)
            d["consistency"] = Consistency.parse(d["consistency"])
            d["optimizer"] = OptimizerConfig(**d["optimizer"])
            return cls(**d)
        except (KeyError, TypeError) as e:
            raise ConfigError(f"bad run config from server: {e}") from e
