"""The Reptile algorithm (Nichol, Achiam, Schulman 2018, Algorithm 2), plain PyTorch.

    theta_i = theta adapted by k inner steps on task i
    theta  <- theta + eps * mean_i(theta_i - theta)

theta travels as one flat float32 vector; the model is only the workspace the inner loop
runs in. Nothing here knows about processes or Ray.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parameters_to_vector

from reptile_dist.config import Config
from reptile_dist.tasks.base import TRAIN_STREAM, Task, TaskFamily, task_rng


def mini_batches(n: int, batch_size: int, num_batches: int, replacement: bool, rng: np.random.Generator) -> Iterator[np.ndarray]:
    """Index batches drawn as openai/supervised-reptile's `_mini_batches` does: without
    replacement, reshuffle the set each pass and let a batch run across passes."""
    if replacement:
        for _ in range(num_batches):
            yield rng.choice(n, size=min(batch_size, n), replace=False)
        return
    current: list[int] = []
    produced = 0
    while produced < num_batches:
        for index in rng.permutation(n):
            current.append(int(index))
            if len(current) == batch_size:
                yield np.asarray(current)
                produced += 1
                current = []
                if produced == num_batches:
                    return


def task_loss(kind: str, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    if kind == "classification":
        return nn.functional.cross_entropy(outputs, targets)
    return nn.functional.mse_loss(outputs, targets)


def inner_optimizer(name: str, params, lr: float, foreach: bool = True) -> torch.optim.Optimizer:
    """The inner loop's optimizer, on torch's multi-tensor (`foreach`) kernels: torch picks them by
    itself only on GPUs and steps a CPU model one parameter at a time (`foreach=False`, for the
    comparisons). The same arithmetic bit for bit (tests/test_reptile.py), and faster: about 5%
    more Omniglot tasks/s side by side (README "The inner optimizer's kernels"). Not `fused`: its
    CPU kernel rounds differently, and Adam with beta1 = 0 carries a last-bit difference into the run."""
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, betas=(0.0, 0.999), foreach=foreach)  # beta1 = 0, as in the paper
    return torch.optim.SGD(params, lr=lr, foreach=foreach)


@dataclass
class InnerMoment:
    """The inner Adam's second-moment estimate, carried from task to task (`inner_state: carried`).

    openai/supervised-reptile keeps one Adam (beta1 = 0) for the whole run, so every task starts
    from the estimate the tasks before it left; a fresh optimizer per task instead makes each first
    step a sign step of size lr for every coordinate. Here every task of a meta-step starts from
    the same estimate and returns its own, and the next estimate is their mean (averaged like the
    deltas), so a meta-step's result still does not depend on which worker adapted which task or
    in what order. Evaluation tasks start from the estimate training left, as in the reference."""

    sq: torch.Tensor  # flat, laid out like theta
    steps: float = 0.0  # inner steps averaged into it, for Adam's bias correction

    @classmethod
    def zeros_like(cls, theta: torch.Tensor) -> "InnerMoment":
        return cls(torch.zeros(theta.numel(), dtype=torch.float32), 0.0)

    def state_dict(self) -> dict:
        return {"sq": self.sq.detach().cpu().clone(), "steps": float(self.steps)}

    def as_numpy(self) -> dict:
        """`state_dict` with a numpy `sq`, for Ray's calls (numpy moves without pickling) and Ray
        Train's return values (which refuse tensors)."""
        return {"sq": self.sq.detach().cpu().numpy(), "steps": float(self.steps)}

    @classmethod
    def from_state(cls, state: dict | None) -> "InnerMoment | None":
        """From `state_dict` or `as_numpy` (copied: arrays Ray hands over are read-only)."""
        if state is None:
            return None
        sq = state["sq"]
        sq = sq.detach().clone() if isinstance(sq, torch.Tensor) else torch.tensor(sq)
        return cls(sq.float(), float(state["steps"]))


@dataclass
class AdaptResult:
    delta: torch.Tensor  # theta_i - theta, flat
    loss: float  # loss on the last inner mini-batch
    accuracy: float  # accuracy on the last inner mini-batch (nan for regression)
    moment: InnerMoment | None = None  # the estimate this task left, when it started from one


