"""What an operator sees: Prometheus metrics of the coordinator and shards, the
event logs of the server and workers, and per-worker traffic in the status."""

from __future__ import annotations

import json
import urllib.request

import pytest
import zmq
from prometheus_client.parser import text_string_to_metric_families

from paramserver import admin
from paramserver.config import CheckpointConfig, Consistency, RunConfig

from .conftest import free_port_block, run_sim


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} from http://127.0.0.1:port/metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: dict, name: str, **labels) -> float:
    """The sum of every sample of `name` whose labels include `labels`."""
    return sum(v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= set(ls))


def events(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


STEPS = 60


def test_metrics_and_event_logs_of_a_run(make_cluster, tmp_path):
    port = free_port_block(3)  # the coordinator, then shards 0 and 1
    log = tmp_path / "server-events.jsonl"
    c = make_cluster(RunConfig(consistency=Consistency("ssp:2"), seed=2), shards=2, metrics_port=port,
                     event_log=str(log), checkpoints=CheckpointConfig(str(tmp_path / "ckpt"), every=0.3))
    worker_logs = [tmp_path / f"worker-{i}.jsonl" for i in range(2)]
    # the first outlasts the second's start by far (STEPS x 0.2 s): both must be live at once
    c.add_worker(max_steps=STEPS, event_log=str(worker_logs[0]), delay=0.2)
    c.wait_live(1)
    c.add_worker(max_steps=STEPS, event_log=str(worker_logs[1]), delay=0.02)
    c.wait_live(2)
    live = scrape(port)
    assert value(live, "paramserver_live_workers") == 2
    # a garbage message to shard 0: refused, counted by reason
    bad = c.ctx.socket(zmq.DEALER)
    try:
        bad.connect(c.status()["shard_map"][0]["address"])
        bad.send_multipart([b"\x00not msgpack"])
        assert bad.poll(5000), "no error reply"
    finally:
        bad.close(linger=0)
    results = c.wait_workers(timeout=120)
    assert [r["steps"] for r in results] == [STEPS, STEPS]
    ids = [str(r["worker_id"]) for r in results]
    c.wait_for(lambda s: s["checkpoints_written"] >= 1, 30, "a checkpoint")

    coordinator = scrape(port)
    assert value(coordinator, "paramserver_joins_total") == 2
    assert value(coordinator, "paramserver_checkpoints_written_total") >= 1
    assert 0 <= value(coordinator, "paramserver_checkpoint_age_seconds") < 60
    assert value(coordinator, "paramserver_updates") > 0
    for shard in (0, 1):
        s = scrape(port + 1 + shard)
        for w in ids:  # every worker's pushes and pulls, counted on every shard
            assert value(s, "paramserver_pushes_total", worker=w, shard=str(shard)) == STEPS
            assert value(s, "paramserver_pulls_total", worker=w) >= STEPS
            for kind in ("raw", "wire"):
                assert value(s, "paramserver_pushed_bytes_total", worker=w, kind=kind) > 0
                assert value(s, "paramserver_pulled_bytes_total", worker=w, kind=kind) > 0
        for hist in ("push", "pull", "apply", "round"):
            assert value(s, f"paramserver_{hist}_seconds_count") > 0, hist
            assert value(s, f"paramserver_{hist}_seconds_sum") > 0, hist
        assert value(s, "paramserver_staleness_count") == 2 * STEPS  # asp/ssp: every push is an update
        assert value(s, "paramserver_shard_version", shard=str(shard)) == 2 * STEPS
    assert value(scrape(port + 1), "paramserver_rejected_messages_total", reason="bad_message") == 1

    server = events(log)
    kinds = [e["event"] for e in server]
    assert kinds.count("join") == 2 and kinds.count("leave") == 2
    assert {e["role"] for e in server if e["event"] == "start"} == {"shard-0", "shard-1"}
    assert "checkpoint" in kinds and "checkpoint_write" in kinds
    rejection = next(e for e in server if e["event"] == "rejection")
    assert rejection["role"] == "shard-0" and rejection["code"] == "bad_message"
    for wl in worker_logs:
        mine = events(wl)
        assert [e["event"] for e in mine] == ["join", "leave"]
        assert mine[-1]["steps"] == STEPS and mine[-1]["reason"] == "steps"


def test_status_counts_each_workers_bytes(make_cluster):
    c = make_cluster(RunConfig(consistency=Consistency("asp"), codec="fp16"), shards=2)
    c.add_worker(max_steps=20)
    results = c.wait_workers(timeout=90)
    status = c.status()
    (worker, traffic), = status["traffic"].items()
    assert worker == str(results[0]["worker_id"])
    numel = status["shard_map"][-1]["chunks"][-1][2]
    assert traffic["pushed_raw"] == 20 * 4 * numel  # the float32 gradients the pushes stand for
    assert 0.45 < traffic["pushed_wire"] / traffic["pushed_raw"] < 0.6  # fp16 and the headers
    assert traffic["pulled_raw"] >= 20 * 4 * numel
    assert traffic["pulled_wire"] > traffic["pulled_raw"]  # float32 frames and the headers


def test_a_taken_metrics_port_is_refused_with_a_clear_message(tmp_path):
    import socket

    from click.testing import CliRunner

    from paramserver.cli import server

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        taken = s.getsockname()[1]
        result = CliRunner().invoke(server, ["start", "--port", "0", "--metrics-port", str(taken)])
    assert result.exit_code != 0
    assert "--metrics-port" in result.output


@pytest.mark.parametrize("bad", ["-1", "70000", "x"])
def test_a_bad_metrics_port_is_a_usage_error(bad):
    from click.testing import CliRunner

    from paramserver.cli import server

    result = CliRunner().invoke(server, ["start", "--metrics-port", bad])
    assert result.exit_code == 2 and "--metrics-port" in result.output


def test_status_once_lists_every_live_worker_and_names_the_straggler(make_cluster):
    import subprocess
    import sys

    c = make_cluster(RunConfig(consistency=Consistency("asp")), shards=1)
    procs = [c.add_worker(max_steps=100_000, delay=d) for d in (0.0, 0.0, 0.2)]  # the third is slow
    info = c.wait_for(lambda s: len(s["workers"]) == 3, 60, "three workers live")
    slow = next(w["id"] for w in info["workers"] if w["pid"] == procs[2].pid)
    c.wait_for(lambda s: admin.straggler(s["workers"]) == slow, 30, "the slow worker's rate to show")
    cli = [sys.executable, "-c", "from paramserver.cli import server; server()", "status", "--server", c.address]
    out = subprocess.run([*cli, "--once", "--json"], capture_output=True, text=True, timeout=60, check=True)
    listed = json.loads(out.stdout)["workers"]
    assert sorted(w["id"] for w in listed) == sorted(w["id"] for w in info["workers"])
    assert all(w["resources"].get("rss_bytes", 0) > 0 for w in listed)  # heartbeats carry psutil figures
    table = subprocess.run([*cli, "--once"], capture_output=True, text=True, timeout=60, check=True).stdout
    assert f"straggler: worker {slow}" in table and "steps/s" in table
    for p in procs:
        p.kill()


def test_a_simulation_reports_its_accuracy_curve_and_time_to_target(tmp_path):
    # 5 ms a step: the run lasts over 0.75 s however fast the machine, so several evaluations fall inside it
    out, report = run_sim(tmp_path, "--workers", "2", "--shards", "1", "--steps", "150", "--consistency", "asp",
                          "--eval-every", "0.2", "--target", "0.9", "--delays", "0.005,0.005")
    curve = report["curve"]
    assert len(curve) >= 3 and 0 <= curve[0]["t"] < 1 and curve[0]["updates"] < curve[-1]["updates"]
    assert [p["t"] for p in curve] == sorted(p["t"] for p in curve)
    assert curve[-1]["accuracy"] == report["final_accuracy"] >= 0.9
    reached = report["time_to_target"]
    assert reached == next(p["t"] for p in curve if p["accuracy"] >= 0.9)
    assert f"test accuracy 0.9 reached after {reached:.1f}s" in out.stdout
