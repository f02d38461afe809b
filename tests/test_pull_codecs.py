"""Compressed pulls (fp16, bf16) and delta pulls, and the per-worker byte counters.

Delta pulls must leave a worker with exactly the weights a whole pull gives,
whatever happened in between (a lost answer, another worker's updates), and
cost less only when few weights changed.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from paramserver import codecs
from paramserver.config import Consistency, OptimizerConfig, RunConfig
from paramserver.errors import ConfigError, ProtocolError
from paramserver.protocol import TensorMeta

# -- the delta frame -------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 3000), changed=st.floats(0, 1), seed=st.integers(0, 2**31 - 1))
def test_a_delta_rebuilds_the_current_weights_exactly(n, changed, seed):
    rng = np.random.default_rng(seed)
    held = rng.standard_normal(n).astype(np.float32)  # what the worker holds
    view = held.copy()  # the shard's copy of what it sent
    current = held.copy()
    touched = rng.random(n) < changed
    current[touched] += rng.standard_normal(int(touched.sum())).astype(np.float32)
    moved = int((current != held).sum())
    meta, frame = codecs.delta.encode(7, current, view)
    if meta.codec == codecs.delta.NAME:
        assert frame.nbytes == 8 * moved < 2 * n  # (index, value) for each entry that moved
        codecs.delta.apply(held, meta, memoryview(frame))
    else:  # half the chunk's bytes or more: it travels whole
        assert meta.dtype == "float32" and frame.nbytes == 4 * n and 8 * moved >= 2 * n
        held[:] = np.frombuffer(frame, np.float32)
    assert np.array_equal(held, current) and np.array_equal(view, current)


def test_a_delta_carries_only_the_entries_that_changed():
    view = np.zeros(1000, np.float32)
    current = view.copy()
    current[[3, 500, 999]] = [1.0, -2.0, 0.5]
    meta, frame = codecs.delta.encode(0, current, view)
    assert meta.codec == "delta" and frame.nbytes == 3 * 8


@pytest.mark.parametrize(("size", "match"), [(12, "whole"), (8, "out of range")])
def test_a_bad_delta_frame_is_refused_and_writes_nothing(size, match):
    held = np.zeros(4, np.float32)
    frame = np.zeros(size, np.uint8)
    if size == 8:
        frame[:4] = np.array([4], "<i4").view(np.uint8)  # index 4 of a chunk of 4
    with pytest.raises(ProtocolError, match=match):
        codecs.delta.apply(held, TensorMeta(key=0, dtype="uint8", shape=[size], codec="delta"), memoryview(frame))
    assert not held.any()


def test_an_unknown_pull_codec_is_refused_before_anything_starts():
    with pytest.raises(ConfigError, match="pull codec"):
        RunConfig(pull_codec="topk:0.01")


# -- through real shards ---------------------------------------------------------------

SPARSE_SGD = RunConfig(consistency=Consistency("asp"), optimizer=OptimizerConfig("sgd", lr=0.1, momentum=0.0),
                       chunk_elems=1024)


def _sparse(total: int, step: int) -> torch.Tensor:
    g = torch.zeros(total)
    g[torch.randperm(total, generator=torch.Generator().manual_seed(step))[:20]] = 1.0
    return g


def _pulls_counted(servers, answers: int) -> None:
    """Wait until each shard has counted `answers` pull answers to worker 0: a shard's
    thread counts an answer just after sending it, so the client may see it first."""
    deadline = time.monotonic() + 10
    while any(0 not in s.traffic or s.traffic[0].pulled_raw < answers * 4 * s.core.numel for s in servers):
        assert time.monotonic() < deadline, f"shards did not count {answers} answers"
        time.sleep(0.001)


def test_delta_pulls_give_the_same_weights_as_whole_pulls(shard_set):
    shards = shard_set(SPARSE_SGD, 2)
    total = shards.plan[-1][-1].stop
    delta, whole = shards.client(pull_codec="delta"), shards.client()
    mine, reference = torch.empty(total), torch.empty(total)
    delta.pull(mine, worker=0, clock=0, timeout=10)  # the first answer is whole: nothing held yet
    _pulls_counted(shards.servers, 1)
    first = [s.traffic[0].pulled_wire for s in shards.servers]
    for step in range(6):
        # sparse SGD updates: few weights change; every other step the answer is lost
        got = delta.push(_sparse(total, step), worker=0, incarnation=0, clock=step, base_version=step, timeout=10,
                         pull_into=mine)
        if step % 2:
            delta.tokens = [0] * len(delta.tokens)  # as after a reset: the next answer must be whole
        whole.pull(reference, worker=0, clock=step + 1, timeout=10)
        assert torch.equal(mine, reference), f"step {step}"
        assert got.version == step + 1
    # raw counts float32 weights either way; the delta answers went on the wire far smaller
    _pulls_counted(shards.servers, 13)
    for s, before in zip(shards.servers, first):
        t = s.traffic[0]
        assert t.pulled_raw == 13 * 4 * s.core.numel  # 1 + 6 delta answers, 6 whole reference pulls
        delta_wire = t.pulled_wire - before - 6 * (4 * s.core.numel)
        assert delta_wire < 0.5 * 6 * 4 * s.core.numel


@pytest.mark.parametrize(("pull_codec", "atol"), [("fp16", 2e-3), ("bf16", 2e-2)])
def test_compressed_pulls_halve_the_bytes(shard_set, pull_codec, atol):
    shards = shard_set(SPARSE_SGD, 2)
    total = shards.plan[-1][-1].stop
    half, whole = shards.client(pull_codec=pull_codec), shards.client()
    a, b = torch.empty(total), torch.empty(total)
    half.pull(a, worker=0, clock=0, timeout=10)
    whole.pull(b, worker=0, clock=0, timeout=10)
    torch.testing.assert_close(a, b, rtol=1e-2, atol=atol)
    _pulls_counted(shards.servers, 2)
    for s in shards.servers:
        t = s.traffic[0]
        assert t.pulled_raw == 2 * 4 * s.core.numel
        assert t.pulled_wire < 0.8 * t.pulled_raw  # one whole float32 answer, one half-size answer


def test_a_pull_for_a_stranger_is_not_counted_or_kept(shard_set):
    shards = shard_set(SPARSE_SGD, 1)
    client = shards.client(pull_codec="delta")
    client.pull(torch.empty(shards.plan[-1][-1].stop), worker=42, clock=0, timeout=10)  # 42 is not a member
    assert shards.servers[0].traffic == {} and shards.servers[0].core.weights._sent == {}


# -- end to end ------------------------------------------------------------------------


@pytest.mark.parametrize(("pull_codec", "most"), [("fp16", 0.55), ("delta", 0.5)])
def test_workers_train_with_compressed_pulls_and_status_counts_their_bytes(make_cluster, pull_codec, most):
    # plain SGD on topk pushes changes few weights per update: delta pulls stay sparse
    run = RunConfig(consistency=Consistency("asp"), codec="topk:0.01", seed=1,
                    optimizer=OptimizerConfig("sgd", lr=0.5, momentum=0.0))
    c = make_cluster(dataclasses.replace(run, pull_codec=pull_codec))
    for _ in range(2):
        c.add_worker(max_steps=300)
    results = c.wait_workers(timeout=150)
    assert [r["steps"] for r in results] == [300, 300], results
    status = c.status()
    traffic = status["traffic"]
    assert sorted(traffic) == sorted(str(r["worker_id"]) for r in results)
    for t in traffic.values():
        assert t["pushed_wire"] * 20 < t["pushed_raw"]  # topk:0.01
        assert 0 < t["pulled_wire"] < most * t["pulled_raw"]
    assert c.accuracy() >= 0.9


# -- the push that pulls -------------------------------------------------------------------


def test_a_push_whose_weights_must_wait_is_acknowledged_at_once(shard_set):
    import zmq

    from paramserver import protocol
    from paramserver.protocol import VERSION

    run = dataclasses.replace(SPARSE_SGD, consistency=Consistency("bsp"))
    shards = shard_set(run, 1)
    core, spec = shards.servers[0].core, shards.specs[0]
    core.set_live({0: (0, 0), 1: (0, 0)})  # before any message: the round needs both workers
    metas = [TensorMeta(key=k, dtype="float32", shape=[stop - start]) for k, start, stop in spec.chunks]
    frames = [np.full(stop - start, 0.5, np.float32) for _, start, stop in spec.chunks]
    sock = shards.ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(spec.address)
    try:
        push = protocol.Push(v=VERSION, seq=11, worker_id=0, incarnation=0, clock=0, base_version=0,
                             tensors=metas, pull=True)
        sock.send_multipart(protocol.encode(push, frames))
        assert sock.poll(5000)
        ack = protocol.decode(sock.recv_multipart()).header
        assert isinstance(ack, protocol.PushOk) and ack.seq == 11 and not ack.applied  # landed, round open
        assert not sock.poll(300)  # the weights wait for worker 1
        total = shards.plan[-1][-1].stop
        shards.client().push(torch.zeros(total), worker=1, incarnation=0, clock=0, base_version=0, timeout=10)
        assert sock.poll(5000)
        weights = protocol.decode(sock.recv_multipart())
        assert isinstance(weights.header, protocol.PullOk) and weights.header.seq == 11
        assert weights.header.version == 1  # the closed round's weights
    finally:
        sock.close(linger=0)
