"""`--pipeline` (asp): a worker computes its next gradient while its last push and
the push's answer travel. Real server, shard and worker processes on loopback.

With one worker and plain SGD the run is deterministic, so the server's weights
can be checked against the update rule done by hand in this process: the gradient
of push k is computed on the weights that push k-2 left (push 0's and push 1's
both on the initial weights).
"""

from __future__ import annotations

import pytest
import torch
import zmq

from paramserver import cluster, sharding, tasks
from paramserver.config import Consistency, OptimizerConfig, RunConfig, Timeouts
from paramserver.errors import ConfigError
from workers import WorkerConfig, run_worker

from .conftest import FAST, cli, rows_of, run_sim
from .test_overlap import DropFirstPushAnswer

STEPS, LR = 30, 0.1


def _run(**changes) -> RunConfig:
    return RunConfig(**{"task": "digits-mlp", "consistency": Consistency("asp"), "seed": 7, "batch_size": 16,
                        "optimizer": OptimizerConfig("sgd", lr=LR, momentum=0.0), **changes})


def _by_hand(run: RunConfig, steps: int, delay: int) -> torch.Tensor:
    """The weights after `steps` SGD pushes of one worker whose gradient k is computed
    on the weights after push k - 1 - delay (the initial ones before there are any)."""
    task = tasks.build(run.task, run.seed)
    layout = sharding.Layout.of(task.model)
    params, grads = sharding.flatten_(task.model, layout)
    _, w = cluster.initial_weights(run)
    history = [w.clone()]
    indices = tasks.partition(len(task.train[0]), run.partitions, 0, run.seed, run.partition, task.train[1])
    batches = tasks.Batches(indices, run.batch_size, seed=(run.seed, 0))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the worker computes
    try:
        for k in range(steps):
            params.copy_(history[max(0, k - delay)])
            grads.zero_()
            batch = batches.at(k)
            task.loss(task.model(task.train[0][batch]), task.train[1][batch]).backward()
            w = w - LR * grads
            history.append(w.clone())
    finally:
        torch.set_num_threads(threads)
    return w


def test_one_pipelined_worker_applies_each_gradient_one_update_late(make_cluster, tmp_path):
    run = _run()
    c = make_cluster(run, shards=2)
    c.add_worker(max_steps=STEPS, pipeline=True, metrics_csv=str(tmp_path / "steps.csv"))
    [result] = c.wait_workers(timeout=120)
    assert (result["steps"], result["clock"]) == (STEPS, STEPS)
    got = c.weights()
    late, plain = _by_hand(run, STEPS, delay=1), _by_hand(run, STEPS, delay=0)
    assert (late - plain).abs().max() > 1e-3  # the two rules are far apart: the check below tells them apart
    torch.testing.assert_close(got, late, rtol=0, atol=1e-5)
    c.wait_for(lambda s: s["updates"] == STEPS and [x["pushes"] for x in s["shards"]] == [STEPS, STEPS], 30,
               "every push counted once on each shard")
    # each shard counts the staleness: none for the first push (nothing applied yet), one after
    assert [int(r["staleness"]) for r in rows_of(tmp_path / "steps.csv")] == [0] + [1] * (STEPS - 1)


def test_a_lost_answer_to_a_pipelined_push_is_resent_and_applied_once(make_cluster):
    run = _run()
    expected = make_cluster(run, shards=2)
    expected.add_worker(max_steps=STEPS, pipeline=True)
    expected.wait_workers(timeout=120)
    ctx = zmq.Context()
    t = Timeouts(heartbeat_interval=0.2, heartbeat_timeout=8.0, request_timeout=3.0, pull_wait=20.0,
                 reconnect_timeout=30.0, shutdown_grace=3.0, startup=60.0)
    c = make_cluster(run, shards=2, timeouts=t)
    shard = c.status()["shard_map"][1]["address"]
    proxy = DropFirstPushAnswer(ctx, shard)
    try:
        c.add_worker(max_steps=STEPS, pipeline=True, routes=((shard, proxy.address),))
        [result] = c.wait_workers(timeout=120)
    finally:
        proxy.close()
        ctx.term()
    assert proxy.dropped is not None and proxy.pushes.count(proxy.dropped) == 2, proxy.pushes
    assert result["steps"] == STEPS and c.status()["updates"] == STEPS
    assert torch.equal(c.weights(), expected.weights())


def test_two_pipelined_workers_train_digits_to_095_and_every_push_lands_once(tmp_path):
    steps = 600
    _, report = run_sim(tmp_path, "--workers", "2", "--shards", "2", "--steps", str(steps), "--consistency", "asp",
                        "--pipeline", "--eval-every", "0")
    assert [r["steps"] for r in sorted(report["worker_results"], key=lambda r: r["worker_id"])] == [steps, steps]
    assert [s["pushes"] for s in report["shard_pushes"]] == [2 * steps] * 2
    assert report["final_accuracy"] >= 0.95


@pytest.mark.parametrize("consistency", ["bsp", "ssp:2"])
def test_a_pipelined_worker_is_refused_by_a_server_that_is_not_asp(make_cluster, consistency):
    c = make_cluster(_run(consistency=Consistency.parse(consistency), min_workers=1), shards=1)
    with pytest.raises(ConfigError, match=f"--pipeline needs asp consistency, not {consistency}"):
        run_worker(WorkerConfig(server=c.address, max_steps=5, timeouts=FAST, pipeline=True))
    assert c.status()["updates"] == 0


def test_pipeline_and_overlap_are_refused_together_before_anything_connects():
    out = cli("ps-worker", "join", "--server", "tcp://127.0.0.1:1", "--reconnect-timeout", "1", "--pipeline", "--overlap")
    assert out.returncode != 0 and "--pipeline and --overlap" in out.stderr, out.stderr


def test_ps_sim_refuses_pipeline_outside_asp(tmp_path):
    out = cli("ps-sim", "run", "--workers", "2", "--consistency", "bsp", "--pipeline", "--report", str(tmp_path))
    assert out.returncode != 0 and "--pipeline needs asp consistency" in out.stderr, out.stderr
    assert not list(tmp_path.iterdir())  # no report: nothing ran


def test_a_pipelined_worker_killed_and_restarted_loses_no_step(tmp_path):
    steps = 120
    _, report = run_sim(tmp_path, "--workers", "3", "--shards", "2", "--steps", str(steps), "--consistency", "asp",
                        "--pipeline", "--kill", "1@40", "--rejoin", "1@80", "--heartbeat-interval", "0.2",
                        "--eval-every", "0")
    assert [(e["worker"], e["event"]) for e in report["worker_events"]] == [(1, "killed"), (1, "restarted")]
    rows = rows_of(tmp_path / "metrics.csv")
    # the process kills itself right after a step's answer, before its next push goes out: every
    # step a process logged was applied once on every shard, and no push went unlogged
    assert [s["pushes"] for s in report["shard_pushes"]] == [len(rows)] * 2, report["membership_events"]
    restarted = [r for r in report["worker_results"] if r["worker_id"] == 1]
    assert [(r["reason"], r["clock"]) for r in restarted] == [("clock", steps)]
