"""The wire contract, defined once (written up in docs/protocol.md).

A message is a multipart ZeroMQ message: frame 0 is a msgpack header, frames
1..n are raw tensor bytes, one per `TensorMeta` in the header, in order. Each
header is one frozen struct below; `encode` builds frames, `decode` validates
them. No other module builds or parses headers.

msgspec decodes the header against its schema in one step (types, ranges,
lengths, unknown fields); `decode` then checks the version and that every
tensor frame has exactly the bytes its dtype and shape call for. Checks that
need server state (keys, shapes of the shard's chunks, finiteness) are the
receiver's, through `check_tensors`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated, Literal, Union

import msgspec
from msgspec import Meta, Struct

from .errors import ProtocolError

VERSION = 1
MAX_HEADER_BYTES = 1 << 20
# frames stay at a few MB (DESIGN.md); this bound only cuts off abuse
MAX_FRAME_BYTES = 64 << 20
MAX_TENSORS = 4096

Id = Annotated[int, Meta(ge=-1, le=2**31 - 1)]
Count = Annotated[int, Meta(ge=0, le=2**53)]
Seq = Annotated[int, Meta(ge=0, le=2**63 - 1)]
Name = Annotated[str, Meta(max_length=256)]
Text = Annotated[str, Meta(max_length=4096)]
Number = int | float

DTYPES = {  # wire name -> bytes per element; the whitelist
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "int8": 1,
    "uint8": 1,
    "int32": 4,
}
DType = Literal["float32", "float16", "bfloat16", "int8", "uint8", "int32"]
# how a pull's weights travel: whole (float32, float16, bfloat16), or `delta`: only
# the entries that changed since the worker's last answer (docs/protocol.md)
PULL_CODECS = ("none", "fp16", "bf16", "delta")
PullCodec = Literal["none", "fp16", "bf16", "delta"]


class ErrorCode:
    BAD_MESSAGE = "bad_message"  # malformed header or frames
    BAD_VERSION = "bad_version"
    UNKNOWN_OP = "unknown_op"
    BAD_TENSOR = "bad_tensor"  # wrong key, shape, dtype or byte count
    NOT_FINITE = "not_finite"  # NaN or Inf in a gradient
    NOT_MEMBER = "not_member"  # worker unknown or dropped: rejoin
    STALE = "stale"  # bsp push for a round already applied: pull again
    WAIT_TIMEOUT = "wait_timeout"  # a deferred pull waited too long: retry
    FINISHED = "finished"  # the run is over
    CHECKPOINT_MISSED = "checkpoint_missed"  # the shard is past the version asked for
    NOT_AUTHORIZED = "not_authorized"  # CURVE key no longer allowed, or not the server's
    INTERNAL = "internal"  # a bug on the server, logged there with its traceback


class TensorMeta(Struct, frozen=True, forbid_unknown_fields=True):
    key: Annotated[int, Meta(ge=0, le=2**31 - 1)]
    dtype: DType
    shape: Annotated[list[Count], Meta(max_length=8)]
    codec: Name = "none"
    params: Annotated[dict[Name, Number], Meta(max_length=16)] = {}

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPES[self.dtype]


class ShardSpec(Struct, frozen=True, forbid_unknown_fields=True):
    index: Count
    address: Text
    # (key, start, stop) over the model's flat float32 vector
    chunks: Annotated[list[tuple[Count, Count, Count]], Meta(max_length=MAX_TENSORS)]


class Header(Struct, frozen=True, tag_field="op", forbid_unknown_fields=True):
    v: int
    seq: Seq


# -- control path: worker <-> coordinator -------------------------------------------


class Join(Header, tag="join"):
    worker_id: Id = -1  # -1: assign a new id; otherwise rejoin with this one
    host: Name = ""
    pid: Count = 0


class JoinOk(Header, tag="join_ok"):
    worker_id: Id
    incarnation: Count
    clock: Count
    epoch: Count
    heartbeat_interval: float  # the server's: beat this often or be dropped
    partition: Id
    config: dict
    shards: Annotated[list[ShardSpec], Meta(max_length=1024)]


class Heartbeat(Header, tag="heartbeat"):
    worker_id: Id
    incarnation: Count
    clock: Count
    loss: float = float("nan")
    steps_per_s: float = 0.0
    resources: Annotated[dict[Name, Number], Meta(max_length=32)] = {}


class HeartbeatOk(Header, tag="heartbeat_ok"):
    state: Literal["run", "finish", "rejoin"]
    # bumps whenever the shards were restarted from a checkpoint: pull again
    epoch: Count = 0


class Leave(Header, tag="leave"):
    worker_id: Id
    incarnation: Count


class Status(Header, tag="status"):
    pass


class StatusOk(Header, tag="status_ok"):
    info: dict


class Stop(Header, tag="stop"):
    pass


class Ack(Header, tag="ack"):
    pass


# -- control path: coordinator -> shard ---------------------------------------------


class Membership(Header, tag="membership"):
    # worker id -> (incarnation, clock it starts at)
    live: Annotated[dict[Id, tuple[Count, Count]], Meta(max_length=1 << 16)]


class Traffic(Struct, array_like=True, forbid_unknown_fields=True):
    """One worker's bytes through one shard: raw = as float32, wire = as sent."""

    pushed_raw: Count = 0
    pushed_wire: Count = 0
    pulled_raw: Count = 0
    pulled_wire: Count = 0


