"""5. Server apply: how many gradients per second a shard takes in on a model of 25M
parameters (100 MB), for SGD (momentum 0.9) and Adam (fused), against:

- torch.optim stepping the same tensor in one process (the optimizer call the
  shard makes, with nothing around it);
- the machine's memcpy bandwidth: the rate an update would reach if it moved
  its bytes at memcpy speed (SGD with momentum reads grad, buffer and weights
  and writes buffer and weights: 5 x 100 MB; Adam reads grad, weights, m, v
  and writes weights, m, v: 7 x 100 MB). Not a hard bound: an in-place update
  skips the read-for-ownership a copy's destination costs, so torch.optim can
  beat it;

measured two ways: `ShardCore` in this process fed a decoded push (validation,
decode, finiteness check, optimizer: the shard's own work), and a real shard
process fed by `ShardClient.push` (the wire included). One torch thread, as
shards run.
"""

from __future__ import annotations

import itertools

import numpy as np
import torch

from paramserver import protocol, sharding
from paramserver.config import Consistency, OptimizerConfig, RunConfig
from paramserver.protocol import VERSION
from paramserver.shard import ShardCore

from . import tasks
from .common import MB, interleaved, row, shared, summary, timed
from .rigs import Ours, ShardHosts

NUMEL = 25_000_000
PASSES = {"sgd": 5, "adam": 7}  # 100 MB passes an update must read or write at least
CONFIGS = {"sgd": OptimizerConfig("sgd", lr=1e-3, momentum=0.9), "adam": OptimizerConfig("adam", lr=1e-3)}


def _run(name: str) -> RunConfig:
    return RunConfig(task=tasks.flat_task(100 * MB), consistency=Consistency("asp"), optimizer=CONFIGS[name])


class CoreFeed:
    """A ShardCore holding all 25M parameters, fed the same decoded push again and again."""

    def __init__(self, name: str, grad: torch.Tensor):
        run = _run(name)
        self.chunks = sharding.plan(NUMEL, 1, run.chunk_elems)[0]
        self.core = ShardCore(0, self.chunks, torch.zeros(NUMEL), run)
        self.core.set_live({0: (0, 0)})
        self.metas = [protocol.TensorMeta(key=c.key, dtype="float32", shape=[c.numel]) for c in self.chunks]
        arr = grad.numpy()
        self.buffers = [memoryview(arr[c.start: c.stop]).cast("B") for c in self.chunks]
        self.seq = itertools.count(1)

    def step(self) -> None:
        h = protocol.Push(v=VERSION, seq=next(self.seq), worker_id=0, incarnation=0, clock=0,
                          base_version=self.core.version, tensors=self.metas)
        self.core.push(h, self.core.decode_push(h, self.buffers))
        self.core.weights.settle()  # the whole update: no answer goes out to run it part by part


class TorchFeed:
    """The peer: the torch.optim optimizer the shard uses, stepping one 25M tensor."""

    def __init__(self, name: str, grad: torch.Tensor):
        self.param = torch.nn.Parameter(torch.zeros(NUMEL))
        cfg = CONFIGS[name]
        if name == "sgd":
            self.opt = torch.optim.SGD([self.param], lr=cfg.lr, momentum=cfg.momentum)
        else:
            self.opt = torch.optim.Adam([self.param], lr=cfg.lr, fused=True)
        self.grad = grad

    def step(self) -> None:
        self.param.grad = self.grad
        self.opt.step()




def memcpy_gbps(reps: int) -> list[float]:
    """Bytes copied per second by torch's copy_ of 100 MB (the traffic is twice that)."""
    src, dst = torch.rand(NUMEL), torch.empty(NUMEL)
    dst.copy_(src)
    return [NUMEL * 4 / timed(lambda: dst.copy_(src), 5) / 1e9 for _ in range(reps)]


def measure(hosts: ShardHosts, name: str, grad: torch.Tensor, reps: int, iters: int) -> dict[str, list[float]]:
    """Seconds per gradient: core vs torch, then the wire vs torch, alternating."""
    core, peer = CoreFeed(name, grad), TorchFeed(name, grad)
    core.step()
    peer.step()
    t = interleaved({"core": lambda: timed(core.step, iters), "torch": lambda: timed(peer.step, iters)}, reps)
    core = None  # free its 300 MB before a shard process takes as much
    wire = Ours(hosts, _run(name), 1)  # a shard process fed through ShardClient.push
    try:
        wire.push()
        t.update(interleaved({"wire": lambda: timed(wire.push, iters), "torch2": lambda: timed(peer.step, iters)}, reps))
    finally:
        wire.close()
    return t


def run(quick: bool = False, context: dict | None = None) -> dict:
    torch.set_num_threads(1)
    reps, iters = (2, 2) if quick else (5, 4)
    grad = torch.from_numpy(np.random.default_rng(0).standard_normal(NUMEL, dtype=np.float32)) * 1e-3
    rows, raw = [], {}
    copy = memcpy_gbps(reps)
    raw["memcpy_gbps"] = copy
    hosts, own = shared(context, "shard_hosts", ShardHosts)
    try:
        for name in CONFIGS:
            t = raw[name] = measure(hosts, name, grad, reps, iters)
            rate = {k: [1 / s for s in v] for k, v in t.items()}
            bound = [g * 1e9 * 2 / (PASSES[name] * NUMEL * 4) for g in copy]
            label = "SGD momentum 0.9" if name == "sgd" else "Adam fused"
            versus_optim = row(f"{label}: ShardCore in-process", "gradients/s", rate["core"], rate["torch"],
                               "torch.optim step", target=">= 0.67x torch.optim (within 1.5x)")
            versus_optim["met"] = versus_optim["ratio"]["median"] >= 1 / 1.5
            rows += [
                versus_optim,
                row(f"{label}: shard process via ShardClient.push", "gradients/s", rate["wire"], rate["torch2"],
                    "torch.optim step", target="report"),
                row(f"{label}: ShardCore in-process", "gradients/s", rate["core"], bound,
                    f"memcpy rate ({PASSES[name]} x 100 MB moved)", target="report"),
            ]
    finally:
        if own:
            hosts.close()
    return {
        "name": "apply", "title": "5. Server apply",
        "what": "Gradients per second into one shard holding 25M parameters (100 MB), one torch thread. "
                f"memcpy: {summary(copy)['median']:.2f} GB/s copied (median of {reps}), i.e. twice that read + written; "
                "the memcpy rate is 2 x that / (passes x 100 MB).",
        "rows": rows, "raw": raw,
    }


def plot(result: dict, path: str) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    names, vals, errs = [], [], [[], []]
    seen = set()
    for r in result["rows"]:
        for key, who in (("ours", r["case"]), ("peer", r["peer_name"] + " / " + r["case"].split(":")[0])):
            if who in seen:
                continue
            seen.add(who)
            s = r[key]
            names.append(who)
            vals.append(s["median"])
            errs[0].append(s["median"] - s["min"])
            errs[1].append(s["max"] - s["median"])
    ax.barh(range(len(names)), vals, xerr=errs, capsize=2)
    ax.set_yticks(range(len(names)), names, fontsize=7)
    ax.invert_yaxis()
    ax.set(xlabel="gradients/s (25M parameters)", title="server apply")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
