"""Sine-wave regression (Finn et al. 2017; the Reptile paper's demonstration):
y = a * sin(x + b), a ~ U[0.1, 5], b ~ U[0, 2pi], x ~ U[-5, 5]."""
from __future__ import annotations

import numpy as np
import torch

from reptile_dist.tasks.base import Task


class SineFamily:
    kind = "regression"

    def __init__(self, train_shots: int, shots: int, queries: int):
        self.train_shots = train_shots
        self.shots = shots
        self.queries = queries

    @staticmethod
    def _points(rng: np.random.Generator, amplitude: float, phase: float, n: int):
        x = rng.uniform(-5.0, 5.0, size=(n, 1)).astype(np.float32)
        y = (amplitude * np.sin(x + phase)).astype(np.float32)
        return torch.from_numpy(x), torch.from_numpy(y)

    def _task(self, rng: np.random.Generator, support: int, queries: int) -> Task:
        amplitude = rng.uniform(0.1, 5.0)
        phase = rng.uniform(0.0, 2 * np.pi)
        sx, sy = self._points(rng, amplitude, phase, support)
        qx, qy = self._points(rng, amplitude, phase, queries)
        return Task(sx, sy, qx, qy)

    def train_task(self, rng: np.random.Generator) -> Task:
        return self._task(rng, self.train_shots, 0)

    def eval_task(self, rng: np.random.Generator, split: str) -> Task:
        # Sine tasks come from a continuous family; splits differ only by their seed stream.
        return self._task(rng, self.shots, self.queries)


def sine_family(cfg) -> SineFamily:
    """The built-in `family: sine` (config.BUILTIN_FAMILIES)."""
    return SineFamily(cfg.train_shots, cfg.shots, cfg.queries)
