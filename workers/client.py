"""The worker's data path: pull weights from every shard and push gradients to every
shard, each fanned out in parallel (send to all, then collect), with one deadline.

Like ps-lite's KVWorker: two verbs over the model's flat float32 vector.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch
import zmq

from paramserver import codecs, protocol
from paramserver.config import check_pull_codec
from paramserver.errors import DeadlineExceeded, ProtocolError
from paramserver.protocol import VERSION
from paramserver.sharding import Chunk
from paramserver.transport import Channel

log = logging.getLogger(__name__)
CLOSE_WAIT = 5.0  # seconds a closing client waits for zmq to let go of its pushes' frames


@dataclass(frozen=True)
class Reply:
    version: int  # the lowest weights version among the shards' answers
    finished: bool  # some shard says the run is over
    staleness: int = 0  # a push's: the largest over the shards


@dataclass
class Outgoing:
    """One push exchange on its way out: per shard, its (header, buffers) once sent, else None."""

    grads: torch.Tensor  # flat float32, shape (total,): the memory the `none` codec sends
    worker: int
    incarnation: int
    clock: int
    base_version: int
    pull: bool
    messages: list
    # of this push's frames sent without a copy: `grads` must stay as it is until each is done
    trackers: list = field(default_factory=list)

    def __repr__(self) -> str:
        sent = sum(m is not None for m in self.messages)
        return f"<Outgoing clock={self.clock} sent={sent}/{len(self.messages)}>"


class ShardClient:
    def __init__(self, ctx: zmq.Context, shards: list[protocol.ShardSpec], codec: str = "none", keys=None,
                 pull_codec: str = "none"):
        # first: a bad name must fail before any socket exists (an open one blocks ctx.term)
        self.codec = codecs.get(codec)  # this worker's own instance: it holds its error-feedback residuals
        self.pull_codec = check_pull_codec(pull_codec)
        self.channels = [Channel(ctx, s.address, f"shard {s.index}", keys) for s in shards]
        self.chunks = [[Chunk(*c) for c in s.chunks] for s in shards]
        # per shard, what its answers must hold (key -> numel) and where each key goes
        self._expected = [{c.key: c.numel for c in chunks} for chunks in self.chunks]
        self._by_key = [{c.key: c for c in chunks} for chunks in self.chunks]
        # delta pulls: per shard, the token of the last answer applied (0: none, send whole)
        self.tokens = [0] * len(shards)
        self._sending: list[zmq.MessageTracker] = []  # of pushes' zero-copy frames (wait_sent)

    def __repr__(self) -> str:
        return f"<ShardClient shards={len(self.channels)} codec={self.codec.name}>"

    @property
    def bytes_sent(self) -> int:
        return sum(ch.bytes_sent for ch in self.channels)

    @property
    def bytes_received(self) -> int:
        return sum(ch.bytes_received for ch in self.channels)

    def pull(self, into: torch.Tensor, worker: int, clock: int, timeout: float, observer: bool = False,
             cancel=None) -> Reply:
        """Copy every shard's weights into `into` (flat float32, shape (total,))."""
        seqs = []
        codec = "none" if observer else self.pull_codec
        for ch, have in zip(self.channels, self.tokens):
            seqs.append(ch.next_seq())
            ch.send(protocol.Pull(v=VERSION, seq=seqs[-1], worker_id=worker, clock=clock, observer=observer,
                                  codec=codec, have=have))
        deadline = time.monotonic() + timeout
        flat = into.numpy()
        replies = []
        for i, (ch, seq) in enumerate(zip(self.channels, seqs)):
            replies.append(self._take_weights(i, flat, ch.receive(seq, deadline, cancel), deadline, cancel))
        return _combine(replies)

    def _take_weights(self, shard: int, flat, msg: protocol.Decoded, deadline: float, cancel) -> protocol.PullOk:
        """A shard's answer into the flat weights: `msg`, its first part, then the others.

        Each part is copied in as it arrives, while the next may still be on the wire.
        ProtocolError unless the parts agree and together hold the shard's keys, each
        once; DeadlineExceeded if a part has not come by `deadline`.
        """
        first = msg.header
        if not isinstance(first, protocol.PullOk):
            raise ProtocolError(f"expected pull_ok, got {type(first).__name__}")
        self.tokens[shard] = 0  # a partly written answer leaves no valid base for a delta
        seen: set[int] = set()
        answer = _answer(first)
        for part in range(first.parts):
            if part:  # one connection keeps the shard's order: part k comes k-th
                msg = self.channels[shard].receive(first.seq, deadline, cancel)
            h = msg.header
            if not isinstance(h, protocol.PullOk) or h.part != part or (part and _answer(h) != answer):
                raise ProtocolError(f"{msg!r} is not part {part} of the answer {first!r}")
            protocol.check_tensors(h.tensors, self._expected[shard], seen, complete=part == first.parts - 1)
            self._copy(shard, flat, msg)
        self.tokens[shard] = first.token
        return first

    def _copy(self, shard: int, flat, msg: protocol.Decoded) -> None:
        by_key = self._by_key[shard]
        for meta, buf in zip(msg.header.tensors, msg.buffers):
            c = by_key[meta.key]
            if meta.codec == codecs.delta.NAME:
                codecs.delta.apply(flat[c.start : c.stop], meta, buf)
            else:
                flat[c.start : c.stop] = codecs.for_wire(meta.codec).decode(meta, buf, c.numel)

    def push(self, grads: torch.Tensor, worker: int, incarnation: int, clock: int, base_version: int, timeout: float,
             cancel=None, retry_for: float = 0.0, pull_into: torch.Tensor | None = None, pull_wait: float = 0.0) -> Reply:
        """Send each shard its slice of `grads` (flat float32, shape (total,)); wait for every ack.

        Each attempt waits `timeout`; unanswered pushes are resent for up to `retry_for`.
        With `pull_into`, the same exchange also pulls at clock + 1: each shard answers
        with its weights, copied into `pull_into`, at once when the consistency mode
        allows; otherwise it acknowledges the push first and the weights follow, within
        `pull_wait` (default `timeout`) of the acknowledgement.
        """
        out = self.start_push(grads, worker, incarnation, clock, base_version, pull=pull_into is not None)
        return self.finish_push(out, timeout, cancel, retry_for, pull_into, pull_wait)

    def start_push(self, grads: torch.Tensor, worker: int, incarnation: int, clock: int, base_version: int,
                   pull: bool) -> Outgoing:
        """A push exchange that sends nothing yet: `send_part` sends one shard's message
        (during backward, once that shard's gradients are final), `finish_push` the rest."""
        return Outgoing(grads, worker, incarnation, clock, base_version, pull, [None] * len(self.channels))

    def send_part(self, out: Outgoing, shard: int) -> None:
        """Encode and send shard `shard`'s slice of `out.grads`; a second call does nothing."""
        if out.messages[shard] is not None:
            return
        metas, buffers = [], []
        for c in self.chunks[shard]:
            # per chunk: the codec keeps error feedback by chunk key; grads itself is never written
            dtype, shape, params, buf = self.codec.encode(c.key, out.grads[c.start : c.stop])
            metas.append(protocol.TensorMeta(key=c.key, dtype=dtype, shape=shape, codec=self.codec.name, params=params))
            buffers.append(buf)
        ch = self.channels[shard]
        header = protocol.Push(v=VERSION, seq=ch.next_seq(), worker_id=out.worker, incarnation=out.incarnation,
                               clock=out.clock, base_version=out.base_version, tensors=metas, pull=out.pull,
                               pull_codec=self.pull_codec, have=self.tokens[shard])
        out.messages[shard] = (header, buffers)
        self._send(ch, header, buffers, out)

    def send_all(self, out: Outgoing) -> None:
        """Send every shard's message of `out` not sent yet, without waiting for answers."""
        for i in range(len(self.channels)):
            self.send_part(out, i)

    def _send(self, ch: Channel, header, buffers, out: Outgoing) -> None:
        known = len(out.trackers)
        ch.send(header, buffers, out.trackers)
        self._sending.extend(out.trackers[known:])

    def finish_push(self, out: Outgoing, timeout: float, cancel=None, retry_for: float = 0.0,
                    pull_into: torch.Tensor | None = None, pull_wait: float = 0.0) -> Reply:
        """Send the shards' messages not sent yet, then collect every answer (see `push`)."""
        self.send_all(out)
        replies, staleness = [], 0
        for i, (ch, (header, buffers)) in enumerate(zip(self.channels, out.messages)):
            msg = self._ack(ch, header, buffers, out, timeout, retry_for, cancel)
            staleness = max(staleness, getattr(msg.header, "staleness", 0))
            if out.pull:
                if isinstance(msg.header, protocol.PushOk):  # landed; the weights wait for the consistency rule
                    msg = ch.receive(header.seq, time.monotonic() + (pull_wait or timeout), cancel)
                # the answer's first part is in: the others follow at once, within a request's time
                self._take_weights(i, pull_into.numpy(), msg, time.monotonic() + timeout, cancel)
            replies.append(msg.header)
        # answered: their frames are (nearly always) released by now; keep only the rest
        self._sending = [t for t in self._sending if not t.done]
        return _combine(replies, staleness)

    def wait_sent(self, timeout: float, out: Outgoing | None = None) -> None:
        """Return once no frame sent without a copy still reads the gradient buffer
        (of push `out`'s, when given; of any push, else).

        The `none` codec sends slices of the caller's gradients as they are: they must
        not be written (the next step's `zero_`) while zmq may still be sending them.
        After a collected answer they are done at once; after an abandoned exchange
        (a reset socket) zmq lets go of them shortly after.
        """
        deadline = time.monotonic() + timeout
        for t in self._sending if out is None else out.trackers:
            try:
                t.wait(max(0.0, deadline - time.monotonic()))
            except zmq.NotDone:
                raise DeadlineExceeded(f"a push's frames still in flight after {timeout}s") from None
        if out is None:
            self._sending.clear()

    def _ack(self, ch: Channel, header, buffers, out: Outgoing, timeout: float, retry_for: float, cancel):
        """Wait for one shard's ack; on a timeout resend the SAME message (same sequence
        number) on a fresh socket, so a shard that had applied it acks without applying twice."""
        give_up = time.monotonic() + retry_for
        while True:
            try:
                return ch.receive(header.seq, time.monotonic() + timeout, cancel)
            except DeadlineExceeded:
                if time.monotonic() + timeout > give_up:
                    raise
                log.warning("no ack from %s for push %d; sending it again", ch.name, header.seq)
                ch.reset()
                self._send(ch, header, buffers, out)

    def reset(self) -> None:
        self.tokens = [0] * len(self.channels)
        for ch in self.channels:
            ch.reset()

    def close(self) -> None:
        for ch in self.channels:
            ch.close()
        # the caller may reuse the gradient buffer (a rejoin makes a new client over it)
        try:
            self.wait_sent(CLOSE_WAIT)
        except DeadlineExceeded as e:
            log.warning("%s", e)


def _answer(h: protocol.PullOk) -> tuple:
    """What every part of one answer says alike."""
    return h.seq, h.version, h.finished, h.token, h.staleness, h.parts


def _combine(headers, staleness: int = 0) -> Reply:
    return Reply(min(h.version for h in headers), any(h.finished for h in headers), staleness)


def fetch_weights(ctx: zmq.Context, server: str, timeout: float = 10.0, keys=None) -> tuple[dict, torch.Tensor]:
    """The server's current weights, read as an observer (never waits, joins nothing).

    Returns (status, flat) with flat float32 of shape (total,).
    """
    from paramserver import admin

    info = admin.status(server, timeout, ctx, keys)
    shards = [protocol.ShardSpec(index=s["index"], address=s["address"], chunks=[tuple(c) for c in s["chunks"]])
              for s in info["shard_map"]]
    total = max((c[2] for s in shards for c in s.chunks), default=0)
    flat = torch.empty(total, dtype=torch.float32)
    client = ShardClient(ctx, shards, keys=keys)
    try:
        client.pull(flat, worker=-1, clock=0, timeout=timeout, observer=True)
    finally:
        client.close()
    return info, flat
