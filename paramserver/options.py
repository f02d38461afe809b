"""Click options shared by the CLIs, built from the config dataclasses' defaults.

Every option reads a `PS_*` environment variable (shown in --help); the table
is in docs/operations.md.
"""

from __future__ import annotations

import functools

import click

from .config import (
    AGGREGATE_HELP,
    CONSISTENCY_HELP,
    OPTIMIZERS,
    PARTITION_HELP,
    PULL_CODECS,
    Consistency,
    OptimizerConfig,
    RunConfig,
    Timeouts,
)
from .errors import ConfigError

_RUN, _OPT, _TIME = RunConfig(), OptimizerConfig(), Timeouts()


def opt(name: str, env: str, **kw):
    return click.option(name, envvar=f"PS_{env}", show_envvar=True, show_default=True, **kw)


RUN_OPTIONS = [
    opt("--task", "TASK", default=_RUN.task, help="digits-mlp, digits-cnn, or package.module:build"),
    opt("--consistency", "CONSISTENCY", default=str(_RUN.consistency), help=CONSISTENCY_HELP),
    opt("--optimizer", "OPTIMIZER", default=_OPT.name, type=click.Choice(OPTIMIZERS), help="server-side torch.optim optimizer"),
    opt("--lr", "LR", default=_OPT.lr, type=float, help="learning rate (per applied update; bsp averages, so it does not scale with workers)"),
    opt("--momentum", "MOMENTUM", default=_OPT.momentum, type=float, help="sgd momentum"),
    opt("--weight-decay", "WEIGHT_DECAY", default=_OPT.weight_decay, type=float),
    opt("--batch-size", "BATCH_SIZE", default=_RUN.batch_size, type=click.IntRange(min=1), help="samples per worker step"),
    opt("--seed", "SEED", default=_RUN.seed, type=int, help="seeds initial weights, data partitions and batch order"),
    opt("--partitions", "PARTITIONS", default=_RUN.partitions, type=click.IntRange(min=0),
        help="0: each worker samples all training data; P: worker i trains on partition i mod P"),
    opt("--partition", "PARTITION", default=_RUN.partition, help="how the data is cut into the --partitions: " + PARTITION_HELP),
    opt("--min-workers", "MIN_WORKERS", default=_RUN.min_workers, type=click.IntRange(min=0),
        help="training waits (bounded) for this many workers: in bsp the first rounds wait for their pushes, "
             "in asp and ssp the first pulls wait until they are live; once reached, the run goes on with the live workers"),
    opt("--aggregate", "AGGREGATE", default=_RUN.aggregate, help=AGGREGATE_HELP),
    opt("--clip-norm", "CLIP_NORM", default=_RUN.clip_norm, type=click.FloatRange(min=0),
        help="scale each push down to this L2 norm per shard (0: off)"),
    opt("--codec", "CODEC", default=_RUN.codec, help="default gradient codec for pushes: none | fp16 | bf16 | topk:RATIO[:noef] | sign[:noef] | qsgd:BITS | package.module:Class"),
    opt("--pull-codec", "PULL_CODEC", default=_RUN.pull_codec, type=click.Choice(PULL_CODECS),
        help="default for how pulls travel: none | fp16 | bf16 (whole weights) | delta (only the entries that changed since the worker's last pull)"),
    opt("--chunk-elems", "CHUNK_ELEMS", default=_RUN.chunk_elems, type=int, help="largest frame, in float32 elements"),
    opt("--pull-part-bytes", "PULL_PART_BYTES", default=_RUN.pull_part_bytes, type=click.IntRange(min=0),
        help="whole float32 pull answers of twice this or more travel in messages of about this size, "
             "copied in as they arrive (0: one message)"),
    opt("--local-steps", "LOCAL_STEPS", default=_RUN.local_steps, type=click.IntRange(min=1),
        help="K > 1: each push is the model delta of K local SGD steps (FedAvg-style; the server's optimizer "
             "applies it as a gradient: sgd --lr 1 --momentum 0 is FedAvg); 1: push one batch's gradient"),
    opt("--local-lr", "LOCAL_LR", default=_RUN.local_lr, type=click.FloatRange(min=0, min_open=True),
        help="learning rate of the workers' local SGD steps (with --local-steps > 1)"),
]

