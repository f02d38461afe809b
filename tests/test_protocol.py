"""The wire contract: every message round-trips, every malformed one is refused.

Refusal is checked twice: by `protocol.decode` alone, and over a real socket
against a running shard, which must answer with an error reply and change no
state, then go on serving.
"""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import time
import typing
from dataclasses import dataclass

import msgspec
import numpy as np
import pytest
import torch
import zmq

from paramserver import protocol, sharding
from paramserver.config import Consistency, OptimizerConfig, RunConfig
from paramserver.coordinator import Coordinator
from paramserver.errors import DeadlineExceeded, ProtocolError
from paramserver.protocol import VERSION, ErrorCode
from paramserver.transport import Channel
from tests.conftest import FAST, free_port_block

P = protocol
WORKER, INCARNATION, SEQ = 3, 0, 77
REPLY_MS = 5000  # every wait on a reply is bounded by this
# 9610 weights of digits-mlp in chunks of 4096: keys 0, 1, 2 with 4096, 4096, 1418
# elements, so that missing and duplicated keys can be expressed
RUN = RunConfig(consistency=Consistency("asp"), chunk_elems=4096)


# -- round trip -------------------------------------------------------------------


def _f32(n: int, start: float = 0.0) -> np.ndarray:
    return np.arange(start, start + n, dtype=np.float32)


META2 = [P.TensorMeta(key=0, dtype="float32", shape=[2, 3]),
         P.TensorMeta(key=1, dtype="float16", shape=[4], codec="fp16", params={"scale": 0.5, "k": 2})]
FRAMES2 = [_f32(6).tobytes(), np.ones(4, np.float16).tobytes()]
SPEC = P.ShardSpec(index=0, address="tcp://127.0.0.1:5556", chunks=[(0, 0, 4096), (1, 4096, 9610)])

EXAMPLES = [  # (header, tensor frames)
    (P.Join(v=1, seq=1, worker_id=-1, host="edge-7", pid=4242), []),
    (P.JoinOk(v=1, seq=2, worker_id=5, incarnation=1, clock=9, epoch=2, heartbeat_interval=0.5, partition=1,
              config=RunConfig().to_wire(), shards=[SPEC]), []),
    (P.Heartbeat(v=1, seq=3, worker_id=5, incarnation=1, clock=10, loss=0.25, steps_per_s=3.5,
                 resources={"cpu": 12.5, "rss": 1 << 30}), []),
    (P.HeartbeatOk(v=1, seq=4, state="rejoin"), []),
    (P.Leave(v=1, seq=5, worker_id=5, incarnation=1), []),
    (P.Status(v=1, seq=6), []),
    (P.StatusOk(v=1, seq=7, info={"state": "run", "workers": [{"id": 1}], "uptime": 1.5}), []),
    (P.Stop(v=1, seq=8), []),
    (P.Ack(v=1, seq=2**63 - 1), []),
    (P.Membership(v=1, seq=9, live={0: (0, 3), 7: (2, 5)}), []),
    (P.ShardStats(v=1, seq=10, index=1, version=4, updates=4, clocks={0: 3}, waiting_for=[7], pushes=9,
                  pulls=11, rejected=1, bytes_pushed=100, bytes_pulled=200, max_staleness=2, pid=99), []),
    (P.Checkpoint(v=1, seq=16, directory=".tmp-ckpt-00000003-ab", number=3, at_version=7, exact=True), []),
    (P.CheckpointOk(v=1, seq=17, index=1, file="shard-1.safetensors", sha256="ab" * 32, version=7, updates=7), []),
    (P.Pull(v=1, seq=11, worker_id=-1, clock=0, observer=True), []),
    (P.PullOk(v=1, seq=12, version=4, tensors=META2, finished=True), FRAMES2),
    (P.PullOk(v=1, seq=12, version=4, tensors=META2[:1], staleness=2, part=2, parts=3), FRAMES2[:1]),
    (P.Push(v=1, seq=13, worker_id=5, incarnation=1, clock=3, base_version=2, tensors=META2), FRAMES2),
    (P.PushOk(v=1, seq=14, version=5, applied=False), []),
    (P.Error(v=1, seq=15, code=ErrorCode.STALE, message="push for round 3 but round 4 is open; pull again"), []),
]


