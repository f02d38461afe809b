"""The benchmark suite must keep running: its quick version, end to end, as `make bench QUICK=1` runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAMES = ["transport", "scaling", "training", "stragglers", "apply", "many_workers", "slowlink"]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_the_quick_benchmark_suite_runs_and_reports_every_figure():
    proc = subprocess.run([sys.executable, "-m", "bench.run", "--quick"], cwd=ROOT, capture_output=True, text=True,
                          timeout=540)
    assert proc.returncode == 0, proc.stderr[-3000:]
    folder = os.path.join(ROOT, "bench", "results", "quick")
    for name in NAMES:
        with open(os.path.join(folder, f"{name}.json")) as f:
            result = json.load(f)
        assert "error" not in result, result.get("trace")
        assert result["rows"], name
        for row in result["rows"]:  # every figure measured, ours and the peer's, in the same run
            if row["metric"].startswith("s to "):
                continue  # a time to accuracy: the quick runs may stop short of the target
            assert row["ours"]["median"] is not None and row["peer"]["median"] is not None, (name, row["case"])
    assert os.path.exists(os.path.join(folder, "benchmarks.md"))


@pytest.mark.timeout(120)
def test_the_floor_peer_makes_its_passes_over_the_bytes():
    """The transport benchmark's floor is only a floor if it does the work: its server
    steps its weights by the gradients and refuses non-finite ones, its client copies
    the answer into its weights; with a pass left out, that pass's effect is missing."""
    import torch

    from bench.common import Procs
    from bench.rigs import Floor

    lr = 0.25
    grads = np.linspace(-1.0, 1.0, 3 * 1_000_000 + 5, dtype=np.float32)  # several frames, the last short

    def stepped(times: int) -> np.ndarray:  # the server's weights start at 1.0; torch's add, as it runs
        w = torch.ones(grads.size)
        for _ in range(times):
            w.add_(torch.from_numpy(grads), alpha=-lr)
        return w.numpy()

    with Procs() as procs:
        made = []
        try:
            full = Floor(procs, ("check", "step", "copy"), lr)
            made.append(full)
            no_step = Floor(procs, ("check", "copy"), lr)
            made.append(no_step)
            no_copy = Floor(procs, ("check", "step"), lr)
            made.append(no_copy)
            split = Floor(procs, ("check", "step", "copy"), lr, servers=2)  # as benchmark 2 spreads it
            made.append(split)
            for f in made:
                f.use_grads(grads, servers=2 if f is split else 1)
                f.round_trip()
                f.round_trip()
            np.testing.assert_array_equal(full.weights, stepped(2))
            np.testing.assert_array_equal(split.weights, stepped(2))
            np.testing.assert_array_equal(no_step.weights, np.ones_like(grads))  # answered, never stepped
            assert np.isnan(no_copy.weights).all()  # answered, never copied in
            full.use_grads(np.where(np.arange(grads.size) == grads.size - 1, np.nan, grads).astype(np.float32))
            with pytest.raises(RuntimeError, match="not finite"):
                full.round_trip()
            full.use_grads(grads)
            full.round_trip()  # the refused push changed nothing: one more step from where it was
            np.testing.assert_array_equal(full.weights, stepped(3))
            with pytest.raises(ValueError, match="unknown passes"):
                Floor(procs, ("check", "compress"), lr)
        finally:
            for f in made:
                f.close()


def test_a_run_without_a_window_where_every_worker_steps_still_gets_its_rate():
    """An asp worker can take all its steps before the other's first (a few steps of the
    25M model on a loaded machine); the rate is then the whole run's, and says so."""
    from bench.engine import measure
    from bench.training import WIDE

    overlapping = [{"joined": 0.0, "stamps": [1.0, 2.0, 3.0], "evals": []},
                   {"joined": 0.0, "stamps": [1.5, 2.5, 3.5], "evals": []}]
    got = measure(overlapping, WIDE, 0.5)
    assert got["rate_over"] == "window"  # from 1.5 to 3.0: the steps at 2.0, 2.5 and 3.0
    assert got["samples_per_s"] == pytest.approx(3 * WIDE.batch_size / 1.5)
    apart = [{"joined": 0.0, "stamps": [1.0, 2.0, 3.0], "evals": []},
             {"joined": 0.0, "stamps": [3.5, 4.0], "evals": []}]
    got = measure(apart, WIDE, 0.5)
    assert got["rate_over"] == "whole run"  # five steps in the 4 s from t0 to the last
    assert got["samples_per_s"] == pytest.approx(5 * WIDE.batch_size / 4.0)
