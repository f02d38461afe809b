"""`ps-server` and `ps-sim`: the server's and the simulation's command lines."""

from __future__ import annotations

import json
import math
import time

import click

from . import admin
from . import log as logsetup
from .config import SIM_EVAL_EVERY, CheckpointConfig, check_pipeline
from .errors import ConfigError
from .linkemu import LINK_HELP, parse_item, per_worker
from .options import (
    CLIENT_KEYS,
    RUN_OPTIONS,
    SERVER_TIMEOUTS,
    TIMEOUT_OPTIONS,
    apply,
    friendly,
    opt,
    run_config,
    timeouts,
)
from .progress import Bar

LOG_LEVEL = opt("--log-level", "LOG_LEVEL", default="info", type=click.Choice(["debug", "info", "warning", "error"]))


def _check(run) -> None:
    from . import codecs, tasks  # torch: imported only by the commands that train

    codecs.get(run.codec)
    tasks.build(run.task, run.seed)  # fail here, with the task's own error, not in a child


@click.group(context_settings={"show_default": True})
def server():
    """The parameter server: a coordinator and its shards."""


@server.command()
@opt("--host", "HOST", default="127.0.0.1", help="interface to bind; the default keeps the server on this machine")
@opt("--port", "PORT", default=5555, type=click.IntRange(0, 65535),
     help="coordinator port; shard i binds port+1+i (0: random ports)")
@opt("--shards", "SHARDS", default=1, type=click.IntRange(min=1), help="number of shard processes")
@opt("--max-steps", "MAX_STEPS", default=0, type=click.IntRange(min=0),
     help="end the run after this many applied updates (a bsp round is one); 0: run until stopped")
@opt("--checkpoint-dir", "CHECKPOINT_DIR", default="", help="write checkpoints here (empty: none)")
@opt("--checkpoint-every", "CHECKPOINT_EVERY", default=CheckpointConfig.every, type=click.FloatRange(min=0.1),
     help="seconds between checkpoints; one more is written at clean shutdown")
@opt("--keep", "CHECKPOINT_KEEP", default=CheckpointConfig.keep, type=click.IntRange(min=1), help="checkpoints kept")
@opt("--resume", "RESUME", default="", help="continue the run whose checkpoints are in this directory")
@opt("--advertise", "ADVERTISE", default="", help="host name workers should connect to (default: the bind host)")
@opt("--insecure", "INSECURE", is_flag=True, default=False,
     help="allow binding a non-loopback interface without CURVE authentication")
@opt("--curve-secret-key", "CURVE_SECRET_KEY", default="", help="the server's secret key file (server.key_secret): encrypt every socket")
@opt("--authorized-keys", "AUTHORIZED_KEYS", default="",
     help="directory of worker public keys (*.key) allowed in; read again as it changes")
@opt("--exit-when-idle", "EXIT_WHEN_IDLE", default=0.0, type=click.FloatRange(min=0),
     help="end the run when no worker has been live for this many seconds (0: never)")
@opt("--metrics-port", "METRICS_PORT", default=0, type=click.IntRange(0, 65535),
     help="serve Prometheus metrics: the coordinator on this port, shard i on port+1+i (0: off)")
@opt("--event-log", "EVENT_LOG", default="", help="append structured events (JSON lines) of every server process here")
@apply(RUN_OPTIONS)
@apply(SERVER_TIMEOUTS)
@LOG_LEVEL
@click.option("--progress/--no-progress", default=None,
              help="a progress bar of updates, live workers and loss (default: when stderr is a terminal)")
@friendly
def start(host, port, shards, max_steps, checkpoint_dir, checkpoint_every, keep, resume, advertise, insecure,
          curve_secret_key, authorized_keys, exit_when_idle, metrics_port, event_log, log_level, progress, **kw):
    """Start the coordinator and SHARDS shard processes; run until stopped or --max-steps."""
    import dataclasses

    from . import cluster
    from .security import ServerSecurity

    logsetup.setup(log_level)
    for name, base in (("--port", port), ("--metrics-port", metrics_port)):
        if base and base + shards > 65535:  # zmq would wrap a port past 65535 around
            raise ConfigError(f"{name} {base} with --shards {shards} needs ports up to {base + shards}; "
                              f"choose a {name} of at most {65535 - shards}")
    security = ServerSecurity.load(curve_secret_key, authorized_keys)
    cluster.check_bind(host, insecure, security is not None)
    t, run = timeouts(kw), run_config(kw, max_steps)
    t = dataclasses.replace(t, exit_when_idle=exit_when_idle)
    _check(run)
    spec = cluster.ServerSpec(run=run, host=host, port=port, shards=shards, timeouts=t, log_level=log_level,
                              checkpoints=CheckpointConfig(checkpoint_dir, checkpoint_every, keep), resume=resume,
                              advertise=advertise, security=security, metrics_port=metrics_port, event_log=event_log)

    bar = Bar("updates", max_steps, "{rate}/s  {workers} live workers  loss {loss}", progress)

    def ready(address):
        click.echo(f"paramserver ready: workers join with\n  ps-worker join --server {address}", err=True)
        bar.start()

    try:  # the bar starts once the server is ready, under the lines that say so
        final = cluster.serve(spec, on_ready=ready, on_tick=_Throttled(bar).update if bar.enabled else None)
    finally:
        bar.stop()
    click.echo(f"run ended after {final['updates']} updates", err=True)


