"""Overlap of push and backward on the 25M model, focused: `python -m bench.overlap`.

bsp with and without `--overlap` (workers/overlap.py), with 2 shards (and 1:
since the measurement in bench/findings.md a worker with one shard takes the
plain path, so there both rows run the same code), next to torch DDP, all in one invocation and in rotating order; every figure is
a ratio against a run of the same repetition: ours / DDP, and overlap / no
overlap at the same shard count. Prints a markdown table (median [min-max]);
the raw runs go to bench/results/overlap.json. Not part of `bench.run`: the
training benchmark carries the 2-shard case.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from dataclasses import replace

import torch

from .common import paired_ratios, summary, write_json
from .engine import Runner
from .training import WIDE, run_system

log = logging.getLogger(__name__)


def cases(shards: list[int]) -> list[tuple[str, int]]:
    """(system, shards): DDP first (its shard count means nothing)."""
    return [("ddp", 0)] + [(m, s) for s in shards for m in ("bsp", "bsp+overlap")]


def run(workers: int, shards: list[int], reps: int, steps: int) -> dict:
    torch.set_num_threads(1)
    todo, runs = cases(shards), {}
    runner = Runner(max(4, workers))
    try:
        for r in range(reps):
            for system, s in todo[r % len(todo):] + todo[: r % len(todo)]:
                w = replace(WIDE, steps=steps, shards=s or WIDE.shards)
                got = run_system(runner, w, system, workers)
                runs.setdefault(f"{system} s{s}", []).append(got.get("samples_per_s"))
                log.warning("%s, %d shards, x%d: %s", system, s, workers, got.get("samples_per_s", got))
    finally:
        runner.close()
    return runs


def fmt(x: dict) -> str:
    if x["median"] is None:
        return "-"
    return f"{x['median']:.3g} [{x['min']:.3g}-{x['max']:.3g}]"


def table(runs: dict, shards: list[int], workers: int) -> str:
    ddp = runs["ddp s0"]
    lines = [f"| {workers} workers, bsp | samples/s | / DDP | overlap / without |", "|---|---|---|---|"]
    for s in shards:
        off = runs[f"bsp s{s}"]
        for name in ("bsp", "bsp+overlap"):
            ours = runs[f"{name} s{s}"]
            vs = fmt(summary(paired_ratios(ours, off))) if name != "bsp" else ""
            lines.append(f"| {s} shard{'s' if s > 1 else ''}, {name} | {fmt(summary(ours))} | "
                         f"{fmt(summary(paired_ratios(ours, ddp)))} | {vs} |")
    lines.append(f"| torch DDP | {fmt(summary(ddp))} | 1 | |")
    return "\n".join(lines)


def window(shards: int, steps: int = 12, warmup: int = 2) -> str:
    """In this process, one torch thread: how long before backward ends each shard's
    gradients are final, i.e. how much of the step its push could hide behind."""
    from paramserver import sharding
    from workers.overlap import ShardReadiness, shard_ranges

    from .tasks import wide_mlp

    torch.set_num_threads(1)
    task = wide_mlp()
    model, (x, y) = task["model"], task["train"]
    layout = sharding.Layout.of(model)
    _, grads = sharding.flatten_(model, layout)
    readiness = ShardReadiness(list(model.parameters()), layout, shard_ranges(sharding.plan(layout.total, shards, 1 << 20)))
    fwd, bwd, early = [], [], {s: [] for s in range(shards)}
    for i in range(steps):
        batch = slice(i * 32, (i + 1) * 32)
        grads.zero_()
        t0 = time.perf_counter()
        loss = task["loss"](model(x[batch]), y[batch])
        t1, final = time.perf_counter(), {}
        with readiness.armed(lambda s: final.__setitem__(s, time.perf_counter())):  # noqa: B023 (used at once)
            loss.backward()
        t2 = time.perf_counter()
        if i >= warmup:
            fwd.append(t1 - t0)
            bwd.append(t2 - t1)
            for s, t in final.items():
                early[s].append(t2 - t)
    readiness.close()
    ms = [f"shard {s} {statistics.median(v) * 1e3:.0f}" for s, v in early.items()]
    return (f"{shards} shards: forward {statistics.median(fwd) * 1e3:.0f} ms, backward {statistics.median(bwd) * 1e3:.0f} ms; "
            f"final this many ms before backward ends: {', '.join(ms)}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.overlap", description=__doc__.splitlines()[0])
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--shards", default="2", help="comma-separated shard counts")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--steps", type=int, default=WIDE.steps, help="steps per worker per run")
    p.add_argument("--window", action="store_true",
                   help="only time, in this process, how long before backward ends each shard is final")
    args = p.parse_args(argv)
    shards = [int(s) for s in args.shards.split(",")]
    if args.window:
        for s in shards:
            print(window(s))
        return
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    runs = run(args.workers, shards, args.reps, args.steps)
    write_json("overlap", {"args": vars(args), "runs": runs})
    print(table(runs, shards, args.workers))


if __name__ == "__main__":
    main()
