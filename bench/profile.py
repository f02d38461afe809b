"""Where a transport round trip spends its time: cProfile on both ends.

    python -m bench.profile [SIZE_MB ...]      (default: 0.004 16 100)

Runs one shard (`cluster.shard_main`) in a spawned process under cProfile and
drives it from this process, also under cProfile, with the benchmark-1 round
trip (ShardClient.push + ShardClient.pull). Prints the top functions of each
side by own time, and writes bench/results/profile_*.txt.
"""

from __future__ import annotations

import cProfile
import io
import os
import pstats
import sys
import tempfile

import torch

from paramserver import cluster, protocol, sharding
from paramserver.config import Timeouts

from .common import MB, RESULTS, SPAWN, Procs, get
from .rigs import Ours, stop_shards
from .transport import transport_run

TOP = 14


def profiled_shard(index, chunks, spec, address, ready, out_path) -> None:
    torch.set_num_threads(1)
    prof = cProfile.Profile()
    prof.enable()
    try:
        cluster.shard_main(index, chunks, spec, address, "", ready, os.getppid())
    finally:
        prof.disable()
        prof.dump_stats(out_path)


class _OneHost:
    """Stands in for ShardHosts: one profiled shard process per start."""

    def __init__(self, procs: Procs, out_path: str):
        self.procs, self.out_path = procs, out_path

    def start(self, run, shards):
        spec = cluster.ServerSpec(run=run, shards=1, timeouts=Timeouts(), log_level="warning")
        layout, _ = cluster.initial_weights(run)
        chunks = sharding.plan(layout.total, 1, run.chunk_elems)[0]
        ready = SPAWN.Queue()
        self.proc = self.procs.spawn(profiled_shard, 0, chunks, spec, "tcp://127.0.0.1:0", ready, self.out_path)
        _, address, error = get(ready, 120, "profiled shard", [self.proc])
        if error:
            raise RuntimeError(error)
        return [protocol.ShardSpec(index=0, address=address, chunks=[(c.key, c.start, c.stop) for c in chunks])]

    def wait_idle(self, n):
        self.proc.join(30)

    def restart(self):
        pass


def stats_text(source, title: str) -> str:
    buf = io.StringIO()
    stats = source if isinstance(source, pstats.Stats) else pstats.Stats(source, stream=buf)
    stats.stream = buf
    buf.write(f"==== {title}\n")
    stats.sort_stats("tottime").print_stats(TOP)
    return buf.getvalue()


def profile(nbytes: int, iters: int) -> str:
    torch.set_num_threads(1)
    out_path = os.path.join(tempfile.mkdtemp(prefix="bench-profile-"), "shard.prof")
    os.makedirs(RESULTS, exist_ok=True)
    with Procs() as procs:
        ours = Ours(_OneHost(procs, out_path), transport_run(nbytes), 1)
        try:
            for _ in range(2):
                ours.round_trip()
            client = cProfile.Profile()
            client.enable()
            for _ in range(iters):
                ours.round_trip()
            client.disable()
        finally:
            ours.client.close()
            stop_shards(ours.ctx, ours.specs)
            ours.ctx.term()
            ours.hosts.wait_idle(1)
    label = f"{nbytes / MB:g} MB x {iters} round trips"
    text = stats_text(pstats.Stats(client), f"client (bench process), {label}")
    text += stats_text(pstats.Stats(out_path), f"shard process, {label} (idle polling included)")
    with open(os.path.join(RESULTS, f"profile_{nbytes}.txt"), "w") as f:
        f.write(text)
    os.remove(out_path)
    os.rmdir(os.path.dirname(out_path))
    return text


def main(argv=None) -> None:
    sizes = [float(a) for a in (argv if argv is not None else sys.argv[1:])] or [0.004096, 16, 100]
    for mb in sizes:
        nbytes = int(mb * MB)
        print(profile(nbytes, max(3, min(500, int(200 * MB / max(nbytes, 1))))))


if __name__ == "__main__":
    main()
