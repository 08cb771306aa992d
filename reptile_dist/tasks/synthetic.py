"""A small synthetic image family for fast tests: each class is a random 28x28 stroke pattern,
its images are noisy, shifted copies. Built in memory, deterministic in its seed."""
from __future__ import annotations

import numpy as np

from reptile_dist.data.classes import ImageClass, ImageClasses


def synthetic_classes(num_train: int = 64, num_test: int = 32, per_class: int = 20, size: int = 28, seed: int = 0) -> ImageClasses:
    rng = np.random.default_rng(seed)
    total = num_train + num_test
    prototypes = rng.random((total, size, size)) < 0.15
    images = np.empty((total * per_class, size, size), dtype=np.uint8)
    for c in range(total):
        for j in range(per_class):
            shifted = np.roll(prototypes[c], shift=tuple(rng.integers(-1, 2, size=2)), axis=(0, 1))
            flips = rng.random((size, size)) < 0.05
            images[c * per_class + j] = np.where(shifted ^ flips, 255, 0)
    classes = [ImageClass(rows=np.arange(c * per_class, (c + 1) * per_class)) for c in range(total)]
    return ImageClasses(images=images, splits={"train": classes[:num_train], "val": [], "test": classes[num_train:]}, image_size=size)


def synthetic_family(cfg):
    """The built-in `family: synthetic` (config.BUILTIN_FAMILIES)."""
    from reptile_dist.tasks.images import ImageFamily

    return ImageFamily(synthetic_classes(seed=cfg.seed), cfg.ways, cfg.train_shots, cfg.shots, cfg.queries)