def test_examples_cover_every_message_type():
    assert {type(h) for h, _ in EXAMPLES} == set(typing.get_args(P.Message))


@pytest.mark.parametrize(("header", "frames"), EXAMPLES, ids=[type(h).__name__ for h, _ in EXAMPLES])
def test_round_trip(header, frames):
    decoded = P.decode(P.encode(header, frames))
    assert decoded.header == header
    assert type(decoded.header) is type(header)
    assert [bytes(b) for b in decoded.buffers] == frames
    assert decoded.wire_bytes == len(P.encode(header)[0]) + sum(len(f) for f in frames)


@pytest.mark.parametrize(("fields", "says"), [
    ({"part": 3, "parts": 3}, "part 3 of 3"),
    ({"part": 5, "parts": 2}, "part 5 of 2"),
    ({"parts": 0}, "$.parts"),
    ({"part": -1}, "$.part"),
    ({"part": P.MAX_TENSORS, "parts": P.MAX_TENSORS}, "$.part"),
    ({"parts": P.MAX_TENSORS + 1}, "$.parts"),
    ({"part": 1.0, "parts": 2}, "$.part"),
    ({"parts": True}, "$.parts"),
])
def test_decode_refuses_pull_ok_part_numbers_that_cannot_be(fields, says):
    header = {**msgspec.to_builtins(P.PullOk(v=1, seq=12, version=4, tensors=META2[:1])), **fields}
    with pytest.raises(ProtocolError, match=re.escape(says)) as e:
        P.decode([msgspec.msgpack.encode(header), FRAMES2[0]])
    assert e.value.code == ErrorCode.BAD_MESSAGE


# -- malformed input --------------------------------------------------------------


def _meta(c: sharding.Chunk) -> P.TensorMeta:
    return P.TensorMeta(key=c.key, dtype="float32", shape=[c.numel])


def _push(metas, worker: int = WORKER, seq: int = SEQ) -> P.Push:
    return P.Push(v=VERSION, seq=seq, worker_id=worker, incarnation=INCARNATION, clock=0, base_version=0,
                  tensors=list(metas))


def _grads(chunks, seed: int = 0) -> list[np.ndarray]:
    """One small finite gradient per chunk, float32 of shape (numel,)."""
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(c.numel).astype(np.float32) for c in chunks]


def valid_push(chunks, seq: int = SEQ, seed: int = 0, worker: int = WORKER) -> list:
    """A well-formed push of one float32 gradient per chunk (repeat or leave out chunks at will)."""
    return P.encode(_push(map(_meta, chunks), worker=worker, seq=seq), _grads(chunks, seed))


def _first(chunks, **fields) -> list:
    """A push whose first tensor meta has `fields` replaced; the frames keep their byte counts."""
    metas = list(map(_meta, chunks))
    metas[0] = msgspec.structs.replace(metas[0], **fields)
    return P.encode(_push(metas), _grads(chunks))


def _one_longer(chunks) -> list:
    """Every tensor one element longer than its chunk, consistently in shape and bytes."""
    metas = [P.TensorMeta(key=c.key, dtype="float32", shape=[c.numel + 1]) for c in chunks]
    return P.encode(_push(metas), [np.append(g, np.float32(0)) for g in _grads(chunks)])


def _poisoned(chunks, value: float) -> list:
    grads = _grads(chunks)
    grads[-1][-1] = value
    return P.encode(_push(map(_meta, chunks)), grads)


DROP = object()