class _Throttled:
    """Feeds the server's bar from the coordinator's loop, twice a second at most."""

    def __init__(self, bar: Bar):
        self.bar, self.next = bar, 0.0

    def update(self, coordinator) -> None:
        if time.monotonic() < self.next:
            return
        self.next = time.monotonic() + 0.5
        losses = [m.loss for m in coordinator.members.live.values() if not math.isnan(m.loss)]
        self.bar.update(coordinator.updates(), workers=len(coordinator.members.live),
                        loss=f"{sum(losses) / len(losses):.4f}" if losses else "-")


@server.command()
@opt("--checkpoint", "CHECKPOINT", required=True, help="a checkpoint directory (or the --checkpoint-dir holding several: the newest)")
@opt("--out", "EXPORT_OUT", required=True, help="the safetensors file to write")
@friendly
def export(checkpoint, out):
    """Write a checkpoint's weights as one safetensors file for `model.load_state_dict`."""
    import os

    from . import checkpoint as ckpt_mod

    found = ckpt_mod.verify(checkpoint) if os.path.isfile(os.path.join(checkpoint, "manifest.json")) else ckpt_mod.latest(checkpoint)
    state = ckpt_mod.export(found, out)
    click.echo(f"wrote {out}: {len(state)} tensors from {found.path} (step {found.manifest['updates']})", err=True)


@server.command()
@opt("--out", "KEYGEN_OUT", required=True, help="directory to write the key pair into")
@opt("--name", "KEYGEN_NAME", default="server", help="file name stem: NAME.key (public) and NAME.key_secret")
@friendly
def keygen(out, name):
    """Make a CURVE key pair: share NAME.key, keep NAME.key_secret private."""
    from .security import keygen as make

    public, secret = make(out, name)
    click.echo(f"public key {public}\nsecret key {secret} (keep it private)", err=True)


@server.command()
@opt("--server", "SERVER", default="tcp://127.0.0.1:5555", help="the coordinator's address")
@click.option("--json", "as_json", is_flag=True, help="print the raw status as JSON (implies --once)")
@click.option("--once", is_flag=True, help="print once and exit (the default when not on a terminal)")
@opt("--interval", "STATUS_INTERVAL", default=1.0, type=click.FloatRange(min=0.1), help="seconds between refreshes")
@opt("--timeout", "STATUS_TIMEOUT", default=5.0, type=float, help="seconds to wait for each answer")
@apply(CLIENT_KEYS)
@friendly
def status(server, as_json, once, interval, timeout, server_key, curve_secret_key):
    """Show live workers (clock, how far behind, steps/s, CPU, memory, bytes) and shards;
    on a terminal the table refreshes until Ctrl-C, the straggler in red."""
    import sys

    from rich.console import Console
    from rich.live import Live

    from .security import client_keys

    keys = client_keys(curve_secret_key, server_key)
    info = admin.status(server, timeout, keys=keys)
    if as_json:
        click.echo(json.dumps(info, indent=2, default=str))
        return
    tty = sys.stdout.isatty()
    console = Console(width=None if tty else 160)  # piped: one line per worker, not rich's 80 columns
    if once or not tty:
        console.print(admin.status_view(info))
        return
    with Live(admin.status_view(info), console=console, auto_refresh=False) as live:
        try:
            while True:
                time.sleep(interval)
                live.update(admin.status_view(admin.status(server, timeout, keys=keys)), refresh=True)
        except KeyboardInterrupt:
            pass


@server.command()
@opt("--server", "SERVER", default="tcp://127.0.0.1:5555", help="the coordinator's address")
@apply(CLIENT_KEYS)
@friendly
def stop(server, server_key, curve_secret_key):
    """End the run: workers are told to finish, then every server process exits."""
    from .security import client_keys

    admin.stop(server, keys=client_keys(curve_secret_key, server_key))
    click.echo("stop requested", err=True)


def _check_links(ctx, param, values: tuple[str, ...]) -> tuple[str, ...]:
    """Check each --link text as it is given; which worker it names is checked against --workers later."""
    for text in values:
        try:
            parse_item(text)
        except ConfigError as e:
            raise click.BadParameter(str(e), ctx, param) from None
    return values


@click.group(context_settings={"show_default": True})
def sim():
    """Local multi-process simulations."""


