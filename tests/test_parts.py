"""Pull answers in parts: a large whole-float32 answer travels as several messages of
whole chunks, and the worker copies each in as it arrives.

The parts must add up to exactly what one message would have carried: the same
weights, bit for bit, every key once, counted on the wire; a missing part is a
missing reply (DeadlineExceeded), a part that contradicts the others a
ProtocolError.
"""

from __future__ import annotations

import dataclasses
import threading
import time

import msgspec
import numpy as np
import pytest
import torch
import zmq

from paramserver import protocol, sharding, transport
from paramserver.config import ConfigError, Consistency, OptimizerConfig, RunConfig
from paramserver.errors import DeadlineExceeded, ProtocolError
from paramserver.protocol import VERSION
from workers.client import ShardClient

P = protocol
# digits-mlp: 9610 weights in chunks of 1024 (4 KB); answers of 8 KB or more go in parts of 8 KB
PARTED = RunConfig(consistency=Consistency("asp"), optimizer=OptimizerConfig("sgd", lr=0.1, momentum=0.0),
                   chunk_elems=1024, pull_part_bytes=8192)


# -- the plan -------------------------------------------------------------------------


def _chunks(*sizes: int) -> list[sharding.Chunk]:
    starts = np.cumsum([0, *sizes])
    return [sharding.Chunk(k, int(a), int(b)) for k, (a, b) in enumerate(zip(starts, starts[1:]))]


@pytest.mark.parametrize(("sizes", "part_bytes", "runs"), [
    ([1 << 20] * 25, 4 << 20, [(i, i + 1) for i in range(25)]),  # 100 MB in 4 MB chunks: one chunk a part
    ([1024] * 5, 8192, [(0, 2), (2, 4), (4, 5)]),  # small chunks grouped to the part size
    ([1 << 20, 1 << 20, 10], 4 << 20, [(0, 1), (1, 2), (2, 3)]),
    ([1 << 20], 4096, [(0, 1)]),  # one chunk: nothing to overlap
    ([1 << 20, 1 << 19], 4 << 20, [(0, 2)]),  # under twice the part size: one message
    ([1024] * 5, 0, [(0, 5)]),  # 0: never
    ([], 4096, [(0, 0)]),
])
def test_parts_are_runs_of_whole_chunks_only_where_they_pay(sizes, part_bytes, runs):
    assert sharding.parts(_chunks(*sizes), part_bytes) == runs


def test_a_negative_part_size_is_refused():
    with pytest.raises(ConfigError, match="pull-part-bytes"):
        RunConfig(pull_part_bytes=-1)


# -- through real shards --------------------------------------------------------------


def _answer(sock: zmq.Socket) -> list[P.Decoded]:
    """Every message of one answer, read off a raw DEALER."""
    out = []
    while not out or out[-1].header.part < out[-1].header.parts - 1:
        assert sock.poll(5000), f"answer stopped after {len(out)} parts"
        out.append(P.decode(sock.recv_multipart(copy=False)))
    return out


def test_a_multi_chunk_shard_answers_in_parts_that_hold_its_weights_exactly(shard_thread):
    shard = shard_thread(PARTED)
    sock = shard.ctx.socket(zmq.DEALER)
    shard.sockets.append(sock)
    sock.setsockopt(zmq.ROUTING_ID, b"w0")  # a shard counts the routing id of each reply it sends too
    sock.connect(shard.server.address)
    sock.send_multipart(P.encode(P.Pull(v=VERSION, seq=5, worker_id=0, clock=0)))
    parts = _answer(sock)
    assert [m.header.part for m in parts] == list(range(5)) and {m.header.parts for m in parts} == {5}
    assert {(m.header.seq, m.header.version) for m in parts} == {(5, 0)}
    assert [len(m.header.tensors) for m in parts] == [2, 2, 2, 2, 2]
    keys = [t.key for m in parts for t in m.header.tensors]
    assert keys == [c.key for c in shard.chunks]  # whole chunks, in key order, each once
    got = np.concatenate([np.frombuffer(b, np.float32) for m in parts for b in m.buffers])
    assert np.array_equal(got, shard.core.weights.param.numpy())
    assert shard.server.bytes_pulled == sum(m.wire_bytes + 2 for m in parts)


@pytest.mark.parametrize("pull_codec", ["fp16", "delta"])
def test_encoded_answers_stay_one_message(shard_thread, pull_codec):
    shard = shard_thread(PARTED)
    sock = shard.dealer()
    sock.send_multipart(P.encode(P.Pull(v=VERSION, seq=5, worker_id=0, clock=0, codec=pull_codec)))
    (only,) = _answer(sock)
    assert only.header.parts == 1 and len(only.header.tensors) == len(shard.chunks)