def _raw(chunks, **changes) -> list:
    """A valid push whose header fields are replaced with anything at all, as raw msgpack."""
    fields = msgspec.to_builtins(_push(map(_meta, chunks)))
    fields.update(changes)
    fields = {k: v for k, v in fields.items() if v is not DROP}
    return [msgspec.msgpack.encode(fields), *_grads(chunks)]


def _raw_meta(chunks, **changes) -> list:
    fields = msgspec.to_builtins(_push(map(_meta, chunks)))
    fields["tensors"][0].update(changes)
    return [msgspec.msgpack.encode(fields), *_grads(chunks)]


def _bad_utf8(chunks) -> list:
    frames = _raw_meta(chunks, codec="@@@@")
    frames[0] = frames[0].replace(b"\xa4@@@@", b"\xa4\xff\xfe\xfd\xfc")  # a 4-byte str that is not UTF-8
    return frames


def _deep(chunks) -> list:
    # an untyped field (StatusOk.info) nested far past any sane depth: 2000 one-entry maps
    head = msgspec.msgpack.encode({"v": 1, "op": "status_ok", "seq": SEQ})
    head = bytes([head[0] + 1]) + head[1:]  # one more entry in the top-level fixmap
    return [head + msgspec.msgpack.encode("info") + b"\x81\xa1a" * 2000 + b"\x00"]


@dataclass(frozen=True)
class Bad:
    name: str
    frames: typing.Callable  # chunks -> frames
    code: str
    says: str  # a fragment the error message must contain
    wire_only: bool = False  # needs the shard's keys and membership, not only decode


