"""BSP with W workers of batch b equals single-process SGD with batch W*b (DESIGN.md)."""

import numpy as np
import pytest
import torch

from paramserver import tasks
from paramserver.config import Consistency, OptimizerConfig, RunConfig
from paramserver.sharding import Layout, flatten_

ROUNDS, BATCH, WORKERS = 25, 16, 2


def single_process(run: RunConfig, rounds: int) -> torch.Tensor:
    """The oracle: one model, torch.optim, each step on the union of the workers' batches."""
    task = tasks.build(run.task, run.seed)
    params, _ = flatten_(task.model, Layout.of(task.model))
    opt = run.optimizer
    optimizer = (torch.optim.SGD(task.model.parameters(), lr=opt.lr, momentum=opt.momentum) if opt.name == "sgd"
                 else torch.optim.Adam(task.model.parameters(), lr=opt.lr))
    n = len(task.train[0])
    streams = [tasks.Batches(tasks.partition(n, WORKERS, p, run.seed), run.batch_size, seed=(run.seed, p))
               for p in range(WORKERS)]
    for step in range(rounds):
        idx = np.concatenate([s.at(step) for s in streams])
        optimizer.zero_grad(set_to_none=False)
        task.loss(task.model(task.train[0][idx]), task.train[1][idx]).backward()
        optimizer.step()
    return params.detach().clone()


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_bsp_two_workers_equals_single_process_double_batch(make_cluster, optimizer):
    run = RunConfig(consistency=Consistency("bsp"), optimizer=OptimizerConfig(optimizer, lr=0.05 if optimizer == "sgd" else 0.003),
                    batch_size=BATCH, seed=7, partitions=WORKERS, min_workers=WORKERS)
    c = make_cluster(run, shards=2)
    for _ in range(WORKERS):
        c.add_worker(max_steps=ROUNDS)
    results = c.wait_workers(timeout=90)
    assert [r["steps"] for r in results] == [ROUNDS] * WORKERS
    assert c.status()["updates"] == ROUNDS
    served, oracle = c.weights(), single_process(run, ROUNDS)
    start = single_process(run, 0)
    assert not torch.allclose(served, start), "training did not move the weights"
    torch.testing.assert_close(served, oracle, rtol=1e-5, atol=1e-6)
