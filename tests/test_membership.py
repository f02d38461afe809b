"""Membership on real processes: a killed worker leaves the barrier within the heartbeat
timeout, a late joiner is served and counted, ssp/asp treat a slow worker as defined, and
a coordinator back from a stall counts the heartbeats that queued meanwhile."""

import dataclasses
import os
import signal
import time

import zmq

from paramserver import protocol
from paramserver.config import Consistency, RunConfig
from paramserver.coordinator import Coordinator
from paramserver.protocol import VERSION

from .conftest import FAST


def test_sigkilled_worker_leaves_bsp_barrier_and_run_finishes(make_cluster):
    # rounds wait for all four: a worker that came up first would otherwise train alone
    # and could finish its steps before the last one was live
    c = make_cluster(RunConfig(consistency=Consistency("bsp"), seed=2, min_workers=4), shards=2)
    procs = [c.add_worker(max_steps=200) for _ in range(4)]
    c.wait_live(4, min_clock=20)
    victim = procs[1]
    os.kill(victim.pid, signal.SIGKILL)
    killed_at = time.monotonic()
    # the barrier must drop the dead worker within the heartbeat timeout (plus one tick)
    info = c.wait_for(lambda s: len(s["workers"]) == 3, FAST.heartbeat_timeout + 2, "the dead worker to be dropped")
    assert time.monotonic() - killed_at <= FAST.heartbeat_timeout + 2
    before = info["updates"]
    c.wait_for(lambda s: s["updates"] > before + 5, 10, "rounds to go on without the dead worker")
    c.workers.remove(victim)
    victim.join(5)
    results = c.wait_workers(timeout=120)
    assert [r["steps"] for r in results] == [200] * 3
    assert c.accuracy() >= 0.9


def test_worker_joining_mid_run_is_served_and_counted(make_cluster):
    c = make_cluster(RunConfig(consistency=Consistency("bsp"), seed=3), shards=2)
    for _ in range(2):  # slowed so that the run outlasts the third worker's start-up
        c.add_worker(max_steps=600, delay=0.02)
    c.wait_for(lambda s: s["updates"] >= 30, 60, "30 rounds with two workers")
    c.add_worker(max_steps=40)
    info = c.wait_for(lambda s: len(s["workers"]) == 3 and max(w["id"] for w in s["workers"]) == 2, 30, "the third worker to be live")
    joined_at = info["updates"]
    results = c.wait_workers(timeout=120)
    assert sorted(r["steps"] for r in results) == [40, 600, 600]
    late = next(r for r in results if r["steps"] == 40)
    # bsp: the round number is the clock; it started near the current round, not at 0
    assert late["clock"] >= joined_at - 5 + 40


def test_asp_with_min_workers_gives_no_weights_until_that_many_are_live(make_cluster):
    c = make_cluster(RunConfig(consistency=Consistency("asp"), seed=5, min_workers=2), shards=2)
    c.add_worker(max_steps=50)
    c.wait_for(lambda s: len(s["workers"]) == 1, 60, "the first worker to be live")
    time.sleep(1.0)  # a few hundred steps' time, had its pull been served
    assert c.status()["updates"] == 0, "the first worker trained alone"
    c.add_worker(max_steps=50)
    results = c.wait_workers(timeout=120)
    assert [r["steps"] for r in results] == [50, 50]
    assert c.status()["updates"] == 100


def test_a_pull_held_for_min_workers_past_pull_wait_is_told_why(shard_thread):
    shard = shard_thread(RunConfig(consistency=Consistency("asp"), min_workers=2),
                         dataclasses.replace(FAST, pull_wait=0.3))
    control, worker = shard.dealer(), shard.dealer()
    control.send_multipart(protocol.encode(protocol.Membership(v=VERSION, seq=1, live={0: (0, 0)})))
    assert control.poll(5000)
    control.recv_multipart()  # the shard's stats: it knows worker 0 is live, and alone
    worker.send_multipart(protocol.encode(protocol.Pull(v=VERSION, seq=2, worker_id=0, clock=0)))
    assert worker.poll(5000), "a held pull got no answer after pull_wait"
    reply = protocol.decode(worker.recv_multipart(copy=False)).header
    assert isinstance(reply, protocol.Error) and reply.code == protocol.ErrorCode.WAIT_TIMEOUT, reply
    assert reply.message == "pull at clock 0 still waiting after 0.3s: 1 of 2 workers (--min-workers) live"
    assert shard.core.updates == 0


