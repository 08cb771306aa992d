"""The parameter server's aggregation, the wire codec and the loops' cadence: pure logic, no Ray."""
import math

import numpy as np
import pytest
import torch

from reptile_dist.config import Config
from reptile_dist.engine.adapt_worker import worker_share
from reptile_dist.engine.aggregation import Aggregator, Push
from reptile_dist.engine.wire import DeltaCodec
from reptile_dist.reptile import DeltaSum, OuterOptimizer
from reptile_dist.training import Cadence


def ray_cfg(**overrides):
    base = dict(family="synthetic", backend="ray", workers=2, meta_batch_size=2, meta_iters=100,
                meta_step_size=1.0, meta_step_size_final=1.0)
    base.update(overrides)
    return Config(**base)


def delta_sum(delta, tasks=1, loss=0.5, moment=None, moment_steps=0.0):
    return DeltaSum(torch.tensor(delta, dtype=torch.float64), tasks, loss * tasks, 1.0 * tasks,
                    None if moment is None else torch.tensor(moment, dtype=torch.float64), moment_steps)


def push(worker, version, delta, tasks=1, **kw):
    return Push(worker, version, tasks, delta_sum(delta, tasks, **kw))


# --- sync -------------------------------------------------------------------------------------
def test_sync_applies_the_mean_of_the_steps_deltas_once_every_task_arrived():
    agg = Aggregator(ray_cfg(), np.zeros(2, dtype=np.float32))
    assert agg.push(push(0, 0, [2.0, 0.0])) is None  # half the meta-batch: no update yet
    assert agg.version == 0 and np.array_equal(agg.theta, [0, 0])
    row = agg.push(push(1, 0, [0.0, 4.0]))
    assert np.array_equal(agg.theta, [1.0, 2.0]) and agg.version == 1
    assert row["step"] == 1 and row["tasks"] == 2 and row["train_loss"] == pytest.approx(0.5)


def test_sync_ignores_a_push_for_another_version_and_a_second_push_from_one_worker():
    agg = Aggregator(ray_cfg(meta_batch_size=3, workers=3), np.zeros(1, dtype=np.float32))
    agg.push(push(0, 0, [1.0]))
    assert agg.push(push(0, 0, [1.0])) is None  # worker 0 again at this version
    assert agg.push(push(1, 5, [1.0])) is None  # a version that is not the current one
    assert agg.version == 0 and len(agg.messages) == 2 and "ignored" in agg.messages[0]


def test_on_worker_loss_skip_completes_the_step_with_the_deltas_that_arrived():
    agg = Aggregator(ray_cfg(), np.zeros(1, dtype=np.float32))
    agg.push(push(0, 0, [3.0]))
    row = agg.complete_step()  # what the driver calls when worker 1 died mid-step
    assert row["tasks"] == 1 and agg.version == 1 and agg.theta[0] == pytest.approx(3.0)  # mean of what arrived
    assert agg.push(push(1, 0, [100.0])) is None and agg.theta[0] == pytest.approx(3.0)  # the late one is ignored


def test_a_step_whose_every_delta_is_rejected_counts_towards_max_rejected_updates():
    agg = Aggregator(ray_cfg(), np.zeros(1, dtype=np.float32))
    for step in range(3):
        agg.push(push(0, step, [math.nan]))
        row = agg.push(Push(1, step, 1, None))  # the worker found its own sum non-finite
        assert row["tasks"] == 0 and "train_loss" not in row
    # both kinds are counted against their sender: the PS's own check and the worker's
    assert agg.counters.rejected_in_a_row == 3 and agg.counters.rejected_nonfinite == 6
    assert agg.counters.rejected_by_worker == {0: 3, 1: 3}
    assert agg.theta[0] == 0.0
    agg.push(push(0, 3, [1.0]))
    agg.push(push(1, 3, [1.0]))
    assert agg.counters.rejected_in_a_row == 0  # one applied step resets it


def test_a_non_finite_loss_is_rejected_even_with_a_finite_delta():
    agg = Aggregator(ray_cfg(), np.zeros(1, dtype=np.float32))
    agg.push(Push(0, 0, 1, delta_sum([1.0], loss=math.inf)))
    agg.push(push(1, 0, [1.0]))
    assert agg.counters.rejected_nonfinite == 1 and agg.theta[0] == pytest.approx(1.0)


