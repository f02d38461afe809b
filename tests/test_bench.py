"""The benchmark suite must keep running: its quick version, end to end, as `make bench QUICK=1` runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

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