def test_the_client_takes_parted_pulls_and_pushes_exactly_and_counts_every_part(shard_set):
    shards = shard_set(PARTED, 2)
    total = shards.plan[-1][-1].stop
    client, weights = shards.client(), torch.full((total,), float("nan"))
    client.pull(weights, worker=0, clock=0, timeout=10)
    assert torch.equal(weights, torch.cat([s.core.weights.param for s in shards.servers]))
    grads = torch.linspace(-1, 1, total)
    got = client.push(grads, worker=0, incarnation=0, clock=0, base_version=0, timeout=10, pull_into=weights)
    assert got.version == 1
    assert torch.equal(weights, torch.cat([s.core.weights.param for s in shards.servers]))
    # a shard counts each reply with the 5-byte routing id zmq gives a peer, and counts an
    # answer just after sending its last part: the client may get there first
    messages = [2 * len(s.core.weights.parts("none")) for s in shards.servers]
    assert min(messages) >= 4
    deadline = time.monotonic() + 10
    while client.bytes_received != sum(s.bytes_pulled - 5 * n for s, n in zip(shards.servers, messages)):
        assert time.monotonic() < deadline, (client.bytes_received, [s.bytes_pulled for s in shards.servers])
        time.sleep(0.001)
    for s in shards.servers:
        assert s.traffic[0].pulled_wire == s.bytes_pulled > s.traffic[0].pulled_raw  # every part's header too


@pytest.mark.parametrize("zero_copy_min", [0, 1 << 40], ids=["every-frame-zero-copy", "every-frame-copied"])
def test_answers_sent_with_or_without_a_copy_carry_each_step_exactly(shard_set, monkeypatch, zero_copy_min):
    """transport.ZERO_COPY_MIN picks, by size, frames sent from the weights' and the
    gradients' own memory (tracked and pinned) or copied; the real sizes are megabytes,
    so here every frame goes one way or the other, pushes' and answers' alike. (A step
    that comes while pinned frames are still in flight is test_core's.)"""
    monkeypatch.setattr(transport, "ZERO_COPY_MIN", zero_copy_min)
    shards = shard_set(PARTED, 2)
    total = shards.plan[-1][-1].stop
    client, weights = shards.client(), torch.empty(total)
    client.pull(weights, worker=0, clock=0, timeout=10)
    expected, version = weights.clone(), 0
    for clock in range(4):
        grads = torch.randn(total, generator=torch.Generator().manual_seed(clock))
        version = client.push(grads, 0, 0, clock, version, timeout=10, pull_into=weights).version
        expected.add_(grads, alpha=-0.1)  # what SGD's step does, in the same order
        assert version == clock + 1
        assert torch.equal(weights, expected), clock
    client.wait_sent(5.0)


# -- a shard that answers as a test says ----------------------------------------------


