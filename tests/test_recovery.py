"""Crash recovery on real processes: checkpoints, resume, export, restarts, SIGSTOP, late servers."""

import os
import signal
import socket
import time

import psutil
import pytest
import torch
from safetensors.torch import load_file

from paramserver import admin, checkpoint, sharding, tasks
from paramserver.config import CheckpointConfig, Consistency, RunConfig
from paramserver.errors import ConfigError

from .conftest import FAST, free_port_block

pytestmark = pytest.mark.timeout(300)


def bsp_run(**kw) -> RunConfig:
    return RunConfig(consistency=Consistency("bsp"), seed=11, partitions=3, min_workers=3, **kw)


def wait_checkpoint(root: str, min_updates: int, timeout: float) -> checkpoint.Checkpoint:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if checkpoint.complete(root):
            ckpt = checkpoint.latest(root)
            if ckpt.manifest["updates"] >= min_updates:
                return ckpt
        time.sleep(0.05)
    raise AssertionError(f"no checkpoint at step >= {min_updates} within {timeout}s")


def kill_server(c, shard_pids: list[int]) -> None:
    """SIGKILL the server process, then wait until its orphaned shards (which notice that
    their launcher is gone) have exited and released their ports."""
    shards = [psutil.Process(pid) for pid in shard_pids]
    os.kill(c.server.pid, signal.SIGKILL)
    c.server.join(5)
    _, alive = psutil.wait_procs(shards, timeout=30)
    assert not alive, f"orphaned shards still running: {alive}"


def shard_pids(c) -> list[int]:
    return [sh["pid"] for sh in c.status()["shards"]]


def exported(root: str, out: str) -> dict[str, torch.Tensor]:
    checkpoint.export(checkpoint.latest(root), out)
    return load_file(out)


def test_checkpoints_export_and_refusals(make_cluster, tmp_path):
    root = str(tmp_path / "ckpt")
    run = RunConfig(consistency=Consistency("asp"), seed=12, max_steps=400)
    c = make_cluster(run, shards=2, checkpoints=CheckpointConfig(root, every=0.3, keep=2))
    for _ in range(2):
        c.add_worker(delay=0.005)
    c.wait_workers(timeout=90)
    c.server.join(30)
    assert c.server.exitcode == 0, "the server did not end by itself after --max-steps"
    names = checkpoint.complete(root)
    assert 1 <= len(names) <= 2, names  # pruned to --keep
    assert not [n for n in os.listdir(root) if n.startswith(checkpoint.TMP)]
    final = checkpoint.latest(root)
    assert final.manifest["updates"] >= 400  # the clean-shutdown checkpoint
    # export loads into the user's module with load_state_dict, and it has learned
    task = tasks.build(run.task, run.seed)
    task.model.load_state_dict(exported(root, str(tmp_path / "model.safetensors")))
    assert task.evaluate()["accuracy"] >= 0.9
    # a damaged file is refused, naming it
    shard_file = final.shard_file(1)
    with open(shard_file, "r+b") as f:
        f.seek(-8, os.SEEK_END)
        f.write(b"\x00" * 8)
    with pytest.raises(ConfigError, match="shard-1.safetensors: checksum mismatch"):
        checkpoint.latest(root)


def test_resume_refuses_unrelated_or_unasked(tmp_path, make_cluster):
    from paramserver.cluster import ServerSpec, prepare

    root = str(tmp_path / "c")
    c = make_cluster(RunConfig(consistency=Consistency("asp"), max_steps=50), shards=1,
                     checkpoints=CheckpointConfig(root, every=60))
    c.add_worker(max_steps=0)
    c.wait_workers(timeout=60)
    c.server.join(30)
    assert checkpoint.complete(root)
    with pytest.raises(ConfigError, match="already holds checkpoints"):
        prepare(ServerSpec(run=RunConfig(), checkpoints=CheckpointConfig(root)))
    with pytest.raises(ConfigError, match="checkpoint of task 'digits-mlp', not 'digits-cnn'"):
        prepare(ServerSpec(run=RunConfig(task="digits-cnn"), resume=root, shards=1))
    with pytest.raises(ConfigError, match="resume with --shards 1"):
        prepare(ServerSpec(run=RunConfig(), resume=root, shards=2))
    with pytest.raises(ConfigError, match="no complete checkpoint"):
        prepare(ServerSpec(run=RunConfig(), resume=str(tmp_path)))


