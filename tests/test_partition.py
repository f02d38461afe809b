"""Label-skewed data partitions (`--partition dirichlet:A | shards:K`), as federated benchmarks use."""

from __future__ import annotations

import numpy as np
import pytest

from paramserver import tasks
from paramserver.config import RunConfig
from paramserver.errors import ConfigError

from .conftest import run_sim

LABELS = np.repeat(np.arange(10), 120)  # 10 classes, 1,200 samples
PARTS = 4


def split(scheme: str) -> list[np.ndarray]:
    return [tasks.partition(len(LABELS), PARTS, i, seed=3, scheme=scheme, labels=LABELS) for i in range(PARTS)]


def skew(parts: list[np.ndarray]) -> float:
    """Mean total-variation distance between each part's label mix and the whole set's."""
    whole = np.bincount(LABELS, minlength=10) / len(LABELS)
    return float(np.mean([0.5 * np.abs(np.bincount(LABELS[p], minlength=10) / len(p) - whole).sum() for p in parts]))


@pytest.mark.parametrize("scheme", ["iid", "dirichlet:0.3", "dirichlet:100", "shards:2"])
def test_every_sample_lands_in_exactly_one_part(scheme):
    parts = split(scheme)
    everything = np.concatenate(parts)
    assert len(everything) == len(LABELS) and len(np.unique(everything)) == len(LABELS)
    assert split(scheme)[1].tolist() == parts[1].tolist()  # every worker computes the same split


def test_dirichlet_and_shards_skew_the_labels_and_iid_does_not():
    assert skew(split("iid")) < 0.1
    assert skew(split("dirichlet:100")) < 0.15  # a large alpha is nearly iid
    assert skew(split("dirichlet:0.3")) > 0.35
    assert skew(split("shards:2")) > 0.4
    assert max(len(np.unique(LABELS[p])) for p in split("shards:2")) <= 4  # 2 shards: a few classes each


@pytest.mark.parametrize("scheme", ["dirichlet", "dirichlet:0", "dirichlet:x", "shards:0", "zipf:2", "iid:1"])
def test_an_unknown_scheme_is_refused(scheme):
    with pytest.raises(ConfigError, match="partition"):
        RunConfig(partition=scheme, partitions=4)


def test_a_skewed_scheme_needs_partitions():
    with pytest.raises(ConfigError, match="--partitions"):
        RunConfig(partition="dirichlet:0.3")


@pytest.mark.slow  # a 4-worker simulation: about 40 s
def test_bsp_still_reaches_090_on_dirichlet_03_partitions(tmp_path):
    _, report = run_sim(tmp_path, "--workers", "4", "--shards", "1", "--steps", "300", "--consistency", "bsp",
                        "--partition", "dirichlet:0.3", "--seed", "1")
    assert report["final_accuracy"] >= 0.9
