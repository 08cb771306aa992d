import numpy as np
import pytest
import torch
from torch import nn

from reptile_dist.config import Config
from reptile_dist.reptile import InnerMoment, Learner, OuterOptimizer, adapt_tasks, draw_tasks, mini_batches
from reptile_dist.tasks.base import TRAIN_STREAM, Task, task_rng


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


def test_outer_nesterov_is_diloco_s_step_on_the_pseudo_gradient():
    outer = OuterOptimizer(torch.zeros(2), "nesterov", momentum=0.9)
    d1, d2 = torch.tensor([1.0, -2.0]), torch.tensor([0.5, 0.5])
    outer.apply(d1, 0.7)  # g = -d; buf = g; theta -= lr (g + mu buf)
    assert torch.allclose(outer.theta, 0.7 * (d1 + 0.9 * d1))
    expected = outer.theta.clone()
    buf = 0.9 * -d1 + -d2
    expected -= 0.7 * (-d2 + 0.9 * buf)
    state = outer.state_dict()
    other = OuterOptimizer(torch.zeros(2), "nesterov", momentum=0.9)
    other.load_state_dict(state)
    assert torch.allclose(outer.apply(d2, 0.7), expected)
    assert torch.equal(other.apply(d2, 0.7), outer.theta)  # the momentum travels in the state


def test_task_seeding_is_independent_of_order():
    from reptile_dist.tasks.sine import SineFamily
    from reptile_dist.tasks.base import TRAIN_STREAM, task_rng

    fam = SineFamily(10, 5, 5)
    forward = [fam.train_task(task_rng(0, TRAIN_STREAM, 7, i)).support_y for i in range(3)]
    backward = [fam.train_task(task_rng(0, TRAIN_STREAM, 7, i)).support_y for i in reversed(range(3))][::-1]
    assert all(torch.equal(a, b) for a, b in zip(forward, backward))
    assert not torch.equal(forward[0], forward[1])