BAD = [
    Bad("empty frame", lambda ch: [b""], ErrorCode.BAD_MESSAGE, "truncated"),
    Bad("garbage", lambda ch: [b"\xc1 this is not msgpack"], ErrorCode.BAD_MESSAGE, "malformed"),
    Bad("missing frames", lambda ch: valid_push(ch)[:-1], ErrorCode.BAD_MESSAGE, "3 tensors but 2 frames"),
    Bad("no frames", lambda ch: valid_push(ch)[:1], ErrorCode.BAD_MESSAGE, "3 tensors but 0 frames"),
    Bad("extra frame", lambda ch: [*valid_push(ch), b"\0" * 16], ErrorCode.BAD_MESSAGE, "3 tensors but 4 frames"),
    Bad("frames on a pull", lambda ch: P.encode(P.Pull(v=1, seq=SEQ, worker_id=WORKER, clock=0), [b"\0" * 4]),
        ErrorCode.BAD_MESSAGE, "0 tensors but 1 frames"),
    Bad("short frame", lambda ch: [*valid_push(ch)[:-1], valid_push(ch)[-1][:-4]], ErrorCode.BAD_TENSOR, "bytes"),
    Bad("long frame", lambda ch: [*valid_push(ch)[:-1], valid_push(ch)[-1].tobytes() + b"\0"],
        ErrorCode.BAD_TENSOR, "bytes"),
    Bad("dtype float64", lambda ch: _raw_meta(ch, dtype="float64"), ErrorCode.BAD_MESSAGE, "dtype"),
    Bad("dtype object", lambda ch: _raw_meta(ch, dtype="object"), ErrorCode.BAD_MESSAGE, "dtype"),
    Bad("unknown op", lambda ch: _raw(ch, op="explode"), ErrorCode.UNKNOWN_OP, "explode"),
    Bad("version 2", lambda ch: _raw(ch, v=2), ErrorCode.BAD_VERSION, "version 2"),
    Bad("version 2, unknown op", lambda ch: _raw(ch, v=2, op="push2"), ErrorCode.BAD_VERSION, "version 2"),
    Bad("version 0", lambda ch: _raw(ch, v=0), ErrorCode.BAD_VERSION, "version 0"),
    Bad("huge header", lambda ch: _raw(ch, pad="x" * P.MAX_HEADER_BYTES), ErrorCode.BAD_MESSAGE, "exceeds"),
    Bad("worker id is a str", lambda ch: _raw(ch, worker_id="three"), ErrorCode.BAD_MESSAGE, "$.worker_id"),
    Bad("tensors is a dict", lambda ch: _raw(ch, tensors={"a": 1}), ErrorCode.BAD_MESSAGE, "$.tensors"),
    Bad("shape of floats", lambda ch: _raw_meta(ch, shape=[4096.0]), ErrorCode.BAD_MESSAGE, "shape"),
    Bad("missing field", lambda ch: _raw(ch, clock=DROP), ErrorCode.BAD_MESSAGE, "`clock`"),
    Bad("null clock", lambda ch: _raw(ch, clock=None), ErrorCode.BAD_MESSAGE, "$.clock"),
    Bad("unknown field", lambda ch: _raw(ch, admin=True), ErrorCode.BAD_MESSAGE, "admin"),
    Bad("negative clock", lambda ch: _raw(ch, clock=-1), ErrorCode.BAD_MESSAGE, "$.clock"),
    Bad("negative seq", lambda ch: _raw(ch, seq=-5), ErrorCode.BAD_MESSAGE, "$.seq"),
    Bad("negative dim", lambda ch: _raw_meta(ch, shape=[-4096]), ErrorCode.BAD_MESSAGE, "shape"),
    Bad("deep nesting", _deep, ErrorCode.BAD_MESSAGE, "recursion"),
    Bad("bad utf-8", _bad_utf8, ErrorCode.BAD_MESSAGE, "utf-8"),
    Bad("header is a list", lambda ch: [msgspec.msgpack.encode([1, "push", SEQ])], ErrorCode.BAD_MESSAGE, "object"),
    # below: checks that need the shard's chunks and members (check_tensors, codecs, ShardCore)
    Bad("wrong shape", _one_longer, ErrorCode.BAD_TENSOR, "expects float32[4096]", wire_only=True),
    Bad("2-d shape", lambda ch: _first(ch, shape=[64, 64]), ErrorCode.BAD_TENSOR, "[64, 64]", wire_only=True),
    Bad("dtype not the codec's", lambda ch: _first(ch, dtype="int32"), ErrorCode.BAD_TENSOR, "int32", wire_only=True),
    Bad("unknown codec", lambda ch: _first(ch, codec="zip"), ErrorCode.BAD_TENSOR, "zip", wire_only=True),
    Bad("unknown key", lambda ch: _first(ch, key=99), ErrorCode.BAD_TENSOR, "key 99 is not held", wire_only=True),
    Bad("missing key", lambda ch: valid_push(ch[:-1]), ErrorCode.BAD_TENSOR, "missing keys [2]", wire_only=True),
    Bad("duplicate key", lambda ch: valid_push([ch[0], ch[1], ch[1], ch[2]]), ErrorCode.BAD_TENSOR,
        "key 1 appears twice", wire_only=True),
    Bad("nan gradient", lambda ch: _poisoned(ch, np.nan), ErrorCode.NOT_FINITE, "NaN", wire_only=True),
    Bad("inf gradient", lambda ch: _poisoned(ch, np.inf), ErrorCode.NOT_FINITE, "Inf", wire_only=True),
    Bad("-inf gradient", lambda ch: _poisoned(ch, -np.inf), ErrorCode.NOT_FINITE, "Inf", wire_only=True),
    Bad("non-member", lambda ch: valid_push(ch, worker=WORKER + 1), ErrorCode.NOT_MEMBER, "rejoin", wire_only=True),
    Bad("old incarnation", lambda ch: _raw(ch, incarnation=INCARNATION + 1), ErrorCode.NOT_MEMBER, "rejoin",
        wire_only=True),
    Bad("op a shard does not serve", lambda ch: P.encode(P.Join(v=1, seq=SEQ)), ErrorCode.UNKNOWN_OP, "Join",
        wire_only=True),
]
CHUNKS = sharding.plan(9610, 1, RUN.chunk_elems)[0]  # the shard_thread layout, without building the task


