"""The edge on one machine, end to end: local steps, slow devices, crashes and churn,
and the report folder (metrics.csv, plots) they leave. Real processes on loopback."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from paramserver import simreport, tasks
from paramserver.config import Consistency, OptimizerConfig, RunConfig
from paramserver.sharding import Layout, flatten_
from workers.steps import StepLog

from .conftest import cli, free_port_block, rows_of, run_sim

PLOTS = ("accuracy.png", "progress.png", "staleness.png", "bytes.png")


def assert_plots(folder) -> None:
    for name in PLOTS:
        with open(os.path.join(folder, name), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n", name


# -- local steps (FedAvg-style) ------------------------------------------------------


def test_a_bsp_round_of_local_steps_is_k_sgd_steps_of_the_worker(make_cluster):
    """One worker, server sgd at lr 1 without momentum: each round's update is the
    worker's delta, so the server's weights must be K local SGD steps per round from
    the initial weights, on the batches of clocks 0..K-1, then K..2K-1."""
    k, rounds, local_lr = 3, 2, 0.1
    run = RunConfig(consistency=Consistency("bsp"), optimizer=OptimizerConfig("sgd", lr=1.0, momentum=0.0),
                    local_steps=k, local_lr=local_lr)
    c = make_cluster(run, shards=2)
    c.add_worker(max_steps=rounds)
    [result] = c.wait_workers(60)
    assert result["steps"] == rounds and result["reason"] == "steps"

    task = tasks.build(run.task, run.seed)
    params, _ = flatten_(task.model, Layout.of(task.model))
    sgd = torch.optim.SGD(task.model.parameters(), lr=local_lr)
    indices = tasks.partition(len(task.train[0]), run.partitions, 0, run.seed, run.partition, task.train[1])
    batches = tasks.Batches(indices, run.batch_size, seed=(run.seed, 0))
    for step in range(rounds * k):
        batch = batches.at(step)
        sgd.zero_grad()
        task.loss(task.model(task.train[0][batch]), task.train[1][batch]).backward()
        sgd.step()
    # w - (w - w_K) is w_K up to float rounding
    torch.testing.assert_close(c.weights(), params, rtol=1e-5, atol=1e-6)
    assert c.status()["updates"] == rounds


def test_a_worker_joins_with_local_steps_speed_and_a_step_log_from_the_command_line(tmp_path, procs):
    port = free_port_block(2)
    address = f"tcp://127.0.0.1:{port}"
    procs.start("ps-server", "start", "--port", str(port), "--consistency", "asp", "--heartbeat-interval", "0.2")
    log = tmp_path / "steps.csv"
    worker = procs.start("ps-worker", "join", "--server", address, "--local-steps", "4", "--local-lr", "0.05",
                          "--speed", "0.5", "--max-steps", "30", "--metrics-csv", str(log), "--no-progress")
    _, err = worker.communicate(timeout=90)
    assert worker.returncode == 0, err[-2000:]
    assert "30 steps" in err
    rows = rows_of(log)
    assert list(rows[0]) == list(StepLog.FIELDS)
    assert [int(r["clock"]) for r in rows] == list(range(1, 31))
    assert all(int(r["bytes_sent"]) > 4 * 9610 and int(r["bytes_received"]) > 4 * 9610 for r in rows)
    assert float(rows[-1]["loss"]) < float(rows[0]["loss"])  # 120 local SGD steps do train
    info = json.loads(cli("ps-server", "status", "--server", address, "--json").stdout)
    assert info["updates"] == 30  # one update per push, however many local steps it carries
    assert info["config"]["local_steps"] == 1  # the worker's own --local-steps, not the server's


@pytest.mark.parametrize(("args", "says"), [
    (["--speed", "0"], "--speed"), (["--speed", "1.5"], "--speed"), (["--local-steps", "-1"], "--local-steps"),
    (["--local-lr", "-0.1"], "--local-lr"),
])
def test_a_bad_worker_option_is_refused_before_anything_connects(args, says):
    out = cli("ps-worker", "join", "--server", "tcp://127.0.0.1:1", "--reconnect-timeout", "1", *args)
    assert out.returncode == 2 and says in out.stderr


# -- the simulation's scenarios --------------------------------------------------------


def test_a_scheduled_kill_and_rejoin_lose_no_step_and_fill_the_report(tmp_path):
    steps = 120
    _, report = run_sim(tmp_path, "--workers", "3", "--shards", "2", "--steps", str(steps), "--consistency", "asp",
                        "--kill", "1@40", "--rejoin", "1@80", "--heartbeat-interval", "0.2")
    events = [(e["worker"], e["event"]) for e in report["worker_events"]]
    assert events == [(1, "killed"), (1, "restarted")]
    rows = rows_of(tmp_path / "metrics.csv")
    first = [int(r["clock"]) for r in rows if r["worker"] == "1" and r["process"] == "0"]
    again = [int(r["clock"]) for r in rows if r["worker"] == "1" and r["process"] == "1"]
    # the process ends itself at the first step its clock reaches 40: exactly 40, unless it
    # joined late and started at the others' clock, past it; the report says which
    assert max(first[:-1], default=0) < 40 <= first[-1] and (first[0] > 40 or first[-1] == 40)
    assert report["worker_events"][0]["clock"] == first[-1]
    assert again and again[-1] == steps
    restarted = [r for r in report["worker_results"] if r["worker_id"] == 1]
    assert [(r["reason"], r["clock"]) for r in restarted] == [("clock", steps)]
    # every step a worker finished was applied once on every shard: nothing lost, nothing
    # twice. (A live worker dropped by a heartbeat timeout could have a push applied on one
    # shard and refused on the other, then redo the step; the default 3 s timeout keeps
    # that out of a loaded test machine.)
    assert [s["pushes"] for s in report["shard_pushes"]] == [len(rows)] * 2, report["membership_events"]
    assert report["scenario"]["kills"] == ["1@40"] and report["scenario"]["rejoins"] == ["1@80"]
    assert set(report["worker_summary"]) == {"0", "1", "2"}
    assert_plots(tmp_path)


@pytest.mark.parametrize(("args", "says"), [
    (["--speeds", "1,x"], "--speeds"), (["--speeds", "1,0"], "--speeds"), (["--speeds", "1,1,1,1,1"], "--speeds"),
    (["--kill", "4@10"], "--kill"), (["--kill", "1"], "--kill"), (["--kill", "1@0"], "--kill"), (["--rejoin", "1@-3"], "--rejoin"),
    (["--rejoin", "1@5"], "alternate"), (["--kill", "1@5,1@9"], "alternate"),
    (["--churn", "leave:-1"], "--churn"), (["--churn", "stay:1"], "--churn"),
    (["--until-target", "--eval-every", "0"], "--until-target"),
])
def test_a_bad_scenario_is_refused_before_anything_starts(tmp_path, args, says):
    out = subprocess.run([sys.executable, "-c", "from paramserver.cli import sim; sim()", "run", "--workers", "4",
                          "--report", str(tmp_path), *args], capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and says in out.stderr, out.stderr[-1000:]
    assert not os.listdir(tmp_path)  # no report: nothing ran


@pytest.mark.slow  # two 4-worker simulations to 0.95: about 70 s
def test_ssp_reaches_095_sooner_than_bsp_with_a_quarter_speed_worker(tmp_path):
    """bsp waits for the slow worker every round; ssp:2 lets the others apply their
    pushes meanwhile, so it gets to the same accuracy in less time."""
    # a third of the default learning rate: at the default, the workers that joined first
    # could reach 0.95 alone in the half second before the last one joined, leaving no
    # window (all connected, target not yet reached) in which to compare their clocks
    common = ["--workers", "4", "--shards", "1", "--steps", "2000", "--speeds", "1,1,1,0.25", "--until-target",
              "--eval-every", "0.25", "--target", "0.95", "--lr", "0.001"]
    _, ssp = run_sim(tmp_path / "ssp", *common, "--consistency", "ssp:2")
    _, bsp = run_sim(tmp_path / "bsp", *common, "--consistency", "bsp")
    for r in (ssp, bsp):
        assert r["time_to_target"] is not None and r["final_accuracy"] >= 0.95
    # from all workers connected to the evaluation that reached 0.95 (the run then stops;
    # how long the workers take to wind down is not part of it)
    assert ssp["time_to_target"] < bsp["time_to_target"], (ssp["time_to_target"], bsp["time_to_target"])
    # in ssp the slow worker is the one the others wait for: its clock trails theirs while
    # the run trains, from all workers connected (t 0) to the target. Not before: the first
    # to join trains alone meanwhile, and a newcomer starts at the clock of its last
    # heartbeat, so early on the others trail it. Not after: the workers learn of the stop
    # at their next heartbeat, and in that wind-down whoever is still running races ahead
    rows = simreport.read_metrics(str(tmp_path / "ssp"))
    training = simreport.worker_summary([r for r in rows if 0 <= r["t"] <= ssp["time_to_target"]])
    lags = {int(w): s["mean_lag"] for w, s in training.items()}
    assert max(lags, key=lags.get) == 3, lags
    # in both modes it spends longest on its own work: the injected 3x its full-speed step
    for r in (ssp, bsp):
        compute = {int(w): s["mean_compute_seconds"] for w, s in r["worker_summary"].items()}
        assert compute[3] > 2 * max(compute[w] for w in (0, 1, 2))
    assert ssp["scenario"]["speeds"] == [1.0, 1.0, 1.0, 0.25]


@pytest.mark.slow  # a 4-worker bsp simulation with random crashes: about 40 s
def test_bsp_trains_through_churn(tmp_path):
    # 20 ms per step: a run of several seconds, so that restarted workers (a second or
    # two to start a process) come back while the others still train
    _, report = run_sim(tmp_path, "--workers", "4", "--shards", "2", "--steps", "300", "--consistency", "bsp",
                        "--churn", "leave:0.3,join:2", "--seed", "3", "--delays", "0.02,0.02,0.02,0.02",
                        "--heartbeat-interval", "0.2", "--heartbeat-timeout", "1")
    kinds = [e["event"] for e in report["worker_events"]]
    assert "killed" in kinds and "restarted" in kinds
    assert report["final_accuracy"] >= 0.9
    rows = rows_of(tmp_path / "metrics.csv")
    assert any(r["process"] != "0" for r in rows)  # a restarted worker trained again
    assert_plots(tmp_path)


@pytest.mark.slow  # a 3-worker bsp simulation whose departures are all graceful: about 30 s
def test_bsp_churn_with_graceful_leaves_never_waits_out_a_heartbeat_timeout(tmp_path):
    """Each departure is SIGTERM: the worker ends its step and says goodbye, so no bsp round
    waits for it (a crash would hold the round for the minute of --heartbeat-timeout)."""
    _, report = run_sim(tmp_path, "--workers", "3", "--shards", "2", "--steps", "200", "--consistency", "bsp",
                        "--churn", "leave:1,join:2,graceful:1", "--seed", "3", "--delays", "0.02,0.02,0.02",
                        "--heartbeat-timeout", "60")
    kinds = [e["event"] for e in report["worker_events"]]
    assert "left" in kinds and "restarted" in kinds and "killed" not in kinds, report["worker_events"]
    assert report["train_seconds"] < 60
    left = [r for r in report["worker_results"] if r["reason"] == "interrupted"]
    # each that left said why (one asked to leave as it took its last step ends by its budget)
    assert 1 <= len(left) <= kinds.count("left"), report["worker_results"]
    assert report["scenario"]["churn"] == {"leave": 1.0, "join": 2.0, "graceful": 1.0}
    assert report["final_accuracy"] >= 0.9
    assert_plots(tmp_path)


@pytest.mark.slow  # a FedAvg simulation: about 30 s
def test_fedavg_reaches_090_with_a_fifth_of_the_pushes(tmp_path):
    _, report = run_sim(tmp_path, "--workers", "4", "--shards", "2", "--steps", "60", "--consistency", "bsp",
                        "--local-steps", "5", "--optimizer", "sgd", "--lr", "1", "--momentum", "0")
    assert report["final_accuracy"] >= 0.9
    assert report["updates"] == 60 and report["local_steps"] == 5
    assert sum(1 for _ in open(tmp_path / "metrics.csv")) == 1 + 4 * 60
