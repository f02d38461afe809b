"""Pure units, no sockets: sharding, consistency rules, the shard core, membership, codecs."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from paramserver import codecs, consistency, optim, protocol, sharding
from paramserver.config import Consistency, OptimizerConfig, RunConfig
from paramserver.consistency import APPLY, DUPLICATE, QUEUE, STALE, Asp, Bsp, Ssp
from paramserver.errors import ConfigError, ProtocolError
from paramserver.membership import Members
from paramserver.protocol import VERSION, ErrorCode
from paramserver.shard import ShardCore

# -- sharding.plan ----------------------------------------------------------------

PLANS = [(9610, 1, 4096), (9610, 3, 1024), (8192, 2, 1024), (100_003, 7, 1000), (7, 3, 2), (2, 4, 3), (0, 2, 5)]


@pytest.mark.parametrize(("total", "shards", "chunk_elems"), PLANS)
def test_plan_is_balanced_contiguous_and_exact(total, shards, chunk_elems):
    plan = sharding.plan(total, shards, chunk_elems)
    assert len(plan) == shards
    sizes = [sum(c.numel for c in chunks) for chunks in plan]
    assert max(sizes) - min(sizes) <= 1  # balanced within one element
    flat = [c for chunks in plan for c in chunks]
    assert [c.key for c in flat] == list(range(len(flat)))
    assert all(0 < c.numel <= chunk_elems for c in flat)
    # contiguous, in order, covering [0, total) exactly once
    assert [0, *(c.stop for c in flat)] == [*(c.start for c in flat), total]
    for chunks in plan:  # each shard's chunks are one contiguous range
        assert all(a.stop == b.start for a, b in zip(chunks, chunks[1:]))


def test_plan_needs_a_shard():
    with pytest.raises(ValueError):
        sharding.plan(10, 0, 4)


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))  # 8192 + 128 + 1280 + 10


@pytest.mark.parametrize("shards", [2, 3])
def test_a_tensor_larger_than_a_chunk_is_split_across_shards(shards):
    layout = sharding.Layout.of(_mlp())
    big = layout.entries[0]
    assert (big.name, big.shape, big.offset, big.numel, layout.total) == ("0.weight", (128, 64), 0, 8192, 9610)
    plan = sharding.plan(layout.total, shards, 1024)
    holders = {s for s, chunks in enumerate(plan) for c in chunks if c.start < big.numel and c.stop > big.offset}
    assert len(holders) > 1
    pieces = [min(c.stop, big.numel) - c.start for chunks in plan for c in chunks if c.start < big.numel]
    assert sum(pieces) == big.numel
    assert max(pieces) <= 1024


# -- sharding.flatten_ ------------------------------------------------------------


def test_flatten_makes_parameters_and_grads_views_of_two_buffers():
    model = _mlp()
    ref = copy.deepcopy(model)
    layout = sharding.Layout.of(model)
    params, grads = sharding.flatten_(model, layout)
    assert params.shape == grads.shape == (layout.total,)
    for e, p, r in zip(layout.entries, model.parameters(), ref.parameters()):
        assert p.data_ptr() == params[e.offset:].data_ptr() and p.shape == e.shape
        assert p.grad.data_ptr() == grads[e.offset:].data_ptr()
        assert torch.equal(p.detach(), r.detach())
    assert all(torch.equal(v, ref.state_dict()[k]) for k, v in sharding.unflatten(params, layout).items())
    params.add_(1.0)  # a write to the flat buffer is a write to the model
    assert torch.equal(model[0].bias.detach(), ref[0].bias.detach() + 1.0)


def test_backward_writes_the_flat_grad_buffer():
    model = _mlp()
    ref = copy.deepcopy(model)
    layout = sharding.Layout.of(model)
    _, grads = sharding.flatten_(model, layout)
    x, y = torch.randn(16, 64, generator=torch.Generator().manual_seed(1)), torch.arange(16) % 10
    for m in (model, ref):
        nn.functional.cross_entropy(m(x), y).backward()
    expected = torch.cat([r.grad.reshape(-1) for r in ref.parameters()])
    torch.testing.assert_close(grads, expected, rtol=0, atol=0)
    assert all(p.grad.data_ptr() == grads[e.offset:].data_ptr() for e, p in zip(layout.entries, model.parameters()))


# -- consistency rules ------------------------------------------------------------


@pytest.mark.parametrize(("worker", "clock", "round_", "pending", "verdict"), [
    (0, 3, 3, set(), QUEUE),
    (0, 3, 3, {1}, QUEUE),
    (0, 3, 3, {0}, DUPLICATE),
    (0, 2, 3, set(), STALE),  # a round already applied
    (0, 4, 3, set(), STALE),  # a round not yet open
])
def test_bsp_on_push(worker, clock, round_, pending, verdict):
    assert Bsp().on_push(worker, clock, round_, pending) == verdict


@pytest.mark.parametrize(("live", "pending", "ready"), [
    ({0, 1}, set(), False),
    ({0, 1}, {0}, False),
    ({0, 1}, {0, 1}, True),
    ({0}, {0, 1}, True),  # a gradient from a worker that has since left still counts
    (set(), set(), False),  # nothing to apply
    (set(), {0}, True),  # everyone left: the round must not hang
])
def test_bsp_round_ready(live, pending, ready):
    assert Bsp().round_ready(live, pending) is ready


@pytest.mark.parametrize(("worker", "pending", "ready"), [(0, set(), True), (0, {1}, True), (0, {0}, False)])
def test_bsp_pull_waits_only_for_its_own_round(worker, pending, ready):
    assert Bsp().pull_ready(worker, 5, {0: 5, 1: 2}, pending) is ready


@pytest.mark.parametrize("policy", [Asp(), Ssp(0), Ssp(3)], ids=lambda p: f"{p.name}")
def test_asp_and_ssp_apply_every_push_on_arrival(policy):
    assert policy.on_push(0, 7, 0, {0}) == APPLY
    assert policy.round_ready({0}, {0}) is False


@pytest.mark.parametrize(("clocks", "clock"), [({}, 0), ({0: 0, 1: 100}, 100), ({}, 10**9)])
def test_asp_pulls_never_wait(clocks, clock):
    assert Asp().pull_ready(0, clock, clocks, set()) is True


@pytest.mark.parametrize(("s", "clock", "clocks", "ready"), [
    (0, 0, {0: 0, 1: 0}, True),
    (0, 1, {0: 1, 1: 0}, False),
    (1, 1, {0: 1, 1: 0}, True),
    (1, 2, {0: 2, 1: 0}, False),
    (1, 2, {0: 2, 1: 1}, True),
    (3, 5, {0: 5, 1: 3, 2: 2}, True),
    (3, 6, {0: 6, 1: 3, 2: 2}, False),
    (0, 10**6, {}, True),  # no live worker: nothing to wait for
])
def test_ssp_pull_ready(s, clock, clocks, ready):
    assert Ssp(s).pull_ready(0, clock, clocks, set()) is ready


@pytest.mark.parametrize(("text", "kind", "staleness"), [("bsp", Bsp, None), ("asp", Asp, None), ("ssp:0", Ssp, 0),
                                                         ("SSP:4", Ssp, 4)])
def test_policy_by_name(text, kind, staleness):
    p = consistency.policy(Consistency.parse(text))
    assert type(p) is kind
    assert getattr(p, "staleness", None) == staleness


@pytest.mark.parametrize("text", ["ssp", "ssp:-1", "ssp:x", "bulk", ""])
def test_bad_consistency_names_are_config_errors(text):
    with pytest.raises(ConfigError, match="unknown consistency"):
        Consistency.parse(text)


def test_mean_is_the_coordinate_mean():
    grads = [torch.tensor([1.0, 2.0]), torch.tensor([3.0, -2.0]), torch.tensor([5.0, 3.0])]
    kept = [g.clone() for g in grads]
    assert torch.equal(consistency.mean(grads), torch.tensor([3.0, 1.0]))
    assert all(torch.equal(a, b) for a, b in zip(grads, kept))  # inputs untouched


# -- ShardCore ---------------------------------------------------------------------

LR = 0.5  # plain SGD, no momentum: an update is exactly param - LR * aggregate
INIT = torch.arange(6, dtype=torch.float32)  # the shard holds [0, 6) in chunks [0, 4) and [4, 6)


def make_core(mode: str) -> ShardCore:
    run = RunConfig(consistency=Consistency.parse(mode), optimizer=OptimizerConfig("sgd", lr=LR, momentum=0.0))
    return ShardCore(0, sharding.plan(6, 1, 4)[0], INIT, run)


def push(core: ShardCore, worker: int, clock: int, grad: torch.Tensor, seq: int | None = None, incarnation: int = 0):
    seq = 100 * clock + worker + 1 if seq is None else seq  # unique per (worker, clock), rising with clock
    header = protocol.Push(v=VERSION, seq=seq, worker_id=worker, incarnation=incarnation, clock=clock,
                           base_version=core.version, tensors=[])
    return core.push(header, core.split(grad.clone()))


def pull_ready(core: ShardCore, worker: int, clock: int, observer: bool = False) -> bool:
    return core.pull_ready(protocol.Pull(v=VERSION, seq=1, worker_id=worker, clock=clock, observer=observer))


def state(core: ShardCore) -> tuple:
    return (core.weights.param.detach().clone(), core.version, core.updates, core.pushes, dict(core.clocks),
            {w: torch.cat(g) for w, g in core.pending.items()})


def assert_same_state(a: tuple, b: tuple) -> None:
    assert torch.equal(a[0], b[0]) and a[1:5] == b[1:5]
    assert a[5].keys() == b[5].keys() and all(torch.equal(a[5][w], b[5][w]) for w in a[5])


G0 = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
G1 = torch.tensor([3.0, 0.0, -1.0, 2.0, 1.0, -6.0])
TWO = {0: (0, 0), 1: (0, 0)}


@pytest.mark.parametrize("order", [(0, 1), (1, 0)])
def test_bsp_round_closes_when_both_pushed_with_the_mean(order):
    core = make_core("bsp")
    core.set_live(TWO)
    first, second = order
    out = push(core, first, 0, (G0, G1)[first])
    assert (out.version, out.applied) == (0, False)
    assert torch.equal(core.weights.param.detach(), INIT) and core.waiting_for() == [second]
    assert not pull_ready(core, first, 1) and pull_ready(core, second, 0)
    out = push(core, second, 0, (G0, G1)[second])
    assert (out.version, out.applied) == (1, True)
    assert torch.equal(core.weights.param.detach(), INIT - LR * (G0 + G1) / 2)
    assert pull_ready(core, first, 1) and core.waiting_for() == [] and core.clocks == {0: 1, 1: 1}


@pytest.mark.parametrize("clock", [0, 2])
def test_bsp_push_for_another_round_is_stale_and_changes_nothing(clock):
    core = make_core("bsp")
    core.set_live(TWO)
    push(core, 0, 0, G0)
    push(core, 1, 0, G1)  # round 0 applied, round 1 open
    push(core, 1, 1, G1)
    before = state(core)
    with pytest.raises(ProtocolError, match="pull again") as e:
        push(core, 0, clock, G0, seq=1000)
    assert e.value.code == ErrorCode.STALE
    assert_same_state(state(core), before)


def test_bsp_retried_push_is_counted_once():
    core = make_core("bsp")
    core.set_live(TWO)
    push(core, 0, 0, G0, seq=5)
    push(core, 0, 0, G0 * 100, seq=5)  # a retry of the same message
    push(core, 1, 0, G1)
    assert torch.equal(core.weights.param.detach(), INIT - LR * (G0 + G1) / 2)
    push(core, 0, 0, G0, seq=5)  # a late retry after the round closed: acknowledged, not stale
    assert core.version == 1


def test_bsp_retry_of_a_queued_push_reports_not_applied():
    core = make_core("bsp")
    core.set_live(TWO)
    assert push(core, 0, 0, G0, seq=5).applied is False
    assert push(core, 0, 0, G0, seq=5).applied is False


@pytest.mark.parametrize("live", [{0: (0, 0)}, {}], ids=["one left", "none left"])
def test_bsp_membership_shrink_closes_a_waiting_round(live):
    core = make_core("bsp")
    core.set_live(TWO)
    push(core, 0, 0, G0)
    assert core.version == 0
    core.set_live(live)
    assert core.version == 1 and not core.pending
    assert torch.equal(core.weights.param.detach(), INIT - LR * G0)
    assert set(core.clocks) == set(live)


def test_push_from_a_non_member_changes_nothing():
    core = make_core("asp")
    core.set_live({0: (1, 0)})
    before = state(core)
    for worker, incarnation in [(1, 0), (0, 0), (0, 2)]:
        with pytest.raises(ProtocolError, match="rejoin") as e:
            push(core, worker, 0, G0, incarnation=incarnation)
        assert e.value.code == ErrorCode.NOT_MEMBER
    assert_same_state(state(core), before)


def test_asp_applies_each_push_once():
    core = make_core("asp")
    core.set_live(TWO)
    assert push(core, 0, 0, G0, seq=7).applied
    assert push(core, 0, 0, G0, seq=7).applied  # a retry: acknowledged
    assert push(core, 1, 5, G1).version == 2
    assert torch.equal(core.weights.param.detach(), INIT - LR * G0 - LR * G1)


@pytest.mark.parametrize(("clock", "ready"), [(0, True), (1, True), (2, True), (3, False), (7, False)])
def test_ssp1_pull_waits_for_the_slowest_live_worker(clock, ready):
    core = make_core("ssp:1")
    core.set_live({0: (0, 0), 1: (0, 1)})
    push(core, 0, 0, G0)
    push(core, 0, 1, G0)  # worker 0 at clock 2, worker 1 at clock 1 (started there)
    assert core.clocks == {0: 2, 1: 1} and core.version == 2
    assert pull_ready(core, 0, clock) is ready
    assert pull_ready(core, 0, clock, observer=True)


def test_ssp_slow_worker_leaving_releases_the_pull():
    core = make_core("ssp:1")
    core.set_live(TWO)
    for c in range(3):
        push(core, 0, c, G0)
    assert not pull_ready(core, 0, 3)
    push(core, 1, 0, G1)
    assert not pull_ready(core, 0, 3)
    core.set_live({0: (0, 0)})  # the straggler is dropped: worker 0 only waits on itself
    assert pull_ready(core, 0, 3)


def test_decode_push_assembles_the_flat_gradient():
    core = make_core("asp")
    metas = [protocol.TensorMeta(key=1, dtype="float16", shape=[2], codec="fp16"),
             protocol.TensorMeta(key=0, dtype="float32", shape=[4])]
    bufs = [memoryview(G0[4:].numpy().astype(np.float16)).cast("B"), memoryview(G0[:4].numpy()).cast("B")]
    header = protocol.Push(v=VERSION, seq=1, worker_id=0, incarnation=0, clock=0, base_version=0, tensors=metas)
    assert torch.equal(torch.cat(core.decode_push(header, bufs)), G0)




def bsp_core(min_workers: int, now: list[float], mode: str = "bsp") -> ShardCore:
    """A core (bsp unless `mode` says) with --min-workers and a 60 s wait, on the clock now[0]."""
    run = RunConfig(consistency=Consistency.parse(mode), optimizer=OptimizerConfig("sgd", lr=LR, momentum=0.0),
                    min_workers=min_workers)
    return ShardCore(0, sharding.plan(6, 1, 4)[0], INIT, run, min_workers_wait=60.0, clock=lambda: now[0])


def test_min_workers_holds_back_only_the_start_of_a_run():
    now = [0.0]
    core = bsp_core(2, now)
    core.set_live({0: (0, 0)})
    assert push(core, 0, 0, G0).applied is False  # alone at the start: the round waits for a second worker
    now[0] = 30.0
    assert not core.tick() and core.version == 0
    core.set_live(TWO)  # the second worker joins and pushes: the round closes with both
    assert push(core, 1, 0, G1).applied and core.version == 1
    core.set_live({0: (0, 0)})  # worker 1 finished and left: the run goes on without waiting for it
    assert push(core, 0, 1, G0).applied and core.version == 2


def test_min_workers_waits_at_most_its_deadline():
    now = [0.0]
    core = bsp_core(3, now)
    core.set_live({0: (0, 0)})
    push(core, 0, 0, G0)
    now[0] = 59.0
    assert not core.tick()
    now[0] = 61.0
    assert core.tick() and core.version == 1  # closed short after the wait
    assert push(core, 0, 1, G0).applied  # and the next rounds do not wait again


@pytest.mark.parametrize("mode", ["asp", "ssp:2"])
def test_min_workers_holds_asp_and_ssp_pulls_until_that_many_are_live(mode):
    now = [0.0]
    core = bsp_core(2, now, mode)
    core.set_live({0: (0, 0)})
    assert not pull_ready(core, 0, 0)  # alone: no weights yet, so it cannot start training alone
    assert pull_ready(core, 0, 0, observer=True)  # an observer reads them all the same
    now[0] = 30.0
    assert not core.tick() and not pull_ready(core, 0, 0)
    core.set_live(TWO)
    assert pull_ready(core, 0, 0) and pull_ready(core, 1, 0)
    core.set_live({1: (0, 0)})  # worker 0 finished and left: the other goes on
    assert pull_ready(core, 1, 0)


def test_min_workers_holds_asp_pulls_at_most_its_deadline():
    now = [0.0]
    core = bsp_core(3, now, "asp")
    core.set_live({0: (0, 0)})
    assert not pull_ready(core, 0, 0)
    now[0] = 59.0
    assert not core.tick() and not pull_ready(core, 0, 0)
    now[0] = 61.0
    assert core.tick()  # the held pulls may go: the server serves them on this turn
    assert pull_ready(core, 0, 0)


def test_asp_without_min_workers_serves_the_first_pull_at_once():
    core = make_core("asp")
    core.set_live({0: (0, 0)})
    assert pull_ready(core, 0, 0) and not core.tick()

class Tracker:
    """Stands in for a zmq MessageTracker: `done` once the frame has left."""

    def __init__(self):
        self.done = False


def test_weights_in_flight_are_never_changed_under_a_pull():
    core = make_core("asp")
    core.set_live({0: (0, 0)})
    _, frames = core.weights.snapshot()
    sent = [f.copy() for f in frames]
    tracker = Tracker()
    core.weights.pin([tracker])  # the pull's frames point into the weights and have not left yet
    push(core, 0, 0, G0)
    assert all(np.array_equal(f, s) for f, s in zip(frames, sent))  # the frames still read version 0
    assert torch.equal(core.weights.param, INIT - LR * G0)  # the update went to a copy
    tracker.done = True
    moved_to = core.weights.param.data_ptr()
    push(core, 0, 1, G1)  # nothing in flight: updated in place, no copy
    assert core.weights.param.data_ptr() == moved_to and torch.equal(core.weights.param, INIT - LR * (G0 + G1))


def test_a_checkpoint_keeps_optimizer_state_across_chunks(tmp_path):
    from paramserver import checkpoint

    run = RunConfig(consistency=Consistency("asp"), optimizer=OptimizerConfig("adam", lr=0.1))
    chunks = sharding.plan(10, 1, 4)[0]  # three chunks: three optimizer parameters
    a = ShardCore(0, chunks, torch.linspace(-1, 1, 10), run)
    a.set_live({0: (0, 0)})
    grads = [torch.linspace(0, 1, 10) * k for k in (1.0, -2.0, 0.5)]
    for clock, g in enumerate(grads[:2]):
        push(a, 0, clock, g)
    path = str(tmp_path / "shard-0.safetensors")
    checkpoint.save_shard(path, a.weights.param, a.weights.optimizer, a.meta())
    b = ShardCore(0, chunks, torch.zeros(10), run)
    b.restore(*checkpoint.load_shard(path))
    b.set_live({0: (0, 0)})
    push(a, 0, 2, grads[2])
    push(b, 0, 2, grads[2])  # same moments and step count: the same next update, bit for bit
    assert torch.equal(a.weights.param, b.weights.param)


# a shard of 10,000 weights in chunks of 1024, answered in parts of 2 chunks: 5 parts
STEPPED = [OptimizerConfig("sgd", lr=0.1, momentum=0.9), OptimizerConfig("adam", lr=0.01),
           OptimizerConfig("adamw", lr=0.01, weight_decay=0.1), OptimizerConfig("adagrad", lr=0.1)]


def _weights(cfg: OptimizerConfig):
    from paramserver.weights import Weights

    chunks = sharding.plan(10_000, 1, 1024)[0]
    return Weights(chunks, torch.linspace(-1, 1, 10_000), cfg, part_bytes=8192)


@pytest.mark.parametrize("cfg", STEPPED, ids=lambda c: c.name)
def test_a_step_run_part_by_part_is_the_same_step_as_torch_optim_on_the_whole(cfg):
    weights = _weights(cfg)
    assert len(weights.parts("none")) == 5
    whole = torch.nn.Parameter(torch.linspace(-1, 1, 10_000))
    ref = optim.make([whole], cfg)
    gen = torch.Generator().manual_seed(0)
    for k in range(4):
        g = torch.randn(10_000, generator=gen)
        weights.step(weights.slices(g.clone()))
        for parts in (1, 3)[: k % 3]:  # as answers ask for them: some parts now, the rest on reading
            weights.settle(parts)
        whole.grad = g
        ref.step()
        torch.testing.assert_close(weights.param, whole.detach(), rtol=0, atol=0)


def test_a_started_step_runs_each_part_once_and_reports_once():
    weights = _weights(OptimizerConfig("sgd", lr=1.0))
    done = []
    g = torch.ones(10_000)
    weights.step(weights.slices(g), done.append)
    flat = weights.snapshot()[1]  # views of the weights' memory, one per chunk
    init = [f.copy() for f in flat]
    weights.settle(2)
    stepped = [not np.array_equal(f, i) for f, i in zip(flat, init)]
    before = np.concatenate(flat).copy()
    assert not done
    weights.settle(2)  # asked again: nothing more runs
    assert np.array_equal(np.concatenate(flat), before)
    weights.settle()
    assert len(done) == 1 and done[0] >= 0
    assert torch.equal(weights.param, torch.linspace(-1, 1, 10_000) - 1)
    assert stepped == [True] * 4 + [False] * 6  # parts 0 and 1, of 2 chunks each, and no more


def test_asking_for_fewer_parts_than_have_run_runs_none_again():
    # a second answer's first part, after a first answer stopped part way (a dropped reply)
    weights = _weights(OptimizerConfig("sgd", lr=1.0))
    weights.step(weights.slices(torch.ones(10_000)))
    weights.settle(3)
    weights.settle(1)
    assert torch.equal(weights.param, torch.linspace(-1, 1, 10_000) - 1)


def test_reading_the_weights_from_another_thread_runs_the_started_step_once():
    import threading

    weights = _weights(OptimizerConfig("sgd", lr=1.0))
    done = []
    weights.step(weights.slices(torch.ones(10_000)), done.append)
    seen = []
    readers = [threading.Thread(target=lambda: seen.append(weights.param.clone())) for _ in range(4)]
    for t in readers:
        t.start()
    weights.settle()
    for t in readers:
        t.join(10)
    expected = torch.linspace(-1, 1, 10_000) - 1
    assert len(seen) == 4 and all(torch.equal(s, expected) for s in seen) and len(done) == 1


# -- membership.Members -----------------------------------------------------------


def heartbeat(worker: int, incarnation: int, clock: int = 0) -> protocol.Heartbeat:
    return protocol.Heartbeat(v=VERSION, seq=1, worker_id=worker, incarnation=incarnation, clock=clock)


def test_join_assigns_fresh_ids():
    m = Members(heartbeat_timeout=2.0, partitions=2)
    joined = [m.join(-1, "h", 1, now=0.0) for _ in range(3)]
    assert [(j.worker_id, j.incarnation, j.partition) for j in joined] == [(0, 0, 0), (1, 0, 1), (2, 0, 0)]
    # a worker asking for its old id gets it (it may have joined a server since restarted
    # from a checkpoint that predates it), and fresh ids never collide with it
    assert m.join(17, "h", 1, now=0.0).worker_id == 17
    assert m.join(-1, "h", 1, now=0.0).worker_id == 18
    assert set(m.table()) == {0, 1, 2, 17, 18}


@pytest.mark.parametrize("gone", ["left", "expired", "still live"])
def test_rejoin_keeps_the_id_and_bumps_the_incarnation(gone):
    m = Members(heartbeat_timeout=2.0, partitions=0)
    m.join(-1, "a", 1, now=0.0)
    old = m.join(-1, "b", 2, now=0.0)
    m.heartbeat(heartbeat(0, 0), now=5.0)
    if gone == "left":
        assert m.leave(1, 0)
    elif gone == "expired":
        assert [d.worker_id for d in m.expire(now=5.0)] == [1]
    again = m.join(old.worker_id, "b", 3, now=6.0)
    assert (again.worker_id, again.incarnation) == (1, 1)
    assert m.table()[1][0] == 1
    assert not m.heartbeat(heartbeat(1, 0), now=6.5) and m.heartbeat(heartbeat(1, 1), now=6.5)


@pytest.mark.parametrize(("worker", "incarnation", "ok"), [(0, 0, False), (0, 1, True), (0, 2, False), (9, 0, False)])
def test_heartbeat_with_a_wrong_incarnation_is_refused(worker, incarnation, ok):
    m = Members(heartbeat_timeout=2.0, partitions=0)
    m.join(-1, "a", 1, now=0.0)
    m.join(0, "a", 2, now=0.0)  # incarnation 1
    assert m.heartbeat(heartbeat(worker, incarnation, clock=4), now=1.0) is ok
    assert m.live[0].clock == (4 if ok else 0) and m.live[0].last_seen == (1.0 if ok else 0.0)


@pytest.mark.parametrize(("now", "dropped"), [(1.75, []), (2.0, []), (2.25, [1]), (3.5, [1]), (3.75, [0, 1])])
def test_expire_drops_silent_members_after_the_timeout(now, dropped):
    m = Members(heartbeat_timeout=2.0, partitions=0)
    m.join(-1, "a", 1, now=0.0)
    m.join(-1, "b", 2, now=0.0)
    m.heartbeat(heartbeat(0, 0), now=1.5)
    version = m.version
    assert sorted(d.worker_id for d in m.expire(now)) == dropped
    assert sorted(m.live) == sorted({0, 1} - set(dropped))
    assert m.version == version + bool(dropped)


def test_a_joiner_starts_at_the_slowest_live_clock():
    m = Members(heartbeat_timeout=2.0, partitions=0)
    assert m.join(-1, "a", 1, now=0.0).clock == 0
    m.join(-1, "b", 2, now=0.0)
    m.join(-1, "c", 3, now=0.0)
    for worker, clock in [(0, 9), (1, 4), (2, 7)]:
        m.heartbeat(heartbeat(worker, 0, clock), now=1.0)
    assert m.join(-1, "d", 4, now=1.0).clock == 4
    m.heartbeat(heartbeat(3, 0, 8), now=1.0)
    m.leave(1, 0)  # the slowest leaves: only live clocks count
    assert m.join(-1, "e", 5, now=1.0).clock == 7
    for w in (0, 2, 3, 4):
        m.leave(w, 0)
    assert m.join(-1, "f", 6, now=1.0).clock == 0  # nobody live


# -- codecs -------------------------------------------------------------------------


def roundtrip(name: str, chunk: torch.Tensor) -> np.ndarray:
    dtype, shape, params, buf = codecs.get(name).encode(0, chunk)
    meta = protocol.TensorMeta(key=0, dtype=dtype, shape=shape, codec=name, params=params)
    msg = protocol.decode(protocol.encode(protocol.PullOk(v=VERSION, seq=1, version=0, tensors=[meta]), [buf]))
    return codecs.for_wire(name).decode(msg.header.tensors[0], msg.buffers[0], chunk.numel())


CHUNK = torch.randn(5000, generator=torch.Generator().manual_seed(0)) * 10.0


def test_none_codec_is_exact():
    assert np.array_equal(roundtrip("none", CHUNK), CHUNK.numpy())


def test_fp16_codec_is_within_fp16_rounding():
    out = roundtrip("fp16", CHUNK)
    assert out.dtype == np.float32
    assert np.array_equal(out, CHUNK.half().float().numpy())
    tiny = CHUNK.abs().numpy() < 2.0**-14  # below the fp16 normal range the error is absolute
    np.testing.assert_allclose(out[~tiny], CHUNK.numpy()[~tiny], rtol=2.0**-11, atol=0)
    np.testing.assert_allclose(out[tiny], CHUNK.numpy()[tiny], rtol=0, atol=2.0**-25)


def test_fp16_codec_keeps_a_large_finite_gradient_finite():
    assert np.isfinite(roundtrip("fp16", torch.tensor([1e5, -7e4, 1.0]))).all()


@pytest.mark.parametrize("name", ["none", "fp16"])
@pytest.mark.parametrize(("dtype", "shape"), [("int32", [4]), ("float32", [5]), ("float16", [2, 2]), ("float32", [])])
def test_codec_refuses_a_foreign_encoding(name, dtype, shape):
    meta = protocol.TensorMeta(key=0, dtype=dtype, shape=shape, codec=name)
    with pytest.raises(ProtocolError, match="expects") as e:
        codecs.for_wire(name).decode(meta, memoryview(b"\0" * meta.nbytes), 4)
    assert e.value.code == ErrorCode.BAD_TENSOR


def test_codec_names():
    assert set(codecs.CODECS) >= {"none", "fp16"}
    with pytest.raises(ConfigError, match="unknown codec"):
        codecs.get("zip")
    with pytest.raises(ProtocolError) as e:
        codecs.for_wire("zip")
    assert e.value.code == ErrorCode.BAD_TENSOR


# -- robust aggregation and clipping ------------------------------------------------


def test_median_and_trimmed_mean_ignore_one_scaled_worker():
    honest = [torch.full((4,), 1.0 + 0.01 * i) for i in range(4)]
    attacker = [torch.full((4,), -100.0)]
    grads = honest + attacker
    assert consistency.mean(grads)[0] < -15  # plain mean is dragged far off
    for name in ("median", "trimmed-mean:0.2"):
        out = consistency.aggregator(name)(grads)
        assert torch.all((out > 0.99) & (out < 1.04)), (name, out)


def test_trimmed_mean_with_nothing_to_trim_is_the_mean():
    grads = [torch.randn(6) for _ in range(3)]
    torch.testing.assert_close(consistency.aggregator("trimmed-mean:0.1")(grads), consistency.mean(grads))


@pytest.mark.parametrize("name", ["max", "trimmed-mean:0.5", "trimmed-mean:x", "median:1"])
def test_unknown_aggregates_are_refused(name):
    with pytest.raises(ConfigError):
        RunConfig(aggregate=name)


def test_clip_norm_scales_a_push_down_on_the_shard():
    run = RunConfig(consistency=Consistency("asp"), clip_norm=1.0)
    chunks = sharding.plan(8, 1, 1024)[0]
    core = ShardCore(0, chunks, torch.zeros(8), run)
    big = torch.full((8,), 10.0)
    metas = [protocol.TensorMeta(key=c.key, dtype="float32", shape=[c.numel]) for c in chunks]
    push = protocol.Push(v=protocol.VERSION, seq=1, worker_id=0, incarnation=0, clock=0, base_version=0, tensors=metas)
    grad = torch.cat(core.decode_push(push, [memoryview(big.numpy()).cast("B")]))
    assert torch.equal(big, torch.full((8,), 10.0))  # the received frame itself is left alone
    assert float(grad.norm()) == pytest.approx(1.0, rel=1e-5)


# -- server optimizers ---------------------------------------------------------------


@pytest.mark.parametrize("cfg", [OptimizerConfig("sgd", lr=0.1, momentum=0.9, weight_decay=1e-3),
                                 OptimizerConfig("adam", lr=0.01), OptimizerConfig("adamw", lr=0.01),
                                 OptimizerConfig("adagrad", lr=0.05)], ids=lambda c: c.name)
@pytest.mark.parametrize("tensors", [1, 3])
def test_the_shards_step_is_the_optimizers_own(cfg, tensors):
    # optim.stepper leaves out only torch's profiler wrapper: the same update, bit for bit
    init = [torch.randn(5, generator=torch.Generator().manual_seed(i)) for i in range(tensors)]
    a = [torch.nn.Parameter(t.clone()) for t in init]
    b = [torch.nn.Parameter(t.clone()) for t in init]
    opt_a, opt_b = optim.make(a, cfg), optim.make(b, cfg)
    step = optim.stepper(opt_b)
    for k in range(3):
        for pa, pb in zip(a, b):
            pa.grad = pb.grad = torch.full((5,), 0.1 * (k + 1))
        opt_a.step()
        step()
    for pa, pb in zip(a, b):
        assert torch.equal(pa, pb)
    for sa, sb in zip(opt_a.state_dict()["state"].values(), opt_b.state_dict()["state"].values()):
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("n", [1, 7, 33, 1024, 70_001])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf, 3e38, -1e20])
# weights.py ignores it; pytest puts its own filters around each test
@pytest.mark.filterwarnings("ignore:overflow encountered in dot:RuntimeWarning")
def test_finiteness_check_finds_nan_and_inf_anywhere_and_only_them(n, bad):
    from paramserver.weights import finite

    base = np.random.default_rng(n).standard_normal(n).astype(np.float32)
    assert finite(base)
    for pos in {0, n // 2, n - 1}:
        x = base.copy()
        x[pos] = bad
        # huge finite entries overflow the one-pass check's squares: still finite
        assert finite(x) == bool(np.isfinite(bad)), (n, pos)