def test_empty_message():
    with pytest.raises(ProtocolError, match="empty message") as e:
        P.decode([])
    assert e.value.code == ErrorCode.BAD_MESSAGE


@pytest.mark.parametrize("bad", [b for b in BAD if not b.wire_only], ids=lambda b: b.name)
def test_decode_refuses(bad):
    with pytest.raises(ProtocolError) as e:
        P.decode(bad.frames(CHUNKS))
    assert e.value.code == bad.code, e.value
    assert bad.says.lower() in str(e.value).lower()


@pytest.mark.parametrize("bad", [b for b in BAD if b.wire_only], ids=lambda b: b.name)
def test_wire_only_cases_pass_decode(bad):
    """These are well-formed messages; only the receiver's own state can refuse them."""
    P.decode(bad.frames(CHUNKS))


def test_check_tensors_accepts_the_shard_keys():
    P.check_tensors(map(_meta, CHUNKS), {c.key: c.numel for c in CHUNKS})


# -- over a real socket, against a running shard -----------------------------------


def ask(sock, frames, timeout_ms: int = REPLY_MS) -> P.Decoded:
    """Send raw frames, return the decoded reply; fail (never hang) if none comes in time."""
    sock.send_multipart(frames, copy=True)
    assert sock.poll(timeout_ms), f"no reply within {timeout_ms} ms"
    return P.decode(sock.recv_multipart())


def join(sock, worker: int = WORKER, clock: int = 0) -> P.ShardStats:
    reply = ask(sock, P.encode(P.Membership(v=VERSION, seq=1, live={worker: (INCARNATION, clock)})))
    assert isinstance(reply.header, P.ShardStats), reply.header
    return reply.header


def weights(reply: P.Decoded) -> torch.Tensor:
    return torch.from_numpy(np.concatenate([np.frombuffer(b, dtype=np.float32) for b in reply.buffers]))


def bits(t: torch.Tensor) -> bytes:
    return t.detach().numpy().tobytes()


@pytest.fixture
def shard(shard_thread):
    s = shard_thread(RUN)
    assert s.chunks == CHUNKS
    return s


@pytest.mark.parametrize("bad", BAD, ids=lambda b: b.name)
def test_shard_refuses_and_lives_on(shard, bad):
    sock = shard.dealer()
    join(sock)
    before, version = bits(shard.core.weights.param), shard.core.version
    reply = ask(sock, bad.frames(shard.chunks))
    assert isinstance(reply.header, P.Error), reply.header
    assert reply.header.code == bad.code, reply.header
    assert bad.says.lower() in reply.header.message.lower()
    assert bits(shard.core.weights.param) == before
    assert shard.core.version == version and shard.core.updates == 0 and shard.core.rejected == 1
    pulled = ask(sock, P.encode(P.Pull(v=VERSION, seq=SEQ + 1, worker_id=WORKER, clock=0)))
    assert isinstance(pulled.header, P.PullOk) and pulled.header.seq == SEQ + 1
    assert pulled.header.version == version
    assert [m.key for m in pulled.header.tensors] == [c.key for c in shard.chunks]
    assert bits(weights(pulled)) == before


# nothing to echo: no msgpack map, or one that even a generic decoder refuses
NO_SEQ = ("empty frame", "garbage", "header is a list", "negative seq", "deep nesting", "bad utf-8")


@pytest.mark.parametrize("bad", [b for b in BAD if b.name not in NO_SEQ], ids=lambda b: b.name)
def test_error_reply_carries_the_request_seq(shard, bad):
    sock = shard.dealer()
    join(sock)
    assert ask(sock, bad.frames(shard.chunks)).header.seq == SEQ


