"""The worker's control path: join the coordinator, then heartbeat from a thread of its own.

The heartbeat thread owns its own socket (sockets are never shared between
threads) and keeps beating while the training thread computes or waits on a
pull, so a busy worker is never mistaken for a dead one.
"""

from __future__ import annotations

import logging
import os
import socket as pysocket
import threading
import time

import psutil
import zmq

from paramserver import protocol
from paramserver.config import Timeouts
from paramserver.errors import DeadlineExceeded, RemoteError, ServerUnavailable
from paramserver.protocol import VERSION
from paramserver.transport import Channel

log = logging.getLogger(__name__)


class Session:
    def __init__(self, ctx: zmq.Context, server: str, timeouts: Timeouts, keys=None):
        self.ctx, self.server, self.timeouts, self.keys = ctx, server, timeouts, keys
        self.worker_id, self.incarnation, self.epoch = -1, 0, 0
        self.interval = timeouts.heartbeat_interval  # replaced by the server's at join
        # written by the training thread, read by the heartbeat thread (plain values)
        self.clock, self.loss, self.steps_per_s = 0, float("nan"), 0.0
        self.finish = threading.Event()  # the coordinator says the run is over
        self.dropped = threading.Event()  # the coordinator no longer knows us: rejoin
        self.last_ack = time.monotonic()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._process = psutil.Process()

    def __repr__(self) -> str:
        return f"<Session worker={self.worker_id}.{self.incarnation} server={self.server}>"

    def join(self, worker_id: int = -1) -> protocol.JoinOk:
        """Join (or rejoin with `worker_id`), retrying with backoff until reconnect_timeout."""
        channel = Channel(self.ctx, self.server, "coordinator", self.keys)
        deadline, backoff = time.monotonic() + self.timeouts.reconnect_timeout, 0.1
        try:
            while True:
                try:
                    reply = channel.request(
                        protocol.Join(v=VERSION, seq=channel.next_seq(), worker_id=worker_id,
                                      host=pysocket.gethostname(), pid=os.getpid()),
                        timeout=min(2.0, max(0.1, deadline - time.monotonic())),
                    ).header
                    break
                except DeadlineExceeded:
                    if channel.handshake_refused():
                        raise ServerUnavailable(
                            f"the server at {self.server} refused our CURVE key: its --authorized-keys must "
                            "hold our public key, and --server-key must be the server's public key") from None
                    channel.reset()
                if time.monotonic() + backoff > deadline:
                    raise ServerUnavailable(
                        f"no coordinator answered at {self.server} within {self.timeouts.reconnect_timeout}s; "
                        "check the address and that `ps-server start` is running"
                    )
                time.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
        finally:
            channel.close()
        self.worker_id, self.incarnation, self.clock = reply.worker_id, reply.incarnation, reply.clock
        self.epoch = reply.epoch
        self.interval = min(max(0.05, reply.heartbeat_interval), self.timeouts.heartbeat_timeout)
        self.dropped.clear()
        self.last_ack = time.monotonic()
        return reply

    def start_heartbeats(self) -> None:
        self._thread = threading.Thread(target=self._beat, name=f"heartbeat-{self.worker_id}", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        channel = Channel(self.ctx, self.server, "coordinator", self.keys)
        try:
            while not self._stop.wait(self.interval):
                self._beat_once(channel)
        finally:
            channel.close()

    def _beat_once(self, channel: Channel) -> None:
        hb = protocol.Heartbeat(
            v=VERSION, seq=channel.next_seq(), worker_id=self.worker_id, incarnation=self.incarnation,
            clock=self.clock, loss=self.loss, steps_per_s=self.steps_per_s, resources=self._resources(),
        )
        try:
            reply = channel.request(hb, timeout=self.interval * 2).header
        except DeadlineExceeded:
            channel.reset()
            return
        except RemoteError as e:
            log.warning("heartbeat refused: %s", e)
            return
        self.last_ack = time.monotonic()
        if reply.state == "finish":
            self.finish.set()
        elif hb.incarnation != self.incarnation:
            pass  # we rejoined while this beat was out: its answer is about the old membership
        elif reply.state == "rejoin" or reply.epoch != self.epoch:
            self.dropped.set()  # dropped, or the server restarted: rejoin and pull again

    def _resources(self) -> dict:
        try:
            net = psutil.net_io_counters()
            return {
                "cpu_percent": self._process.cpu_percent(None),
                "rss_bytes": self._process.memory_info().rss,
                "net_sent_bytes": net.bytes_sent,
                "net_recv_bytes": net.bytes_recv,
            }
        except (psutil.Error, OSError):
            return {}

    def server_silent_for(self) -> float:
        return time.monotonic() - self.last_ack

    def leave(self) -> None:
        """Say goodbye so bsp rounds stop waiting for us at once; best effort, bounded."""
        channel = Channel(self.ctx, self.server, "coordinator", self.keys)
        try:
            channel.request(protocol.Leave(v=VERSION, seq=channel.next_seq(), worker_id=self.worker_id,
                                           incarnation=self.incarnation), timeout=2.0)
        except (DeadlineExceeded, RemoteError) as e:
            log.info("leave not acknowledged: %s", e)
        finally:
            channel.close()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.interval * 4 + 1)
