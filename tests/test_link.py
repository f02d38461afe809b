"""Bad networks for `ps-sim --link`: the spec parser, the user-space link emulator on real
sockets, nftables loss and partitions (root only), and whole simulations over them."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time

import click
import psutil
import pytest
from click.testing import CliRunner

from paramserver import netfault
from paramserver.config import Consistency, RunConfig, Timeouts
from paramserver.errors import ConfigError
from paramserver.linkemu import LinkEmulator, LinkSpec, Pacer, per_worker
from paramserver.sim import SimConfig, simulate
from workers.trainer import route

from .conftest import _alive_children, _assert_no_leaks

BIN = os.path.dirname(sys.executable)
MODEL_BYTES = 9610 * 4  # digits-mlp: one pull or push of the whole model, float32


def _can_drop_packets() -> str:
    try:
        netfault.check_available()
    except ConfigError as e:
        return str(e)
    return ""


root_only = pytest.mark.skipif(bool(_can_drop_packets()), reason=f"real packet drops unavailable: {_can_drop_packets()}")


# -- the --link text ------------------------------------------------------------------


@pytest.mark.parametrize("text, expected, canonical", [
    ("delay=50ms,rate=10mbit,loss=1%", LinkSpec(delay=0.05, rate=10e6, loss=1.0), "delay=50ms,rate=10mbit,loss=1%"),
    ("delay=0.2s, jitter=20ms", LinkSpec(delay=0.2, jitter=0.02), "delay=200ms,jitter=20ms"),
    ("rate=512kbit", LinkSpec(rate=512e3), "rate=512kbit"),
    ("rate=1.5gbit,loss=0.5", LinkSpec(rate=1.5e9, loss=0.5), "rate=1.5gbit,loss=0.5%"),
    ("down=5s@60s", LinkSpec(downs=((60.0, 5.0),)), "down=5s@60s"),
    # several partitions, sorted; overlapping ones merge
    ("down=2s@90s,down=5s@60s,down=10s@62s", LinkSpec(downs=((60.0, 12.0), (90.0, 2.0))), "down=12s@60s,down=2s@90s"),
    ("DELAY=100us", LinkSpec(delay=1e-4), "delay=0.1ms"),
])
def test_link_specs_parse(text, expected, canonical):
    spec = LinkSpec.parse(text)
    assert spec == expected
    assert str(spec) == canonical
    assert LinkSpec.parse(canonical) == spec


@pytest.mark.parametrize("text, message", [
    ("delay=50", "needs a number and a unit"),
    ("delay=fast", "needs a number and a unit"),
    ("rate=10mbps", "rate '10mbps' must be a positive number with a unit: bit, kbit, mbit, gbit"),
    ("rate=0mbit", "must be a positive number"),
    ("loss=150%", "percentage in (0, 100]"),
    ("loss=-1%", "percentage in (0, 100]"),
    ("jitter=5ms", "jitter needs a delay at least as large"),
    ("delay=5ms,jitter=10ms", "jitter needs a delay at least as large"),
    ("down=5s", "must be DURATION@START"),
    ("down=0s@5s", "a down duration must be > 0"),
    ("bandwidth=1mbit", "unknown key 'bandwidth'"),
    ("delay", "is not KEY=VALUE"),
    ("delay=5ms,delay=6ms", "delay given twice"),
])
def test_bad_link_specs_are_refused_with_the_reason(text, message):
    with pytest.raises(ConfigError, match="--link") as e:
        LinkSpec.parse(text)
    assert message in str(e.value)


def test_per_worker_specs_override_the_shared_one_key_by_key():
    specs = per_worker(["delay=50ms,rate=10mbit", "1:rate=1mbit,loss=2%", "2:down=3s@4s"], workers=3)
    assert specs[0] == LinkSpec(delay=0.05, rate=10e6)
    assert specs[1] == LinkSpec(delay=0.05, rate=1e6, loss=2.0)
    assert specs[2] == LinkSpec(delay=0.05, rate=10e6, downs=((4.0, 3.0),))
    assert per_worker([], workers=2) == [LinkSpec(), LinkSpec()]
    # a worker may add jitter to the shared delay; checked once the two are merged
    assert per_worker(["delay=50ms", "1:jitter=5ms"], workers=2)[1] == LinkSpec(delay=0.05, jitter=0.005)
    with pytest.raises(ConfigError, match="jitter needs a delay"):
        per_worker(["delay=5ms", "1:jitter=10ms"], workers=2)
    assert not LinkSpec() and LinkSpec(rate=1).shapes and not LinkSpec(rate=1).drops and LinkSpec(loss=1).drops


@pytest.mark.parametrize("texts, message", [
    (["3:rate=1mbit"], "names worker 3, but there are 2 (0 to 1)"),
    (["x:rate=1mbit"], "'x' is not a worker number"),
    (["1:speed=1mbit"], "--link '1:speed=1mbit': unknown key 'speed'"),
])
def test_per_worker_specs_refuse_what_does_not_fit(texts, message):
    with pytest.raises(ConfigError) as e:
        per_worker(texts, workers=2)
    assert message in str(e.value)


def test_ps_sim_refuses_a_bad_link_as_a_click_error():
    from paramserver.cli import sim

    out = CliRunner().invoke(sim, ["run", "--link", "delay=5ms,rate=fast"])
    assert out.exit_code == 2
    assert "Invalid value for '--link'" in out.output and "rate 'fast'" in out.output
    out = CliRunner().invoke(sim, ["run", "--workers", "2", "--link", "2:delay=5ms"])
    assert out.exit_code == 1 and "names worker 2, but there are 2" in out.output


# -- the timing model -------------------------------------------------------------------


def test_pacer_sends_at_the_rate_then_adds_the_delay():
    pacer = Pacer(LinkSpec(delay=0.02, rate=8e6))  # 1 MB/s
    assert pacer.due(0.0, 10_000) == pytest.approx(0.01 + 0.02)
    # the link is still busy with the first chunk: the second queues behind it
    assert pacer.due(0.005, 10_000) == pytest.approx(0.02 + 0.02)
    # an idle link starts at once
    assert pacer.due(1.0, 1_000) == pytest.approx(1.001 + 0.02)
    assert Pacer(LinkSpec(delay=0.05)).due(3.0, 10**9) == pytest.approx(3.05)  # no rate: delay only


@pytest.mark.parametrize("gap", [0.001, 0.1])
def test_pacer_with_jitter_never_reorders(gap):
    pacer = Pacer(LinkSpec(delay=0.05, jitter=0.04), random.Random(0))
    dues = [pacer.due(i * gap, 100) for i in range(2000)]
    assert dues == sorted(dues)
    lags = [d - i * gap for i, d in enumerate(dues)]
    assert min(lags) >= 0.01 - 1e-9 and max(lags) <= 0.09 + 1e-9
    if gap > 2 * 0.04:  # sparse: each chunk gets its own delay, uniform around 50 ms
        assert 0.048 < sum(lags) / len(lags) < 0.052


# -- the proxy on real sockets --------------------------------------------------------


class Peer:
    """A TCP server thread: echoes, or sends `reply_bytes` once it has read `expect` bytes."""

    def __init__(self, expect: int = 0, reply_bytes: int = 0):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.address = f"tcp://127.0.0.1:{self.sock.getsockname()[1]}"
        self.expect, self.reply_bytes = expect, reply_bytes
        self.received_at: float | None = None  # when the last expected byte arrived
        self.eof = threading.Event()
        self.threads: list[threading.Thread] = []
        self._spawn(self._accept)

    def _spawn(self, target, *args):
        t = threading.Thread(target=target, args=args, daemon=True)
        t.start()
        self.threads.append(t)

    def _accept(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self._spawn(self._serve, conn)

    def _serve(self, conn):
        got = 0
        with conn:
            conn.settimeout(30)
            while True:
                try:
                    data = conn.recv(1 << 16)
                except OSError:
                    return
                if not data:
                    self.eof.set()
                    return
                got += len(data)
                if not self.expect:
                    conn.sendall(data)
                elif got >= self.expect and self.received_at is None:
                    self.received_at = time.monotonic()
                    if self.reply_bytes:
                        conn.sendall(b"r" * self.reply_bytes)

    def close(self):
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the accept(); close() alone does not
        except OSError:
            pass
        self.sock.close()
        for t in self.threads:
            t.join(5)
        assert not any(t.is_alive() for t in self.threads)


@pytest.fixture
def emulator():
    made: list = []

    def make(*peers):
        e = LinkEmulator(seed=1)
        made.append(e)
        made.extend(peers)
        return e

    yield make
    for thing in made:
        thing.close()
    assert not [t for t in threading.enumerate() if t.name == "linkemu"], "link emulator thread left running"


def _connect(address: str) -> socket.socket:
    host, port = address[len("tcp://"):].rsplit(":", 1)
    s = socket.create_connection((host, int(port)), timeout=10)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def _recv_exactly(s: socket.socket, n: int) -> None:
    while n > 0:
        data = s.recv(min(n, 1 << 16))
        assert data, "connection closed early"
        n -= len(data)


def test_proxy_adds_the_delay_in_each_direction(emulator):
    peer = Peer()
    e = emulator(peer)
    delay = 0.05
    with _connect(e.proxy(0, peer.address, LinkSpec(delay=delay))) as s:
        rtts = []
        for _ in range(5):
            t = time.monotonic()
            s.sendall(b"ping")
            _recv_exactly(s, 4)
            rtts.append(time.monotonic() - t)
    rtts.sort()
    # every round trip pays one delay up and one down; the quickest shows nothing more is added
    assert 2 * delay <= rtts[0] < 2 * delay + 0.05, rtts


@pytest.mark.parametrize("direction", ["up", "down"])
def test_proxy_paces_to_the_rate(emulator, direction):
    n, rate = 1_000_000, 16e6  # 0.5 s of sending
    peer = Peer(expect=n if direction == "up" else 1, reply_bytes=0 if direction == "up" else n)
    e = emulator(peer)
    with _connect(e.proxy(0, peer.address, LinkSpec(delay=0.01, rate=rate))) as s:
        t = time.monotonic()
        if direction == "up":
            s.sendall(b"u" * n)
            deadline = time.monotonic() + 10
            while peer.received_at is None and time.monotonic() < deadline:
                time.sleep(0.01)
            took = peer.received_at - t
        else:
            s.sendall(b"go")
            _recv_exactly(s, n)
            took = time.monotonic() - t
    expected = n * 8 / rate + 0.01  # serialisation, then the delay
    assert expected * 0.95 <= took <= expected * 1.5 + 0.1, (took, expected)
    key = "bytes_up" if direction == "up" else "bytes_down"
    deadline = time.monotonic() + 5  # the loop thread counts right after its write: allow it a moment
    while e.stats()[0][key] < n and time.monotonic() < deadline:
        time.sleep(0.01)
    assert e.stats()[0][key] == n


def test_connections_of_one_worker_share_its_rate(emulator):
    n, rate = 500_000, 16e6
    peers = [Peer(expect=n), Peer(expect=n)]
    e = emulator(*peers)
    spec = LinkSpec(rate=rate)
    socks = [_connect(e.proxy(0, p.address, spec)) for p in peers]  # one worker, two shards
    t = time.monotonic()
    senders = [threading.Thread(target=s.sendall, args=(b"x" * n,)) for s in socks]
    for th in senders:
        th.start()
    for th in senders:
        th.join(10)
    deadline = time.monotonic() + 10
    while any(p.received_at is None for p in peers) and time.monotonic() < deadline:
        time.sleep(0.01)
    took = max(p.received_at for p in peers) - t
    assert took >= 2 * n * 8 / rate * 0.95, f"{took:.2f}s: the two connections did not share one link"
    for s in socks:
        s.close()


def test_proxy_passes_close_on_and_shuts_down_cleanly(emulator):
    peer = Peer()
    e = emulator(peer)
    s = _connect(e.proxy(0, peer.address, LinkSpec(delay=0.02)))
    s.sendall(b"hello")
    _recv_exactly(s, 5)
    s.close()
    assert peer.eof.wait(5), "the server never saw the client's close"
    # a connection still open when the emulator stops is closed, not left hanging
    s2 = _connect(e.proxy(1, peer.address, LinkSpec(delay=0.02)))
    s2.sendall(b"x")
    _recv_exactly(s2, 1)
    e.close(timeout=5)
    s2.settimeout(5)
    assert s2.recv(10) == b""
    s2.close()


def test_proxy_to_a_dead_server_closes_the_client_side(emulator):
    port = socket.create_server(("127.0.0.1", 0))
    address = f"tcp://127.0.0.1:{port.getsockname()[1]}"
    port.close()  # nobody listens there now
    e = emulator()
    with _connect(e.proxy(0, address, LinkSpec(delay=0.01))) as s:
        s.settimeout(10)
        assert s.recv(10) == b""


def test_proxy_refuses_non_tcp_addresses(emulator):
    with pytest.raises(ConfigError, match="tcp://HOST:PORT"):
        emulator().proxy(0, "ipc:///tmp/x", LinkSpec(delay=0.01))


# -- routes: how a worker reaches the server through its link --------------------------


def test_worker_routes_replace_only_the_addresses_they_name():
    routes = (("tcp://127.0.0.1:5556", "tcp://127.0.0.1:7001"),)
    assert route("tcp://127.0.0.1:5556", routes) == "tcp://127.0.0.1:7001"
    assert route("tcp://127.0.0.1:5557", routes) == "tcp://127.0.0.1:5557"


def test_ps_worker_route_option():
    from paramserver.options import ROUTE

    @click.command()
    @ROUTE
    def show(route):
        click.echo(repr(route))

    ok = CliRunner().invoke(show, ["--route", "tcp://a:1=tcp://127.0.0.9:0;a:1", "--route", "tcp://b:2=tcp://c:3"])
    assert ok.exit_code == 0 and "('tcp://a:1', 'tcp://127.0.0.9:0;a:1'), ('tcp://b:2', 'tcp://c:3')" in ok.output
    bad = CliRunner().invoke(show, ["--route", "tcp://a:1"])
    assert bad.exit_code == 2 and "is not ADDRESS=CONNECT_TO" in bad.output


# -- nftables: pure parts, refusals, and the real thing (root) -------------------------


def test_ruleset_and_schedule():
    specs = {0: LinkSpec(loss=2.5), 3: LinkSpec(downs=((10.0, 5.0), (30.0, 1.0)))}
    text = netfault.ruleset("t", specs, {0: "127.1.2.10", 3: "127.1.2.13"})
    assert "ip saddr 127.1.2.10 numgen random mod 10000 < 250 counter name w0_lost drop" in text
    assert "ip daddr 127.1.2.10 numgen random mod 10000 < 250 counter name w0_lost drop" in text
    assert "127.1.2.13 numgen" not in text and "ip saddr @down" in text and "ip daddr @down" in text
    assert netfault.schedule(specs) == [(10.0, 3, "down"), (15.0, 3, "up"), (30.0, 3, "down"), (31.0, 3, "up")]
    assert netfault.worker_address(0, pid=0x1234) == "127.18.52.10"
    with pytest.raises(ConfigError, match="at most 240 workers"):
        netfault.worker_address(240)


def test_loss_and_partitions_are_refused_without_root(monkeypatch):
    monkeypatch.setattr(netfault.os, "geteuid", lambda: 1000)
    with pytest.raises(ConfigError, match="needs root .this is uid 1000.: run ps-sim as root, or drop loss= and down="):
        netfault.check_available()
    # refused before any process starts
    before = psutil.Process().children(recursive=True)
    with pytest.raises(ConfigError, match="needs root"):
        simulate(RunConfig(), SimConfig(workers=1, links=(LinkSpec(loss=5.0),), progress=False))
    assert psutil.Process().children(recursive=True) == before


def test_loss_and_partitions_are_refused_without_nft(monkeypatch):
    monkeypatch.setattr(netfault.os, "geteuid", lambda: 0)
    monkeypatch.setattr(netfault.shutil, "which", lambda name: None)
    with pytest.raises(ConfigError, match=r"need the nft tool \(apt-get install nftables\)"):
        netfault.check_available()


def _connects(source: str, port: int, timeout: float = 0.5) -> bool:
    with socket.socket() as s:
        s.bind((source, 0))
        s.settimeout(timeout)
        try:
            s.connect(("127.0.0.1", port))
            return True
        except OSError:
            return False


@root_only
def test_nftables_drop_real_packets_and_the_table_goes_away():
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    faults = netfault.NetFaults({0: LinkSpec(loss=100.0), 1: LinkSpec(downs=((0.5, 1.5),))})
    lost, cut = faults.addresses[0], faults.addresses[1]
    try:
        faults.open()
        assert faults.table in netfault.our_tables()
        assert not _connects(lost, port), "loss=100% let a SYN through"
        assert _connects(cut, port) and _connects("127.0.0.1", port)
        faults.begin()
        deadline = time.monotonic() + 10
        while not faults.events and time.monotonic() < deadline:
            time.sleep(0.05)
        assert faults.events and faults.events[0]["event"] == "down"
        assert not _connects(cut, port), "a partitioned worker still connects"
        while len(faults.events) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert [e["event"] for e in faults.events] == ["down", "up"]
        assert 1.2 <= faults.events[1]["t"] - faults.events[0]["t"] <= 2.5
        assert _connects(cut, port), "the partition did not end"
        faults.close()
        assert faults.table not in netfault.our_tables()
        assert faults.counters["w0_lost"] >= 1 and faults.counters["partitioned"] >= 1
        assert _connects(lost, port), "still dropped after the table was removed"
    finally:
        faults.close()  # idempotent
        listener.close()


@root_only
def test_a_table_left_by_a_killed_simulation_is_removed_by_the_next():
    dead = subprocess.Popen(["sleep", "30"])
    dead.kill()
    dead.wait(10)
    name = netfault.table_name(dead.pid)
    subprocess.run(["nft", "add", "table", "inet", name], check=True, timeout=10)
    try:
        netfault._sweep_stale_tables()
        assert name not in netfault.our_tables()
    finally:
        subprocess.run(["nft", "delete", "table", "inet", name], capture_output=True, timeout=10)


# -- whole simulations -------------------------------------------------------------------


@pytest.fixture
def no_leaks():
    """Fail if a simulation run in this process leaves a child process behind."""
    before = {p.pid for p in _alive_children()}
    yield
    _assert_no_leaks(before)


def _sim(tmp_path, name: str, *args, timeout: float = 420) -> dict:
    report = tmp_path / name
    out = subprocess.run([os.path.join(BIN, "ps-sim"), "run", "--no-progress", "--report", str(report), *args],
                         capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stderr[-3000:]
    (tmp_path / f"{name}.stderr").write_text(out.stderr)
    return json.loads((report / "report.json").read_text())


def _step_seconds(report: dict) -> float:
    rows = report["worker_results"]
    return sum(r["train_seconds"] / r["steps"] for r in rows) / len(rows)


@pytest.mark.timeout(300)
def test_one_worker_behind_a_slow_link_and_one_without(tmp_path, no_leaks):
    # one short run, both sides under the same load: worker 0's steps pay the link, worker 1's do not
    delay, rate = 0.02, 20e6
    sim = SimConfig(workers=2, shards=2, steps=30, report=str(tmp_path / "r"), progress=False,
                    links=tuple(per_worker(["0:delay=20ms,rate=20mbit"], 2)))
    report = simulate(RunConfig(consistency=Consistency("asp")), sim)
    # simulated worker i joins as id i; a 30-step worker may come and go between two status polls
    step = {r["worker_id"]: r["train_seconds"] / r["steps"] for r in report["worker_results"]}
    bound = 2 * delay + 2 * MODEL_BYTES * 8 / rate  # see the next test
    assert step[0] >= 0.95 * bound and step[1] <= 0.5 * bound, (step, bound)
    assert report["link"]["specs"] == {"0": "delay=20ms,rate=20mbit"}
    assert min(report["link"]["proxies"]["0"]["bytes_up"], report["link"]["proxies"]["0"]["bytes_down"]) >= 30 * MODEL_BYTES


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_delay_and_rate_slow_each_step_as_the_bytes_and_delay_say(tmp_path):
    delay, rate, steps = 0.02, 20e6, 40
    common = ["--workers", "2", "--shards", "2", "--steps", str(steps), "--consistency", "asp"]
    linked = _sim(tmp_path, "linked", *common, "--link", "delay=20ms,rate=20mbit")
    plain = _sim(tmp_path, "plain", *common)
    # the least a step costs over the link: the gradient up and the weights down, each
    # sent at the rate, and at least one round trip (2 delays); 0.071 s. (A separate pull
    # and push, rather than a push whose answer carries the weights, is 2 round trips.)
    bound = 2 * delay + 2 * MODEL_BYTES * 8 / rate
    with_link, without = _step_seconds(linked), _step_seconds(plain)
    print(f"per step: {with_link * 1e3:.1f} ms with the link, {without * 1e3:.1f} ms without; bound {bound * 1e3:.1f} ms")
    assert with_link >= 0.95 * bound
    assert with_link <= 3 * bound, "far slower than the link explains"
    assert without <= 0.5 * bound
    assert linked["link"]["specs"] == {"0": "delay=20ms,rate=20mbit", "1": "delay=20ms,rate=20mbit"}
    for proxy in linked["link"]["proxies"].values():  # every byte of every step went through the proxy
        assert min(proxy["bytes_up"], proxy["bytes_down"]) >= steps * MODEL_BYTES
    assert plain["link"] == {}


@root_only
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_five_percent_loss_still_reaches_095_and_applies_no_push_twice(tmp_path):
    report = _sim(tmp_path, "loss", "--workers", "4", "--shards", "2", "--steps", "300", "--consistency", "asp",
                  "--seed", "1", "--link", "loss=5%", "--request-timeout", "2")
    assert report["final_accuracy"] >= 0.95
    steps = sum(r["steps"] for r in report["worker_results"])
    assert steps == 4 * 300
    # asp applies every admitted push once; a resent push is acknowledged, not admitted.
    # So each shard admitted exactly one push per worker step, and applied each once.
    for shard in report["shard_pushes"]:
        assert shard["pushes"] == steps and shard["updates"] == steps, report["shard_pushes"]
    resent = (tmp_path / "loss.stderr").read_text().count("sending it again")
    print(f"accuracy {report['final_accuracy']:.4f}; pushes resent after a lost ack: {resent}; {report['shard_pushes']}")
    counters = report["link"]["counters"]
    for i in range(4):
        lost, packets = counters[f"w{i}_lost"], counters[f"w{i}_packets"]
        assert 0.02 <= lost / packets <= 0.09, f"worker {i}: {lost} of {packets} packets dropped"
    assert report["link"]["table"] not in netfault.our_tables()


@root_only
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_pushes_resent_across_a_short_partition_are_applied_once(tmp_path, capfd, no_leaks):
    # shorter than the heartbeat timeout, longer than one attempt: the worker stays a member
    # and resends its unanswered push, with the same sequence number, on a fresh connection
    t = Timeouts(heartbeat_interval=0.2, heartbeat_timeout=8.0, request_timeout=0.5, pull_wait=0.5,
                 reconnect_timeout=60.0, shutdown_grace=3.0)
    sim = SimConfig(workers=2, shards=2, steps=150, delays=(0.02, 0.02), report=str(tmp_path / "r"), progress=False,
                    links=tuple(per_worker(["1:down=2.5s@2s"], 2)), timeouts=t)
    report = simulate(RunConfig(consistency=Consistency("asp")), sim)
    resent = capfd.readouterr().err.count("sending it again")
    print(f"pushes resent: {resent}; {report['shard_pushes']}")
    assert resent >= 1, "no push was resent: the test did not exercise the duplicate path"
    assert [e["event"] for e in report["membership_events"] if e["worker"] == 1] == ["joined", "left"]
    steps = sum(r["steps"] for r in report["worker_results"])
    assert steps == 300
    for shard in report["shard_pushes"]:
        assert shard["pushes"] == steps and shard["updates"] == steps, report["shard_pushes"]
    assert report["link"]["table"] not in netfault.our_tables()


@root_only
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_partition_longer_than_the_heartbeat_timeout_drops_the_worker_and_it_rejoins(tmp_path):
    report = _sim(tmp_path, "down", "--workers", "2", "--shards", "2", "--steps", "200", "--consistency", "asp",
                  "--delays", "0.05,0.05", "--link", "1:down=4s@2s", "--heartbeat-interval", "0.2",
                  "--heartbeat-timeout", "1.5", "--request-timeout", "2")
    down, up = report["link"]["partitions"]
    assert (down["worker"], down["event"], up["event"]) == (1, "down", "up")
    events = [e for e in report["membership_events"] if e["worker"] == 1]
    dropped = next(e for e in events if e["event"] == "dropped")
    rejoined = next(e for e in events if e["event"] == "rejoined")
    assert down["t"] + 1.5 - 0.5 <= dropped["t"] <= up["t"], (report["link"], events)
    assert rejoined["t"] >= up["t"] - 0.5 and rejoined["incarnation"] == dropped["incarnation"] + 1
    assert [r["steps"] for r in report["worker_results"]] == [200, 200]
    assert report["link"]["counters"]["partitioned"] > 0
    assert report["link"]["table"] not in netfault.our_tables()


@root_only
@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_an_interrupted_simulation_removes_its_rules(tmp_path, sig):
    cmd = [os.path.join(BIN, "ps-sim"), "run", "--no-progress", "--report", str(tmp_path / "r"), "--workers", "2",
           "--shards", "1", "--steps", "100000", "--consistency", "asp", "--link", "loss=5%,delay=5ms"]
    # a shell's background job starts with SIGINT ignored; a user's Ctrl-C does not
    log = open(tmp_path / "stderr", "w+")  # a file, not a pipe: a full pipe would stall the run
    sim = subprocess.Popen(cmd, stdout=log, stderr=log,
                           preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    table = netfault.table_name(sim.pid)
    prefix = netfault.worker_address(0, sim.pid).rsplit(".", 1)[0] + "."
    try:
        _wait_for_traffic(table, sim, timeout=300)
        children = psutil.Process(sim.pid).children(recursive=True)
        sim.send_signal(sig)
        sim.wait(timeout=120)
        assert table not in netfault.our_tables(), f"{table} left behind after {sig.name}"
        lo = subprocess.run(["ip", "-o", "addr", "show", "dev", "lo"], capture_output=True, text=True, timeout=10).stdout
        assert prefix not in lo, lo
        _, alive = psutil.wait_procs(children, timeout=30)
        assert not alive, f"left running: {[p.pid for p in alive]}"
        log.seek(0)
        assert "Traceback" not in log.read()
    finally:
        if sim.poll() is None:
            sim.kill()
            sim.wait(30)
        log.close()
        subprocess.run(["nft", "delete", "table", "inet", table], capture_output=True, timeout=10)


def _wait_for_traffic(table: str, sim: subprocess.Popen, timeout: float) -> None:
    """Until the workers have sent real traffic through the simulation's table."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert sim.poll() is None, f"ps-sim exited with {sim.returncode}"
        out = subprocess.run(["nft", "-j", "list", "counters", "table", "inet", table],
                             capture_output=True, text=True, timeout=10)
        if out.returncode == 0:
            counters = {c["counter"]["name"]: c["counter"]["packets"]
                        for c in json.loads(out.stdout)["nftables"] if "counter" in c}
            if min(counters.get("w0_packets", 0), counters.get("w1_packets", 0)) > 500:
                return
        time.sleep(0.5)
    raise AssertionError(f"no traffic through {table} within {timeout}s")


def test_link_help_is_in_the_cli():
    from paramserver.cli import sim

    out = CliRunner().invoke(sim, ["run", "--help"])
    assert out.exit_code == 0
    text = " ".join(out.output.split())
    assert "--link TEXT" in text and "PS_SIM_LINK" in text and "nftables, root only" in text
