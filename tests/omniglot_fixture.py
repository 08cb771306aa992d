"""A generated stand-in for the official Omniglot release, for tests on a machine without it.

Same layout and file names as brendenlake/omniglot's python/images_<set>.zip:
images_<set>/<Alphabet>/<characterNN>/<id>_<drawer>.png, 105x105 1-bit PNGs, black ink on white,
<id> numbering the characters of both sets from 0001. Every character is a seeded set of strokes;
each drawer redraws them with its own jitter, pen width and offset, so drawings of one character
look alike, differ pixel for pixel, and characters are told apart by their shapes.
"""
from __future__ import annotations

import zipfile
from io import BytesIO
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SIZE = 105  # the release's drawing size
MARGIN = 18  # strokes stay this far from the border, so the corners are paper as in the release


def character_strokes(rng: np.random.Generator) -> list[np.ndarray]:
    """2 to 4 strokes, each a polyline of 2 to 4 points (x, y) in the drawing area."""
    return [rng.uniform(MARGIN, SIZE - MARGIN, size=(rng.integers(2, 5), 2)) for _ in range(rng.integers(2, 5))]


def drawing(strokes: list[np.ndarray], rng: np.random.Generator) -> bytes:
    """One drawer's PNG of a character: its strokes moved a little, in that drawer's pen."""
    image = Image.new("1", (SIZE, SIZE), 1)
    pen = ImageDraw.Draw(image)
    width = int(rng.integers(4, 7))
    offset = rng.normal(0, 2.0, size=2)
    for stroke in strokes:
        points = np.clip(stroke + offset + rng.normal(0, 2.0, size=stroke.shape), 4, SIZE - 5)
        pen.line([tuple(p) for p in points], fill=0, width=width, joint="curve")
    buffer = BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def write_release(folder: Path, alphabets: dict[str, list[int]], drawers: int = 20, seed: int = 0) -> list[Path]:
    """images_<set>.zip in `folder` for each set in `alphabets` (set -> characters per alphabet).

    Returns the zips' paths, in the order of `alphabets`.
    """
    folder.mkdir(parents=True, exist_ok=True)
    zips, number = [], 0
    for set_name, sizes in alphabets.items():
        path = folder / f"images_{set_name}.zip"
        with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:  # PNGs are compressed already
            for a, characters in enumerate(sizes):
                alphabet = f"{set_name.title()}_Script_{chr(ord('A') + a)}"
                for c in range(1, characters + 1):
                    number += 1
                    rng = np.random.default_rng([seed, number])
                    strokes = character_strokes(rng)
                    for d in range(1, drawers + 1):
                        member = f"images_{set_name}/{alphabet}/character{c:02d}/{number:04d}_{d:02d}.png"
                        archive.writestr(member, drawing(strokes, rng))
        zips.append(path)
    return zips
