"""Batched adaptation (torch.func.vmap over tasks) against the per-task loop of reptile.py."""
import pytest
import torch

from conftest import tiny
from reptile_dist.reptile import adapt_tasks, adapt_tasks_batched
from reptile_dist.plugins import build_family
from reptile_dist.training import make_learner


@pytest.mark.parametrize("preset, overrides", [
    ("sine", dict(inner_optimizer="adam", inner_lr=0.01)),
    ("sine", dict(inner_optimizer="sgd", inner_replacement=True)),
    # The conv net with batch norm; SGD, because with Adam (beta1=0) the conv biases in front of
    # batch norm (true gradient 0) take rounding-noise-driven lr-sized steps in either version.
    ("synthetic", dict(inner_optimizer="sgd", inner_lr=0.1)),
])
def test_batched_adaptation_gives_the_loops_deltas(preset, overrides):
    cfg = tiny(preset, **overrides)
    family = build_family(cfg)
    learner = make_learner(cfg, family)
    theta = learner.initial_theta()
    loop = adapt_tasks(learner, family, theta, cfg, step=3, task_indices=range(5))
    batched = adapt_tasks(learner, family, theta, cfg.replace(batched_adaptation=True), step=3, task_indices=range(5))
    assert batched.tasks == loop.tasks == 5
    assert loop.delta.abs().max() > 1e-3  # it did adapt
    assert torch.allclose(batched.delta, loop.delta, atol=1e-6), (batched.delta - loop.delta).abs().max()
    assert batched.loss_sum == pytest.approx(loop.loss_sum, rel=1e-5)
    if family.kind == "classification":
        assert batched.accuracy_sum == pytest.approx(loop.accuracy_sum, abs=1e-5)


def test_batched_adaptation_of_no_tasks_is_an_empty_sum():
    cfg = tiny("sine")
    family = build_family(cfg)
    learner = make_learner(cfg, family)
    result = adapt_tasks_batched(learner, cfg, learner.initial_theta(), drawn=[])
    assert result.tasks == 0 and not result.delta.any()


def test_batched_adaptation_carries_the_moment_as_the_loop_does():
    from reptile_dist.reptile import InnerMoment

    cfg = tiny("sine", inner_optimizer="adam", inner_lr=0.01, inner_state="carried")
    family = build_family(cfg)
    learner = make_learner(cfg, family)
    theta = learner.initial_theta()
    start = InnerMoment(torch.rand(theta.numel(), generator=torch.Generator().manual_seed(1)) * 1e-2, 40.0)
    loop = adapt_tasks(learner, family, theta, cfg, step=3, task_indices=range(5), moment=start)
    batched = adapt_tasks(learner, family, theta, cfg.replace(batched_adaptation=True), step=3,
                          task_indices=range(5), moment=start)
    assert torch.allclose(batched.delta, loop.delta, atol=1e-6), (batched.delta - loop.delta).abs().max()
    assert batched.mean_moment().steps == loop.mean_moment().steps == 40 + cfg.inner_steps
    assert torch.allclose(batched.mean_moment().sq, loop.mean_moment().sq, rtol=1e-5, atol=1e-12)
