"""N-way K-shot classification over a class-indexed image table.

Composed from small steps in the manner of learn2learn: pick N distinct classes (`sample_ways`),
pick K distinct images in each (`sample_shots`), remap labels to 0..N-1 in draw order.
"""
from __future__ import annotations

import numpy as np
import torch

from reptile_dist.config import ConfigError
from reptile_dist.data.classes import ImageClass, ImageClasses
from reptile_dist.tasks.base import Task


def sample_ways(rng: np.random.Generator, classes: list[ImageClass], ways: int) -> list[ImageClass]:
    return [classes[i] for i in rng.choice(len(classes), size=ways, replace=False)]


def sample_shots(rng: np.random.Generator, cls: ImageClass, count: int) -> np.ndarray:
    return rng.choice(cls.rows, size=count, replace=False)


def load_images(images: np.ndarray, rows: np.ndarray, rotation: int) -> np.ndarray:
    """float32 (n, 1, H, W) in [0, 1], rotated counter-clockwise by `rotation` degrees."""
    batch = images[rows]
    if rotation:
        batch = np.rot90(batch, k=rotation // 90, axes=(1, 2))
    return (batch.astype(np.float32) / 255.0)[:, None]


class ImageFamily:
    """N-way K-shot tasks over `ImageClasses`."""

    kind = "classification"

    def __init__(self, classes: ImageClasses, ways: int, train_shots: int, shots: int, queries: int):
        # Meta-training draws train_shots from "train" only; evaluation may use any split.
        classes.check(ways, train_shots, "train_shots", splits=("train",))
        classes.check(ways, shots + queries, "shots + queries")
        self.classes = classes
        self.ways = ways
        self.train_shots = train_shots
        self.shots = shots
        self.queries = queries

    def _task(self, rng: np.random.Generator, split: str, shots: int, queries: int) -> Task:
        chosen = sample_ways(rng, self.classes.splits[split], self.ways)
        sx, sy, qx, qy = [], [], [], []
        for label, cls in enumerate(chosen):
            rows = sample_shots(rng, cls, shots + queries)
            pixels = load_images(self.classes.images, rows, cls.rotation)
            sx.append(pixels[:shots])
            qx.append(pixels[shots:])
            sy += [label] * shots
            qy += [label] * queries
        return Task(
            support_x=torch.from_numpy(np.concatenate(sx)),
            support_y=torch.tensor(sy, dtype=torch.long),
            query_x=torch.from_numpy(np.concatenate(qx)),
            query_y=torch.tensor(qy, dtype=torch.long),
        )

    def train_task(self, rng: np.random.Generator) -> Task:
        return self._task(rng, "train", self.train_shots, 0)

    def eval_task(self, rng: np.random.Generator, split: str) -> Task:
        if not self.classes.splits.get(split):
            raise ConfigError(f"split '{split}' has no classes")
        return self._task(rng, split, self.shots, self.queries)
