"""`ps-worker`: join a server and train."""

from __future__ import annotations

import click

from paramserver import log as logsetup
from paramserver.config import PULL_CODECS
from paramserver.options import CLIENT_KEYS, ROUTE, WORKER_TIMEOUTS, apply, friendly, opt, timeouts
from paramserver.progress import Bar

from .config import WorkerConfig
from .trainer import run_worker


@click.group(context_settings={"show_default": True})
def worker():
    """A training worker."""


@worker.command()
@opt("--server", "SERVER", default="tcp://127.0.0.1:5555", help="the coordinator's address: the one thing a worker needs")
@opt("--worker-id", "WORKER_ID", default=-1, type=int, help="rejoin with this id (-1: a new one)")
@opt("--max-steps", "WORKER_MAX_STEPS", default=0, type=click.IntRange(min=0), help="stop after this many steps (0: when the server ends the run)")
@opt("--threads", "THREADS", default=1, type=click.IntRange(min=1), help="torch threads")
@opt("--codec", "WORKER_CODEC", default="", help="gradient codec for this worker's pushes, e.g. topk:0.01 or sign (empty: the server's default)")
@opt("--pull-codec", "WORKER_PULL_CODEC", default="", type=click.Choice(["", *PULL_CODECS]),
     help="how this worker's pulls travel: fp16 or bf16 (whole weights), delta (only what changed), none (empty: the server's default)")
@opt("--event-log", "WORKER_EVENT_LOG", default="", help="append this worker's events (JSON lines) here")
@opt("--delay", "WORKER_DELAY", default=0.0, type=click.FloatRange(min=0), help="extra seconds per step (simulates a slow device)")
@opt("--speed", "WORKER_SPEED", default=1.0, type=click.FloatRange(0, 1, min_open=True),
     help="play a slower device: each step takes 1/SPEED times this worker's measured full-speed step")
@opt("--local-steps", "WORKER_LOCAL_STEPS", default=0, type=click.IntRange(min=0),
     help="K > 1: push the model delta of K local SGD steps (FedAvg-style); 1: push gradients; 0: the server's setting")
@opt("--local-lr", "WORKER_LOCAL_LR", default=0.0, type=click.FloatRange(min=0),
     help="learning rate of the local SGD steps (0: the server's --local-lr)")
@opt("--overlap/--no-overlap", "WORKER_OVERLAP", default=WorkerConfig.overlap,
     help="send each shard its gradients during backward, as soon as they are final (not with --local-steps > 1)")
@opt("--pipeline/--no-pipeline", "WORKER_PIPELINE", default=WorkerConfig.pipeline,
     help="asp only: compute the next gradient while the last push and its answer travel (each gradient one update staler)")
@opt("--metrics-csv", "WORKER_METRICS_CSV", default="",
     help="append one CSV row per step here: time, loss, clock, staleness, step and compute seconds, bytes")
@click.option("--progress/--no-progress", default=None, help="a progress bar (default: when stderr is a terminal)")
@ROUTE
@apply(CLIENT_KEYS)
@apply(WORKER_TIMEOUTS)
@opt("--log-level", "LOG_LEVEL", default="info", type=click.Choice(["debug", "info", "warning", "error"]))
@friendly
def join(server, worker_id, max_steps, threads, codec, pull_codec, event_log, delay, speed, local_steps, local_lr,
         overlap, pipeline, metrics_csv, progress, route, server_key, curve_secret_key, log_level, **kw):
    """Join the server at SERVER and train until the run ends."""
    from paramserver.security import client_keys

    logsetup.setup(log_level)
    cfg = WorkerConfig(server=server, worker_id=worker_id, max_steps=max_steps, threads=threads,
                       codec=codec, pull_codec=pull_codec, event_log=event_log, delay=delay, speed=speed,
                       local_steps=local_steps, local_lr=local_lr, overlap=overlap, pipeline=pipeline, metrics_csv=metrics_csv,
                       timeouts=timeouts(kw), keys=client_keys(curve_secret_key, server_key), routes=route)
    with Bar("worker {id}", max_steps, "{rate} steps/s  clock {clock}  loss {loss}", progress) as bar:
        def show(t):
            bar.update(t.steps, id=t.session.worker_id, clock=t.clock, loss=f"{t.loss:.4f}")

        result = run_worker(cfg, on_step=show if bar.enabled else None, handle_signals=True)
    click.echo(f"worker {result.worker_id} done: {result.steps} steps, last loss {result.loss:.4f} ({result.reason})", err=True)