# --- async ------------------------------------------------------------------------------------
def test_async_drops_deltas_staler_than_the_bound():
    agg = Aggregator(ray_cfg(mode="async", staleness_bound=1, meta_batch_size=1), np.zeros(1, dtype=np.float32))
    agg.push(push(0, 0, [1.0]))  # version 0 -> 1
    agg.push(push(1, 0, [1.0]))  # staleness 1: applied, version 2
    assert agg.push(push(0, 0, [1.0])) is None  # staleness 2 > bound
    assert agg.counters.dropped_stale == 1 and agg.counters.staleness == {0: 1, 1: 1}
    assert agg.theta[0] == pytest.approx(2.0)


@pytest.mark.parametrize("weighting, expected", [("none", 1.0 + 1.0), ("inverse", 1.0 + 0.5)])
def test_async_weights_a_stale_delta_by_its_staleness(weighting, expected):
    agg = Aggregator(ray_cfg(mode="async", staleness_weighting=weighting, meta_batch_size=1),
                     np.zeros(1, dtype=np.float32))
    agg.push(push(0, 0, [1.0]))
    agg.push(push(1, 0, [1.0]))  # staleness 1: weight 1 (none) or 1/(1+1) (inverse)
    assert agg.theta[0] == pytest.approx(expected)


def test_async_scales_a_push_by_its_share_of_the_meta_batch_and_counts_progress_in_tasks():
    agg = Aggregator(ray_cfg(mode="async", meta_batch_size=4), np.zeros(1, dtype=np.float32))
    row = agg.push(push(0, 0, [8.0], tasks=2))  # a sum over 2 tasks of a 4-task meta-batch
    assert agg.theta[0] == pytest.approx(8.0 / 4) and agg.progress == 0.5 and row["step"] == 0.5
    assert not agg.done


def test_async_rejections_in_a_row_are_counted_per_push():
    agg = Aggregator(ray_cfg(mode="async"), np.zeros(1, dtype=np.float32))
    for _ in range(4):
        assert agg.push(push(0, agg.version, [math.nan])) is None
    assert agg.counters.rejected_in_a_row == 4 and agg.version == 0


def test_restored_aggregator_continues_the_version_and_the_applied_tasks():
    cfg = ray_cfg(mode="async", meta_batch_size=2)
    agg = Aggregator(cfg, np.zeros(1, dtype=np.float32))
    agg.push(push(0, 0, [1.0]))
    state = agg.state()  # what a checkpoint holds
    restored = Aggregator(cfg, np.zeros(1, dtype=np.float32), state["outer"], state["version"], state["applied_tasks"])
    assert restored.version == agg.version and restored.progress == agg.progress
    assert np.array_equal(restored.theta, agg.theta)


def test_async_nesterov_restored_from_a_checkpoint_continues_exactly_with_its_momentum():
    cfg = ray_cfg(mode="async", meta_batch_size=2, outer_optimizer="nesterov", outer_momentum=0.9,
                  meta_step_size=0.7, meta_step_size_final=0.7)
    agg = Aggregator(cfg, np.zeros(2, dtype=np.float32))
    agg.push(push(0, 0, [1.0, -2.0]))
    agg.push(push(1, 0, [0.5, 1.0]))  # staleness 1
    state = agg.state()
    restored = Aggregator(cfg, np.zeros(2, dtype=np.float32), state["outer"], state["version"], state["applied_tasks"])
    fresh_momentum = Aggregator(cfg, agg.theta.copy(), None, state["version"], state["applied_tasks"])
    for a in (agg, restored, fresh_momentum):
        a.push(push(0, a.version, [1.0, 1.0]))
    assert np.array_equal(restored.theta, agg.theta)
    assert not np.allclose(fresh_momentum.theta, agg.theta)  # the momentum buffer is part of the state