SERVER_TIMEOUTS = [
    opt("--heartbeat-interval", "HEARTBEAT_INTERVAL", default=_TIME.heartbeat_interval, type=click.FloatRange(min=0.01),
        help="seconds between worker heartbeats (workers are told at join)"),
    opt("--heartbeat-timeout", "HEARTBEAT_TIMEOUT", default=_TIME.heartbeat_timeout, type=click.FloatRange(min=0.05),
        help="a worker silent this long is dropped from every barrier"),
]
WORKER_TIMEOUTS = [
    opt("--request-timeout", "REQUEST_TIMEOUT", default=_TIME.request_timeout, type=click.FloatRange(min=0.1),
        help="deadline of one request to the server"),
    opt("--reconnect-timeout", "RECONNECT_TIMEOUT", default=_TIME.reconnect_timeout, type=click.FloatRange(min=0.1),
        help="how long a worker keeps trying to reach a server that is not there (yet, or any more)"),
]
TIMEOUT_OPTIONS = SERVER_TIMEOUTS + WORKER_TIMEOUTS


CLIENT_KEYS = [
    opt("--server-key", "SERVER_KEY", default="", help="the server's CURVE public key file (server.key) to encrypt with"),
    opt("--curve-secret-key", "CURVE_SECRET_KEY", default="", help="this client's CURVE secret key file (NAME.key_secret)"),
]


def _routes(ctx, param, values) -> tuple[tuple[str, str], ...]:
    out = []
    for text in values:
        real, sep, via = text.partition("=")
        if not sep or not real.strip() or not via.strip():
            raise click.BadParameter(f"{text!r} is not ADDRESS=CONNECT_TO, e.g. "
                                     "tcp://10.0.0.5:5556=tcp://127.0.0.1:7000", ctx, param)
        out.append((real.strip(), via.strip()))
    return tuple(out)


ROUTE = opt("--route", "ROUTES", multiple=True, callback=_routes,
            help="ADDRESS=CONNECT_TO: reach a coordinator or shard ADDRESS (as the server names it) through "
                 "CONNECT_TO instead, e.g. a link emulator or tcp://SOURCE_IP:0;HOST:PORT; repeat for several")


def apply(options):
    def decorate(f):
        for o in reversed(options):
            f = o(f)
        return f

    return decorate


def run_config(kw: dict, max_steps: int = 0) -> RunConfig:
    optimizer = OptimizerConfig(kw.pop("optimizer"), kw.pop("lr"), kw.pop("momentum"), kw.pop("weight_decay"))
    return RunConfig(
        task=kw.pop("task"), consistency=Consistency.parse(kw.pop("consistency")), optimizer=optimizer,
        batch_size=kw.pop("batch_size"), seed=kw.pop("seed"), partitions=kw.pop("partitions"),
        partition=kw.pop("partition"),
        max_steps=max_steps, min_workers=kw.pop("min_workers"), codec=kw.pop("codec"),
        pull_codec=kw.pop("pull_codec"),
        aggregate=kw.pop("aggregate"), clip_norm=kw.pop("clip_norm"), chunk_elems=kw.pop("chunk_elems"),
        pull_part_bytes=kw.pop("pull_part_bytes"),
        local_steps=kw.pop("local_steps"), local_lr=kw.pop("local_lr"),
    )


def timeouts(kw: dict) -> Timeouts:
    """Timeouts from whichever of the timeout options this command has."""
    names = ("heartbeat_interval", "heartbeat_timeout", "request_timeout", "reconnect_timeout")
    t = Timeouts(**{n: kw.pop(n) for n in names if n in kw})
    if t.heartbeat_timeout <= t.heartbeat_interval:
        raise ConfigError("--heartbeat-timeout must be longer than --heartbeat-interval")
    return t


def friendly(f):
    """Turn our errors into a one-line message and exit code 1 instead of a traceback."""

    @functools.wraps(f)
    def wrapper(*a, **kw):
        from .errors import PSError

        try:
            return f(*a, **kw)
        except PSError as e:
            raise click.ClickException(str(e)) from e

    return wrapper