class Learner:
    """A model used as the workspace for adapting copies of theta to tasks."""

    def __init__(self, model: nn.Module, kind: str, optimizer: str, lr: float, device: str | torch.device = "cpu",
                 loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None):
        self.model = model.to(device)
        self.kind = kind
        # The task loss: a plug-in's (`loss: module:function`), else the kind's default.
        self.loss = loss or (lambda outputs, targets: task_loss(kind, outputs, targets))
        self.family_info: dict | None = None  # what a trained model's file records of its family (plugins.family_info)
        self.optimizer = optimizer
        self.lr = lr
        self.device = torch.device(device)

    def initial_theta(self) -> torch.Tensor:
        return parameters_to_vector(self.model.parameters()).detach().clone()

    def load(self, theta: torch.Tensor) -> None:
        """Copy theta into the model (vector_to_parameters would alias theta's storage, and the
        inner loop would then overwrite theta itself)."""
        offset = 0
        with torch.no_grad():
            for p in self.model.parameters():
                n = p.numel()
                p.copy_(theta[offset : offset + n].view_as(p))
                offset += n

    def theta(self) -> torch.Tensor:
        return parameters_to_vector(self.model.parameters()).detach()

    def _optimizer(self, moment: InnerMoment | None) -> torch.optim.Optimizer:
        opt = inner_optimizer(self.optimizer, self.model.parameters(), self.lr)
        if moment is not None and self.optimizer == "adam":
            sq = moment.sq.to(self.device)
            offset = 0
            for p in self.model.parameters():
                n = p.numel()
                opt.state[p] = {"step": torch.tensor(float(moment.steps)), "exp_avg": torch.zeros_like(p),
                                "exp_avg_sq": sq[offset : offset + n].view_as(p).to(p.dtype).clone()}
                offset += n
        return opt

    def _moment(self, opt: torch.optim.Optimizer, start: InnerMoment, steps: int) -> InnerMoment:
        """The estimate `opt` (built by `_optimizer(start)`) holds after `steps` inner steps."""
        sq = torch.cat([opt.state[p]["exp_avg_sq"].flatten() for p in self.model.parameters()])
        return InnerMoment(sq.detach().float().cpu(), start.steps + steps)

    def adapt(self, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor, steps: int, batch_size: int,
              replacement: bool, rng: np.random.Generator, opt: torch.optim.Optimizer | None = None,
              moment: InnerMoment | None = None) -> AdaptResult:
        """Adapt theta to (x, y); theta itself is not modified.

        `moment`: the carried second-moment estimate the inner Adam starts from (and the result
        carries the one it ends with); None: a fresh optimizer, zero state. `opt`: the caller's
        optimizer over this model's parameters instead, whose state then carries on
        (benchmarks/adam_state_probe.py uses it to train the reference's sequential way)."""
        theta = theta.to(self.device)
        self.load(theta)
        x, y = x.to(self.device), y.to(self.device)
        carried = opt is None and moment is not None and self.optimizer == "adam"
        if opt is None:
            opt = self._optimizer(moment if carried else None)
        loss = torch.tensor(float("nan"))
        accuracy = float("nan")
        for batch in mini_batches(len(x), batch_size, steps, replacement, rng):
            index = torch.from_numpy(batch).to(self.device)
            out = self.model(x[index])
            loss = self.loss(out, y[index])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if self.kind == "classification":
                accuracy = (out.argmax(1) == y[index]).float().mean().item()
        return AdaptResult(self.theta() - theta, float(loss.item()), accuracy,
                           self._moment(opt, moment, steps) if carried else None)


