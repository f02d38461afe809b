"""3. Training against DDP: the same model, data, batch size per worker, seed, optimizer
(Adam) and number of workers, trained by one process, by torch DDP (gloo, spawned
processes on loopback) and by paramserver in bsp, asp and ssp:2.

Two workloads: the digits MLP (9,610 parameters: every step is a few hundred
microseconds of compute, so the exchange's latency decides) and an MLP of
25.2M parameters on synthetic data (every step moves 100 MB each way).
"""

from __future__ import annotations

import logging

import torch

from .common import row, shared, summary
from .engine import Runner, Workload, with_steps

log = logging.getLogger(__name__)

DIGITS = Workload("digits-mlp", "digits-mlp", steps=500, shards=1, lr=3e-3, eval_every=0.025, timeout=60)
# a step moves 100 MB each way and takes seconds here: few steps, enough for a rate
WIDE = Workload("wide-mlp-25m", "bench.tasks:wide_mlp", steps=5, shards=2, lr=3e-4, timeout=300)
# asp also runs with the workers' --pipeline (each computes its next gradient while its last
# push travels), next to asp without it
MODES = ["bsp", "asp", "asp+pipeline", "ssp:2"]
# the 25M model also runs bsp with --overlap (workers/overlap.py), next to bsp without it
WIDE_MODES = [*MODES, "bsp+overlap"]


def plan(quick: bool) -> list[tuple[Workload, list[int], list[str], int]]:
    """(workload, worker counts, our modes, repetitions)."""
    if quick:
        # the 25M model's full 5 steps: with fewer, an asp worker often finishes before the
        # other's first step, and the rate falls back to the whole run's (engine.measure)
        return [(with_steps(DIGITS, 150), [2], ["bsp", "asp", "asp+pipeline"], 1), (WIDE, [2], ["asp"], 1)]
    # a repetition's ratio moves with the machine's moment (within one invocation DDP x2
    # ran digits at 23-36k samples/s and the 25M model at 149-191): 5 repetitions of
    # digits, each 2-worker run paired with a DDP run of its own (`beside`), and 3 of the
    # 25M model (about 2 minutes each) keep one odd run from moving a median, and the
    # suite under 20 minutes
    return [(DIGITS, [2, 4], MODES, 5), (WIDE, [2, 4], WIDE_MODES, 3)]


def beside(w: Workload, system: str, n: int) -> bool:
    """Whether this run of ours gets a DDP run of its own right next to it, its ratio's peer.
    For digits with 2 workers, the cases with targets: a run takes seconds, and this
    machine's speed changes over tens of seconds (the single process ran at 55-84k
    samples/s within one invocation), more than between two adjacent runs."""
    return w.name == DIGITS.name and n == 2 and system not in ("single", "ddp")


def beside_key(system: str, n: int) -> str:
    return f"ddp x{n} beside {system}"


def systems(workers: list[int], modes: list[str]) -> list[tuple[str, int]]:
    """Every (system, workers) of one workload: the single process first."""
    out = [("single", 1)]
    for n in workers:
        out += [("ddp", n)] + [(m, n) for m in modes]
    return out


def run_system(runner: Runner, w: Workload, system: str, n: int, **kw) -> dict:
    try:
        if system in ("single", "ddp"):
            return runner.ddp(w, n, **kw)
        mode, _, flag = system.partition("+")
        return runner.ours(w, n, mode, overlap=flag == "overlap", pipeline=flag == "pipeline", **kw)
    except Exception as e:  # noqa: BLE001 (a failed run is data: reported, not fatal)
        log.error("%s %s x%d failed: %s", w.name, system, n, e)
        return {"error": str(e)}


def run(quick: bool = False, context: dict | None = None) -> dict:
    torch.set_num_threads(1)
    runs: dict[str, dict[str, list]] = {}
    runner, own = shared(context, "runner", Runner)
    try:
        for w, workers, modes, reps in plan(quick):
            todo = systems(workers, modes)
            for r in range(reps):  # rotate the order so drift does not favour one system
                for system, n in todo[r % len(todo):] + todo[: r % len(todo)]:
                    pair = [(system, f"{system} x{n}")]
                    if beside(w, system, n):  # DDP first in even repetitions, second in odd ones
                        pair.insert(r % 2, ("ddp", beside_key(system, n)))
                    for name, key in pair:
                        got = run_system(runner, w, name, n)
                        runs.setdefault(w.name, {}).setdefault(key, []).append(got)
                        log.warning("%s %s: %s", w.name, key, _brief(got))
    finally:
        if own:
            runner.close()
    return result(runs, plan(quick))


def _brief(got: dict) -> str:
    if "error" in got:
        return got["error"]
    sps, tt = got["samples_per_s"], got["time_to_target"]
    return (f"{'no' if sps is None else round(sps)} samples/s, to target {tt if tt is None else round(tt, 2)} s, "
            f"final {got['final_accuracy']:.3f}")