# --- shares -----------------------------------------------------------------------------------
def test_sync_shares_cover_the_meta_batch_once_and_async_shares_follow_tasks_per_push():
    sync = ray_cfg(workers=3, meta_batch_size=5)
    assert sorted(i for w in range(3) for i in worker_share(sync, w)) == list(range(5))
    assert worker_share(ray_cfg(mode="async", workers=2, meta_batch_size=5), 1) == [5, 6, 7, 8, 9]  # a meta-batch each
    assert worker_share(ray_cfg(mode="async", workers=2, meta_batch_size=5, tasks_per_push=4), 1) == [4, 5, 6, 7]


def test_async_shares_of_a_version_adapted_again_are_new_tasks():
    """A worker can adapt from one version again (its push was dropped or rejected and no other
    worker pushed meanwhile). Each repeat draws tasks no worker drew from that version yet."""
    cfg = ray_cfg(mode="async", workers=3, meta_batch_size=5)
    seen = [i for repeat in range(3) for w in range(3) for i in worker_share(cfg, w, repeat)]
    assert len(seen) == len(set(seen)) == 3 * 3 * cfg.async_tasks_per_push == 45


# --- the wire ---------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype, tolerance", [("float64", 0.0), ("float32", 1e-7), ("bfloat16", 1e-2),
                                              ("float16", 1e-3)])
def test_the_codec_round_trips_a_carried_sum_in_every_wire_precision(dtype, tolerance):
    rng = np.random.default_rng(0)
    total = delta_sum(rng.normal(size=50), tasks=3, loss=0.25, moment=rng.random(50) + 0.1, moment_steps=15.0)
    codec = DeltaCodec(50, carried=True, dtype=dtype)
    wire = codec.encode(total)
    assert wire.vector.size == 100  # the estimates travel with the delta, in the same precision
    assert wire.vector.itemsize == {"float64": 8, "float32": 4, "bfloat16": 2, "float16": 2}[dtype]
    back = codec.decode(wire)
    assert back.tasks == 3 and back.loss_sum == 0.75 and back.accuracy_sum == 3.0 and back.moment_steps == 15.0
    assert torch.allclose(back.delta, total.delta, rtol=tolerance, atol=0)
    assert torch.allclose(back.moment_sum, total.moment_sum, rtol=tolerance, atol=0)
    if dtype == "float64":  # the default keeps sync runs bit-equal to the local trainer
        assert torch.equal(back.delta, total.delta)


def test_a_sum_without_estimates_sends_zeros_in_their_place_and_fresh_runs_send_none():
    empty = DeltaSum(torch.zeros(4, dtype=torch.float64), 0, 0.0, 0.0)
    assert DeltaCodec(4, carried=True).encode(empty).vector.size == 8
    fresh = DeltaCodec(4, carried=False)
    assert fresh.encode(delta_sum([1.0, 2.0, 3.0, 4.0])).vector.size == 4
    assert fresh.decode(fresh.encode(delta_sum([1.0, 2.0, 3.0, 4.0]))).moment_sum is None


# --- the outer update and the cadence ---------------------------------------------------------
def test_apply_sum_moves_theta_by_the_mean_and_averages_the_carried_estimates():
    outer = OuterOptimizer(torch.zeros(2), carry_inner_moment=True)
    outer.apply_sum(delta_sum([2.0, 4.0], tasks=2, moment=[2.0, 6.0], moment_steps=5.0), step_size=0.5)
    assert torch.equal(outer.theta, torch.tensor([0.5, 1.0]))
    assert torch.equal(outer.inner_moment.sq, torch.tensor([1.0, 3.0])) and outer.inner_moment.steps == 5.0


def test_the_cadence_marks_multiples_and_the_last_step_for_whole_and_fractional_progress():
    cadence = Cadence(meta_iters=10, log_every=4, eval_every=0, checkpoint_every=3)
    logged = [s for s in range(1, 11) if cadence.log(s - 1, s)]
    saved = [s for s in range(1, 11) if cadence.checkpoint(s - 1, s)]
    assert logged == [4, 8, 10] and saved == [3, 6, 9, 10]
    assert not any(cadence.evaluate(s - 1, s) for s in range(1, 11))  # eval_every 0: never
    assert cadence.log(3.6, 4.2) and not cadence.log(4.2, 4.8)  # async progress crosses 4 once
    assert Cadence(10, 4, 5, 0).evaluate(9.5, 10.0) and not Cadence(10, 4, 5, 0).checkpoint(5.0, 6.0)