class ShardStats(Header, tag="shard_stats"):
    index: Count
    version: Count
    updates: Count
    clocks: dict[Id, Count]
    waiting_for: list[Id]
    pushes: Count
    pulls: Count
    rejected: Count
    bytes_pushed: Count  # push messages received, as they were on the wire
    bytes_pulled: Count  # pull replies sent
    max_staleness: Count
    max_clock_gap: int = 0  # ssp: the most a served pull led the slowest live worker
    pid: Count = 0
    traffic: Annotated[dict[Id, Traffic], Meta(max_length=1 << 16)] = {}


class Checkpoint(Header, tag="checkpoint"):
    directory: Text
    number: Count
    # bsp: write at exactly this version (all shards then hold the same round);
    # otherwise write now
    at_version: Count = 0
    exact: bool = False


class CheckpointOk(Header, tag="checkpoint_ok"):
    index: Count
    file: Name
    sha256: Name
    version: Count
    updates: Count


# -- data path: worker <-> shard ----------------------------------------------------


class Pull(Header, tag="pull"):
    worker_id: Id
    clock: Count
    # an observer (evaluation, export) reads the newest weights and never waits
    observer: bool = False
    codec: PullCodec = "none"
    have: Count = 0  # delta: the token of the last answer the worker applied (0: none)


class PullOk(Header, tag="pull_ok"):
    version: Count
    tensors: Annotated[list[TensorMeta], Meta(max_length=MAX_TENSORS)]
    finished: bool = False
    token: Count = 0  # delta: send it back as `have`; 0 when not a delta answer
    # in the answer to a push that asked for weights: that push's staleness (as in push_ok)
    staleness: Count = 0
    # a large answer travels as `parts` messages of whole chunks, so that the worker copies
    # one while the next is still on the wire (zmq hands over a message only once it is all in)
    part: Annotated[int, Meta(ge=0, lt=MAX_TENSORS)] = 0
    parts: Annotated[int, Meta(ge=1, le=MAX_TENSORS)] = 1


class Push(Header, tag="push"):
    worker_id: Id
    incarnation: Count
    clock: Count
    base_version: Count  # the weights version the gradient was computed on
    tensors: Annotated[list[TensorMeta], Meta(max_length=MAX_TENSORS)]
    # also a pull at clock + 1: the reply is then pull_ok with the next weights, saving
    # the worker a second exchange per step
    pull: bool = False
    pull_codec: PullCodec = "none"
    have: Count = 0


class PushOk(Header, tag="push_ok"):
    version: Count
    applied: bool  # False: queued for the bsp round, applied when it closes
    finished: bool = False
    # weights versions applied between the push's base_version and its own update
    # (0 in bsp, and for a queued or duplicate push)
    staleness: Count = 0


class Error(Header, tag="error"):
    code: Name
    message: Text


Message = Union[  # noqa: UP007 (one line per group reads better than a chain of |)
    Join, JoinOk, Heartbeat, HeartbeatOk, Leave, Status, StatusOk, Stop, Ack,
    Membership, ShardStats, Checkpoint, CheckpointOk, Pull, PullOk, Push, PushOk, Error,
]

# what a Channel sends; it only ever receives the others (the answers and Error)
REQUESTS = (Join, Heartbeat, Leave, Status, Stop, Membership, Checkpoint, Pull, Push)

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Message)


@dataclass(frozen=True)
class Decoded:
    header: Header
    buffers: list[memoryview]  # one per header.tensors entry, raw bytes, not copied
    wire_bytes: int = 0  # the whole message as it was on the wire

    def __repr__(self) -> str:
        return f"<{type(self.header).__name__} seq={self.header.seq} frames={len(self.buffers)}>"


def encode(header: Header, buffers=()) -> list:
    """Frames for one message: the msgpack header, then the tensor buffers untouched."""
    return [_encoder.encode(header), *buffers]