class Scripted:
    """A ROUTER that answers each request with the messages `script(seq)` returns."""

    def __init__(self, ctx: zmq.Context, script):
        self.sock = ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.address = f"tcp://127.0.0.1:{self.sock.bind_to_random_port('tcp://127.0.0.1')}"
        self.script, self.running = script, True
        self.thread = threading.Thread(target=self._serve, name="test-scripted-shard", daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while self.running:
            if self.sock.poll(50):
                identity, *frames = self.sock.recv_multipart()
                for message in self.script(P.decode(frames).header.seq):
                    self.sock.send_multipart([identity, *message])

    def close(self) -> None:
        self.running = False
        self.thread.join(5)
        assert not self.thread.is_alive()
        self.sock.close(linger=0)


CHUNKS = _chunks(4, 4, 4)  # one shard of three chunks: 12 weights
VALUES = np.arange(12, dtype=np.float32)


def piece(seq: int, keys, part: int, parts: int, **fields) -> list:
    metas = [P.TensorMeta(key=k, dtype="float32", shape=[4]) for k in keys]
    header = P.PullOk(v=VERSION, seq=seq, version=fields.pop("version", 3), tensors=metas, part=part, parts=parts,
                      **fields)
    return P.encode(header, [VALUES[4 * k : 4 * k + 4].tobytes() for k in keys])


@pytest.fixture
def scripted():
    ctx, made = zmq.Context(), []

    def make(script) -> ShardClient:
        made.append(Scripted(ctx, script))
        spec = P.ShardSpec(index=0, address=made[-1].address, chunks=[(c.key, c.start, c.stop) for c in CHUNKS])
        made.append(ShardClient(ctx, [spec], pull_codec="delta"))
        return made[-1]

    yield make
    for m in reversed(made):
        m.close()
    ctx.term()


def test_parts_are_gathered_and_a_late_part_of_an_earlier_answer_is_dropped(scripted):
    sent = []

    def script(seq):
        sent[:] = [piece(seq - 1, [2], 1, 2, version=9), piece(seq, [0], 0, 2, token=7),
                   piece(seq, [1, 2], 1, 2, token=7)]
        return sent

    client = scripted(script)
    weights = torch.zeros(12)
    got = client.pull(weights, worker=0, clock=0, timeout=5)
    assert torch.equal(weights, torch.from_numpy(VALUES)) and got.version == 3
    assert client.tokens == [7]  # taken once every part is in
    assert client.bytes_received == sum(len(f) for m in sent for f in m)  # the dropped one too


def test_a_missing_part_runs_into_the_deadline_and_leaves_no_delta_base(scripted):
    client = scripted(lambda seq: [piece(seq, [0], 0, 3, token=7), piece(seq, [1], 1, 3, token=7)])
    started = time.monotonic()
    with pytest.raises(DeadlineExceeded):
        client.pull(torch.zeros(12), worker=0, clock=0, timeout=1.0)
    assert time.monotonic() - started < 2.0
    assert client.tokens == [0]


@pytest.mark.parametrize(("messages", "match"), [
    ([piece(0, [0], 0, 2), piece(0, [1, 2], 1, 2, version=4)], "not part 1"),  # parts disagree
    ([piece(0, [0], 0, 2), piece(0, [1, 2], 1, 3)], "not part 1"),
    ([piece(0, [0], 0, 2), piece(0, [1, 2], 1, 2, finished=True)], "not part 1"),
    ([piece(0, [0], 0, 2), piece(0, [0, 1, 2], 1, 2)], "key 0 appears twice"),  # across parts
    ([piece(0, [0], 0, 2), piece(0, [1], 1, 2)], "missing keys \\[2\\]"),
    ([piece(0, [1, 2], 1, 2), piece(0, [0], 0, 2)], "not part 0"),  # out of order
])
def test_parts_that_do_not_make_one_answer_are_refused(scripted, messages, match):
    def script(seq):  # the messages as given, with the request's seq
        return [[P.encode(msgspec.structs.replace(P.decode(m).header, seq=seq))[0], *m[1:]] for m in messages]

    client = scripted(script)
    with pytest.raises(ProtocolError, match=match):
        client.pull(torch.zeros(12), worker=0, clock=0, timeout=5)
    assert client.tokens == [0]


# -- end to end -----------------------------------------------------------------------

ROUNDS, WORKERS = 15, 2


def _train(make_cluster, run: RunConfig, overlap: bool) -> tuple[torch.Tensor, dict]:
    c = make_cluster(run, shards=2)
    for _ in range(WORKERS):
        c.add_worker(max_steps=ROUNDS, overlap=overlap)
    results = c.wait_workers(timeout=120)
    assert [r["steps"] for r in results] == [ROUNDS] * WORKERS, results
    return c.weights(), c.status()


def _wire_per_raw(status: dict) -> float:
    t = status["traffic"].values()
    return sum(x["pulled_wire"] for x in t) / sum(x["pulled_raw"] for x in t)


@pytest.mark.slow  # two full training runs (23 s): with the slow checks, to keep `make test` under its 15 minutes
def test_training_with_parted_answers_is_bit_identical_to_one_message_answers(make_cluster):
    # bsp of 2 workers (a sum of two is the same either way round): the weights depend on nothing
    # but the arithmetic; digits-cnn in 1024-element chunks, so every answer is several parts
    run = RunConfig(task="digits-cnn", consistency=Consistency("bsp"), optimizer=OptimizerConfig("adam", lr=0.003),
                    batch_size=16, seed=3, partitions=WORKERS, min_workers=WORKERS, chunk_elems=1024,
                    pull_part_bytes=0)
    whole, status = _train(make_cluster, run, overlap=False)
    assert status["updates"] == ROUNDS
    one_message = _wire_per_raw(status)
    for overlap in (False, True):
        parted, status = _train(make_cluster, dataclasses.replace(run, pull_part_bytes=4096), overlap=overlap)
        assert status["updates"] == ROUNDS
        assert _wire_per_raw(status) > one_message  # a header per part: the answers did go in parts
        assert torch.equal(parted, whole), f"overlap={overlap}"