@pytest.mark.parametrize("changes", [{"op": "x" * 5000}, {"y" * 5000: 1}], ids=["long op", "long unknown field"])
def test_error_reply_to_a_long_bad_name_is_decodable(shard, changes):
    sock = shard.dealer()
    reply = ask(sock, _raw(shard.chunks, **changes))  # decoding the reply is what fails today
    assert isinstance(reply.header, P.Error) and reply.header.seq == SEQ


@pytest.fixture
def coordinator():
    """A Coordinator with no shards, served from a thread until a Stop or a deadline."""
    ctx = zmq.Context()
    c = Coordinator(ctx, "tcp://127.0.0.1:0", RunConfig(), [], FAST)
    thread = threading.Thread(target=c.serve, kwargs={"until": time.monotonic() + 60}, daemon=True)
    thread.start()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(c.address)
    yield sock
    ask(sock, P.encode(P.Stop(v=VERSION, seq=1)))
    thread.join(FAST.shutdown_grace + 5)
    sock.close(linger=0)
    ctx.term()
    assert not thread.is_alive(), "coordinator thread did not stop"


@pytest.mark.parametrize(("frames", "code"), [
    (P.encode(P.Join(v=2, seq=SEQ)), ErrorCode.BAD_VERSION),
    (P.encode(P.Pull(v=VERSION, seq=SEQ, worker_id=0, clock=0)), ErrorCode.UNKNOWN_OP),
], ids=["join v2", "pull"])
def test_coordinator_error_reply_carries_the_request_seq(coordinator, frames, code):
    reply = ask(coordinator, frames)
    assert isinstance(reply.header, P.Error) and reply.header.code == code
    assert reply.header.seq == SEQ


# -- valid pushes: the update is torch.optim's ------------------------------------


ORACLES = {
    "sgd": lambda p, c: torch.optim.SGD([p], lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay),
    "adam": lambda p, c: torch.optim.Adam([p], lr=c.lr, weight_decay=c.weight_decay),
    "adamw": lambda p, c: torch.optim.AdamW([p], lr=c.lr, weight_decay=c.weight_decay),
    "adagrad": lambda p, c: torch.optim.Adagrad([p], lr=c.lr, weight_decay=c.weight_decay),
}


def oracle(init: torch.Tensor, cfg: OptimizerConfig, steps: list[torch.Tensor]) -> torch.Tensor:
    p = torch.nn.Parameter(init.clone())
    opt = ORACLES[cfg.name](p, cfg)
    for g in steps:
        p.grad = g.clone()
        opt.step()
    return p.detach()


def _assert_ulp_close(actual, expected):
    # fused (server) and foreach (oracle) kernels round differently in the last bit
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("cfg", [OptimizerConfig("adam"), OptimizerConfig("adam", lr=1e-2, weight_decay=1e-3),
                                 OptimizerConfig("sgd", lr=0.1, momentum=0.9), OptimizerConfig("adamw", lr=1e-2),
                                 OptimizerConfig("adagrad", lr=0.05)],
                         ids=lambda c: f"{c.name}-lr{c.lr}-wd{c.weight_decay}")
def test_asp_push_is_one_torch_optim_step(shard_thread, cfg):
    s = shard_thread(RunConfig(consistency=Consistency("asp"), chunk_elems=4096, optimizer=cfg))
    init = s.core.weights.param.detach().clone()
    sock = s.dealer()
    join(sock)
    steps = []
    for seq in (10, 11):
        reply = ask(sock, valid_push(s.chunks, seq=seq, seed=seq))
        # both pushes name base version 0: the second is applied one version later
        assert reply.header == P.PushOk(v=VERSION, seq=seq, version=len(steps) + 1, applied=True, staleness=len(steps))
        steps.append(torch.from_numpy(np.concatenate(_grads(s.chunks, seed=seq))))
    assert not torch.equal(s.core.weights.param.detach(), init)
    _assert_ulp_close(s.core.weights.param.detach(), oracle(init, cfg, steps))


