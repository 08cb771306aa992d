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
    """float32 (n, C, H, W) in [0, 1] from uint8 `images` (N, H, W) (C = 1) or (N, H, W, C),
    rotated counter-clockwise by `rotation` degrees in the (H, W) plane."""
    batch = images[rows]
    if rotation:
        batch = np.rot90(batch, k=rotation // 90, axes=(1, 2))
    if batch.ndim == 3:
        return (batch.astype(np.float32) / 255.0)[:, None]
    # Channels first, as torch's convolutions want them, in one contiguous copy.
    return batch.transpose(0, 3, 1, 2).astype(np.float32, order="C") / 255.0


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

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(channels, height, width) of a task's images: what the built-in networks are sized for."""
        return (self.classes.channels, self.classes.image_size, self.classes.image_size)

    @property
    def preprocessing(self) -> dict | None:
        """How the table's images were made from image files (a trained model's file records it,
        and `adapt` converts a user's images the same way)."""
        return self.classes.preprocessing

    def train_task(self, rng: np.random.Generator) -> Task:
        return self._task(rng, "train", self.train_shots, 0)

    def eval_task(self, rng: np.random.Generator, split: str) -> Task:
        if not self.classes.splits.get(split):
            raise ConfigError(f"split '{split}' has no classes")
        return self._task(rng, split, self.shots, self.queries)


def omniglot_family(cfg) -> ImageFamily:
    """The built-in `family: omniglot` (config.BUILTIN_FAMILIES): the prepared table `cfg.data`,
    split as `cfg.split` says, training classes augmented by rotation."""
    from reptile_dist.data.omniglot import load_omniglot

    classes = load_omniglot(cfg.data, split=cfg.split, seed=0, val_characters=cfg.val_characters)
    return ImageFamily(classes, cfg.ways, cfg.train_shots, cfg.shots, cfg.queries)


def images_family(cfg, rotations: bool = False) -> ImageFamily:
    """The built-in `family: images` (config.BUILTIN_FAMILIES): any table `reptile-dist data
    images` prepared, at its size and channels. `rotations` (family_args): every training class
    also seen at 90, 180 and 270 degrees as classes of its own, as Omniglot's are; off for natural
    images."""
    from reptile_dist.data.images import load_image_table

    classes = load_image_table(cfg.data)
    if rotations:
        train = [ImageClass(c.rows, r) for c in classes.splits["train"] for r in (0, 90, 180, 270)]
        classes = ImageClasses(classes.images, {**classes.splits, "train": train}, classes.image_size,
                               classes.channels, classes.preprocessing)
    return ImageFamily(classes, cfg.ways, cfg.train_shots, cfg.shots, cfg.queries)
