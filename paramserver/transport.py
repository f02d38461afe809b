"""ZeroMQ plumbing shared by every role: sockets with safe options, framed send and
receive, and a request channel with sequence numbers and deadlines.

Addresses are URLs (`tcp://host:port`, `ipc:///path`, `inproc://name`), so the
same code runs in one test process and across hosts. A socket belongs to the
thread that made it.
"""

from __future__ import annotations

import ctypes
import itertools
import logging
import time

import zmq

from . import protocol
from .errors import ConfigError, DeadlineExceeded, Interrupted, ProtocolError, RemoteError

log = logging.getLogger(__name__)

# below this, copying into a zmq message is cheaper than pinning the buffer: a frame
# sent without a copy costs a Frame, a tracker and a wake-up of pyzmq's thread that
# releases it (which takes the GIL), while a copy, once malloc reuses memory
# (tune_allocator), costs little more than the memcpy. Paired probes: 1 MB frames
# copied 1.13x as fast as zero-copy, 4 MB frames 0.89x; the cut lies between
ZERO_COPY_MIN = 2 * 1024 * 1024
# a DEALER whose peer never completed the handshake (say, CURVE refused our key)
# blocks in send: bound it, so that no send waits forever
SEND_TIMEOUT_MS = 2000
_SNDMORE = int(zmq.SNDMORE)
# glibc's mallopt parameters, and the values tune_allocator sets
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8
MMAP_THRESHOLD = 32 << 20  # the most glibc takes on 64-bit: every frame we send is smaller
TRIM_THRESHOLD = 1 << 30


def tune_allocator() -> bool:
    """Make malloc reuse the memory of received frames instead of faulting in fresh pages;
    True where it could (glibc). Call it first thing in a process, before threads start.

    zmq's I/O thread mallocs each large frame it receives. By default glibc serves sizes
    over its mmap threshold with a fresh mapping, and the rest from a per-thread arena
    whose heaps it unmaps once they are empty: either way the received bytes land on
    pages the kernel must fault in and zero, about 25,000 faults per 100 MB received (a
    third of the page faults of a 25M-model bsp run, bench/findings.md). One arena for
    every thread, trimmed only past TRIM_THRESHOLD of free memory at its top, with frames
    under MMAP_THRESHOLD taken from it, keeps the same pages in use. The cost: a process
    keeps up to TRIM_THRESHOLD of freed memory mapped, no more than its peak use.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt  # of the C library this process runs on
    except (OSError, AttributeError):  # not glibc (macOS has no mallopt)
        return False
    # the arena limit takes effect only for threads that have not allocated yet
    return all(mallopt(param, value) == 1 for param, value in (
        (_M_ARENA_MAX, 1), (_M_MMAP_THRESHOLD, MMAP_THRESHOLD), (_M_TRIM_THRESHOLD, TRIM_THRESHOLD)))


def socket(ctx: zmq.Context, kind: int) -> zmq.Socket:
    s = ctx.socket(kind)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.MAXMSGSIZE, protocol.MAX_FRAME_BYTES)
    s.setsockopt(zmq.SNDHWM, 10_000)
    s.setsockopt(zmq.RCVHWM, 10_000)
    s.setsockopt(zmq.SNDTIMEO, SEND_TIMEOUT_MS)
    return s


def bind(sock: zmq.Socket, address: str) -> str:
    """Bind and return the address peers should use (port 0 picks a free port)."""
    if address.startswith("tcp://") and address.endswith(":0"):
        host = address[len("tcp://") : -2]
        port = sock.bind_to_random_port(f"tcp://{host}")
        return f"tcp://{host}:{port}"
    sock.bind(address)
    return address


def listen(ctx: zmq.Context, address: str, keys=None) -> tuple[zmq.Socket, str]:
    """A ROUTER bound at `address` (a CURVE server with security.Keys `keys`) and the
    address peers should use. A failed bind leaves no socket open: one would keep the
    context's `term` waiting forever, and the process from ever ending."""
    sock = socket(ctx, zmq.ROUTER)
    try:
        if keys is not None:
            from .security import make_server

            make_server(sock, keys)
        return sock, bind(sock, address)
    except BaseException:
        sock.close(linger=0)
        raise


def send(sock: zmq.Socket, frames: list, flags: int = 0, trackers: list | None = None) -> int:
    """Send frames, large ones without a copy; returns the bytes put on the wire.

    With `trackers`, each frame sent without a copy adds a MessageTracker there:
    its buffer must not change until the tracker is `.done`.
    """
    # plain ints: or-ing zmq's Flag enums runs Python code in the enum module, per frame
    flags, more, total, last = int(flags), _SNDMORE, 0, len(frames) - 1
    for i, f in enumerate(frames):
        n = len(f) if isinstance(f, bytes) else memoryview(f).nbytes
        total += n
        fl = flags | more if i < last else flags
        if n < ZERO_COPY_MIN:
            sock.send(f, fl, copy=True)
        elif trackers is None:
            sock.send(f, fl, copy=False)
        else:
            trackers.append(sock.send(f, fl, copy=False, track=True))
    return total


