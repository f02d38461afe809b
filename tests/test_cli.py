"""The three CLIs as a user runs them: real subprocesses on loopback, each ended by pid."""

import json
import signal
import socket
import subprocess
import time

import psutil
import pytest

from paramserver import checkpoint

from .conftest import cli as run
from .conftest import free_port_block


def foreground() -> None:
    """SIGINT at its default, as a terminal's foreground job has it: a suite started in the
    background (`make test &`) passes it down ignored, and Python keeps an ignored SIGINT ignored."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def status(address: str) -> dict:
    """`ps-server status --json`; a run with no workers and no updates when nothing answered."""
    out = run("ps-server", "status", "--server", address, "--json", "--timeout", "2")
    return json.loads(out.stdout) if out.returncode == 0 else {"workers": [], "updates": 0}


def wait_status(address: str, until, timeout: float) -> dict:
    """The status once `until(status)` holds, or the last one seen after `timeout` seconds."""
    deadline, info = time.monotonic() + timeout, status(address)
    while not until(info) and time.monotonic() < deadline:
        time.sleep(0.1)
        info = status(address)
    return info


def test_server_and_workers_end_by_themselves_after_max_steps(procs):
    port = free_port_block(3)
    server = procs.start("ps-server", "start", "--port", str(port), "--shards", "2", "--max-steps", "600",
                         "--consistency", "ssp:2", "--heartbeat-interval", "0.2")
    address = f"tcp://127.0.0.1:{port}"
    # slowed a little so that the run outlasts a few status calls
    workers = [procs.start("ps-worker", "join", "--server", address, "--delay", "0.01") for _ in range(2)]
    info = wait_status(address, lambda i: len(i["workers"]) == 2, 60)
    assert len(info["workers"]) == 2, "status never listed both workers"
    assert info["config"]["consistency"] == "ssp:2"
    for p in [*workers, server]:
        assert p.wait(timeout=90) == 0, p.communicate()[1][-2000:]
    err = server.communicate()[1]
    assert f"ps-worker join --server {address}" in err
    assert "run ended after" in err


def test_worker_without_server_fails_clearly():
    port = free_port_block(1)
    out = run("ps-worker", "join", "--server", f"tcp://127.0.0.1:{port}", "--reconnect-timeout", "1.5", timeout=30)
    assert out.returncode != 0
    assert "no coordinator answered" in out.stderr


def test_worker_whose_connection_loops_back_to_itself_fails_clearly():
    # a connect to a local port nothing listens on can draw that port as its own source
    # and reach itself; zmq's `source;destination` form makes it happen every time
    port = free_port_block(1)
    out = run("ps-worker", "join", "--server", f"tcp://127.0.0.1:{port};127.0.0.1:{port}",
              "--reconnect-timeout", "1.5", timeout=30)
    assert out.returncode != 0
    assert "no coordinator answered" in out.stderr, out.stderr[-2000:]


@pytest.mark.parametrize("address", ["tcp://127.0.0.1:notaport", "bogus://x"])
@pytest.mark.parametrize("command", [("ps-worker", "join"), ("ps-server", "status")], ids=" ".join)
def test_a_malformed_server_address_is_refused_clearly(command, address):
    out = run(*command, "--server", address, timeout=30)
    assert out.returncode != 0
    assert f"cannot connect to {address!r}" in out.stderr and "tcp://host:port" in out.stderr, out.stderr[-2000:]
    assert "Traceback" not in out.stderr


def test_sim_run_writes_report(tmp_path):
    report = tmp_path / "r"
    out = run("ps-sim", "run", "--workers", "2", "--shards", "2", "--steps", "150", "--consistency", "asp",
              "--report", str(report), "--no-progress", timeout=180)
    assert out.returncode == 0, out.stderr[-2000:]
    data = json.loads((report / "report.json").read_text())
    for key in ["final_accuracy", "wall_seconds", "steps", "workers", "shards", "consistency",
                "bytes_pushed", "bytes_pulled", "max_staleness_observed"]:
        assert key in data
    assert data["workers"] == 2 and data["shards"] == 2 and data["consistency"] == "asp"
    assert data["bytes_pushed"] > 0 and data["bytes_pulled"] > 0
    assert "final test accuracy" in out.stdout


def test_sim_progress_bar_ends_at_the_steps_taken(tmp_path):
    # a short run: the workers finish and leave the status between two of its polls, so
    # only their results can tell the bar about the last steps
    out = run("ps-sim", "run", "--workers", "2", "--shards", "1", "--steps", "100", "--consistency", "asp",
              "--report", str(tmp_path / "r"), "--progress", timeout=180,
              env={"COLUMNS": "200"})  # wide enough that rich never cuts the count short
    assert out.returncode == 0, out.stderr[-2000:]
    counts = [line for line in out.stderr.splitlines() if line.startswith("training")]
    assert counts and " 200/200 " in counts[-1], out.stderr[-2000:]


@pytest.mark.parametrize("command", [("ps-server", "start"), ("ps-server", "status"), ("ps-worker", "join"), ("ps-sim", "run")])
def test_help_shows_defaults_and_env_vars(command):
    out = run(*command, "--help")
    assert out.returncode == 0
    assert "default:" in out.stdout and "PS_" in out.stdout


@pytest.mark.parametrize("args, message", [
    (("ps-server", "start", "--consistency", "ssp:x"), "unknown consistency"),
    (("ps-server", "start", "--task", "no_such_module:build"), "cannot load task"),
    (("ps-server", "start", "--codec", "zip"), "unknown codec"),
    (("ps-server", "start", "--port", "65535", "--shards", "2"), "choose a --port of at most 65533"),
    (("ps-server", "start", "--metrics-port", "65535"), "choose a --metrics-port of at most 65534"),
    (("ps-sim", "run", "--bogus"), "No such option"),
    (("ps-server", "status", "--server", "tcp://127.0.0.1:1", "--timeout", "0.5"), "no reply"),
])
def test_bad_input_is_refused_with_a_clear_message(args, message):
    out = run(*args, timeout=30)
    assert out.returncode != 0
    assert message in out.stderr


def test_environment_variables_set_options(procs):
    out = run("ps-server", "start", "--port", "1", env={"PS_CONSISTENCY": "nope"}, timeout=30)
    assert out.returncode != 0 and "unknown consistency 'nope'" in out.stderr


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["Ctrl-C", "SIGTERM"])
def test_ctrl_c_or_sigterm_ends_the_run_with_its_final_checkpoint_and_every_process(procs, tmp_path, sig):
    """As a terminal's Ctrl-C or a service manager's stop: the worker is told to finish, every
    update acknowledged before the signal is in the final checkpoint, and nothing is left running."""
    port = free_port_block(3)
    address, ckpts = f"tcp://127.0.0.1:{port}", str(tmp_path / "ckpt")
    server = procs.start("ps-server", "start", "--port", str(port), "--shards", "2", "--checkpoint-dir", ckpts,
                         "--checkpoint-every", "3600", preexec_fn=foreground)
    worker = procs.start("ps-worker", "join", "--server", address, "--delay", "0.01")
    before = wait_status(address, lambda i: i["updates"] >= 50, 60)["updates"]
    assert before >= 50, "the worker never got going"
    children = psutil.Process(server.pid).children(recursive=True)
    assert len([c for c in children if "resource_tracker" not in " ".join(c.cmdline())]) == 2
    server.send_signal(sig)
    try:
        code = server.wait(timeout=30)
    except subprocess.TimeoutExpired:  # say where it stuck: the log, and which processes still ran
        states = {}
        for p in (psutil.Process(server.pid), *children):
            try:
                states[p.pid] = p.status()
            except psutil.NoSuchProcess:
                pass
        server.kill()
        pytest.fail(f"still running 30 s after {sig.name}: {states}; its log:\n{server.communicate()[1][-4000:]}")
    err = server.communicate()[1]
    assert code == 0, err[-3000:]
    assert "telling workers to finish" in err and "Traceback" not in err, err[-3000:]
    gone, alive = psutil.wait_procs(children, timeout=10)
    assert not alive, f"left running: {[p.pid for p in alive]}"
    assert worker.wait(timeout=30) == 0, worker.communicate()[1][-2000:]
    assert "(finished)" in worker.communicate()[1]
    final = checkpoint.latest(ckpts)  # the only one: the periodic ones are an hour apart
    assert final.manifest["updates"] >= before


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["Ctrl-C", "SIGTERM"])
def test_ctrl_c_or_sigterm_on_a_worker_makes_it_leave_at_once_and_the_run_goes_on(procs, sig):
    """The worker finishes its step and says goodbye: a bsp round does not wait out its
    heartbeats (an hour here), and the other worker trains on."""
    port = free_port_block(3)
    address = f"tcp://127.0.0.1:{port}"
    procs.start("ps-server", "start", "--port", str(port), "--shards", "2", "--consistency", "bsp",
                "--heartbeat-timeout", "3600")
    workers = [procs.start("ps-worker", "join", "--server", address, "--delay", "0.01", preexec_fn=foreground)
               for _ in range(2)]
    info = wait_status(address, lambda i: len(i["workers"]) == 2 and i["updates"] >= 20, 60)
    assert len(info["workers"]) == 2 and info["updates"] >= 20, info
    workers[0].send_signal(sig)
    assert workers[0].wait(timeout=30) == 0, workers[0].communicate()[1][-3000:]
    err = workers[0].communicate()[1]
    assert "(interrupted)" in err and "Traceback" not in err, err[-3000:]
    info = status(address)
    assert len(info["workers"]) == 1, info  # left, not waiting to be dropped
    before = info["updates"]
    info = wait_status(address, lambda i: i["updates"] >= before + 20, 30)
    assert info["updates"] >= before + 20, "bsp rounds stopped after the other worker left"
    assert workers[1].poll() is None


def test_a_worker_signalled_while_it_leaves_by_itself_finishes_leaving():
    """The first signal after joining never cuts a worker short, also when its loop has
    already ended (its --max-steps reached as the signal comes) and it is saying goodbye;
    before joining, or a second time, it stops at once."""
    import zmq

    from workers import WorkerConfig
    from workers.trainer import Trainer

    ctx = zmq.Context()
    try:
        trainer = Trainer(WorkerConfig(server="tcp://127.0.0.1:1"), ctx)
        with pytest.raises(KeyboardInterrupt):
            trainer.interrupt("SIGTERM")  # nothing to leave yet
        trainer.joined = True  # as after the loop has ended by itself, before `leave` goes out
        trainer.interrupt("SIGTERM")
        assert trainer.session.finish.wait(5) and trainer.interrupted == "SIGTERM"
        with pytest.raises(KeyboardInterrupt):
            trainer.interrupt("SIGINT")
    finally:
        ctx.destroy(linger=0)


@pytest.mark.parametrize("taken", [0, 1], ids=["coordinator port", "shard port"])
def test_server_whose_port_is_taken_exits_with_the_error_and_leaves_nothing(procs, taken):
    port = free_port_block(3)
    children: dict[int, psutil.Process] = {}
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", port + taken))
        holder.listen()
        server = procs.start("ps-server", "start", "--port", str(port), "--shards", "1")
        deadline = time.monotonic() + 60
        while server.poll() is None and time.monotonic() < deadline:
            try:
                children.update((c.pid, c) for c in psutil.Process(server.pid).children(recursive=True))
            except psutil.NoSuchProcess:
                break
            time.sleep(0.05)
        assert server.wait(timeout=5) != 0
    err = server.communicate()[1]
    assert "Address already in use" in err and "choose another --port" in err, err[-2000:]
    assert "Traceback" not in err
    gone, alive = psutil.wait_procs(list(children.values()), timeout=10)
    assert not alive, f"left running: {[p.pid for p in alive]}"


def test_worker_with_a_bad_codec_exits_with_the_error(procs):
    port = free_port_block(3)
    procs.start("ps-server", "start", "--port", str(port), "--shards", "1")
    out = run("ps-worker", "join", "--server", f"tcp://127.0.0.1:{port}", "--codec", "bogus", timeout=60)
    assert out.returncode != 0
    assert "unknown codec 'bogus'" in out.stderr
