"""Image data sets beyond Omniglot: prepare class folders, Mini-ImageNet or CIFAR-100 into one
Arrow table, and load it as meta-learning classes.

Sources (`layout`; "auto" recognises each from its files):
  split-folders         DIR/train/, DIR/val/, DIR/test/, each with one folder of images per class
  flat                  DIR/<class>/<image>, its classes split by `split` ("64:16:20" class counts or
                        "0.64:0.16:0.2" fractions) after a shuffle with `seed`; both are recorded
  mini-imagenet-csv     DIR/images/ and DIR/{train,val,test}.csv (filename,label), Ravi & Larochelle 2017
  mini-imagenet-pickle  DIR/mini-imagenet-cache-{train,val,test}.pkl (image_data, class_dict)
  cifar-fs              DIR/cifar-100-python/ (or that folder itself), split into the 64/16/20 fine
                        classes of CIFAR-FS (Bertinetto et al. 2019)
  fc100                 the same files, split by superclass, 12/4/4 (Oreshkin et al. 2018)

Every image is converted by `preprocess_like`, and how is recorded in the table (`preprocessing`),
so a user's own images can later be converted exactly the same way: EXIF orientation applied;
transparency flattened onto white; RGB (channels=3) or 8-bit luma (channels=1, Pillow's "L");
then the largest centred square is cropped, keeping the aspect ratio and dropping the ends of the
long side rather than stretching the picture, and resized to size x size with Lanczos.

The table is one uncompressed Arrow IPC file (memory-mapped by every worker on a machine, like
Omniglot's): `image` (fixed-size binary, H x W x C uint8), `split`, `class`, `file`, sorted by
(split, class, file). Pickled sources are read with an unpickler that admits only numpy arrays and
plain containers, so a crafted pickle cannot run code.
"""
from __future__ import annotations

import _codecs
import collections
import csv
import json
import math
import multiprocessing
import pickle
import struct
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image, ImageOps, UnidentifiedImageError
from tqdm import tqdm

# Decode workers re-import this module: nothing here may import torch (a test holds to it).
from reptile_dist.data.classes import ImageClass, ImageClasses
from reptile_dist.data.omniglot import (DataError, _grayscale, _image_view, _one_line, _worker_count, _write_table,
                                        open_table)

FORMAT = "images-v1"
SPLITS = ("train", "val", "test")
LAYOUTS = ("auto", "split-folders", "flat", "mini-imagenet-csv", "mini-imagenet-pickle", "cifar-fs", "fc100")
DEFAULT_SIZE = 84  # Mini-ImageNet's size since Vinyals et al. 2016
CHANNELS = (1, 3)
MAX_SIZE = 1024
CROP = "center-square"
RESIZE = "lanczos"
REDUCING_GAP = 3.0  # Pillow's two-step downscale: a box reduce, then Lanczos over >= 3x the target
BACKGROUND = "white"
REBUILD = "rebuild it with `reptile-dist data images`"
# What Pillow raises for a file it cannot decode, a truncated one, or one whose header claims
# more pixels than Image.MAX_IMAGE_PIXELS allows (DecompressionBombError).
IMAGE_ERRORS = (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError, ValueError, EOFError,
                struct.error)
_CHUNK = 256  # images per decode job
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")

# CIFAR-FS: the class lists of Bertinetto et al. 2019 (R2D2, splits/bertinetto/{train,val,test}.txt),
# as reproduced in torchmeta's assets (datasets/assets/cifar100/cifar-fs/*.json).
CIFAR_FS_CLASSES = {
    "train": (
        "apple", "aquarium_fish", "bear", "bee", "bottle", "bowl", "boy", "bridge", "bus", "can", "castle",
        "caterpillar", "chair", "clock", "cloud", "cockroach", "couch", "cup", "dinosaur", "dolphin", "elephant",
        "forest", "girl", "hamster", "house", "kangaroo", "keyboard", "lawn_mower", "lion", "lizard", "lobster",
        "mountain", "mouse", "mushroom", "oak_tree", "orange", "orchid", "palm_tree", "pear", "pine_tree", "plate",
        "porcupine", "possum", "rabbit", "raccoon", "ray", "road", "seal", "shrew", "skunk", "skyscraper", "snake",
        "spider", "squirrel", "streetcar", "sunflower", "tank", "tiger", "train", "trout", "tulip", "turtle",
        "willow_tree", "wolf",
    ),
    "val": (
        "beaver", "beetle", "butterfly", "camel", "cattle", "crab", "crocodile", "flatfish", "lamp", "maple_tree",
        "motorcycle", "otter", "sea", "shark", "television", "tractor",
    ),
    "test": (
        "baby", "bed", "bicycle", "chimpanzee", "fox", "leopard", "man", "pickup_truck", "plain", "poppy", "rocket",
        "rose", "snail", "sweet_pepper", "table", "telephone", "wardrobe", "whale", "woman", "worm",
    ),
}
# FC100: Oreshkin et al. 2018's superclass split, by CIFAR-100 coarse label index (the same lists
# as torchmeta's assets/cifar100/fc100 by name).
FC100_SUPERCLASSES = {
    "train": (1, 2, 3, 4, 5, 6, 9, 10, 15, 17, 18, 19),
    "val": (8, 11, 13, 16),
    "test": (0, 7, 12, 14),
}