def poller(sock: zmq.Socket) -> zmq.Poller:
    """A poller for `sock`'s input, made once: `Socket.poll` builds a new one per call."""
    p = zmq.Poller()
    p.register(sock, zmq.POLLIN)
    return p


def recv(sock: zmq.Socket) -> list[zmq.Frame]:
    """The frames of one message, received without a copy."""
    # Frame.more, not recv_multipart: that asks getsockopt(RCVMORE), enum types and all, per frame
    frames = [sock.recv(copy=False)]
    while frames[-1].more:
        frames.append(sock.recv(copy=False))
    return frames


def nbytes(frames) -> int:
    return sum(len(f) if isinstance(f, bytes) else memoryview(getattr(f, "buffer", f)).nbytes for f in frames)


class Channel:
    """A DEALER to one peer; request/reply matched by sequence number, every wait bounded.

    Replies to requests that already timed out are recognised by their sequence
    number and dropped.
    """

    def __init__(self, ctx: zmq.Context, address: str, name: str = "", keys=None):
        # keys: security.Keys for a CURVE client, None for plain sockets
        self.ctx, self.address, self.name, self.keys = ctx, address, name or address, keys
        self.monitor = None
        self._seq = itertools.count(int(time.time() * 1000) << 16)
        self.sock = self._connect()
        self.bytes_sent = self.bytes_received = 0

    def __repr__(self) -> str:
        return f"<Channel {self.name}>"

    def _connect(self) -> zmq.Socket:
        s = socket(self.ctx, zmq.DEALER)
        try:
            if self.keys is not None:
                from .security import make_client

                make_client(s, self.keys)
                # a refused key shows only as a monitor event: the peer just stays silent
                self.monitor = s.get_monitor_socket(zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL)
            s.connect(self.address)
        except zmq.ZMQError as e:
            # nothing left open: an open socket would keep the context's term waiting forever
            if self.monitor is not None:
                self.monitor.close(linger=0)
                self.monitor = None
            s.close(linger=0)
            raise ConfigError(f"cannot connect to {self.address!r}: {e}; "
                              "an address looks like tcp://host:port") from None
        self._poller = poller(s)
        return s

    def handshake_refused(self) -> bool:
        """Whether the peer refused our CURVE key since the socket was made."""
        if self.monitor is None:
            return False
        refused = False
        while self.monitor.poll(0):
            self.monitor.recv_multipart()
            refused = True
        return refused

    def reset(self) -> None:
        """A fresh socket: drops queued requests and late replies after a failure."""
        self._close()
        self.sock = self._connect()

    def _close(self) -> None:
        if self.monitor is not None:
            self.sock.disable_monitor()
            self.monitor.close(linger=0)
            self.monitor = None
        self.sock.close(linger=0)

    def next_seq(self) -> int:
        return next(self._seq)

    def send(self, header, buffers=(), trackers: list | None = None) -> None:
        """Send one message; with `trackers`, its zero-copy frames' trackers are added there."""
        try:
            self.bytes_sent += send(self.sock, protocol.encode(header, buffers), trackers=trackers)
        except zmq.Again:
            raise DeadlineExceeded(f"could not send to {self.name}: no connection within {SEND_TIMEOUT_MS} ms") from None

    def receive(self, seq: int, deadline: float, cancel=None) -> protocol.Decoded:
        """The reply to `seq`, or DeadlineExceeded; an error reply becomes RemoteError.

        `cancel()`, checked every 100 ms, ends the wait early with Interrupted.
        """
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise DeadlineExceeded(f"no reply from {self.name} within the deadline")
            if not self._poller.poll(max(1, int(min(left, 0.1 if cancel else left) * 1000))):
                if cancel is not None and cancel():
                    raise Interrupted(f"wait for {self.name} interrupted")
                continue
            frames = recv(self.sock)
            try:
                msg = protocol.decode(frames)
            except ProtocolError as e:
                self.bytes_received += nbytes(frames)
                log.warning("dropping malformed reply from %s: %s", self.name, e)
                continue
            self.bytes_received += msg.wire_bytes  # every frame's bytes, as nbytes(frames) counts them
            if isinstance(msg.header, protocol.REQUESTS):
                self.let_go_of_loop()
                raise DeadlineExceeded(f"the connection to {self.name} looped back to itself: "
                                       f"nothing listens at {self.address}")
            if msg.header.seq != seq:
                continue  # a late reply to a request we gave up on
            if isinstance(msg.header, protocol.Error):
                raise RemoteError(msg.header.code, msg.header.message)
            return msg

    def let_go_of_loop(self) -> None:
        """A fresh socket for one that received a request (`protocol.REQUESTS`), its own:
        it is connected to itself.

        A TCP connect to a local port that nothing listens on can draw that very port as
        its source and reach itself, and DEALER to DEALER handshakes fine. The loop would
        hold the port (the server could then not bind it) and answer nothing, ever.
        """
        log.warning("the connection to %s looped back to itself; connecting again", self.name)
        self.reset()

    def request(self, header, buffers=(), timeout: float = 10.0) -> protocol.Decoded:
        self.send(header, buffers)
        return self.receive(header.seq, time.monotonic() + timeout)

    def close(self) -> None:
        self._close()
