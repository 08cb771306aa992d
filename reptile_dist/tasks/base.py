"""What every task family hands to the inner loop and to evaluation."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch


@dataclass(frozen=True)
class Task:
    """One few-shot task. Meta-training tasks have an empty query set."""

    support_x: torch.Tensor
    support_y: torch.Tensor
    query_x: torch.Tensor
    query_y: torch.Tensor


class TaskFamily(Protocol):
    kind: str  # "classification" or "regression"

    def train_task(self, rng: np.random.Generator) -> Task:
        """A meta-training task: train_shots examples per class, no query set."""

    def eval_task(self, rng: np.random.Generator, split: str) -> Task:
        """An evaluation task from `split`: `shots` support examples per class plus queries."""


def task_rng(seed: int, stream: int, step: int, index: int) -> np.random.Generator:
    """The generator for task `index` of meta-step `step`.

    Derived only from (run seed, stream, step, index), so a task's draw never depends on which
    process adapts it or in what order.
    """
    return np.random.default_rng([seed, stream, step, index])


TRAIN_STREAM = 0
EVAL_STREAMS = {"train": 1, "val": 2, "test": 3}
