"""End to end on real processes: each consistency mode trains digits to >= 0.95."""

import pytest

from paramserver.config import Consistency, RunConfig


@pytest.mark.parametrize("mode", ["bsp", "asp", "ssp:2"])
def test_four_workers_two_shards_reach_095(make_cluster, mode):
    # every round of 4 workers (as ps-sim does): the result does not depend on join timing
    c = make_cluster(RunConfig(consistency=Consistency.parse(mode), seed=1, min_workers=4), shards=2)
    # 400 steps each: at 300, asp's arrival order once left the model at 0.9499
    for _ in range(4):
        c.add_worker(max_steps=400)
    results = c.wait_workers(timeout=150)
    assert [r["steps"] for r in results] == [400] * 4, results
    assert c.accuracy() >= 0.95
