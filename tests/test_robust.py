"""A compromised worker among honest ones: what the shards refuse, and what they outvote.

The compromised device is modelled without any option of the worker: every
process builds the server's task, `tests.hostile_task:build`, and a process
started with HOSTILE_GRADIENT_SCALE set multiplies its loss, and so every
gradient it pushes, by that factor. Worker processes are spawned, so each
inherits the environment it was started with; the variable is set only around
the start of the hostile one.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from paramserver.config import Consistency, OptimizerConfig, RunConfig

from . import hostile_task

pytestmark = pytest.mark.timeout(600)

TASK = "tests.hostile_task:build"


def _start(c, monkeypatch, worker_id: int, scale: str | None, **config):
    """Start one worker; with `scale`, a compromised one."""
    with monkeypatch.context() as env:
        if scale is not None:
            env.setenv(hostile_task.ENV, scale)
        else:
            env.delenv(hostile_task.ENV, raising=False)
        return c.add_worker(worker_id=worker_id, **config)


def test_a_nan_push_is_refused_and_the_weights_stay_finite(make_cluster, monkeypatch):
    c = make_cluster(RunConfig(task=TASK, consistency=Consistency("asp"), seed=5), shards=2)
    before = c.weights()
    worker = _start(c, monkeypatch, 0, "nan", max_steps=50)
    [result] = c.wait_workers(timeout=60)
    # not_finite stops the worker (docs/protocol.md): its first push is its last
    assert worker.exitcode != 0 and result["error"].startswith("not_finite"), result
    info = c.wait_for(lambda s: all(sh["rejected"] >= 1 for sh in s["shards"]), 10, "both shards to refuse the push")
    assert [sh["updates"] for sh in info["shards"]] == [0, 0]
    after = c.weights()
    assert torch.isfinite(after).all()
    assert after.numpy().tobytes() == before.numpy().tobytes(), "a refused push changed the weights"


# Test accuracy after 500 rounds, measured on this 2-core machine. This run (seed 3,
# the hostile worker is id 4) is deterministic up to float rounding: median 0.9610
# (twice), trimmed-mean:0.2 0.9638, mean 0.1003. Over seeds 1-6, with the hostile worker
# at id 4 or at whatever id its join got, median and trimmed-mean ended at 0.955-0.964
# and mean at 0.1003 every time: the -100x gradient outweighs the four honest ones, so
# the mean climbs the loss. Batch 128 and lr 0.002 because the digits MLP tops out near
# 0.96-0.97, and with the defaults (batch 32, lr 0.003) the noisier robust aggregates
# ended 300 rounds at 0.941-0.947, and 500 or 600 rounds as low as 0.953.
ROUNDS = 500
ROBUST = RunConfig(task=TASK, consistency=Consistency("bsp"), seed=3, min_workers=5, batch_size=128,
                   optimizer=OptimizerConfig("adam", lr=0.002))


def _accuracy_with_one_hostile_worker(make_cluster, monkeypatch, aggregate: str) -> float:
    """Five bsp workers, four honest and one pushing -100x its gradients; the test accuracy."""
    c = make_cluster(dataclasses.replace(ROBUST, aggregate=aggregate), shards=2)
    for worker_id in range(4):
        _start(c, monkeypatch, worker_id, None, max_steps=ROUNDS)
    _start(c, monkeypatch, 4, "-100", max_steps=ROUNDS)
    results = c.wait_workers(timeout=300)
    assert [r.get("steps") for r in results] == [ROUNDS] * 5, results
    accuracy = c.accuracy()
    c.close()  # the next run gets the cores
    return accuracy


@pytest.mark.slow
def test_median_and_trimmed_mean_outvote_a_worker_pushing_minus_100x(make_cluster, monkeypatch):
    robust = {a: _accuracy_with_one_hostile_worker(make_cluster, monkeypatch, a) for a in ("median", "trimmed-mean:0.2")}
    mean = _accuracy_with_one_hostile_worker(make_cluster, monkeypatch, "mean")
    assert all(acc >= 0.95 for acc in robust.values()), robust
    assert mean < 0.5 and all(acc - mean > 0.4 for acc in robust.values()), (mean, robust)
