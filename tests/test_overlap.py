"""Pushing a shard's gradients during backward (`--overlap`, workers/overlap.py).

The countdown is checked in-process against the gradients backward leaves; the
training runs are real processes (server, shards, workers) on loopback: with and
without overlap the weights after N bsp rounds are the same bits, and a shard
answer lost on the way back is resent and applied once.
"""

from __future__ import annotations

import dataclasses
import threading
import time

import pytest
import torch
import zmq
from torch import nn

from paramserver import protocol, sharding
from paramserver.config import Consistency, OptimizerConfig, RunConfig, Timeouts
from paramserver.errors import RemoteError
from paramserver.protocol import ErrorCode
from workers.overlap import ShardReadiness, shard_ranges

ROUNDS, WORKERS, BATCH = 8, 2, 16


def _model() -> tuple[nn.Module, sharding.Layout, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 64))
    layout = sharding.Layout.of(model)
    _, grads = sharding.flatten_(model, layout)
    return model, layout, grads


@pytest.mark.parametrize("shards", [1, 2, 3])
def test_each_shard_is_ready_once_with_its_final_gradients_and_the_last_layers_first(shards):
    model, layout, grads = _model()
    ranges = shard_ranges(sharding.plan(layout.total, shards, 1024))
    readiness = ShardReadiness(list(model.parameters()), layout, ranges)
    seen: dict[int, torch.Tensor] = {}

    def ready(s):
        assert s not in seen, f"shard {s} ready twice"
        seen[s] = grads[slice(*ranges[s])].clone()  # what a send at this moment would carry

    with readiness.armed(ready):
        model(torch.randn(5, 4)).square().sum().backward()
    assert sorted(seen) == list(range(shards))
    for s, got in seen.items():
        assert torch.equal(got, grads[slice(*ranges[s])]), f"shard {s} was ready before its gradients were final"
    # the input layer is on shard 0: it is the last one ready, every other one goes before it
    assert list(seen)[-1] == 0


def test_a_disarmed_readiness_calls_nothing_and_an_error_comes_out_after_backward():
    model, layout, grads = _model()
    ranges = shard_ranges(sharding.plan(layout.total, 2, 1024))
    readiness = ShardReadiness(list(model.parameters()), layout, ranges)
    model(torch.randn(5, 4)).sum().backward()  # not armed: nothing to call
    grads.zero_()
    calls = []

    def failing(s):
        calls.append(s)
        raise RuntimeError("send failed")

    with pytest.raises(RuntimeError, match="send failed"), readiness.armed(failing):
        model(torch.randn(5, 4)).sum().backward()
    assert calls == [1]  # the first failure stops the rest; backward itself ran to the end
    assert bool(grads[: ranges[0][1]].abs().sum() > 0)
    readiness.close()
    assert not readiness.handles


def test_an_exchange_abandoned_after_an_early_send_applies_the_step_once_on_each_shard(shard_set):
    # what the trainer does when a step fails after backward sent the last layers' shard its
    # push and before the others had theirs: reset the sockets, pull again, push again
    run = RunConfig(consistency=Consistency("bsp"), optimizer=OptimizerConfig("sgd", lr=0.1, momentum=0.0),
                    chunk_elems=1024)
    shards = shard_set(run, 2)
    client = shards.client()
    total = shards.plan[-1][-1].stop
    start, weights = torch.empty(total), torch.empty(total)
    client.pull(start, worker=0, clock=0, timeout=10.0)
    grads = torch.randn(total, generator=torch.Generator().manual_seed(1))
    out = client.start_push(grads, 0, 0, clock=0, base_version=0, pull=True)
    client.send_part(out, 1)  # during backward; then the step fails
    # the case is a push that reached shard 1: a reset at once (linger 0) can drop it unsent
    deadline = time.monotonic() + 10
    while shards.servers[1].core.pushes < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert shards.servers[1].core.pushes == 1
    client.reset()
    got = client.pull(weights, worker=0, clock=0, timeout=10.0)
    assert got.version == 0  # shard 1 applied round 0 alone; shard 0 still waits for it
    with pytest.raises(RemoteError) as e:  # the step again: shard 1 has it, and says so
        client.push(grads, 0, 0, clock=0, base_version=0, timeout=10.0, pull_into=weights)
    assert e.value.code == ErrorCode.STALE
    got = client.pull(weights, worker=0, clock=1, timeout=10.0)
    assert got.version == 1
    assert [(s.core.version, s.core.pushes) for s in shards.servers] == [(1, 1), (1, 1)]
    torch.testing.assert_close(weights, start - 0.1 * grads, rtol=0, atol=1e-7)
    client.wait_sent(5.0)  # nothing in flight reads grads any more


def _run(optimizer: str) -> RunConfig:
    return RunConfig(task="digits-cnn", consistency=Consistency("bsp"), optimizer=OptimizerConfig(optimizer, lr=0.05 if optimizer == "sgd" else 0.003),
                     batch_size=BATCH, seed=3, partitions=WORKERS, min_workers=WORKERS, chunk_elems=1024)


