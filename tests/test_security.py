"""CURVE on real processes: only allowed keys get in; removing a key cuts a worker off."""

import os
import shutil
import time

import pytest
import torch
import zmq

from paramserver import cluster, protocol, security
from paramserver.config import Consistency, RunConfig
from paramserver.errors import ConfigError, DeadlineExceeded, RemoteError, ServerUnavailable
from paramserver.transport import Channel
from workers import WorkerConfig, run_worker
from workers.client import fetch_weights

from .conftest import FAST

pytestmark = pytest.mark.timeout(300)


@pytest.fixture
def keys(tmp_path):
    """server, two workers (one allowed), and a stranger's key pair."""
    for name in ("server", "alice", "mallory"):
        security.keygen(str(tmp_path / name), name)
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    shutil.copy(tmp_path / "alice" / "alice.key", allowed)
    path = lambda n, ext: str(tmp_path / n / f"{n}.{ext}")  # noqa: E731
    return {"dir": str(allowed), "path": path,
            "server": security.ServerSecurity.load(path("server", "key_secret"), str(allowed))}


def client(keys, name):
    return security.client_keys(keys["path"](name, "key_secret"), keys["path"]("server", "key"))


def test_only_allowed_keys_pull_or_push(make_cluster, keys):
    c = make_cluster(RunConfig(consistency=Consistency("asp"), seed=21), shards=2, security=keys["server"])
    c.keys = client(keys, "alice")
    before = c.weights()
    fast = FAST.__class__(**{**FAST.__dict__, "reconnect_timeout": 4.0})
    # a stranger's key, no key at all, and the server's public key passed as our own: all refused
    strangers = [client(keys, "mallory"), None, security.Keys(*security.load_secret(keys["path"]("mallory", "key_secret")),
                                                             security.load_public(keys["path"]("alice", "key")))]
    for k in strangers:
        with pytest.raises((ServerUnavailable, DeadlineExceeded)):
            run_worker(WorkerConfig(server=c.address, max_steps=5, timeouts=fast, keys=k))
    with pytest.raises(DeadlineExceeded):
        ctx = zmq.Context()
        try:
            fetch_weights(ctx, c.address, timeout=2.0, keys=client(keys, "mallory"))
        finally:
            ctx.term()
    assert torch.equal(c.weights(), before), "a refused peer changed the weights"
    # the allowed worker trains for real (800 steps each: asp's arrival order on a loaded
    # machine once left 2 x 500 steps one test sample short of 0.95)
    for _ in range(2):
        c.add_worker(max_steps=800, keys=client(keys, "alice"))
    results = c.wait_workers(timeout=120)
    assert [r["steps"] for r in results] == [800, 800]
    assert c.accuracy() >= 0.95


def test_removing_a_key_cuts_off_a_connected_worker(make_cluster, keys):
    c = make_cluster(RunConfig(consistency=Consistency("asp"), seed=22), shards=1, security=keys["server"])
    c.keys = client(keys, "alice")
    worker = c.add_worker(max_steps=100000, delay=0.01, keys=client(keys, "alice"))
    c.wait_for(lambda s: any(w["clock"] > 20 for w in s["workers"]), 60, "the worker to train")
    os.remove(os.path.join(keys["dir"], "alice.key"))
    removed = time.monotonic()
    worker.join(30)
    assert not worker.is_alive(), "the worker kept going after its key was removed"
    assert worker.exitcode != 0
    assert time.monotonic() - removed < 15


def test_control_messages_only_from_the_server_key(make_cluster, keys):
    c = make_cluster(RunConfig(consistency=Consistency("asp")), shards=1, security=keys["server"])
    c.keys = client(keys, "alice")
    shard = c.status()["shard_map"][0]["address"]
    ch = Channel(c.ctx, shard, "shard", c.keys)
    try:
        with pytest.raises(RemoteError) as refused:
            ch.request(protocol.Stop(v=protocol.VERSION, seq=ch.next_seq()), timeout=5)
    finally:
        ch.close()
    assert refused.value.code == protocol.ErrorCode.NOT_AUTHORIZED
    time.sleep(0.5)
    assert c.status()["shards"][0]["pushes"] == 0 and c.weights().numel() > 0  # the shard still serves


def test_binding_beyond_loopback_needs_curve_or_insecure():
    with pytest.raises(ConfigError, match="ps-server keygen"):
        cluster.check_bind("0.0.0.0", insecure=False, secure=False)
    cluster.check_bind("0.0.0.0", insecure=True, secure=False)
    cluster.check_bind("0.0.0.0", insecure=False, secure=True)
    cluster.check_bind("127.0.0.1", insecure=False, secure=False)
