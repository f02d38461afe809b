"""2. Shard scaling: the transport round trip with 1, 2 and 4 shard processes on this one
host, against the bare echo spread over as many echo processes (each gets an
equal part of the bytes, all in parallel, as the client does with shards), and
benchmark 1's floors (all the passes; the server's alone) spread the same way.
"""

from __future__ import annotations

import torch

from .common import MB, Procs, row, shared, summary
from .rigs import Bare, Floor, ShardHosts
from .transport import EVERY_SIZE, FLOORS, LR, close_peers, floor_ratios, gbps, label, measure

SHARDS = [1, 2, 4]
SIZES = [100 * MB]
QUICK_SIZES = [16 * MB]


def run(quick: bool = False, context: dict | None = None) -> dict:
    sizes, reps = (QUICK_SIZES, 2) if quick else (SIZES, 3)
    torch.set_num_threads(1)
    rows, raw = [], {}
    hosts, own = shared(context, "shard_hosts", ShardHosts)
    with Procs() as procs:
        bare, floors = None, {}
        try:
            bare = Bare(procs, max(SHARDS))
            for k in EVERY_SIZE:
                floors[k] = Floor(procs, FLOORS[k], LR, max(SHARDS))
            for nbytes in sizes:
                base = None
                for shards in SHARDS:
                    m = measure(hosts, bare, floors, nbytes, shards, reps, quick)
                    ours, peer = gbps(nbytes, m["ours"]), gbps(nbytes, m["bare"])
                    base = base or summary(ours)["median"]
                    r = row(f"{label(nbytes)}, {shards} shard{'s' * (shards > 1)}", "GB/s", ours, peer,
                            f"bare echo, {shards} process{'es' * (shards > 1)}", shards=shards, nbytes=nbytes,
                            target=">= 0.8x bare")
                    r["met"] = r["ratio"]["median"] >= 0.8
                    r["vs_one_shard"] = summary(ours)["median"] / base
                    ratio = floor_ratios(nbytes, m)
                    r["floor"] = summary(gbps(nbytes, m["floor"]))
                    r["floor_ratio"], r["ours_floor"] = ratio["floor"], ratio["ours / floor"]
                    r["server_ratio"] = ratio["server passes"]
                    rows.append(r)
                    raw[r["case"]] = {"bytes": nbytes, "shards": shards, **m}
        finally:
            close_peers(bare, floors)
            if own:
                hosts.close()
    return {
        "name": "scaling", "title": "2. Shard scaling",
        "what": "The benchmark-1 round trip with the model split over 1, 2 and 4 shard processes "
                "(one host), against the bare echo split over as many echo processes. "
                "'vs 1 shard' is ours at S shards over ours at 1 shard (same size). The floor is benchmark 1's "
                "(the echo making a parameter server's passes over the bytes; 'server passes' without the "
                "client's copy), split over as many processes. "
                "The machine has 2 cores, so more than 2 processes cannot add CPU.",
        "rows": rows, "raw": raw, "reps": reps,
        "detail": {"columns": ["size", "shards", "ours GB/s", "ours vs 1 shard", "bare GB/s", "floor GB/s",
                               "floor / bare", "ours / floor", "server passes / bare"],
                   "rows": [[r["case"].split(",")[0], r["shards"], r["ours"], f"{r['vs_one_shard']:.2f}x", r["peer"],
                             r["floor"], r["floor_ratio"], r["ours_floor"], r["server_ratio"]] for r in rows]},
    }


def plot(result: dict, path: str) -> None:
    import matplotlib.pyplot as plt

    sizes = sorted({r["nbytes"] for r in result["rows"]})
    fig, axes = plt.subplots(1, len(sizes), figsize=(5 * len(sizes), 4), squeeze=False)
    for ax, nbytes in zip(axes[0], sizes):
        rows = [r for r in result["rows"] if r["nbytes"] == nbytes]
        xs = [r["shards"] for r in rows]
        for key, name in (("ours", "paramserver"), ("peer", "bare pyzmq")):
            med = [r[key]["median"] for r in rows]
            err = [[m - r[key]["min"] for m, r in zip(med, rows)], [r[key]["max"] - m for m, r in zip(med, rows)]]
            ax.errorbar(xs, med, yerr=err, marker="o", capsize=3, label=name)
        ax.set(xlabel="shard (echo) processes", ylabel="GB/s (push + pull)", title=label(nbytes), xticks=xs)
        ax.set_ylim(bottom=0)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
