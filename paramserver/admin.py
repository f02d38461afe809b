"""What tools and operators ask a running server: its status, and to stop."""

from __future__ import annotations

import zmq

from . import protocol
from .errors import DeadlineExceeded
from .protocol import VERSION
from .transport import Channel


def _ask(server: str, header_type, timeout: float, ctx: zmq.Context | None, keys=None):
    own = ctx is None
    ctx = ctx or zmq.Context()
    channel = Channel(ctx, server, "coordinator", keys)
    try:
        return channel.request(header_type(v=VERSION, seq=channel.next_seq()), timeout=timeout).header
    except DeadlineExceeded:
        if channel.handshake_refused():
            raise DeadlineExceeded(f"the server at {server} refused our CURVE key") from None
        raise DeadlineExceeded(f"no reply from a coordinator at {server} within {timeout}s; "
                               "is `ps-server start` running there?") from None
    finally:
        channel.close()
        if own:
            ctx.term()


def status(server: str, timeout: float = 5.0, ctx: zmq.Context | None = None, keys=None) -> dict:
    """The coordinator's view: state, workers, shards, what a round waits for."""
    return _ask(server, protocol.Status, timeout, ctx, keys).info


def stop(server: str, timeout: float = 5.0, ctx: zmq.Context | None = None, keys=None) -> None:
    """Ask the server to end the run: workers are told to finish, then every process exits."""
    _ask(server, protocol.Stop, timeout, ctx, keys)