@dataclass
class DeltaSum:
    """Sum over tasks of (theta_i - theta), with what is needed to average and log it.

    Every loop meets its meta-step's tasks in this form: the local trainer adapts them all, a
    worker or an all-reduce rank its share, and the shares add up (`+`) to the local trainer's sum."""

    delta: torch.Tensor  # float64
    tasks: int
    loss_sum: float
    accuracy_sum: float
    moment_sum: torch.Tensor | None = None  # sum of the tasks' final second-moment estimates (carried state)
    moment_steps: float = 0.0  # the inner steps behind each of them (the same for every task of a step)

    def __add__(self, other: "DeltaSum") -> "DeltaSum":
        moment_sum = None
        if self.moment_sum is not None and other.moment_sum is not None:
            moment_sum = self.moment_sum + other.moment_sum
        return DeltaSum(self.delta + other.delta, self.tasks + other.tasks,
                        self.loss_sum + other.loss_sum, self.accuracy_sum + other.accuracy_sum,
                        moment_sum, max(self.moment_steps, other.moment_steps))

    @property
    def finite(self) -> bool:
        """No NaN or Inf in the delta, the loss or the carried estimates: only such a sum may touch theta.
        A NaN or Inf anywhere makes the float64 sum non-finite; one pass of a sum is ~10x faster than
        isfinite().all() on the CPU, and the parameter server runs it on every push."""
        return (math.isfinite(float(self.delta.sum())) and math.isfinite(self.loss_sum)
                and (self.moment_sum is None or math.isfinite(float(self.moment_sum.sum()))))

    def mean_moment(self) -> InnerMoment | None:
        """The next carried estimate: the mean of the tasks' own."""
        if self.moment_sum is None or not self.tasks:
            return None
        return InnerMoment(self.moment_sum.to(torch.float32).div_(self.tasks), self.moment_steps)


@dataclass
class DrawnTask:
    """Task (step, index), drawn, with its generator positioned where the inner mini-batches come next."""

    index: int
    rng: np.random.Generator
    task: Task


def draw_tasks(family: TaskFamily, cfg: Config, step: int, task_indices: Iterable[int]) -> list[DrawnTask]:
    """The meta-training tasks (step, i) for i in task_indices. An adapt worker draws a step's
    tasks while its push is on its way; `adapt_tasks` draws them itself when not given them."""
    drawn = []
    for i in task_indices:
        rng = task_rng(cfg.seed, TRAIN_STREAM, step, i)
        drawn.append(DrawnTask(i, rng, family.train_task(rng)))
    return drawn


def adapt_tasks(learner: Learner, family: TaskFamily, theta: torch.Tensor, cfg: Config, step: int,
                task_indices: Iterable[int], moment: InnerMoment | None = None,
                drawn: list[DrawnTask] | None = None) -> DeltaSum:
    """Adapt theta to tasks (step, i) for i in task_indices and sum their deltas.

    Task (step, i) is drawn from a generator seeded by (cfg.seed, step, i), so the sum over a
    meta-batch is the same whichever processes adapt which of its tasks. The sum is kept in
    float64, where adding a handful of float32 deltas is (nearly always) exact: partial sums
    from several workers then add up to the local trainer's sum bit for bit, which matters
    because Adam with beta1=0 turns a last-bit difference in a near-zero gradient into an
    lr-sized step.

    `moment`: the carried inner second-moment estimate every task starts from (`inner_state:
    carried`); the tasks' final estimates are summed the same way. `drawn`: these tasks as
    `draw_tasks(family, cfg, step, task_indices)` drew them already (once only: adapting them
    uses up their generators)."""
    if drawn is None:
        drawn = draw_tasks(family, cfg, step, task_indices)
    elif [d.index for d in drawn] != list(task_indices):
        raise ValueError(f"tasks drawn for {[d.index for d in drawn]}, asked to adapt {list(task_indices)}")
    if cfg.batched_adaptation:
        return adapt_tasks_batched(learner, cfg, theta, drawn, moment)
    total = torch.zeros_like(theta, dtype=torch.float64, device=learner.device)
    moment_sum = torch.zeros_like(theta, dtype=torch.float64) if moment is not None else None
    tasks, loss_sum, acc_sum = 0, 0.0, 0.0
    for d in drawn:
        rng, task = d.rng, d.task
        result = learner.adapt(theta, task.support_x, task.support_y, cfg.inner_steps, cfg.inner_batch_size,
                               cfg.inner_replacement, rng, moment=moment)
        total += result.delta
        tasks += 1
        loss_sum += result.loss
        acc_sum += result.accuracy
        if moment_sum is not None:
            moment_sum += result.moment.sq
    moment_steps = moment.steps + cfg.inner_steps if moment is not None else 0.0
    return DeltaSum(total.cpu(), tasks, loss_sum, acc_sum, moment_sum if tasks else None, moment_steps)