def test_ssp_bounds_the_lead_over_a_slow_worker(make_cluster):
    s = 2
    c = make_cluster(RunConfig(consistency=Consistency("ssp", s), seed=4), shards=2)
    # The slow worker goes first and outlasts the fast ones by far: started together, the
    # fast ones could finish their steps before the slow one's process was live, and then
    # nothing would hold them back.
    slow = c.add_worker(max_steps=400, delay=0.05)  # 20 s at least, about 5x slower than the others
    c.wait_live(1, min_clock=1)  # the slow worker
    fast = [c.add_worker(max_steps=40) for _ in range(2)]
    for p in fast:
        p.join(60)
        assert not p.is_alive(), f"{p.name} did not finish"
    assert slow.is_alive(), "the slow worker finished first: the test did not exercise the bound"
    gaps = [sh["max_clock_gap"] for sh in c.status()["shards"]]
    assert max(gaps) <= s, f"a worker ran {max(gaps)} clocks ahead of the slowest (bound {s})"
    assert max(gaps) == s, "the fast workers never reached the bound: the test did not exercise it"
    os.kill(slow.pid, signal.SIGKILL)


def test_asp_fast_worker_is_not_slowed_by_slow_one(make_cluster):
    c = make_cluster(RunConfig(consistency=Consistency("asp"), seed=5), shards=1)
    # the slow worker is live first: a newcomer starts at the slowest live clock, so a slow
    # worker that joined while the fast one was far ahead would start far ahead too
    slow = c.add_worker(max_steps=100, delay=0.5)  # 100 steps take >= 50 s
    c.wait_live(1, min_clock=1)  # the slow worker
    fast = c.add_worker(max_steps=100)
    started = time.monotonic()
    fast.join(60)
    assert not fast.is_alive(), "the fast worker did not finish"
    assert slow.is_alive(), "the slow worker finished as soon as the fast one: it was not slow"
    slow_clock = next(w["clock"] for w in c.status()["workers"] if w["pid"] == slow.pid)
    assert slow_clock < 50, f"slow worker at clock {slow_clock} when the fast one ended after {time.monotonic() - started:.1f}s"
    os.kill(slow.pid, signal.SIGKILL)


def test_stalled_coordinator_keeps_a_worker_whose_heartbeat_is_queued():
    # a stall longer than the heartbeat timeout, with the worker's heartbeat queued
    # behind another message: the tick after the stall must see the heartbeat
    timeouts = dataclasses.replace(FAST, heartbeat_timeout=0.5)
    ctx = zmq.Context()
    coordinator = Coordinator(ctx, "tcp://127.0.0.1:0", RunConfig(), [], timeouts)
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(coordinator.address)
    try:
        sock.send_multipart(protocol.encode(protocol.Join(v=VERSION, seq=1)))
        coordinator.serve_once(1000)
        assert sock.poll(1000)
        joined = protocol.decode(sock.recv_multipart()).header
        assert isinstance(joined, protocol.JoinOk), joined
        time.sleep(timeouts.heartbeat_timeout)  # the stall: nothing is served
        sock.send_multipart(protocol.encode(protocol.Status(v=VERSION, seq=2)))
        sock.send_multipart(protocol.encode(protocol.Heartbeat(v=VERSION, seq=3, worker_id=joined.worker_id,
                                                               incarnation=joined.incarnation, clock=0)))
        time.sleep(0.2)  # both queued at the coordinator, and the join now older than the timeout
        coordinator.serve_once(0)
        assert joined.worker_id in coordinator.members.live, "dropped although its heartbeat had arrived"
    finally:
        sock.close(linger=0)
        coordinator.close()
        ctx.term()
