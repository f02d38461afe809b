"""1. Transport ceiling: a push + pull round trip of the whole model through the real
ShardClient and shard processes, against a bare pyzmq DEALER/ROUTER echo of the
same bytes between two processes in pyzmq's fastest form (zero-copy frames of
4 MB each way, received without a copy).

Both move the model's bytes once up and once down per round trip, so GB/s is
2 * size / round-trip time for both. Ours runs asp (pulls never wait) and plain
SGD without momentum (the apply is one in-place add; benchmark 5 times it).

From 1 MB up a third peer runs in the same rotation, the floor (`echo.floor_main`):
the same bare echo making the three passes over the bytes that a parameter server
makes, the server's finiteness check and SGD step and the client's copy of the
answer into its weights, with nothing else (each stepped frame goes out at once,
as our shard's answer parts do). A fourth makes the server's two alone: no parameter
server can leave them out, whatever a worker does with the answer. At one size each
pass also runs alone. They say what the passes themselves cost against the echo, and how
much of our gap to the echo is ours.
"""

from __future__ import annotations

import numpy as np
import torch

from paramserver.config import Consistency, OptimizerConfig, RunConfig

from . import tasks
from .common import MB, Procs, interleaved, paired_ratios, row, shared, summary, timed
from .echo import PASSES
from .rigs import Bare, Floor, Ours, ShardHosts

SMALL = 4096
SIZES = [SMALL, 1 * MB, 16 * MB, 100 * MB, 400 * MB]
QUICK_SIZES = [SMALL, 16 * MB]
# the floor peers: all the passes; the server's (the check and the step: a worker that took the
# answer's frames as its weights would skip its copy, no server can skip these); and each pass
# alone (at one size only: they split the floor up)
FLOORS = {"floor": PASSES, "server passes": ("check", "step"), **{f"{p} only": (p,) for p in PASSES}}
EVERY_SIZE = ("floor", "server passes")
SPLIT_SIZE, QUICK_SPLIT_SIZE = 100 * MB, 16 * MB
LR = 1e-6  # ours and the floor's SGD rate: small, so the weights drift little over thousands of round trips


def label(nbytes: int) -> str:
    return f"{nbytes // 1024} KB" if nbytes < MB else f"{nbytes // MB} MB"


def transport_run(nbytes: int) -> RunConfig:
    return RunConfig(task=tasks.flat_task(nbytes), consistency=Consistency("asp"),
                     optimizer=OptimizerConfig("sgd", lr=LR, momentum=0.0))


def repetitions(nbytes: int, reps: int) -> int:
    """Up to 1 MB a repetition takes a fraction of a second, and the ratio of one moves with
    the machine's moment: a few more cost seconds and steady the median."""
    return 2 * reps + 1 if nbytes <= MB else reps