@dataclass(frozen=True)
class _Item:
    """One image of the source: its split and class, its name in the table, and where its pixels
    are (an image file, or a row of one of the source's arrays)."""

    split: str
    cls: str
    file: str
    path: str | None = None
    array: int = -1
    row: int = -1


@dataclass
class _Source:
    layout: str
    items: list[_Item]
    recipe: dict
    arrays: list[np.ndarray] = field(default_factory=list)


# --- Preprocessing -------------------------------------------------------------------------------


def preprocessing_for(size: int = DEFAULT_SIZE, channels: int = 3) -> dict:
    """The `preprocessing` record of a table of size x size images with `channels` channels."""
    _check_options(size, channels)
    return {"size": size, "channels": channels, "crop": CROP, "resize": RESIZE, "reducing_gap": REDUCING_GAP,
            "background": BACKGROUND, "exif": "transpose"}


def _check_options(size: object, channels: object) -> None:
    if not isinstance(size, int) or isinstance(size, bool) or not 1 <= size <= MAX_SIZE:
        raise DataError(f"size={size!r} must be an integer in [1, {MAX_SIZE}]")
    if channels not in CHANNELS:
        raise DataError(f"channels={channels!r} must be 1 or 3")


def _check_preprocessing(preprocessing: object) -> tuple[int, int]:
    """(size, channels) of a `preprocessing` record this version can reproduce exactly."""
    if not isinstance(preprocessing, dict):
        raise DataError(f"preprocessing must be a dict, not {type(preprocessing).__name__}")
    size, channels = preprocessing.get("size"), preprocessing.get("channels")
    _check_options(size, channels)
    if preprocessing != preprocessing_for(size, channels):
        raise DataError(f"preprocessing {json.dumps(preprocessing, sort_keys=True)} is not one this version of "
                        f"reptile-dist makes (expected {json.dumps(preprocessing_for(size, channels), sort_keys=True)})")
    return size, channels