def decode(frames) -> Decoded:
    """Validate and decode one message (frames: bytes, memoryview or zmq.Frame)."""
    if not frames:
        raise ProtocolError("empty message")
    raw = _bytes_of(frames[0])
    if len(raw) > MAX_HEADER_BYTES:
        raise ProtocolError(f"header of {len(raw)} bytes exceeds {MAX_HEADER_BYTES}")
    header = _decode_header(raw)
    if header.v != VERSION:
        raise ProtocolError(f"protocol version {header.v} not supported (this is {VERSION})", ErrorCode.BAD_VERSION)
    if isinstance(header, PullOk) and header.part >= header.parts:
        raise ProtocolError(f"pull_ok part {header.part} of {header.parts}: parts are numbered from 0")
    metas = getattr(header, "tensors", ())
    if len(frames) - 1 != len(metas):
        raise ProtocolError(f"header lists {len(metas)} tensors but {len(frames) - 1} frames follow")
    buffers, total = [], len(raw)
    for meta, frame in zip(metas, frames[1:]):
        buf = _buffer_of(frame)
        if buf.nbytes != meta.nbytes:
            raise ProtocolError(
                f"tensor {meta.key}: {buf.nbytes} bytes for {meta.dtype}{meta.shape} ({meta.nbytes} expected)",
                ErrorCode.BAD_TENSOR,
            )
        buffers.append(buf)
        total += buf.nbytes
    return Decoded(header, buffers, total)


def _decode_header(raw: bytes) -> Header:
    try:
        return _decoder.decode(raw)
    except msgspec.ValidationError as e:
        version = _peek_version(raw)
        if version is not None and version != VERSION:
            raise ProtocolError(f"protocol version {version} not supported (this is {VERSION})", ErrorCode.BAD_VERSION) from None
        if "Invalid value" in str(e) and "$.op" in str(e):
            raise ProtocolError(f"unknown operation: {e}", ErrorCode.UNKNOWN_OP) from None
        raise ProtocolError(f"invalid header: {e}") from None
    # msgspec raises these on bad UTF-8 and on deep nesting
    except (msgspec.DecodeError, ValueError, RecursionError) as e:
        raise ProtocolError(f"undecodable header: {e}") from None


def _peek_version(raw: bytes):
    try:
        generic = msgspec.msgpack.decode(raw)
    except (msgspec.DecodeError, ValueError, RecursionError):
        return None
    v = generic.get("v") if isinstance(generic, dict) else None
    return v if isinstance(v, int) else None


def _bytes_of(frame) -> bytes | memoryview:
    return getattr(frame, "buffer", frame)  # a zmq.Frame's memory, or bytes / a buffer as given


def _buffer_of(frame) -> memoryview:
    return memoryview(_bytes_of(frame)).cast("B")


def error_reply(seq: int, code: str, message: str) -> list:
    return encode(error(seq, code, message))


def error(seq: int, code: str, message: str) -> Error:
    # the text may quote hostile input: keep it within what a decoder accepts
    return Error(v=VERSION, seq=seq, code=code[:256], message=message[:4000])


def seq_of(frames) -> int:
    """Best-effort sequence number of an undecodable request, so the error reply still matches."""
    try:
        raw = msgspec.msgpack.decode(_bytes_of(frames[0]))
    except (msgspec.DecodeError, ValueError, RecursionError, IndexError):
        return 0
    seq = raw.get("seq", 0) if isinstance(raw, dict) else 0
    # bool is an int to Python, but not to msgspec: `true` would make the reply undecodable
    return seq if isinstance(seq, int) and not isinstance(seq, bool) and 0 <= seq < 2**63 else 0


def check_tensors(metas, expected: dict[int, int], seen: set | None = None, complete: bool = True) -> None:
    """Receiver-side check: every key is one of ours, exactly once.

    expected: key -> number of elements of that chunk on this receiver. Sizes on
    the wire depend on the codec, so the codec's `decode` checks them. For a
    message in parts: `seen` holds the keys of the parts before (this part's are
    added), and `complete` is for the last part, after which every key has come.
    """
    seen = set() if seen is None else seen
    for meta in metas:
        if meta.key not in expected:
            raise ProtocolError(f"key {meta.key} is not held here", ErrorCode.BAD_TENSOR)
        if meta.key in seen:
            raise ProtocolError(f"key {meta.key} appears twice", ErrorCode.BAD_TENSOR)
        seen.add(meta.key)
    if complete and len(seen) != len(expected):  # every key seen is expected: the same count means the same set
        missing = sorted(set(expected) - seen)[:5]
        raise ProtocolError(f"message is missing keys {missing}", ErrorCode.BAD_TENSOR)
