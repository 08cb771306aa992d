"""Build an Omniglot table whose pixels are made the way openai/supervised-reptile made them, for
measuring whether preprocessing explains part of the gap to the paper.

The reference reads each PNG (mode "1") and calls `Image.resize((28, 28))`, which Pillow always
does with nearest-neighbour sampling for mode "1": binary 28x28 images with jagged, sometimes
broken strokes. reptile-dist's `data omniglot` resamples with an antialiasing (LANCZOS) filter
to 8-bit grayscale. This writes the reference's pixels (ink 255, paper 0, as reptile-dist stores
them; the reference's inverted polarity is undone by the first batch norm) into a table of the
same format, so any run can use it with `--set data=PATH`:

    python benchmarks/reference_pixels_table.py --source ../shared/data/omniglot/images_background.zip \\
        ../shared/data/omniglot/images_evaluation.zip --out runs/omniglot-nearest.arrow
    python benchmarks/adam_state_probe.py --checkpoint pretrained/omniglot-5w1s.pt --train 2000 \\
        --tasks 500 --variants averaged --data runs/omniglot-nearest.arrow
"""
from __future__ import annotations

import argparse
import json

import numpy as np
from PIL import Image

from reptile_dist.data import omniglot


def reference_pixels(image: Image.Image, size: int = omniglot.IMAGE_SIZE) -> np.ndarray:
    small = np.asarray(image.resize((size, size)), dtype=np.float32)  # mode "1": always NEAREST
    return (255 * (1 - small)).astype(np.uint8)  # ink 255 on paper 0, as the table stores it


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", nargs=2, required=True, help="images_background.zip images_evaluation.zip")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    omniglot.preprocess_image = reference_pixels  # used by the in-process decoder below
    omniglot._worker_count = lambda: 1  # worker processes would re-import the antialiasing one
    print(json.dumps(omniglot.prepare_omniglot(args.source, args.out)))


if __name__ == "__main__":
    main()