def _converted(image: Image.Image, channels: int) -> Image.Image:
    """`image` upright, in mode L (1 channel) or RGB (3), transparency flattened onto white."""
    # Phone photos store their rotation as EXIF orientation; only parse EXIF when present.
    if "exif" in image.info and image.getexif().get(0x0112, 1) != 1:
        image = ImageOps.exif_transpose(image)
    if channels == 1 or image.mode.startswith("I;16") or image.mode in ("I", "F"):
        gray = _grayscale(image)  # also scales 16-bit and float pixels to 0..255
        return gray if channels == 1 else gray.convert("RGB")
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        paper = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(paper, image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")


def _fitted(image: Image.Image, size: int) -> np.ndarray:
    """The largest centred square of `image`, resized to size x size: (size, size[, C]) uint8."""
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    # The box crops and resizes in one pass; an image already size x size is copied unchanged.
    small = image.resize((size, size), Image.Resampling.LANCZOS, box=(left, top, left + side, top + side),
                         reducing_gap=REDUCING_GAP)
    return np.asarray(small, dtype=np.uint8)


def preprocess_like(image: Image.Image, preprocessing: dict) -> np.ndarray:
    """One image converted exactly as a table's images were: uint8 (size, size) for 1 channel,
    (size, size, 3) for 3. `preprocessing` is the table's record (`ImageClasses.preprocessing`).

    Raises DataError for a record this version does not know; Pillow's own errors for an image it
    cannot decode (the caller names the file).
    """
    size, channels = _check_preprocessing(preprocessing)
    return _fitted(_converted(image, channels), size)


# --- Pickles -------------------------------------------------------------------------------------


def _pickle_globals() -> dict[tuple[str, str], object]:
    """The only globals a data pickle may name: numpy's array and scalar reconstruction, plain
    containers, and the codec call protocol-2 pickles use for bytes."""
    core = getattr(np, "_core", None) or np.core  # numpy 2 moved numpy.core to numpy._core
    allowed: dict[tuple[str, str], object] = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype,
                                              ("_codecs", "encode"): _codecs.encode,
                                              ("collections", "OrderedDict"): collections.OrderedDict}
    for package in ("numpy.core", "numpy._core"):
        allowed[(f"{package}.multiarray", "_reconstruct")] = core.multiarray._reconstruct
        allowed[(f"{package}.multiarray", "scalar")] = core.multiarray.scalar
        allowed[(f"{package}.numeric", "_frombuffer")] = core.numeric._frombuffer  # protocol 5 arrays
    for module in ("builtins", "__builtin__"):  # Python 2 pickles (CIFAR-100) name __builtin__
        for kind in (set, frozenset, bytearray, list, dict, tuple):
            allowed[(module, kind.__name__)] = kind
    return allowed


class _PlainDataUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays and plain containers; any other global ends the load unresolved,
    so a pickle whose reduce names os.system (or anything else) runs nothing."""

    _allowed = _pickle_globals()

    def find_class(self, module: str, name: str) -> object:
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"it names {module}.{name}, which is not allowed (only numpy arrays and plain containers are read)"
            ) from None


def _load_pickle(path: Path) -> object:
    """The plain data in the pickle at `path` (Python 2 pickles too, as numpy's docs advise: latin1)."""
    try:
        with open(path, "rb") as stream:
            return _PlainDataUnpickler(stream, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, OSError, ValueError, TypeError, AttributeError, IndexError, KeyError,
            MemoryError, OverflowError, struct.error) as exc:
        raise DataError(f"cannot read pickle {path}: {_one_line(exc)}") from None


def _field(data: object, key: str, path: Path) -> object:
    """data[key] of an unpickled dict whose keys may be str or bytes (re-pickled Python 2 data)."""
    if not isinstance(data, dict):
        raise DataError(f"{path} holds a {type(data).__name__}, not a dict with '{key}'")
    for candidate in (key, key.encode()):
        if candidate in data:
            return data[candidate]
    raise DataError(f"{path} has no '{key}' (keys: {', '.join(sorted(map(_text, data)))})")


def _text(value: object) -> str:
    return value.decode("latin1") if isinstance(value, bytes) else str(value)


def _uint8_images(value: object, path: Path, key: str) -> np.ndarray:
    """An (n, H, W) or (n, H, W, 1|3|4) uint8 array, (n, H, W, 1) squeezed."""
    if not isinstance(value, np.ndarray) or value.dtype != np.uint8 or value.ndim not in (3, 4) \
            or (value.ndim == 4 and value.shape[3] not in (1, 3, 4)):
        shape = getattr(value, "shape", None)
        raise DataError(f"{path}: '{key}' must be a uint8 array (n, H, W) or (n, H, W, 3), not "
                        f"{type(value).__name__} {getattr(value, 'dtype', '')} {shape or ''}".rstrip())
    return value[..., 0] if value.ndim == 4 and value.shape[3] == 1 else value


def _row_indices(value: object, count: int, path: Path, cls: str) -> list[int]:
    rows = np.asarray(value) if isinstance(value, (list, tuple, np.ndarray)) else None
    if rows is None or rows.ndim != 1 or rows.dtype.kind not in "iu":
        raise DataError(f"{path}: class '{cls}' must map to a list of row indices")
    if len(rows) == 0:
        raise DataError(f"{path}: class '{cls}' has no images")
    if rows.min() < 0 or rows.max() >= count:
        raise DataError(f"{path}: class '{cls}' names row {int(rows.max() if rows.max() >= count else rows.min())}, "
                        f"outside the {count} images of 'image_data'")
    return [int(r) for r in rows]


# --- Source layouts ------------------------------------------------------------------------------


def _image_suffixes() -> frozenset[str]:
    """Every file suffix Pillow can open."""
    Image.init()
    return frozenset(ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN)


def _visible_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith((".", "__MACOSX")))


