"""A user's own problem for reptile-dist: few-shot regression of damped waves
y = a * exp(-d * x) * sin(w * x + p), and the MLP that meta-learns it.

Nothing here imports Ray or changes reptile-dist: a task family is any object with `kind`,
`train_task(rng)` and `eval_task(rng, split)` returning `reptile_dist.Task`s, and a network is
any torch.nn.Module. Used by train_waves.py (the Python API) and waves.yaml (the command line).
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

import reptile_dist as rd


class DampedWaves:
    kind = "regression"

    def __init__(self, support: int, queries: int, max_damping: float):
        self.support = support
        self.queries = queries
        self.max_damping = max_damping

    def _task(self, rng: np.random.Generator, support: int, queries: int) -> rd.Task:
        a, d = rng.uniform(0.5, 3.0), rng.uniform(0.0, self.max_damping)
        w, p = rng.uniform(0.5, 2.0), rng.uniform(0.0, 2 * np.pi)
        x = rng.uniform(0.0, 5.0, size=(support + queries, 1)).astype(np.float32)
        y = (a * np.exp(-d * x) * np.sin(w * x + p)).astype(np.float32)
        x, y = torch.from_numpy(x), torch.from_numpy(y)
        return rd.Task(x[:support], y[:support], x[support:], y[support:])

    def train_task(self, rng: np.random.Generator) -> rd.Task:
        return self._task(rng, self.support, 0)

    def eval_task(self, rng: np.random.Generator, split: str) -> rd.Task:
        return self._task(rng, self.support, self.queries)


def make_family(cfg, max_damping: float = 0.5) -> DampedWaves:
    """family: waves:make_family, with family_args {max_damping: ...}."""
    return DampedWaves(cfg.train_shots, cfg.queries, max_damping)


def make_model(cfg, hidden: int = 40) -> nn.Module:
    """model: waves:make_model, with model_args {hidden: ...}."""
    return nn.Sequential(nn.Linear(1, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 1))