def target(w: Workload, system: str, n: int) -> float | None:
    """The least samples/s against DDP's that the system should reach, where one is set:
    on digits with 2 workers asp 1.8x (with or without --pipeline) and bsp 1x; on the
    25M model bsp 0.8x."""
    if w.name == DIGITS.name and n == 2:
        return {"asp": 1.8, "bsp": 1.0}.get(system.partition("+")[0])
    if w.name == WIDE.name and system.partition("+")[0] == "bsp":
        return 0.8
    return None


def values(runs: list, key: str) -> list:
    return [r.get(key) if r and "error" not in r else None for r in runs]


def result(runs: dict, plans) -> dict:
    rows, detail = [], []
    for w, workers, modes, _ in plans:
        got = runs.get(w.name, {})
        for (system, n) in systems(workers, modes):
            rs = got.get(f"{system} x{n}", [])
            detail.append([w.name, "single process" if system == "single" else ("torch DDP" if system == "ddp" else system), n,
                           summary(values(rs, "samples_per_s")), summary(values(rs, "time_to_target")) if w.eval_every else None,
                           summary(values(rs, "final_accuracy")), sum(1 for r in rs if "error" in r),
                           sum(1 for r in rs if r.get("rate_over") == "whole run")])
            if system in ("single", "ddp"):
                continue
            paired = beside(w, system, n)
            ddp = got.get(beside_key(system, n) if paired else f"ddp x{n}", [])
            peer = f"DDP x{n} beside" if paired else f"DDP x{n}"
            r = row(f"{w.name}, {system}, {n} workers", "samples/s", values(rs, "samples_per_s"),
                    values(ddp, "samples_per_s"), peer)
            least, ratio = target(w, system, n), r["ratio"]["median"]
            if least:
                r["target"], r["met"] = f">= {least:g}x DDP", ratio is not None and ratio >= least
            rows.append(r)
            if w.eval_every:
                rows.append(row(f"{w.name}, {system}, {n} workers", f"s to {w.target} accuracy",
                                values(rs, "time_to_target"), values(ddp, "time_to_target"), peer, better="lower"))
    return {
        "name": "training", "title": "3. Training against DDP",
        "what": "Same model, data order, batch size per worker (32), seed, optimizer (Adam) and number of workers; "
                "every process (DDP ranks, our workers and shards) uses one torch thread. "
                f"digits-mlp: {plans[0][0].steps} steps per worker, lr {plans[0][0].lr}, 1 shard; "
                "test accuracy checked every 25 ms on worker 0 / rank 0 (and at the end). "
                + (f"wide-mlp-25m: {plans[1][0].steps} steps per worker, lr {plans[1][0].lr}, 2 shards; bsp+overlap is bsp "
                   "with the workers' --overlap (each shard's push sent during backward). " if len(plans) > 1 else "")
                + "asp+pipeline is asp with the workers' --pipeline (each computes its next gradient while its "
                "last push and the answer travel). "
                + "samples/s counts the window in which every worker is stepping (or, in a run where one worker "
                "finished before another's first step, every sample from the moment the last worker connected "
                "to the last step; such runs are counted in the detail); time to target is measured "
                "from the moment the last worker connected. The coordinator runs on a thread of the bench process, "
                "shards and workers are processes; ours runs with --min-workers equal to the worker count (no worker "
                "trains before all are in, as behind DDP's start barrier). "
                + "Repetitions, in rotating order: " + ", ".join(f"{p[0].name} {p[3]}" for p in plans) + ". "
                + "On digits with 2 workers each of our runs has a DDP x2 run of its own right before or after it "
                "(alternately), and its ratios are against that run: the machine's speed drifts over the tens of "
                "seconds a rotation takes. Elsewhere a repetition's DDP run is the peer.",
        "rows": rows,
        "detail": {"columns": ["workload", "system", "workers", "samples/s", "s to 0.95", "final accuracy", "failed runs",
                               "rate over the whole run"],
                   "rows": detail},
        "raw": runs,
    }


def plot(result: dict, path: str) -> None:
    import matplotlib.pyplot as plt

    digits = result["raw"].get("digits-mlp", {})
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    for name, rs in digits.items():
        if " beside " in name:  # DDP's own curve is there already
            continue
        ok = [r for r in rs if r and "error" not in r and r["trace"]]
        if ok:
            t, acc = zip(*ok[0]["trace"])
            ax[0].plot(t, acc, label=name, lw=1)
    ax[0].axhline(0.95, ls="--", color="grey")
    ax[0].set(xlabel="seconds since all workers connected", ylabel="test accuracy", title="digits-mlp (first repetition)",
              ylim=(0.5, 1.0))
    ax[0].legend(fontsize=7)
    names, med, lo, hi = [], [], [], []
    for wl, sysname, n, sps, *_ in result["detail"]["rows"]:
        if sps["median"] is not None:
            short = {"single process": "single", "torch DDP": "DDP"}.get(sysname, sysname)
            names.append(f"{wl.split('-')[0]} {short} x{n}")
            med.append(sps["median"])
            lo.append(sps["median"] - sps["min"])
            hi.append(sps["max"] - sps["median"])
    ax[1].barh(range(len(names)), med, xerr=[lo, hi], capsize=2)
    ax[1].set_yticks(range(len(names)), names, fontsize=7)
    ax[1].set(xscale="log", xlabel="samples/s (log)", title="throughput")
    ax[1].invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
