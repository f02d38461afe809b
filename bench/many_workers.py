"""6. Many workers: 32 light clients (no model compute: pull, then push a fixed random
gradient, again and again) against 2 shards of the digits-mlp model (9,610
parameters, Adam, asp), served by a real server; pushes/s, p50/p99 push latency
and errors.

The peer is the same 32 clients, threads and message pattern against 2 bare
pyzmq ROUTER processes that only do what a shard must at the least: answer a
push (its gradient frames) with a small ack, and a pull with the weights' bytes
(zero-copy). The 32 clients are 4 processes of 8 threads; each client has its
own sockets, session and heartbeats.
"""

from __future__ import annotations

import os
import threading
import time

import numpy as np
import torch
import zmq

from paramserver import admin, sharding, tasks
from paramserver.config import Consistency, RunConfig

from .common import SPAWN, Procs, get, percentile, row, shared, summary
from .echo import skeleton_main
from .engine import TIMEOUTS, Pool, Runner, Server

PROCESSES, THREADS = 4, 8
SHARDS = 2
TASK = "digits-mlp"


# -- clients, inside a pool process ---------------------------------------------------------


def clients_job(kind: str, address, seconds: float, threads: int, seed: int, stop_at=None) -> dict:
    """`threads` clients for `seconds`; their push latencies (s) and errors."""
    torch.set_num_threads(1)
    ctx = zmq.Context()
    out: list[dict] = [{} for _ in range(threads)]
    start = time.monotonic() + 0.5  # all threads begin together
    run = _ours_client if kind == "ours" else _bare_client
    ts = [threading.Thread(target=run, args=(ctx, address, start, seconds, seed * 100 + i, out[i]))
          for i in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(seconds + 60)
    ctx.term()
    return {"latencies": [x for o in out for x in o.get("latencies", [])],
            "errors": sum(o.get("errors", 0) for o in out) + sum(1 for t in ts if t.is_alive()),
            "messages": [m for o in out for m in o.get("messages", [])][:5]}


def _ours_client(ctx, server: str, start: float, seconds: float, seed: int, out: dict) -> None:
    from paramserver.errors import PSError
    from workers.client import ShardClient
    from workers.session import Session

    session = Session(ctx, server, TIMEOUTS)
    joined = session.join()
    session.start_heartbeats()
    total = max(c[2] for s in joined.shards for c in s.chunks)
    client = ShardClient(ctx, joined.shards)
    weights = torch.empty(total)
    grads = torch.from_numpy(np.random.default_rng(seed).standard_normal(total, dtype=np.float32))
    latencies, errors, messages, clock = [], 0, [], joined.clock
    _wait(start)
    end = start + seconds
    while time.monotonic() < end:
        try:
            got = client.pull(weights, session.worker_id, clock, 10.0)
            t = time.perf_counter()
            client.push(grads, session.worker_id, session.incarnation, clock, got.version, 10.0)
            latencies.append(time.perf_counter() - t)
            clock += 1
            session.clock = clock
        except PSError as e:
            errors += 1
            messages.append(str(e)[:200])
            client.reset()
    client.close()
    session.leave()
    session.close()
    out.update(latencies=latencies, errors=errors, messages=messages)


def _bare_client(ctx, addresses: list, start: float, seconds: float, seed: int, out: dict) -> None:
    parts = [np.random.default_rng(seed + i).standard_normal(n // 4, dtype=np.float32) for i, (_, n) in enumerate(addresses)]
    socks = []
    for a, _ in addresses:
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.connect(a)
        socks.append(s)
    latencies, errors = [], 0
    _wait(start)
    end = start + seconds
    while time.monotonic() < end:
        try:
            _exchange(socks, [[b"pull"]] * len(socks))
            t = time.perf_counter()
            _exchange(socks, [[b"push", p] for p in parts])
            latencies.append(time.perf_counter() - t)
        except TimeoutError:
            errors += 1
    for s in socks:
        s.close(linger=0)
    out.update(latencies=latencies, errors=errors)


def _exchange(socks, messages) -> None:
    for s, m in zip(socks, messages):
        s.send_multipart(m, copy=False)
    for s in socks:
        if not s.poll(10_000):
            raise TimeoutError("no reply")
        s.recv_multipart(copy=False)


def _wait(until: float) -> None:
    time.sleep(max(0.0, until - time.monotonic()))


# -- the benchmark ------------------------------------------------------------------------------


def shard_bytes() -> list[int]:
    layout = sharding.Layout.of(tasks.build(TASK).model)
    return [4 * sum(c.numel for c in cs) for cs in sharding.plan(layout.total, SHARDS, RunConfig().chunk_elems)]


def one_rep(pool: Pool, kind: str, address, seconds: float) -> dict:
    jobs = [("bench.many_workers:clients_job", {"kind": kind, "address": address, "seconds": seconds,
                                                "threads": THREADS, "seed": i})
            for i in range(PROCESSES)]
    outs = pool.run(jobs, seconds + 120)
    lat = [x for o in outs for x in o["latencies"]]
    return {"pushes_per_s": len(lat) / seconds, "p50_ms": 1e3 * percentile(lat, 50), "p99_ms": 1e3 * percentile(lat, 99),
            "errors": sum(o["errors"] for o in outs), "messages": [m for o in outs for m in o["messages"]][:5]}


def run(quick: bool = False, context: dict | None = None) -> dict:
    torch.set_num_threads(1)
    seconds, reps = (2.0, 2) if quick else (8.0, 3)
    ctx = zmq.Context()
    runner, own = shared(context, "runner", Runner)
    pool = runner.pool
    res: dict[str, list] = {"ours": [], "bare": []}
    try:
        with Procs() as procs:
            ready = SPAWN.Queue()
            sizes = shard_bytes()
            skel = [procs.spawn(skeleton_main, ready, os.getpid(), n, name=f"bench-skeleton-{i}") for i, n in enumerate(sizes)]
            bare = [(get(ready, 60, "skeleton start", skel), n) for n in sizes]
            server = Server(RunConfig(task=TASK, consistency=Consistency("asp")), SHARDS)
            try:
                for r in range(reps):
                    for kind in (["ours", "bare"] if r % 2 == 0 else ["bare", "ours"]):
                        res[kind].append(one_rep(pool, kind, server.address if kind == "ours" else bare, seconds))
                rejected = sum(s["rejected"] for s in admin.status(server.address, 5.0, ctx)["shards"])
            finally:
                server.stop(ctx)
                server.join()
    finally:
        ctx.term()
        if own:
            runner.close()
    errors = sum(r["errors"] for r in res["ours"]) + rejected
    get_ = lambda kind, key: [r[key] for r in res[kind]]  # noqa: E731
    n = PROCESSES * THREADS
    rows = [
        row(f"{n} clients, 2 shards", "pushes/s", get_("ours", "pushes_per_s"), get_("bare", "pushes_per_s"),
            "bare pyzmq skeleton", target="no errors", met=errors == 0, errors=errors),
        row(f"{n} clients, 2 shards", "p50 push latency (ms)", get_("ours", "p50_ms"), get_("bare", "p50_ms"),
            "bare pyzmq skeleton", better="lower", target="report"),
        row(f"{n} clients, 2 shards", "p99 push latency (ms)", get_("ours", "p99_ms"), get_("bare", "p99_ms"),
            "bare pyzmq skeleton", better="lower", target="report"),
    ]
    return {
        "name": "many_workers", "title": "6. Many workers",
        "what": f"{n} light clients ({PROCESSES} processes x {THREADS} threads; pull, then push a random gradient, "
                f"no compute) against {SHARDS} shards of digits-mlp (asp, Adam), {seconds:.0f} s per repetition. "
                f"Errors: {errors} (client-side exceptions plus messages the shards rejected).",
        "rows": rows, "raw": res, "errors": errors,
        "latency_ms": {k: summary(get_(k, "p50_ms")) for k in res},
    }


def plot(result: dict, path: str) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(9, 3.5))
    for i, metric in enumerate(["pushes/s", "push latency (ms)"]):
        rows = [r for r in result["rows"] if (metric in r["metric"])]
        labels = [r["metric"].replace(" push latency (ms)", "") for r in rows]
        x = np.arange(len(rows))
        for j, (key, name) in enumerate((("ours", "paramserver"), ("peer", "bare skeleton"))):
            ax[i].bar(x + 0.4 * j, [r[key]["median"] for r in rows], 0.4, label=name)
        ax[i].set_xticks(x + 0.2, labels)
        ax[i].set(title=metric)
        ax[i].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