@pytest.mark.slow
def test_resumed_bsp_run_ends_with_the_same_weights(make_cluster, tmp_path):
    """Kill the whole server after a checkpoint, resume it on the same port: the workers
    reconnect by themselves, and the run ends where an uninterrupted one ends."""
    steps = 120
    roots = [str(tmp_path / "a"), str(tmp_path / "b")]
    # the uninterrupted reference
    ref = make_cluster(bsp_run(max_steps=steps), shards=2, checkpoints=CheckpointConfig(roots[0], every=60))
    for _ in range(3):
        ref.add_worker()
    ref.wait_workers(timeout=90)
    ref.server.join(30)
    expected = exported(roots[0], str(tmp_path / "a.safetensors"))

    port = free_port_block(3)
    c = make_cluster(bsp_run(max_steps=steps), shards=2, port=port,
                     checkpoints=CheckpointConfig(roots[1], every=0.5, keep=5))
    for _ in range(3):
        c.add_worker(delay=0.01)
    # the pids hold for the server's life: asked for before the run and its checkpoints
    # keep the coordinator busy (once, in a full slow suite, a status asked for right
    # after a checkpoint went unanswered for its 5 s)
    pids = shard_pids(c)
    ckpt = wait_checkpoint(roots[1], 20, 60)
    assert ckpt.manifest["updates"] < steps, "the run ended before a checkpoint inside it: nothing to resume"
    kill_server(c, pids)
    c.start_server(resume=roots[1])
    results = c.wait_workers(timeout=120)
    assert all(r["reason"] == "finished" for r in results), results
    c.server.join(30)
    final = checkpoint.latest(roots[1])
    assert final.manifest["run_id"] == ckpt.manifest["run_id"]
    assert final.manifest["updates"] == steps
    got = exported(roots[1], str(tmp_path / "b.safetensors"))
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6)


# the first point runs in `make test`; the rest are the slow marker's (.ci/run runs both)
@pytest.mark.parametrize("kill_after", [0.15, *(pytest.param(t, marks=pytest.mark.slow) for t in (0.45, 0.75, 1.05))])
def test_kill_during_checkpoint_write_leaves_a_complete_one(make_cluster, tmp_path, monkeypatch, kill_after):
    # each step of a write pauses 0.3 s, so the kill lands inside one at a different point
    monkeypatch.setenv(checkpoint.FAULT_SLEEP_ENV, "0.3")
    root = str(tmp_path / "ckpt")
    port = free_port_block(3)
    c = make_cluster(RunConfig(consistency=Consistency("asp"), seed=13), shards=2, port=port,
                     checkpoints=CheckpointConfig(root, every=0.2, keep=3))
    c.add_worker(delay=0.01)
    wait_checkpoint(root, 1, 60)
    pids = shard_pids(c)
    # wait for the next write to begin, then kill mid-way
    deadline = time.monotonic() + 30
    while not [n for n in os.listdir(root) if n.startswith(checkpoint.TMP)] and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(kill_after)
    kill_server(c, pids)
    found = checkpoint.latest(root)  # verifies every checksum
    assert found.manifest["updates"] >= 1
    monkeypatch.delenv(checkpoint.FAULT_SLEEP_ENV)
    c.start_server(resume=root)
    assert c.status()["run_id"] == found.manifest["run_id"]


@pytest.mark.slow
def test_sigkilled_shard_is_restarted_from_checkpoint(make_cluster, tmp_path):
    root = str(tmp_path / "ckpt")
    every = 1.0
    port = free_port_block(3)
    c = make_cluster(RunConfig(consistency=Consistency("ssp", 2), seed=14, max_steps=1500), shards=2, port=port,
                     checkpoints=CheckpointConfig(root, every=every, keep=3))
    for _ in range(3):
        c.add_worker(delay=0.01)
    wait_checkpoint(root, 100, 60)
    # the rate of the running training, not the average since the server started
    first, started = c.status(), time.monotonic()
    time.sleep(every)
    before = c.status()
    rate = (before["updates"] - first["updates"]) / (time.monotonic() - started)
    victim = before["shards"][1]["pid"]
    os.kill(victim, signal.SIGKILL)
    at_kill = before["updates"]
    # the coordinator keeps answering while the new shards start (seconds: torch, the checkpoint)
    seen, deadline = [], time.monotonic() + 30
    while not (seen and seen[-1]["epoch"] == 1 and len(seen[-1]["shards"]) == 2):
        assert time.monotonic() < deadline, "the shards did not restart within 30 s"
        seen.append(admin.status(c.address, timeout=2.0, ctx=c.ctx))  # DeadlineExceeded fails the test
        time.sleep(0.05)
    assert any(s["restarting"].startswith(root) for s in seen), [s["restarting"] for s in seen]
    assert seen[-1]["restarting"] == ""
    info = seen[-1]
    restored_from = min(sh["updates"] for sh in info["shards"])
    # lost: what was applied after the newest checkpoint, at most one interval's worth
    assert at_kill - restored_from <= rate * every * 2 + 20, (at_kill, restored_from, rate)
    c.wait_for(lambda s: len(s["workers"]) == 3, 30, "every worker to rejoin")
    results = c.wait_workers(timeout=120)
    assert all(r["reason"] == "finished" for r in results)
    c.server.join(30)
    task = tasks.build("digits-mlp", 14)
    task.model.load_state_dict(exported(root, str(tmp_path / "m.safetensors")))
    assert task.evaluate()["accuracy"] >= 0.95