def test_carried_moment_with_one_task_per_step_is_one_adam_through_every_task():
    """meta_batch_size 1 and step size 1: theta becomes theta_i and the carried estimate the task's own,
    so training is one Adam (beta1 = 0) run through every task's mini-batches in order: the
    reference's long-lived optimizer, bias correction included."""
    d, lr, k, steps = 3, 0.05, 4, 6
    cfg = Config(family="sine", inner_optimizer="adam", inner_state="carried", inner_lr=lr, inner_steps=k,
                 inner_batch_size=2, meta_batch_size=1, meta_step_size=1.0, meta_step_size_final=1.0, seed=5)
    family = QuadraticTasks(d)
    learner = Learner(Point(d), "regression", "adam", lr)
    outer = OuterOptimizer(torch.zeros(d), "sgd", carry_inner_moment=True)
    for step in range(steps):
        result = adapt_tasks(learner, family, outer.theta, cfg, step, [0], outer.inner_moment)
        outer.apply((result.delta / result.tasks).float(), 1.0, result.mean_moment())

    point = Point(d)
    opt = torch.optim.Adam(point.parameters(), lr=lr, betas=(0.0, 0.999))
    for step in range(steps):
        rng = task_rng(cfg.seed, TRAIN_STREAM, step, 0)
        task = family.train_task(rng)
        for batch in mini_batches(len(task.support_x), 2, k, False, rng):
            loss = nn.functional.mse_loss(point(task.support_x[batch]), task.support_y[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
    assert torch.allclose(outer.theta, point.theta.detach(), atol=1e-6)
    assert outer.inner_moment.steps == steps * k
    assert torch.allclose(outer.inner_moment.sq, opt.state[point.theta]["exp_avg_sq"], rtol=1e-5)

    fresh = OuterOptimizer(torch.zeros(d), "sgd")
    for step in range(steps):
        result = adapt_tasks(learner, family, fresh.theta, cfg, step, [0])
        fresh.apply((result.delta / result.tasks).float(), 1.0)
    assert not torch.allclose(fresh.theta, outer.theta, atol=1e-3)  # carrying the estimate changes training


def test_carried_moment_is_the_tasks_mean_whichever_split_of_the_tasks_adapts_it():
    from conftest import tiny
    from reptile_dist.plugins import build_family
    from reptile_dist.training import make_learner

    cfg = tiny("synthetic", inner_state="carried")
    family = build_family(cfg)
    learner = make_learner(cfg, family)
    theta = learner.initial_theta()
    start = InnerMoment(torch.rand(theta.numel(), generator=torch.Generator().manual_seed(0)) * 1e-4, 500.0)
    whole = adapt_tasks(learner, family, theta, cfg, 2, range(5), start)
    parts = adapt_tasks(learner, family, theta, cfg, 2, [0, 2, 4], start) + adapt_tasks(learner, family, theta, cfg, 2, [1, 3], start)
    assert torch.allclose(whole.delta, parts.delta, rtol=0, atol=1e-12)
    mean, split_mean = whole.mean_moment(), parts.mean_moment()
    assert mean.steps == split_mean.steps == 500 + cfg.inner_steps
    assert torch.allclose(mean.sq, split_mean.sq, rtol=1e-6, atol=0)
    assert not torch.allclose(mean.sq, start.sq)  # the tasks' gradients moved it
    # A zero estimate that has seen no steps is a fresh optimizer; a warm one changes the deltas.
    fresh = adapt_tasks(learner, family, theta, cfg, 2, range(5))
    zero = adapt_tasks(learner, family, theta, cfg, 2, range(5), InnerMoment.zeros_like(theta))
    assert torch.equal(fresh.delta, zero.delta)
    assert not torch.allclose(whole.delta, fresh.delta, atol=1e-5)


@pytest.mark.parametrize("batched", [False, True])
def test_tasks_drawn_ahead_adapt_exactly_as_tasks_drawn_in_place(batched):
    """An adapt worker draws the next step's tasks while its push travels: the generator it keeps
    must go on to the same inner mini-batches."""
    from conftest import tiny
    from reptile_dist.plugins import build_family
    from reptile_dist.training import make_learner

    cfg = tiny("synthetic", inner_state="carried", batched_adaptation=batched)
    family = build_family(cfg)
    learner = make_learner(cfg, family)
    theta = learner.initial_theta()
    start = InnerMoment.zeros_like(theta)
    in_place = adapt_tasks(learner, family, theta, cfg, 4, [1, 3], start)
    ahead = draw_tasks(family, cfg, 4, [1, 3])
    assert [d.index for d in ahead] == [1, 3]
    drawn = adapt_tasks(learner, family, theta, cfg, 4, [1, 3], start, drawn=ahead)
    assert torch.equal(in_place.delta, drawn.delta) and torch.equal(in_place.moment_sum, drawn.moment_sum)
    other_step = adapt_tasks(learner, family, theta, cfg, 5, [1, 3], start)
    assert not torch.equal(in_place.delta, other_step.delta)


def test_outer_state_round_trips_the_carried_moment():
    outer = OuterOptimizer(torch.zeros(3), "sgd", carry_inner_moment=True)
    outer.apply(torch.ones(3), 0.5, InnerMoment(torch.tensor([1.0, 2.0, 3.0]), 15.0))
    other = OuterOptimizer(torch.zeros(3), "sgd", carry_inner_moment=True)
    other.load_state_dict(outer.state_dict())
    assert torch.equal(other.theta, torch.full((3,), 0.5))
    assert torch.equal(other.inner_moment.sq, torch.tensor([1.0, 2.0, 3.0])) and other.inner_moment.steps == 15.0


def test_glorot_init_draws_tensorflows_layer_defaults():
    from reptile_dist.config import Config
    from reptile_dist.models import omniglot_conv

    torch.manual_seed(0)
    model = omniglot_conv(Config(ways=5, init="glorot"))
    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert len(layers) == 5
    for layer in layers:
        w = layer.weight
        fan_in, fan_out = w[0].numel(), w.shape[0] * w[0, 0].numel()
        bound = (6 / (fan_in + fan_out)) ** 0.5
        assert torch.equal(layer.bias, torch.zeros_like(layer.bias))
        assert 0.9 * bound < w.abs().max() <= bound


@pytest.mark.parametrize("optimizer, carried", [("adam", False), ("adam", True), ("sgd", False)])
def test_the_inner_optimizers_multi_tensor_kernels_adapt_bit_for_bit_as_torchs_cpu_default(monkeypatch, optimizer,
                                                                                            carried):
    """inner_optimizer asks for torch's foreach kernels, which torch leaves off on the CPU (about
    5% more Omniglot tasks/s): a task adapted with them equals, bit for bit, the task adapted one
    parameter at a time (torch's CPU default), carried estimate included."""
    import functools

    import reptile_dist.reptile as reptile

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    learner = Learner(net, "classification", optimizer, 0.01)
    theta = learner.initial_theta()
    x, y = torch.randn(12, 1, 8, 8), torch.arange(12) % 3
    moment = InnerMoment(torch.rand(theta.numel()) * 1e-3, 7.0) if carried else None
    assert learner._optimizer(moment).defaults["foreach"] is True

    def adapt():
        return learner.adapt(theta, x, y, 8, 4, False, np.random.default_rng(3), moment=moment)

    multi = adapt()

    monkeypatch.setattr(reptile, "inner_optimizer", functools.partial(reptile.inner_optimizer, foreach=False))
    single = adapt()
    assert learner._optimizer(moment).defaults["foreach"] is False
    assert not torch.equal(multi.delta, torch.zeros_like(multi.delta))
    assert torch.equal(multi.delta, single.delta) and multi.loss == single.loss
    if carried:
        assert multi.moment.steps == single.moment.steps == 15.0
        assert torch.equal(multi.moment.sq, single.moment.sq)
