"""Image classes: a table of images and, per split, the classes drawn from its rows.

Numpy only: the data layer builds these and the task families sample from them.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from reptile_dist.config import ConfigError


@dataclass(frozen=True)
class ImageClass:
    """A class: the table rows of one character, seen at one rotation (multiple of 90 degrees)."""

    rows: np.ndarray
    rotation: int = 0


@dataclass
class ImageClasses:
    """Images uint8, possibly memory-mapped, and the classes of each split.

    `images` is (n, H, W) when `channels` is 1 and (n, H, W, channels) otherwise. `preprocessing`
    says how a table's images were made from the source files (data.images records it, so a user's
    own images can be converted the same way); None where there is no such record.
    """

    images: np.ndarray
    splits: dict[str, list[ImageClass]]
    image_size: int = 28
    channels: int = 1
    preprocessing: dict | None = None

    def check(self, ways: int, images_per_class: int, field: str = "shots + queries", splits: tuple[str, ...] | None = None) -> None:
        """Raise ConfigError naming `field` if a split (default: every split) cannot supply the tasks asked for."""
        for name, classes in self.splits.items():
            if not classes or (splits is not None and name not in splits):
                continue
            if ways > len(classes):
                raise ConfigError(f"ways={ways} is larger than the {len(classes)} classes of split '{name}'")
            fewest = min(len(c.rows) for c in classes)
            if images_per_class > fewest:
                raise ConfigError(f"{field} = {images_per_class} exceeds the {fewest} images per class of split '{name}'")