@pytest.mark.slow
def test_a_restart_whose_shard_cannot_start_ends_the_run_with_the_reason(make_cluster, tmp_path):
    root = str(tmp_path / "ckpt")
    port = free_port_block(3)
    c = make_cluster(RunConfig(consistency=Consistency("asp"), seed=16), shards=2, port=port,
                     checkpoints=CheckpointConfig(root, every=0.5))
    c.add_worker(delay=0.01)
    wait_checkpoint(root, 1, 60)
    victim = psutil.Process(c.status()["shards"][1]["pid"])
    victim.kill()
    victim.wait(10)
    # shard 1's port, taken before its successor (seconds away: it imports torch) can bind it
    blocker = socket.socket()
    blocker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        blocker.bind(("127.0.0.1", port + 2))
        blocker.listen()
        c.server.join(60)
        assert not c.server.is_alive(), "the server did not end after its shards failed to restart"
        address, error = c.ready.get(timeout=5)
        assert address is None and error.startswith(f"restarting the shards from {root}"), error
        assert "Address already in use" in error and error.endswith("run ended"), error
        assert "another process has taken it since" in error and "choose another --port" not in error, error
    finally:
        blocker.close()


@pytest.mark.slow
def test_stopped_worker_is_dropped_then_rejoins(make_cluster):
    # rounds wait for all three at first: one up early could use up the run's rounds alone
    c = make_cluster(RunConfig(consistency=Consistency("bsp"), seed=15, max_steps=1200, min_workers=3), shards=2)
    procs = [c.add_worker(delay=0.005) for _ in range(3)]
    c.wait_for(lambda s: len(s["workers"]) == 3 and s["updates"] >= 20, 60, "3 workers training")
    os.kill(procs[0].pid, signal.SIGSTOP)
    stopped = time.monotonic()
    try:
        info = c.wait_for(lambda s: len(s["workers"]) == 2, FAST.heartbeat_timeout + 2, "the stopped worker to be dropped")
        # the others did not wait longer than the timeout: rounds go on
        dropped_at = time.monotonic()
        assert dropped_at - stopped <= FAST.heartbeat_timeout + 2
        c.wait_for(lambda s: s["updates"] > info["updates"] + 10, 10, "rounds to go on without it")
    finally:
        os.kill(procs[0].pid, signal.SIGCONT)
    info = c.wait_for(lambda s: len(s["workers"]) == 3, 20, "the worker to rejoin")
    assert max(w["incarnation"] for w in info["workers"]) == 1
    results = c.wait_workers(timeout=120)
    assert all(r["reason"] == "finished" for r in results)


def test_worker_started_before_the_server_connects_when_it_comes_up(make_cluster):
    from paramserver.cluster import SPAWN
    from paramserver.sim import worker_main
    from workers import WorkerConfig

    port = free_port_block(3)
    results = SPAWN.Queue()
    early = SPAWN.Process(target=worker_main, args=(WorkerConfig(server=f"tcp://127.0.0.1:{port}", max_steps=30,
                                                                 timeouts=FAST), results, "warning"))
    early.start()
    try:
        time.sleep(3)
        assert early.is_alive(), "the worker gave up before its deadline"
        c = make_cluster(RunConfig(consistency=Consistency("asp")), shards=1, port=port)
        c.workers.append(early)
        c.wait_workers(timeout=60)
        assert results.get(timeout=5)["steps"] == 30
    finally:
        if early.is_alive():
            early.kill()
        early.join(5)


@pytest.mark.slow
def test_sigkilled_bsp_worker_costs_little_accuracy(make_cluster, tmp_path):
    accuracies = []
    for kill in (False, True):
        root = str(tmp_path / str(kill))
        # min_workers: the first rounds wait for all four, so the run without the kill is the
        # same every time (bsp = SGD on 4 x 32) and the difference is the kill's alone
        c = make_cluster(RunConfig(consistency=Consistency("bsp"), seed=16, max_steps=300, min_workers=4), shards=2,
                         checkpoints=CheckpointConfig(root, every=600))
        procs = [c.add_worker(delay=0.003) for _ in range(4)]
        if kill:
            c.wait_for(lambda s: s["updates"] >= 40 + int.from_bytes(os.urandom(1), "little") % 60, 60, "some rounds")
            os.kill(procs[2].pid, signal.SIGKILL)
            c.workers.remove(procs[2])
            procs[2].join(5)
        c.wait_workers(timeout=120)
        c.server.join(30)
        task = tasks.build("digits-mlp", 16)
        task.model.load_state_dict(exported(root, str(tmp_path / f"{kill}.safetensors")))
        accuracies.append(task.evaluate()["accuracy"])
    assert abs(accuracies[0] - accuracies[1]) <= 0.01, accuracies


def test_layout_signature_is_stable():
    a = sharding.Layout.of(tasks.build("digits-mlp", 0).model)
    b = sharding.Layout.of(tasks.build("digits-mlp", 5).model)
    assert checkpoint.signature(a) == checkpoint.signature(b)
    assert checkpoint.signature(a) != checkpoint.signature(sharding.Layout.of(tasks.build("digits-cnn", 0).model))
