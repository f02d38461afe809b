"""What an eavesdropper on the wire sees: real loopback packets, with and without CURVE.

A raw packet socket (AF_PACKET on `lo`, so root or CAP_NET_RAW) records the TCP
payload of every connection to the cluster's coordinator and shard ports while a
worker trains a few steps and a tool reads the weights. The same run is made
twice: without CURVE the float32 bytes of the weights the server sent must be in
the capture (the positive control: the capture works and would see a leak);
with CURVE none of them may be, though as many bytes crossed the wire.
"""

from __future__ import annotations

import shutil
import socket
import struct
import threading
import time

import pytest
import torch

from paramserver import cluster, security
from paramserver.config import Consistency, RunConfig

pytestmark = pytest.mark.timeout(240)

ETH_P_ALL = 0x0003
PACKET_HOST = 0  # a packet as received; on `lo` each one is also seen once as outgoing
SO_RCVBUFFORCE = 33  # Linux; root may exceed rmem_max
WINDOW = 16  # bytes: four float32 weights in a row, never there by chance
RUN = RunConfig(consistency=Consistency("asp"), seed=4242)  # an unusual seed: not another test's weights
STEPS = 20


class Capture:
    """TCP payloads on `lo` to or from `ports`, per connection in arrival order, until stopped."""

    def __init__(self, ports: set[int], deadline_s: float = 120.0):
        self.ports, self.deadline = ports, time.monotonic() + deadline_s
        self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 64 << 20)
        except OSError:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 20)
        self.sock.bind(("lo", 0))
        self.sock.settimeout(0.1)
        self.flows: dict[tuple[int, int], bytearray] = {}
        self.packets = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="capture", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        buf = bytearray(1 << 18)  # loopback segments reach 64 KiB; GSO may hand us more
        while time.monotonic() < self.deadline:
            try:
                n, addr = self.sock.recvfrom_into(buf)
            except TimeoutError:
                if self._stop.is_set():
                    return  # stopped, and a tick without packets: what was queued is read
                continue
            if addr[2] == PACKET_HOST:
                self._add(memoryview(buf)[:n])

    def _add(self, frame: memoryview) -> None:
        # lo frames: 14-byte Ethernet header (zero MACs), then IPv4, then TCP
        if len(frame) < 54 or frame[12:14] != b"\x08\x00" or frame[23] != socket.IPPROTO_TCP:
            return
        ip = 14
        ihl = (frame[ip] & 0x0F) * 4
        total = struct.unpack_from("!H", frame, ip + 2)[0]
        tcp = ip + ihl
        sport, dport = struct.unpack_from("!HH", frame, tcp)
        if sport not in self.ports and dport not in self.ports:
            return
        end = ip + total if total else len(frame)
        payload = frame[tcp + (frame[tcp + 12] >> 4) * 4 : end]
        if len(payload):
            self.flows.setdefault((sport, dport), bytearray()).extend(payload)
            self.packets += 1

    def stop(self) -> bytes:
        """Everything captured, the connections' streams joined (a window never spans two)."""
        self._stop.set()
        self.deadline = min(self.deadline, time.monotonic() + 3)  # a link that never goes quiet
        self._thread.join(5)
        assert not self._thread.is_alive(), "capture thread did not stop"
        self.sock.close()
        return b"\n--\n".join(bytes(f) for f in self.flows.values())


def _raw_socket_or_skip() -> None:
    if not hasattr(socket, "AF_PACKET"):
        pytest.skip("AF_PACKET raw sockets are Linux-only")
    try:
        socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL)).close()
    except PermissionError:
        pytest.skip("capturing loopback packets needs root or CAP_NET_RAW")
    except OSError as e:
        pytest.skip(f"no raw packet socket here: {e}")


def _windows(flat: torch.Tensor, shard_map: list[dict], per_shard: int = 4) -> list[bytes]:
    """16-byte runs of the weights, inside each shard's chunks (a chunk travels as one frame)."""
    raw = flat.numpy().tobytes()
    out = []
    for s in shard_map:
        for _, start, stop in s["chunks"]:
            for i in range(per_shard):
                at = start + (stop - start - WINDOW // 4) * (2 * i + 1) // (2 * per_shard)
                out.append(raw[at * 4 : at * 4 + WINDOW])
    return out


def _ports(c) -> set[int]:
    info = c.status()
    return {int(a.rsplit(":", 1)[1]) for a in [c.address, *(s["address"] for s in info["shard_map"])]}


def _train_and_read(c, keys) -> tuple[bytes, list[bytes], int]:
    """Capture a short training run and a read of the weights; (capture, weight windows, weight bytes)."""
    initial = cluster.initial_weights(RUN)[1]
    shard_map = c.status()["shard_map"]
    cap = Capture(_ports(c))
    try:
        c.add_worker(max_steps=STEPS, keys=keys)
        results = c.wait_workers(timeout=90)
        final = c.weights()  # an observer pull, answered with the weights the server holds now
    finally:
        seen = cap.stop()
    assert [r["steps"] for r in results] == [STEPS], results
    assert not torch.equal(final, initial), "the run did not train"
    return seen, _windows(initial, shard_map) + _windows(final, shard_map), final.numel() * 4


@pytest.fixture
def curve(tmp_path):
    """The server's key pair with an allow-list of one worker key; (server security, worker keys)."""
    for name in ("server", "alice"):
        security.keygen(str(tmp_path / name), name)
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    shutil.copy(tmp_path / "alice" / "alice.key", allowed)
    server = security.ServerSecurity.load(str(tmp_path / "server" / "server.key_secret"), str(allowed))
    worker = security.client_keys(str(tmp_path / "alice" / "alice.key_secret"), str(tmp_path / "server" / "server.key"))
    return server, worker


@pytest.mark.slow  # two clusters and a capture: about 45 s, kept out of the 15-minute suite
def test_weights_cross_loopback_in_clear_only_without_curve(make_cluster, curve):
    _raw_socket_or_skip()
    server_security, worker_keys = curve

    plain = make_cluster(RUN, shards=2)
    seen, windows, weight_bytes = _train_and_read(plain, None)
    # the positive control: the capture sees ZeroMQ's NULL greeting and the weights in clear
    assert seen.count(b"NULL") > 0, "no ZeroMQ NULL greeting in the plain capture"
    found = [w.hex() for w in windows if w in seen]
    assert len(found) == len(windows), f"only {len(found)} of {len(windows)} weight windows in the plain capture"
    assert len(seen) > 2 * weight_bytes  # at least the first pull and the final read
    plain_bytes = len(seen)
    plain.close()

    secure = make_cluster(RUN, shards=2, security=server_security)
    secure.keys = worker_keys
    seen, windows, weight_bytes = _train_and_read(secure, worker_keys)
    assert seen.count(b"CURVE") > 0, "no CURVE greeting in the capture: did it record the right connections?"
    assert len(seen) > plain_bytes // 2, f"captured {len(seen)} bytes with CURVE against {plain_bytes} without"
    leaked = [w.hex() for w in windows if w in seen]
    assert not leaked, f"{len(leaked)} of {len(windows)} weight windows readable on the wire with CURVE: {leaked[:3]}"