@sim.command("run")
@opt("--workers", "SIM_WORKERS", default=4, type=click.IntRange(min=1))
@opt("--shards", "SHARDS", default=2, type=click.IntRange(min=1))
@opt("--steps", "SIM_STEPS", default=300, type=click.IntRange(min=1), help="steps per worker")
@opt("--report", "SIM_REPORT", default="runs/sim", help="folder for report.json")
@opt("--delays", "SIM_DELAYS", default="", help="extra seconds per step for each worker, e.g. 0,0,0,0.02")
@opt("--speeds", "SIM_SPEEDS", default="",
     help="relative compute speed of each worker, e.g. 1,1,0.5,0.25: a step takes 1/speed times the worker's "
          "measured full-speed step (missing: full speed)")
@opt("--kill", "SIM_KILL", default="", help="WORKER@STEP,...: kill (SIGKILL) the worker when its clock reaches STEP")
@opt("--rejoin", "SIM_REJOIN", default="",
     help="WORKER@STEP,...: start a killed worker again, with its old id, when the run reaches STEP "
          "(the largest live clock)")
@opt("--churn", "SIM_CHURN", default="",
     help="leave:RATE,join:RATE[,graceful:SHARE]: live workers leave at random, RATE per second each, and come back "
          "at RATE; a departure is a crash (SIGKILL), or with SHARE (0 to 1) of them a graceful leave (SIGTERM: the "
          "worker ends its step and says goodbye)")
@opt("--timeout", "SIM_TIMEOUT", default=900.0, type=float, help="deadline for the whole run")
@opt("--link", "SIM_LINK", multiple=True, callback=_check_links,
     help="emulate a bad network: " + LINK_HELP + ". delay, jitter, rate: a proxy per worker; "
          "loss, down (partitions, seconds after training began): real drops with nftables, root only")
@opt("--eval-every", "SIM_EVAL_EVERY", default=SIM_EVAL_EVERY, type=click.FloatRange(min=0),
     help="evaluate the server's weights about this often (seconds) while training: the report's curve "
          "and accuracy plot (0: off)")
@opt("--target", "SIM_TARGET", default=0.95, type=click.FloatRange(0, 1),
     help="with --eval-every: the report's time_to_target is when test accuracy first reaches this")
@click.option("--pipeline", is_flag=True,
              help="asp only: every worker computes its next gradient while its last push travels (ps-worker join --pipeline)")
@click.option("--until-target", is_flag=True, help="with --eval-every: end the run once test accuracy reaches --target")
@apply(RUN_OPTIONS)
@apply(TIMEOUT_OPTIONS)
@opt("--log-level", "LOG_LEVEL", default="warning", type=click.Choice(["debug", "info", "warning", "error"]))
@click.option("--progress/--no-progress", default=True)
@friendly
def sim_run(workers, shards, steps, report, delays, speeds, kill, rejoin, churn, timeout, link, eval_every, target,
            pipeline, until_target, log_level, progress, **kw):
    """Start a server and WORKERS workers as processes, train, evaluate, write a report
    (report.json, metrics.csv, PNG plots)."""
    from .scenario import Churn, Scenario, parse_schedule, parse_speeds
    from .sim import SimConfig, simulate

    logsetup.setup(log_level)
    if until_target and not eval_every:
        raise ConfigError("--until-target needs --eval-every > 0 (the run ends on an evaluation)")
    scenario = Scenario(speeds=parse_speeds(speeds, workers) if speeds else (),
                        kills=parse_schedule(kill, "--kill", workers, first=1), rejoins=parse_schedule(rejoin, "--rejoin", workers),
                        churn=Churn.parse(churn))
    if kw["partition"] != "iid" and not kw["partitions"]:
        kw["partitions"] = workers  # one partition of the data per simulated worker
    t, run = timeouts(kw), run_config(kw)
    links = tuple(per_worker(link, workers))
    _check(run)
    if pipeline:
        check_pipeline(run.consistency)
    cfg = SimConfig(workers=workers, shards=shards, steps=steps, report=report, delays=_floats(delays),
                    timeout=timeout, progress=progress, log_level=log_level, timeouts=t, links=links,
                    eval_every=eval_every, target=target, until_target=until_target, scenario=scenario,
                    pipeline=pipeline)
    result = simulate(run, cfg)
    click.echo(f"final test accuracy {result['final_accuracy']:.4f} ({run.consistency}, {workers} workers, "
               f"{shards} shards, {result['train_seconds']:.1f}s training)")
    if eval_every:
        reached = result["time_to_target"]
        click.echo(f"test accuracy {target} " + (f"reached after {reached:.1f}s" if reached is not None else "not reached"))
    click.echo(f"report: {report}/report.json")


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise ConfigError(f"--delays takes comma-separated seconds, got {text!r}") from None