def iterations(nbytes: int, quick: bool) -> int:
    """Round trips per repetition: about 0.4 GB moved, at least 2 and at most 300."""
    n = max(2, min(300, int(400 * MB / nbytes)))
    return max(2, n // 4) if quick else n


def measure(hosts: ShardHosts, bare: Bare, floors: dict, nbytes: int, shards: int, reps: int, quick: bool) -> dict:
    """Alternate ours, bare and `floors` (name -> Floor) at one size and shard count;
    seconds per round trip per repetition."""
    ours = Ours(hosts, transport_run(nbytes), shards)
    try:
        bare.use(nbytes, shards)
        for f in floors.values():
            f.use(nbytes, shards)
        runs = {"ours": ours.round_trip, "bare": bare.round_trip, **{k: f.round_trip for k, f in floors.items()}}
        for _ in range(2):  # warm-up: first-touch page faults, TCP windows, snapshot buffers
            for f in runs.values():
                f()
        n = iterations(nbytes, quick)
        times = interleaved({k: (lambda f=f: timed(f, n)) for k, f in runs.items()}, repetitions(nbytes, reps))
        for _ in range(max(2, n // 2)):  # for the record: the same as a push and then a pull
            ours.split_trip()
        return {**times, "iters": n, "push_s": _median(ours.push_s), "pull_s": _median(ours.pull_s)}
    finally:
        ours.close()


def _median(xs):
    return float(np.median(xs)) if xs else None


def gbps(nbytes: int, seconds: list) -> list:
    return [2 * nbytes / s / 1e9 for s in seconds]


def run(quick: bool = False, context: dict | None = None) -> dict:
    sizes, reps = (QUICK_SIZES, 3) if quick else (SIZES, 5)
    split = QUICK_SPLIT_SIZE if quick else SPLIT_SIZE
    torch.set_num_threads(1)
    rows, raw, floor_rows = [], {}, []
    hosts, own = shared(context, "shard_hosts", ShardHosts)
    with Procs() as procs:
        bare, floors = None, {}
        try:
            bare = Bare(procs, 1)
            for k, passes in FLOORS.items():
                floors[k] = Floor(procs, passes, LR)
            for nbytes in sizes:
                peers = {} if nbytes == SMALL else {k: f for k, f in floors.items() if k in EVERY_SIZE or nbytes == split}
                m = measure(hosts, bare, peers, nbytes, 1, reps, quick)
                raw[label(nbytes)] = {"bytes": nbytes, **m}
                rows.append(size_row(nbytes, m))
                if peers:
                    floor_rows.append(floor_row(nbytes, m))
        finally:
            close_peers(bare, floors)
            if own:
                hosts.close()
    return {
        "name": "transport", "title": "1. Transport ceiling",
        "what": "Push + pull round trip of the whole model through ShardClient and one shard process "
                "(asp, SGD without momentum), as a worker's step makes it: one exchange, the push answered "
                "with the next weights; against a bare pyzmq DEALER/ROUTER echo of the same bytes "
                "between two processes with zero-copy 4 MB frames. Every process on both sides sets up malloc alike "
                "(transport.tune_allocator: received frames reuse memory). GB/s = 2 x size / round-trip time; "
                f"4 KB is reported as round-trip latency. tcp on loopback for both. {reps} repetitions "
                f"a size, {repetitions(MB, reps)} up to 1 MB.",
        "rows": rows, "raw": raw, "reps": reps,
        "detail": {
            "title": "The passes over the bytes that a parameter server makes, as a bare pyzmq floor: the "
                     "echo's server checks the gradients for NaN and Inf (the shards' dot-product test) and "
                     "steps its weights with them (`w -= lr * g`, one pass), sending each 4 MB frame of the "
                     "weights as soon as it is stepped (as a shard sends its answer's parts); its client "
                     "copies the answer into a flat buffer. Nothing else: no header, no validation, no "
                     "consistency rule. 'server passes' is the same floor without the client's copy: the "
                     "check and the step, which no parameter server can leave out. Run in the same rotation "
                     f"as ours and the echo; at {label(split)} each pass also runs alone. Paired ratios of "
                     "GB/s, median [min-max].",
            "columns": ["size", "ours / bare", "floor / bare", "ours / floor",
                        *[f"{k} / bare" for k in FLOORS if k != "floor"]],
            "rows": floor_rows,
        },
    }


def floor_ratios(nbytes: int, m: dict) -> dict:
    """Paired GB/s ratios of one `measure`: ours and each floor it ran against the echo
    (None for a floor it did not run), and "ours / floor"."""
    bare = gbps(nbytes, m["bare"])
    ratio = {k: summary(paired_ratios(gbps(nbytes, m[k]), bare)) if k in m else None for k in ("ours", *FLOORS)}
    ratio["ours / floor"] = summary(paired_ratios(gbps(nbytes, m["ours"]), gbps(nbytes, m["floor"])))
    return ratio


def floor_row(nbytes: int, m: dict) -> list:
    """[size, ours/bare, floor/bare, ours/floor, each pass alone/bare] for the detail table."""
    ratio = floor_ratios(nbytes, m)
    return [label(nbytes), ratio["ours"], ratio["floor"], ratio["ours / floor"],
            *[ratio[k] for k in FLOORS if k != "floor"]]


def close_peers(bare: Bare | None, floors: dict) -> None:
    for peer in (bare, *floors.values()):
        if peer is not None:
            peer.close()


def size_row(nbytes: int, m: dict) -> dict:
    ours, bare = gbps(nbytes, m["ours"]), gbps(nbytes, m["bare"])
    r = row(label(nbytes), "GB/s", ours, bare, "bare pyzmq echo")
    ratio = r["ratio"]["median"]
    if nbytes == SMALL:
        us_ours, us_bare = [s * 1e6 for s in m["ours"]], [s * 1e6 for s in m["bare"]]
        r = row(label(nbytes), "us per round trip", us_ours, us_bare, "bare pyzmq echo", better="lower")
        r["target"] = "ours <= 100 us; <= 2x bare"
        r["met"] = r["ours"]["median"] <= 100 and r["ratio"]["median"] <= 2
    elif nbytes >= 16 * MB:
        r["target"], r["met"] = ">= 0.8x bare", ratio >= 0.8
    else:
        r["target"], r["met"] = ">= 0.5x bare (no more than 2x slower)", ratio >= 0.5
    r["push_ms"] = m["push_s"] * 1e3 if m["push_s"] is not None else None
    r["pull_ms"] = m["pull_s"] * 1e3 if m["pull_s"] is not None else None
    return r


def plot(result: dict, path: str) -> None:
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if r["metric"] == "GB/s"]
    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    xs = [result["raw"][r["case"]]["bytes"] / MB for r in rows]
    for key, name in (("ours", "paramserver"), ("peer", "bare pyzmq")):
        med = [r[key]["median"] for r in rows]
        err = [[m - r[key]["min"] for m, r in zip(med, rows)], [r[key]["max"] - m for m, r in zip(med, rows)]]
        ax[0].errorbar(xs, med, yerr=err, marker="o", capsize=3, label=name)
    ax[0].set(xscale="log", xlabel="model size (MB)", ylabel="GB/s (push + pull)", title="round-trip throughput")
    ax[0].legend()
    med = [r["ratio"]["median"] for r in rows]
    err = [[m - r["ratio"]["min"] for m, r in zip(med, rows)], [r["ratio"]["max"] - m for m, r in zip(med, rows)]]
    ax[1].errorbar(xs, med, yerr=err, marker="o", capsize=3)
    ax[1].axhline(0.8, ls="--", color="grey", label="target 0.8")
    ax[1].set(xscale="log", xlabel="model size (MB)", ylabel="ours / bare", title="ratio", ylim=(0, 1.2))
    ax[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