def _train(make_cluster, run: RunConfig, overlap: bool, timeouts=None, routes=None) -> tuple[torch.Tensor, dict]:
    c = make_cluster(run, shards=2, **({"timeouts": timeouts} if timeouts else {}))
    for i in range(WORKERS):
        c.add_worker(max_steps=ROUNDS, overlap=overlap, routes=routes(c) if routes and i == 0 else ())
    results = c.wait_workers(timeout=120)
    assert [r["steps"] for r in results] == [ROUNDS] * WORKERS, results
    return c.weights(), c.status()


# sgd runs in `make test`; adam (the same worker-side path, another optimizer on the shards) in the slow marker's
@pytest.mark.parametrize("optimizer", ["sgd", pytest.param("adam", marks=pytest.mark.slow)])
def test_bsp_weights_with_overlap_are_bit_identical_to_without(make_cluster, optimizer):
    run = _run(optimizer)
    without, status = _train(make_cluster, run, overlap=False)
    assert status["updates"] == ROUNDS
    with_overlap, status = _train(make_cluster, run, overlap=True)
    assert status["updates"] == ROUNDS
    assert torch.equal(with_overlap, without)


def test_with_local_steps_overlap_takes_the_plain_path_and_trains_the_same(make_cluster):
    # the pushed delta exists only after K steps: nothing is final during a backward
    run = dataclasses.replace(_run("sgd"), local_steps=2, local_lr=0.05)
    without, _ = _train(make_cluster, run, overlap=False)
    with_overlap, status = _train(make_cluster, run, overlap=True)
    assert status["updates"] == ROUNDS
    assert torch.equal(with_overlap, without)


class DropFirstPushAnswer:
    """A zmq proxy in front of one shard that loses its first answer to a push.

    The worker's DEALER connects here; each worker socket (identity) gets its own
    DEALER to the shard, so the shard sees a resend on a fresh socket as it would
    without the proxy. Counts the push sequence numbers it forwarded.
    """

    def __init__(self, ctx: zmq.Context, target: str):
        self.ctx, self.target = ctx, target
        self.front = ctx.socket(zmq.ROUTER)
        self.front.setsockopt(zmq.LINGER, 0)
        self.address = f"tcp://127.0.0.1:{self.front.bind_to_random_port('tcp://127.0.0.1')}"
        self.pushes: list[int] = []  # seq of every push forwarded
        self.dropped: int | None = None  # seq whose answer was lost
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, name="test-drop-proxy", daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        backs: dict[bytes, zmq.Socket] = {}
        poller = zmq.Poller()
        poller.register(self.front, zmq.POLLIN)
        try:
            while not self.stop.is_set():
                for sock, _ in poller.poll(100):
                    frames = sock.recv_multipart()
                    if sock is self.front:
                        ident, body = frames[0], frames[1:]
                        if ident not in backs:
                            backs[ident] = self._backend(poller)
                        header = protocol.decode(body).header
                        if isinstance(header, protocol.Push):
                            self.pushes.append(header.seq)
                        backs[ident].send_multipart(body)
                    else:
                        ident = next(i for i, b in backs.items() if b is sock)
                        seq = protocol.decode(frames).header.seq
                        if self.dropped is None and seq in self.pushes:
                            self.dropped = seq
                        if seq == self.dropped and self.pushes.count(seq) == 1:
                            continue  # lost: every answer to the first copy of this push
                        self.front.send_multipart([ident, *frames])
        finally:
            for b in backs.values():
                b.close(linger=0)
            self.front.close(linger=0)

    def _backend(self, poller: zmq.Poller) -> zmq.Socket:
        s = self.ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.connect(self.target)
        poller.register(s, zmq.POLLIN)
        return s

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)


# the overlap case (18 s) runs with the slow checks, to keep `make test` under its 15 minutes
@pytest.mark.parametrize("overlap", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["plain", "overlap"])
def test_a_lost_shard_answer_is_resent_and_the_push_applied_once(make_cluster, overlap):
    run = _run("adam")
    expected, _ = _train(make_cluster, run, overlap=False)
    ctx = zmq.Context()
    proxies = []

    def via_proxy(c):
        shard = c.status()["shard_map"][1]["address"]
        proxies.append(DropFirstPushAnswer(ctx, shard))
        return ((shard, proxies[-1].address),)

    # one attempt waits 3 s, so that on a loaded machine the resend's answer does not time
    # out too; the resend goes out on a fresh socket, same sequence number
    t = Timeouts(heartbeat_interval=0.2, heartbeat_timeout=8.0, request_timeout=3.0, pull_wait=20.0,
                 reconnect_timeout=30.0, shutdown_grace=3.0, startup=60.0)
    try:
        got, status = _train(make_cluster, run, overlap=overlap, timeouts=t, routes=via_proxy)
    finally:
        for p in proxies:
            p.close()
        ctx.term()
    proxy = proxies[0]
    assert proxy.dropped is not None and proxy.pushes.count(proxy.dropped) == 2, proxy.pushes
    assert status["updates"] == ROUNDS
    assert torch.equal(got, expected)
