import numpy as np
import pytest
import torch
from torch import nn

from reptile_dist.config import Config
from reptile_dist.reptile import Learner, OuterOptimizer, adapt_tasks, mini_batches
from reptile_dist.tasks.base import Task


class Point(nn.Module):
    """The model is the point theta itself: output theta for every input."""

    def __init__(self, d):
        super().__init__()
        self.theta = nn.Parameter(torch.zeros(d))

    def forward(self, x):
        return self.theta.expand(len(x), -1)


class QuadraticTasks:
    """Task i: minimise mean((theta - c_i)^2); c_i drawn from the task's generator."""

    kind = "regression"

    def __init__(self, d):
        self.d = d

    def train_task(self, rng):
        c = torch.tensor(rng.normal(size=self.d), dtype=torch.float32)
        return Task(torch.zeros(4, 1), c.expand(4, -1).clone(), torch.zeros(0, 1), torch.zeros(0, self.d))


def test_reptile_update_matches_the_closed_form_on_quadratics():
    d, alpha, k, eps = 3, 0.1, 4, 0.7
    cfg = Config(family="sine", inner_optimizer="sgd", inner_lr=alpha, inner_steps=k, inner_batch_size=4,
                 meta_batch_size=5, seed=3)
    family = QuadraticTasks(d)
    learner = Learner(Point(d), "regression", "sgd", alpha)
    theta = torch.tensor([1.0, -2.0, 0.5])
    result = adapt_tasks(learner, family, theta, cfg, step=0, task_indices=range(5))
    outer = OuterOptimizer(theta, "sgd")
    new = outer.apply((result.delta / result.tasks).float(), eps)
    # SGD on mean((theta - c)^2) contracts theta - c by (1 - 2 alpha / d) per step, so
    # theta_i = c_i + r (theta - c_i) with r = (1 - 2 alpha / d)^k and
    # theta' = theta + eps (1 - r) (mean_i c_i - theta).
    from reptile_dist.tasks.base import TRAIN_STREAM, task_rng

    centres = torch.stack([family.train_task(task_rng(cfg.seed, TRAIN_STREAM, 0, i)).support_y[0] for i in range(5)])
    r = (1 - 2 * alpha / d) ** k
    expected = theta + eps * (1 - r) * (centres.mean(0) - theta)
    assert torch.allclose(new, expected, atol=1e-6)


def test_adapt_leaves_theta_untouched_and_starts_the_optimizer_fresh():
    learner = Learner(Point(2), "regression", "adam", 0.1)
    theta = torch.tensor([0.0, 0.0])
    x, y = torch.zeros(4, 1), torch.ones(4, 2)
    a = learner.adapt(theta, x, y, 3, 2, False, np.random.default_rng(0)).delta
    b = learner.adapt(theta, x, y, 3, 2, False, np.random.default_rng(0)).delta
    assert torch.equal(theta, torch.zeros(2))
    assert torch.equal(a, b)  # no Adam moments carried over from the first task
    # Adam with beta1 = 0: the first step moves each coordinate by exactly lr (g / |g|).
    first = learner.adapt(theta, x, y, 1, 2, False, np.random.default_rng(0)).delta
    assert torch.allclose(first, torch.full((2,), 0.1), atol=1e-6)
    assert bool((a > first).all()) and bool((a < 0.3 + 1e-6).all())


def test_mini_batches_without_replacement_cover_the_set_each_pass():
    rng = np.random.default_rng(0)
    batches = list(mini_batches(10, 5, 4, False, rng))
    assert len(batches) == 4 and all(len(b) == 5 for b in batches)
    assert sorted(np.concatenate(batches[:2])) == list(range(10))
    assert sorted(np.concatenate(batches[2:])) == list(range(10))


def test_mini_batches_run_across_passes_like_the_reference():
    batches = list(mini_batches(5, 3, 5, False, np.random.default_rng(1)))
    flat = np.concatenate(batches)
    for start in range(0, 15, 5):
        assert sorted(flat[start:start + 5]) == list(range(5))


def test_outer_adam_moves_along_the_mean_delta():
    outer = OuterOptimizer(torch.zeros(3), "adam")
    outer.apply(torch.tensor([1.0, -1.0, 0.0]), 0.1)
    assert torch.allclose(outer.theta, torch.tensor([0.1, -0.1, 0.0]), atol=1e-6)
    state = outer.state_dict()
    other = OuterOptimizer(torch.zeros(3), "adam")
    other.load_state_dict(state)
    a = outer.apply(torch.tensor([1.0, 1.0, 1.0]), 0.1).clone()
    b = other.apply(torch.tensor([1.0, 1.0, 1.0]), 0.1)
    assert torch.equal(a, b)


def test_task_seeding_is_independent_of_order():
    from reptile_dist.tasks.sine import SineFamily
    from reptile_dist.tasks.base import TRAIN_STREAM, task_rng

    fam = SineFamily(10, 5, 5)
    forward = [fam.train_task(task_rng(0, TRAIN_STREAM, 7, i)).support_y for i in range(3)]
    backward = [fam.train_task(task_rng(0, TRAIN_STREAM, 7, i)).support_y for i in reversed(range(3))][::-1]
    assert all(torch.equal(a, b) for a, b in zip(forward, backward))
    assert not torch.equal(forward[0], forward[1])