def test_duplicate_push_applies_once(shard):
    init = shard.core.weights.param.detach().clone()
    sock = shard.dealer()
    join(sock)
    first = ask(sock, valid_push(shard.chunks, seq=SEQ))
    after_one = bits(shard.core.weights.param)
    again = ask(sock, valid_push(shard.chunks, seq=SEQ))
    assert first.header == again.header == P.PushOk(v=VERSION, seq=SEQ, version=1, applied=True)
    assert bits(shard.core.weights.param) == after_one and shard.core.version == 1
    grad = torch.from_numpy(np.concatenate(_grads(shard.chunks)))
    _assert_ulp_close(shard.core.weights.param.detach(), oracle(init, RUN.optimizer, [grad]))
    assert shard.core.pushes == 1


def looped(port: int) -> str:
    """An address whose connection reaches itself, as a connect to a local port nothing
    listens on can by drawing that very port as its source: zmq's `source;destination`."""
    return f"tcp://127.0.0.1:{port};127.0.0.1:{port}"


def test_a_channel_looped_back_to_itself_gives_up_at_once_and_lets_the_port_go():
    ctx = zmq.Context()
    ch = Channel(ctx, looped(free_port_block(1)), "coordinator")
    first = ch.sock
    try:
        started = time.monotonic()
        with pytest.raises(DeadlineExceeded, match="looped back to itself"):
            ch.request(P.Status(v=VERSION, seq=ch.next_seq()), timeout=10.0)
        assert time.monotonic() - started < 5.0  # it knew, instead of waiting out the deadline
        assert first.closed and ch.sock is not first  # the loop held the server's port
    finally:
        ch.close()
        ctx.term()


def test_coordinator_lets_go_of_a_shard_connection_looped_back_to_itself():
    ctx = zmq.Context()
    shard = P.ShardSpec(index=0, address=looped(free_port_block(1)), chunks=[(0, 0, 4)])
    c = Coordinator(ctx, "tcp://127.0.0.1:0", RunConfig(), [shard], FAST)
    first = c.channels[0].sock
    try:
        deadline = time.monotonic() + 10
        while not first.closed and time.monotonic() < deadline:
            c.serve_once(100)  # its ticks send the shard the live set, which comes back
        assert first.closed and c.channels[0].sock is not first
    finally:
        c.close()
        ctx.term()


# -- memory of received frames ------------------------------------------------------

# a process receives five messages of 100 MB (25 frames of 4 MB, the size pull answers
# and the bare echo use) and prints the page faults each reception took
_RECEIVE = """
import resource, sys
import numpy as np, zmq
from paramserver import transport
tuned = sys.argv[1] == "tuned" and transport.tune_allocator()
ctx = zmq.Context()
router, address = transport.listen(ctx, "tcp://127.0.0.1:0")
dealer = transport.socket(ctx, zmq.DEALER)
dealer.connect(address)
frame = np.ones(4 << 20, dtype=np.uint8)
faults = []
for _ in range(5):
    dealer.send_multipart([b"h"] + [frame] * 25, copy=False)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    msg = transport.recv(router)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    del msg
router.close(linger=0)
dealer.close(linger=0)
ctx.term()
print(int(bool(tuned)), *faults)
"""


def test_tune_allocator_keeps_received_frames_on_pages_already_in_use():
    got = {}
    for mode in ("plain", "tuned"):
        out = subprocess.run([sys.executable, "-c", _RECEIVE, mode], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        tuned, *faults = map(int, out.stdout.split())
        got[mode] = faults
    assert tuned == 1  # glibc: mallopt took every setting
    pages = 100 * 256  # of 4 KB in 100 MB
    # the control: glibc's defaults fault in every page of every message (25,600 here)
    assert min(got["plain"][2:]) > pages // 2, got
    # tuned, the first messages grow the heap; later ones reuse it
    assert max(got["tuned"][2:]) < pages // 50, got
