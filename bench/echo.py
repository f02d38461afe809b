"""The bare pyzmq peers, as process entry points that import neither torch nor
paramserver's roles (they start in a fraction of a second and take no memory);
the floor imports torch for its check and step.

They set up malloc as our processes do (`transport.tune_allocator`): without it
every frame they receive lands on freshly faulted pages, and the echo of 100 MB
takes 2-3 times as long; the peer is to be pyzmq at its fastest.
"""

from __future__ import annotations

import os

import numpy as np
import zmq

from paramserver.transport import send, tune_allocator


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


PASSES = ("check", "step", "copy")


def floor_main(ready, parent_pid: int, passes: tuple[str, ...], lr: float) -> None:
    """The least a parameter server does to the bytes of a push + pull round trip, as
    a bare pyzmq server. Every message is gradients in float32 frames. The `passes`
    (of PASSES) that run here:

    - check: the shards' test for NaN and Inf (`weights.finite`) over every frame before
      any is applied; a push that fails it is answered with one message, b"not finite";
    - step: the SGD update in place, `w -= lr * g`, torch's one-pass add (the kernel
      torch.optim's SGD runs).

    ("copy" is the client's: `rigs.Floor` copies the answer into its flat weights.)
    The answer is one message [b"ok", weights] per frame received, each sent as soon
    as its part of the weights is stepped, as a shard sends its answer's parts; from
    `transport.ZERO_COPY_MIN` up without a copy, from the weights' own memory. The
    weights start at 1.0, written, as a shard's are. No header, no validation, no
    consistency rule: what is left is the cost of the passes. A client that takes
    the whole answer before its next push (`rigs.Floor`) keeps the frames in flight
    apart from the next step's writes.
    """
    tune_allocator()
    step, check = "step" in passes, "check" in passes
    if step or check:  # imported here: the echoes above start without torch
        import torch

        from paramserver.weights import finite

        torch.set_num_threads(1)
    ctx, sock = _router(ready)
    weights = np.ones(0, dtype=np.float32)
    while os.getppid() == parent_pid:
        if not sock.poll(100):
            continue
        identity, *frames = sock.recv_multipart(copy=False)
        grads = [np.frombuffer(f.buffer, dtype=np.float32) for f in frames]
        if check and not all(finite(g) for g in grads):
            sock.send_multipart([identity, b"not finite"])
            continue
        total = sum(g.size for g in grads)
        if weights.size != total:
            weights = np.ones(total, dtype=np.float32)
        start = 0
        for g in grads:
            w = weights[start : start + g.size]
            if step:
                torch.from_numpy(w).add_(torch.from_numpy(g), alpha=-lr)
            send(sock, [identity, b"ok", w])
            start += g.size
    sock.close(linger=0)
    ctx.term()