def adapt_tasks_batched(learner: Learner, cfg: Config, theta: torch.Tensor, drawn: list[DrawnTask],
                        moment: InnerMoment | None = None) -> DeltaSum:
    """`adapt_tasks` with the tasks' inner loops run side by side: one inner step of every task
    at once, torch.func.vmap over tasks of grad(functional_call). The same tasks, mini-batches
    and optimizer maths (Adam with beta1=0 written out as torch.optim.Adam computes it), so the
    same deltas up to float rounding; it needs batch norm without running statistics.

    One exception, in either version: with Adam (beta1=0), a coordinate whose true gradient is 0
    (a conv bias in front of batch norm) takes lr-sized steps driven by rounding noise, so those
    coordinates differ between the two, without changing what the network computes."""
    from torch.func import functional_call, grad_and_value, vmap

    device = learner.device
    theta = theta.to(device)
    xs, ys, batches = [], [], []
    for d in drawn:
        rng, task = d.rng, d.task
        xs.append(task.support_x)
        ys.append(task.support_y)
        # Drawn after the task from the same generator, as the per-task loop draws them.
        batches.append(np.stack(list(mini_batches(len(task.support_x), cfg.inner_batch_size, cfg.inner_steps,
                                                  cfg.inner_replacement, rng))))
    if not xs:
        return DeltaSum(torch.zeros_like(theta, dtype=torch.float64).cpu(), 0, 0.0, 0.0)
    carried = moment is not None and learner.optimizer == "adam"
    x, y = torch.stack(xs).to(device), torch.stack(ys).to(device)
    index = torch.from_numpy(np.stack(batches)).to(device)  # (tasks, inner_steps, batch)
    rows = torch.arange(len(xs), device=device)[:, None]

    shapes = dict(learner.model.named_parameters())
    names = list(shapes)
    pieces = torch.split(theta, [p.numel() for p in shapes.values()])
    params = {name: piece.view_as(shapes[name]).expand(len(xs), *shapes[name].shape).clone()
              for name, piece in zip(names, pieces)}

    def loss_and_output(p, xb, yb):
        out = functional_call(learner.model, p, (xb,))
        return learner.loss(out, yb), out

    step_grad = vmap(grad_and_value(loss_and_output, has_aux=True))
    beta2, eps = 0.999, 1e-8  # torch.optim.Adam's defaults, as inner_optimizer() uses
    if carried:
        start = torch.split(moment.sq.to(device), [p.numel() for p in shapes.values()])
        second = {name: piece.view_as(shapes[name]).expand(len(xs), *shapes[name].shape).clone()
                  for name, piece in zip(names, start)}
        t0 = moment.steps
    else:
        second = {name: torch.zeros_like(v) for name, v in params.items()}
        t0 = 0.0
    losses = accuracies = None
    for t in range(index.shape[1]):
        xb, yb = x[rows, index[:, t]], y[rows, index[:, t]]
        grads, (losses, out) = step_grad(params, xb, yb)
        for name in names:
            g = grads[name]
            if learner.optimizer == "adam":
                second[name] = second[name] * beta2 + (1 - beta2) * (g * g)
                denom = second[name].sqrt() / (1 - beta2 ** (t0 + t + 1)) ** 0.5 + eps
                params[name] = params[name] - learner.lr * (g / denom)
            else:
                params[name] = params[name] - learner.lr * g
        if learner.kind == "classification":
            accuracies = (out.argmax(-1) == yb).float().mean(1)
    adapted = torch.cat([params[name].flatten(1) for name in names], dim=1)
    total = torch.zeros_like(theta, dtype=torch.float64)
    for delta in adapted - theta:  # in task order, as adapt_tasks adds them
        total += delta
    acc_sum = float(accuracies.sum()) if accuracies is not None else float("nan")
    moment_sum = None
    if carried:
        moment_sum = torch.zeros_like(theta, dtype=torch.float64)
        for sq in torch.cat([second[name].flatten(1) for name in names], dim=1):
            moment_sum += sq
        moment_sum = moment_sum.cpu()
    return DeltaSum(total.cpu(), len(xs), float(losses.sum()), acc_sum, moment_sum, t0 + index.shape[1])