def _class_folders(folder: Path) -> dict[str, list[Path]]:
    """Class name -> its image files (sorted) for each class folder in `folder`."""
    suffixes = _image_suffixes()
    classes = {}
    for sub in _visible_dirs(folder):
        files = sorted(p for p in sub.iterdir() if p.is_file() and not p.name.startswith(".")
                       and p.suffix.lower() in suffixes)
        if not files:
            raise DataError(f"class folder {sub} has no images")
        classes[sub.name] = files
    return classes


def _file_items(root: Path, split: str, cls: str, files: list[Path]) -> list[_Item]:
    return [_Item(split, cls, f.relative_to(root).as_posix(), path=str(f)) for f in files]


def _read_split_folders(root: Path) -> _Source:
    items = []
    for split in SPLITS:
        folder = root / split
        if not folder.is_dir():
            raise DataError(f"no {split}/ folder in {root} (the split-folders layout is train/, val/ and test/, "
                            "each with one folder of images per class)")
        classes = _class_folders(folder)
        if not classes:
            raise DataError(f"split '{split}' is empty: {folder} has no class folders")
        for cls, files in classes.items():
            items += _file_items(root, split, cls, files)
    return _Source("split-folders", items, {"kind": "folders"})


def _split_counts(text: str, total: int) -> list[int]:
    """Classes per split from "TRAIN:VAL:TEST", class counts summing to `total` or fractions summing to 1."""
    usage = f"--split {text!r} must be TRAIN:VAL:TEST class counts (64:16:20) or fractions (0.64:0.16:0.2)"
    parts = [p.strip() for p in text.split(":")]
    if len(parts) != 3:
        raise DataError(usage)
    if all(p.isdigit() for p in parts):
        counts = [int(p) for p in parts]
        if sum(counts) != total:
            raise DataError(f"--split {text} names {sum(counts)} classes, but the source has {total}")
    else:
        try:
            fractions = [float(p) for p in parts]
        except ValueError:
            raise DataError(usage) from None
        if not all(math.isfinite(f) and f >= 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
            raise DataError(f"--split {text}: fractions must be at least 0 and sum to 1")
        # Largest remainder: the counts sum to `total`, each within one class of its share.
        shares = [f * total for f in fractions]
        counts = [math.floor(s) for s in shares]
        by_remainder = sorted(range(3), key=lambda i: (-(shares[i] - counts[i]), i))
        for i in by_remainder[: total - sum(counts)]:
            counts[i] += 1
    for split, count in zip(SPLITS, counts):
        if count == 0:
            raise DataError(f"--split {text} leaves split '{split}' empty ({total} classes: "
                            f"{', '.join(f'{s} {c}' for s, c in zip(SPLITS, counts))})")
    return counts


def _read_flat(root: Path, split: str | None, seed: int) -> _Source:
    classes = _class_folders(root)
    if not classes:
        raise DataError(f"no class folders with images in {root}")
    if split is None:
        raise DataError(f"{root} is a folder of {len(classes)} class folders: pass --split TRAIN:VAL:TEST "
                        "(class counts such as 64:16:20, or fractions such as 0.64:0.16:0.2)")
    counts = _split_counts(split, len(classes))
    names = sorted(classes)
    order = [names[i] for i in np.random.default_rng(seed).permutation(len(names))]
    items, start = [], 0
    for split_name, count in zip(SPLITS, counts):
        for cls in order[start:start + count]:
            items += _file_items(root, split_name, cls, classes[cls])
        start += count
    recipe = {"kind": "seeded", "split": split, "classes": dict(zip(SPLITS, counts)), "seed": seed,
              "method": "class folders sorted by name, permuted by numpy.random.default_rng(seed).permutation, "
                        "then cut into train, val, test in that order"}
    return _Source("flat", items, recipe)


def _read_mini_imagenet_csv(root: Path) -> _Source:
    images = root / "images"
    items = []
    for split in SPLITS:
        path = root / f"{split}.csv"
        if not path.is_file():
            raise DataError(f"no {path.name} in {root} (Mini-ImageNet as Ravi & Larochelle distribute it: "
                            "images/ and train.csv, val.csv, test.csv)")
        found = 0
        try:
            with open(path, newline="", encoding="utf-8") as stream:
                rows = csv.reader(stream)
                header = [h.strip() for h in next(rows, [])]
                if header[:2] != ["filename", "label"]:
                    raise DataError(f"{path} must start with the header filename,label (found {','.join(header)!r})")
                for row in rows:
                    if not any(cell.strip() for cell in row):
                        continue
                    if len(row) < 2 or not row[0].strip() or not row[1].strip():
                        raise DataError(f"{path} line {rows.line_num}: expected filename,label, found {','.join(row)!r}")
                    filename, label = row[0].strip(), row[1].strip()
                    file = images / filename
                    if not file.is_file():
                        raise DataError(f"{path} line {rows.line_num} names {file}, which does not exist")
                    items.append(_Item(split, label, f"images/{filename}", path=str(file)))
                    found += 1
        except (csv.Error, UnicodeDecodeError) as exc:
            raise DataError(f"cannot read {path}: {_one_line(exc)}") from None
        if not found:
            raise DataError(f"split '{split}' is empty: {path} lists no images")
    return _Source("mini-imagenet-csv", items, {"kind": "csv", "files": [f"{s}.csv" for s in SPLITS]})


def _read_mini_imagenet_pickle(root: Path) -> _Source:
    items, arrays = [], []
    for split in SPLITS:
        path = root / f"mini-imagenet-cache-{split}.pkl"
        if not path.is_file():
            raise DataError(f"no {path.name} in {root} (the pickled Mini-ImageNet caches are "
                            "mini-imagenet-cache-train.pkl, -val.pkl and -test.pkl)")
        data = _load_pickle(path)
        images = _uint8_images(_field(data, "image_data", path), path, "image_data")
        class_dict = _field(data, "class_dict", path)
        if not isinstance(class_dict, dict):
            raise DataError(f"{path}: 'class_dict' must be a dict of class name -> row indices")
        if not class_dict:
            raise DataError(f"split '{split}' is empty: {path} has no classes")
        arrays.append(images)
        for cls, rows in class_dict.items():
            name = _text(cls)
            items += [_Item(split, name, f"{path.name}:{r}", array=len(arrays) - 1, row=r)
                      for r in _row_indices(rows, len(images), path, name)]
    recipe = {"kind": "pickle-cache", "files": [f"mini-imagenet-cache-{s}.pkl" for s in SPLITS]}
    return _Source("mini-imagenet-pickle", items, recipe, arrays)


def _cifar_folder(root: Path) -> Path | None:
    for folder in (root, root / "cifar-100-python"):
        if all((folder / name).is_file() for name in ("train", "test", "meta")):
            return folder
    return None


def _names(value: object, count: int, path: Path, key: str) -> list[str]:
    if not isinstance(value, (list, tuple)) or len(value) != count:
        raise DataError(f"{path}: '{key}' must list {count} names, as CIFAR-100's meta does")
    return [_text(v) for v in value]


def _labels(value: object, count: int, limit: int, path: Path, key: str) -> np.ndarray:
    labels = np.asarray(value) if isinstance(value, (list, tuple, np.ndarray)) else np.zeros(0)
    if labels.shape != (count,) or labels.dtype.kind not in "iu" or labels.min() < 0 or labels.max() >= limit:
        raise DataError(f"{path}: '{key}' must be {count} labels in [0, {limit})")
    return labels


def _read_cifar(root: Path, layout: str) -> _Source:
    folder = _cifar_folder(root)
    if folder is None:
        raise DataError(f"no CIFAR-100 in {root} (expected cifar-100-python/ with train, test and meta, "
                        "the python version from https://www.cs.toronto.edu/~kriz/cifar.html)")
    meta = _load_pickle(folder / "meta")
    fine_names = _names(_field(meta, "fine_label_names", folder / "meta"), 100, folder / "meta", "fine_label_names")
    _names(_field(meta, "coarse_label_names", folder / "meta"), 20, folder / "meta", "coarse_label_names")
    if layout == "cifar-fs":
        split_of_name = {name: split for split, names in CIFAR_FS_CLASSES.items() for name in names}
        if set(split_of_name) != set(fine_names):
            missing = sorted(set(split_of_name) ^ set(fine_names))
            raise DataError(f"{folder / 'meta'}: the fine class names are not CIFAR-100's (they differ in "
                            f"{', '.join(missing[:5])}), so the CIFAR-FS class lists do not apply")
        recipe = {"kind": "published", "name": "cifar-fs", "reference": "Bertinetto et al. 2019, splits/bertinetto",
                  "classes": {s: len(n) for s, n in CIFAR_FS_CLASSES.items()}}
    else:
        split_of_coarse = {c: split for split, coarse in FC100_SUPERCLASSES.items() for c in coarse}
        recipe = {"kind": "published", "name": "fc100", "reference": "Oreshkin et al. 2018",
                  "superclasses": {s: list(c) for s, c in FC100_SUPERCLASSES.items()}}
    items, arrays = [], []
    for part in ("train", "test"):
        path = folder / part
        data = _load_pickle(path)
        raw = _field(data, "data", path)
        if not isinstance(raw, np.ndarray) or raw.dtype != np.uint8 or raw.ndim != 2 or raw.shape[1] != 3 * 32 * 32:
            raise DataError(f"{path}: 'data' must be a uint8 array (n, 3072), CIFAR's rows of 32x32 RGB")
        count = len(raw)
        if count == 0:
            raise DataError(f"{path} holds no images")
        fine = _labels(_field(data, "fine_labels", path), count, 100, path, "fine_labels")
        coarse = _labels(_field(data, "coarse_labels", path), count, 20, path, "coarse_labels")
        names = data.get("filenames", data.get(b"filenames")) if isinstance(data, dict) else None
        files = [_text(n) for n in names] if isinstance(names, list) and len(names) == count else \
            [str(i) for i in range(count)]
        # CIFAR stores each row as the 1024 reds, then the greens, then the blues.
        arrays.append(np.ascontiguousarray(raw.reshape(count, 3, 32, 32).transpose(0, 2, 3, 1)))
        for i in range(count):
            name = fine_names[fine[i]]
            split = split_of_name[name] if layout == "cifar-fs" else split_of_coarse[int(coarse[i])]
            items.append(_Item(split, name, f"{part}/{files[i]}", array=len(arrays) - 1, row=i))
    return _Source(layout, items, recipe, arrays)


def _detect(root: Path, split: str | None) -> str:
    if _cifar_folder(root) is not None:
        raise DataError(f"{root} holds CIFAR-100: pass --layout cifar-fs (Bertinetto et al.'s 64/16/20 classes) "
                        "or --layout fc100 (Oreshkin et al.'s 12/4/4 superclasses)")
    if any((root / f"mini-imagenet-cache-{s}.pkl").is_file() for s in SPLITS):
        return "mini-imagenet-pickle"
    if (root / "images").is_dir() and any((root / f"{s}.csv").is_file() for s in SPLITS):
        return "mini-imagenet-csv"
    folders = {p.name for p in _visible_dirs(root)}
    if split is None and folders and folders <= set(SPLITS):
        return "split-folders"
    if folders:
        return "flat"
    raise DataError(f"no images found in {root} (expected train/, val/, test/ of class folders; class folders "
                    "with --split; Mini-ImageNet's images/ and CSVs or pickled caches; or cifar-100-python/)")


def _read_source(root: Path, layout: str, split: str | None, seed: int) -> _Source:
    if layout not in LAYOUTS:
        raise DataError(f"layout '{layout}' is not one of {', '.join(LAYOUTS)}")
    if not root.is_dir():
        raise DataError(f"image source folder not found: {root}")
    if layout == "auto":
        layout = _detect(root, split)
    if split is not None and layout != "flat":
        raise DataError(f"--split applies to a flat folder of class folders; {root} is read as {layout}, "
                        "whose split is given")
    if layout == "split-folders":
        return _read_split_folders(root)
    if layout == "flat":
        return _read_flat(root, split, seed)
    if layout == "mini-imagenet-csv":
        return _read_mini_imagenet_csv(root)
    if layout == "mini-imagenet-pickle":
        return _read_mini_imagenet_pickle(root)
    return _read_cifar(root, layout)


def _check_classes(items: list[_Item], root: Path) -> None:
    """Every split has images, and no class is in two splits (a test class seen in training)."""
    split_of: dict[str, str] = {}
    for item in items:
        first = split_of.setdefault(item.cls, item.split)
        if first != item.split:
            raise DataError(f"class '{item.cls}' is in both {first} and {item.split} of {root}; "
                            "a class must belong to one split")
    for split in SPLITS:
        if split not in split_of.values():
            raise DataError(f"split '{split}' of {root} has no images")


# --- Decoding ------------------------------------------------------------------------------------


def _decode_chunk(entries: list[tuple[str, str | np.ndarray]], preprocessing: dict) -> bytes:
    """Preprocessed pixels of `entries` (where, image file or pixel array), concatenated. Runs in a
    worker process."""
    size, channels = _check_preprocessing(preprocessing)
    out = bytearray()
    for where, payload in entries:
        if isinstance(payload, np.ndarray):
            image = _converted(Image.fromarray(payload), channels)
        else:
            try:
                with Image.open(payload) as opened:
                    image = _converted(opened, channels)  # converting decodes: errors surface here
            except IMAGE_ERRORS as exc:
                raise DataError(f"cannot read image {where}: {_one_line(exc)}") from None
        out += _fitted(image, size).tobytes()
    return bytes(out)


def _entries(items: list[_Item], arrays: list[np.ndarray]) -> Iterator[tuple[str, str | np.ndarray]]:
    for item in items:
        yield (item.path, item.path) if item.path is not None else (item.file, arrays[item.array][item.row])


def _decode_all(items: list[_Item], arrays: list[np.ndarray], preprocessing: dict, workers: int) -> np.ndarray:
    """(n, size * size * channels) pixels of `items`, decoded by `workers` processes.

    Decoding and resampling hold the GIL, so threads would not help. A bounded number of chunks is
    in flight, so array sources are not copied into the pool's queue all at once.
    """
    pixels_per_image = preprocessing["size"] ** 2 * preprocessing["channels"]
    pixels = np.empty((len(items), pixels_per_image), dtype=np.uint8)
    entries = _entries(items, arrays)
    chunks = ((start, list(islice(entries, _CHUNK))) for start in range(0, len(items), _CHUNK))
    # disable=None: a bar only on a terminal, so logs and captured output hold no bar.
    with tqdm(total=len(items), unit="img", desc="decoding images", disable=None, leave=False) as bar:
        def store(start: int, data: bytes) -> None:
            done = len(data) // pixels_per_image
            pixels[start:start + done] = np.frombuffer(data, dtype=np.uint8).reshape(done, pixels_per_image)
            bar.update(done)

        if workers <= 1 or len(items) <= _CHUNK:
            for start, batch in chunks:
                store(start, _decode_chunk(batch, preprocessing))
            return pixels
        # forkserver, not fork: forking a process that already runs Ray's threads is unsafe.
        context = multiprocessing.get_context("forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else None)
        workers = min(workers, math.ceil(len(items) / _CHUNK))
        pool = ProcessPoolExecutor(max_workers=workers, mp_context=context)
        try:
            pending: deque = deque()
            for start, batch in chunks:
                pending.append((start, pool.submit(_decode_chunk, batch, preprocessing)))
                if len(pending) >= 2 * workers:
                    start, future = pending.popleft()
                    store(start, future.result())
            while pending:
                start, future = pending.popleft()
                store(start, future.result())
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
    return pixels


# --- Preparing and loading -----------------------------------------------------------------------


def _split_summary(items: list[_Item]) -> dict:
    summary = {}
    for split in SPLITS:
        counts = collections.Counter(item.cls for item in items if item.split == split)
        summary[split] = {"classes": len(counts), "images": sum(counts.values()),
                          "images_per_class_min": min(counts.values(), default=0),
                          "images_per_class_max": max(counts.values(), default=0)}
    return summary


def prepare_images(source: str | Path, out: str | Path, size: int = DEFAULT_SIZE, channels: int = 3,
                   split: str | None = None, layout: str = "auto", seed: int = 0, workers: int | None = None) -> dict:
    """Build the image table at `out` from the folder `source`; returns a summary.

    Args:
        source: a folder in one of the layouts of this module's docstring.
        out: the table to write (whole or not at all).
        size, channels: images become size x size, 1 (luma) or 3 (RGB) channels.
        split: "TRAIN:VAL:TEST" class counts or fractions; only for a flat folder of class folders.
        layout: one of LAYOUTS; "auto" recognises the source.
        seed: shuffles the classes before `split` cuts them.
        workers: decoding processes (default: every core this process may use).

    Raises:
        DataError: one line naming the file or argument at fault; nothing is written then.
    """
    start = time.perf_counter()
    preprocessing = preprocessing_for(size, channels)
    root = Path(source)
    found = _read_source(root, layout, split, seed)
    items = sorted(found.items, key=lambda i: (SPLITS.index(i.split), i.cls, i.file))
    _check_classes(items, root)
    pixels = _decode_all(items, found.arrays, preprocessing, workers or _worker_count())
    image_bytes = pixels.shape[1]
    columns = {
        "image": pa.FixedSizeBinaryArray.from_buffers(pa.binary(image_bytes), len(items), [None, pa.py_buffer(pixels)]),
        "split": pa.array([i.split for i in items], pa.string()),
        "class": pa.array([i.cls for i in items], pa.string()),
        "file": pa.array([i.file for i in items], pa.string()),
    }
    metadata = {"reptile_dist.format": FORMAT, "image_size": str(size), "channels": str(channels),
                "preprocessing": json.dumps(preprocessing, sort_keys=True),
                "split_recipe": json.dumps(found.recipe, sort_keys=True), "source_layout": found.layout}
    batch = pa.RecordBatch.from_pydict(columns).replace_schema_metadata(metadata)
    _write_table(batch, Path(out))
    splits = _split_summary(items)
    return {
        "out": str(out),
        "layout": found.layout,
        "images": len(items),
        "classes": sum(s["classes"] for s in splits.values()),
        "image_size": size,
        "channels": channels,
        "splits": splits,
        "split_recipe": found.recipe,
        "preprocessing": preprocessing,
        "seconds": round(time.perf_counter() - start, 2),
    }


def _open_table(path: Path) -> tuple[pa.Table, dict]:
    """The table, memory-mapped, and its schema metadata, after checking it is an image table."""
    return open_table(path, FORMAT, "image table", f"reptile-dist data images --source DIR --out {path}", REBUILD)


def load_image_table(path: str | Path) -> ImageClasses:
    """Memory-map the table at `path` (written by `prepare_images`) as train / val / test classes.

    Each (split, class) of the table is one class, its rows in file order; classes are in name
    order. Images are a read-only view of the mapped file: (n, H, W) for 1 channel, (n, H, W, 3)
    for 3. `preprocessing` is the table's record, for `preprocess_like`.

    Raises:
        DataError: one line naming the file when it is missing, truncated or not an image table.
    """
    path = Path(path)
    table, metadata = _open_table(path)
    try:
        preprocessing = json.loads(metadata.get("preprocessing", ""))
        size, channels = _check_preprocessing(preprocessing)
    except (ValueError, DataError) as exc:
        raise DataError(f"{path} has no usable preprocessing record ({_one_line(exc)}); {REBUILD}") from None
    expected = pa.schema([("image", pa.binary(size * size * channels))] + [(c, pa.string()) for c in ("split", "class", "file")])
    if metadata.get("image_size") != str(size) or metadata.get("channels") != str(channels) \
            or not table.schema.equals(expected) or table.num_rows == 0:
        raise DataError(f"{path} has an unexpected layout (columns {table.schema.names}, image_size "
                        f"{metadata.get('image_size')}, channels {metadata.get('channels')}); {REBUILD}")
    # "\0" never occurs in a class name, so sorting the joined key sorts the (split, class) pair.
    keys = pc.binary_join_element_wise(table["split"], table["class"], "\0").to_numpy(zero_copy_only=False)
    _, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
    rows = np.split(np.argsort(inverse, kind="stable"), np.cumsum(np.bincount(inverse))[:-1])
    split_of_class = table["split"].to_numpy(zero_copy_only=False)[first]
    unknown = sorted(set(split_of_class) - set(SPLITS))
    if unknown:
        raise DataError(f"{path} has rows of unknown split {unknown[0]!r} (expected one of {', '.join(SPLITS)})")
    return ImageClasses(
        images=_image_view(table, size, channels),
        splits={s: [ImageClass(rows=r) for r, c in zip(rows, split_of_class) if c == s] for s in SPLITS},
        image_size=size,
        channels=channels,
        preprocessing=preprocessing,
    )
