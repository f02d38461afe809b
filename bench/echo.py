"""The bare pyzmq peers, as process entry points that import neither torch nor
paramserver's roles (they start in a fraction of a second and take no memory).

They set up malloc as our processes do (`transport.tune_allocator`): without it
every frame they receive lands on freshly faulted pages, and the echo of 100 MB
takes 2-3 times as long; the peer is to be pyzmq at its fastest.
"""

from __future__ import annotations

import os

import numpy as np
import zmq

from paramserver.transport import tune_allocator


def _router(ready) -> tuple[zmq.Context, zmq.Socket]:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    ready.put(f"tcp://127.0.0.1:{sock.bind_to_random_port('tcp://127.0.0.1')}")
    return ctx, sock


def echo_main(ready, parent_pid: int) -> None:
    """Send every message straight back, frames untouched (received and sent without a copy)."""
    tune_allocator()
    ctx, sock = _router(ready)
    while os.getppid() == parent_pid:
        if sock.poll(100):
            sock.send_multipart(sock.recv_multipart(copy=False), copy=False)
    sock.close(linger=0)
    ctx.term()


def skeleton_main(ready, parent_pid: int, nbytes: int) -> None:
    """The least a shard does: ack a push (several frames), answer a pull (one frame) with nbytes."""
    tune_allocator()
    weights = np.zeros(nbytes, dtype=np.uint8)
    ctx, sock = _router(ready)
    while os.getppid() == parent_pid:
        if sock.poll(100):
            frames = sock.recv_multipart(copy=False)
            reply = b"ok" if len(frames) > 2 else weights
            sock.send_multipart([frames[0], reply], copy=False)
    sock.close(linger=0)
    ctx.term()