class OuterOptimizer:
    """The meta update on the flat theta.

    sgd:      theta <- theta + eps * mean_delta  (the paper's interpolation, Algorithm 2)
    adam:     Adam on the pseudo-gradient g = -mean_delta with learning rate eps
    nesterov: SGD with Nesterov momentum on g, learning rate eps (DiLoCo's outer step:
              buf <- mu buf + g; theta <- theta - eps (g + mu buf))"""

    def __init__(self, theta: torch.Tensor, kind: str = "sgd", carry_inner_moment: bool = False,
                 momentum: float = 0.9):
        self.kind = kind
        self.param = torch.nn.Parameter(theta.detach().clone().float(), requires_grad=False)
        if kind == "adam":
            self._opt: torch.optim.Optimizer | None = torch.optim.Adam([self.param], lr=1.0)
        elif kind == "nesterov":
            self._opt = torch.optim.SGD([self.param], lr=1.0, momentum=momentum, nesterov=True)
        else:
            self._opt = None
        # The carried inner second-moment estimate (`inner_state: carried`) lives beside theta, so
        # it is checkpointed, resumed and handed to workers with it.
        self.inner_moment = InnerMoment.zeros_like(self.param.data) if carry_inner_moment else None

    @classmethod
    def for_config(cls, cfg: Config, theta: torch.Tensor) -> "OuterOptimizer":
        return cls(theta, cfg.outer_optimizer, cfg.carries_inner_moment, cfg.outer_momentum)

    @property
    def theta(self) -> torch.Tensor:
        return self.param.data

    def apply(self, mean_delta: torch.Tensor, step_size: float, inner_moment: InnerMoment | None = None) -> torch.Tensor:
        """One meta update; `inner_moment` (carried state) becomes the estimate the next tasks start from."""
        if inner_moment is not None and self.inner_moment is not None:
            self.inner_moment = inner_moment
        if self._opt is None:
            self.param.data.add_(mean_delta, alpha=step_size)
        else:
            for group in self._opt.param_groups:
                group["lr"] = step_size
            self.param.grad = -mean_delta.detach().clone()
            self._opt.step()
            self.param.grad = None
        return self.param.data

    def apply_sum(self, total: DeltaSum, step_size: float, per: int | None = None) -> torch.Tensor:
        """The meta update from a sum of deltas: theta moves by step_size times total.delta / per
        (per: the sum's own task count, which makes it the mean), and the tasks' mean estimate
        becomes the carried one. Async pushes divide by meta_batch_size instead, so a meta-batch's
        worth of them moves theta as far as one synchronous meta-step."""
        # To float32 first, then scale: each pass over theta-sized vectors is what a parameter
        # server's push costs, so the fewest passes (every loop calls this, so they agree bit for bit).
        # For sgd the 1/per rides in the step size (apply's add_ alpha), one pass fewer than dividing.
        per = per or total.tasks
        delta = total.delta.to(torch.float32)
        if self._opt is None:
            return self.apply(delta, step_size / per, total.mean_moment())
        return self.apply(delta.div_(per), step_size, total.mean_moment())

    def state_dict(self) -> dict:
        state = {"kind": self.kind, "theta": self.param.data.clone()}
        if self.inner_moment is not None:
            state["inner_moment"] = self.inner_moment.state_dict()
        if self._opt is not None:  # the live one aliases the optimizer's moment or momentum tensors
            state[self.kind] = copy.deepcopy(self._opt.state_dict())
        return state

    def load_state_dict(self, state: dict) -> None:
        self.param.data.copy_(state["theta"])
        if self.inner_moment is not None and state.get("inner_moment") is not None:
            self.inner_moment = InnerMoment.from_state(state["inner_moment"])
        if self._opt is not None and self.kind in state:
            self._opt.load_state_dict(state[self.kind])


def meta_step(learner: Learner, family: TaskFamily, outer: OuterOptimizer, cfg: Config, step: int,
              task_indices: Iterable[int], combine: Callable[[DeltaSum], DeltaSum] | None = None,
              admit: Callable[[DeltaSum], bool] | None = None) -> DeltaSum:
    """One meta-step (Algorithm 2): adapt theta to this process's tasks of `step`, combine the
    sum with the other processes' shares (`combine`: the all-reduce; none when one process adapts
    the whole meta-batch), and apply the outer update with eps(step). Returns the combined sum.

    `admit(total)`: whether the sum may update theta at all (the loops' finite-update guard).

    The parameter server splits this in two: its workers run `adapt_tasks`, and it applies
    `OuterOptimizer.apply_sum` to the sum of their pushes."""
    part = adapt_tasks(learner, family, outer.theta, cfg, step, task_indices, outer.inner_moment)
    total = part if combine is None else combine(part)
    if admit is None or admit(total):
        outer.apply_sum(total, cfg.meta_step_size_at(step))
    return total
