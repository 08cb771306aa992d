"""Omniglot: prepare the official release into one Arrow table, load it as meta-learning classes.

`prepare_omniglot` reads images_background / images_evaluation (zips or folders), downsamples
every drawing to 28x28 with ink high, and writes an uncompressed Arrow IPC file sorted by
(set, alphabet, character, file). `load_omniglot` memory-maps that file, so every worker on a
machine shares one copy of the pixels, and splits the 1623 characters into classes.
"""
from __future__ import annotations

import multiprocessing
import os
import re
import shutil
import time
import urllib.error
import urllib.request
import zipfile
import zlib
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from io import BytesIO
from itertools import islice
from pathlib import Path
from typing import BinaryIO, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image, ImageOps, UnidentifiedImageError

# Decode workers re-import this module: nothing here may import torch (a test holds to it).
from reptile_dist.data.classes import ImageClass, ImageClasses
from reptile_dist.errors import UserError
from reptile_dist.files import atomic_write

DEFAULT_TABLE = "data/omniglot.arrow"
DEFAULT_SOURCE_DIR = "data/omniglot"
OFFICIAL_URL = "https://github.com/brendenlake/omniglot/raw/master/python/{name}"
FORMAT = "omniglot-v1"
IMAGE_SIZE = 28
SETS = ("background", "evaluation")
SPLITS = ("paper", "alphabet")
PAPER_TRAIN_CHARACTERS = 1200  # Nichol et al. 2018, following openai/supervised-reptile
ROTATIONS = (0, 90, 180, 270)  # meta-training classes are augmented by rotation (Santoro et al. 2016)
SOURCE_HINT = "--source path/to/images_background.zip path/to/images_evaluation.zip"

# images_<set>/<Alphabet>/<characterNN>/<file>.png, possibly below a prefix inside a zip.
_DRAWING = re.compile(r"(?:^|/)images_(background|evaluation)/([^/]+)/([^/]+)/([^/]+\.png)$", re.IGNORECASE)


class DataError(UserError, ValueError):  # also a ValueError: load_omniglot's bad arguments were, and callers catch them so
    """Bad input data: one line that names the offending file."""


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _grayscale(image: Image.Image) -> Image.Image:
    """8-bit grayscale with any transparency flattened onto white paper."""
    if image.mode.startswith("I;16") or image.mode in ("I", "F"):
        # Pillow clips these to 0..255 on convert("L"); rescale 16-bit and [0, 1] float instead.
        pixels = np.asarray(image, dtype=np.float64)
        if image.mode.startswith("I;16") or (image.mode == "I" and pixels.max() > 255):
            pixels = pixels / 257.0
        elif image.mode == "F" and pixels.max() <= 1.0:
            pixels = pixels * 255.0
        return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8))
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        paper = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(paper, image.convert("RGBA"))
    elif image.mode not in ("1", "L", "P", "RGB"):
        image = image.convert("RGB")  # CMYK, YCbCr, HSV, LAB: no direct path to L in every case
    return image.convert("L")


def preprocess_image(image: Image.Image, size: int = IMAGE_SIZE) -> np.ndarray:
    """uint8 (size, size), ink 255 and paper 0, from dark ink on light paper in any mode or size.

    Non-square images are padded with paper to a square first, so strokes keep their shape.
    """
    # Phone photos store their rotation as EXIF orientation; only parse EXIF when present.
    if "exif" in image.info and image.getexif().get(0x0112, 1) != 1:
        image = ImageOps.exif_transpose(image)
    gray = _grayscale(image)
    width, height = gray.size
    if width != height:
        side = max(width, height)
        square = Image.new("L", (side, side), 255)
        square.paste(gray, ((side - width) // 2, (side - height) // 2))
        gray = square
    # LANCZOS is the antialiasing filter; reducing_gap only changes large inputs (photos).
    small = gray.resize((size, size), Image.Resampling.LANCZOS, reducing_gap=3.0)
    return 255 - np.asarray(small, dtype=np.uint8)


@dataclass(frozen=True)
class Drawing:
    """One PNG of the release: where it is (`container`, `member`) and what it is."""

    set: str
    alphabet: str
    character: str
    file: str
    container: str  # a zip file, or the folder that holds images_<set>/
    member: str  # path inside the container, "/"-separated
    in_zip: bool

    @property
    def key(self) -> tuple[str, str, str, str]:
        return (self.set, self.alphabet, self.character, self.file)


def _drawings_in_zip(path: Path) -> list[Drawing]:
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as exc:
        raise DataError(f"Omniglot source is not a valid zip file: {path} ({_one_line(exc)})") from None
    found = []
    for name in names:
        match = _DRAWING.search(name)
        if match and "__MACOSX" not in name and not match.group(4).startswith("._"):
            found.append(Drawing(match.group(1).lower(), *match.groups()[1:], str(path), name, in_zip=True))
    return found


def _drawings_in_folder(root: Path, set_name: str) -> list[Drawing]:
    folder = root / f"images_{set_name}"
    return [
        Drawing(set_name, p.parent.parent.name, p.parent.name, p.name, str(root), p.relative_to(root).as_posix(), in_zip=False)
        for p in folder.glob("*/*/*")
        if p.suffix.lower() == ".png" and p.is_file()
    ]


def _drawings_in_source(source: Path) -> list[Drawing]:
    """A zip; a folder images_<set>/; or a folder holding images_<set>/ folders or zips."""
    if not source.exists():
        raise DataError(f"Omniglot source not found: {source}")
    if source.is_file():
        found = _drawings_in_zip(source)
    else:
        own = re.fullmatch(r"images_(background|evaluation)", source.name)
        if own:
            found = _drawings_in_folder(source.parent, own.group(1))
        else:
            found = []
            for set_name in SETS:
                if (source / f"images_{set_name}").is_dir():
                    found += _drawings_in_folder(source, set_name)
                elif (source / f"images_{set_name}.zip").is_file():
                    found += _drawings_in_zip(source / f"images_{set_name}.zip")
    if not found:
        raise DataError(
            f"no Omniglot images in {source} (expected images_background/<Alphabet>/<characterNN>/*.png "
            "or images_evaluation/..., as a zip or a folder)"
        )
    return found


def _collect(sources: list[Path]) -> list[Drawing]:
    """Every drawing of both sets, each set from exactly one place, sorted by key."""
    drawings: list[Drawing] = []
    origin: dict[str, str] = {}
    for source in sources:
        found = _drawings_in_source(source)
        for set_name in sorted({d.set for d in found}):
            if set_name in origin:
                raise DataError(f"images_{set_name} is given twice: in {origin[set_name]} and in {source}")
            origin[set_name] = str(source)
        drawings += found
    for set_name in SETS:
        if set_name not in origin:
            names = ", ".join(str(s) for s in sources)
            raise DataError(f"no images_{set_name} in the sources ({names}); pass {SOURCE_HINT}")
    return sorted(drawings, key=lambda d: d.key)


def _read_files(drawings: list[Drawing]) -> Iterator[tuple[str, bytes]]:
    """(where, PNG bytes) of each drawing, in order; each zip is opened once."""
    archives: dict[str, zipfile.ZipFile] = {}
    try:
        for d in drawings:
            where = f"{d.member} in {d.container}"
            try:
                if d.in_zip:
                    if d.container not in archives:
                        archives[d.container] = zipfile.ZipFile(d.container)
                    yield where, archives[d.container].read(d.member)
                else:
                    yield where, (Path(d.container) / d.member).read_bytes()
            except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as exc:
                raise DataError(f"cannot read image {where}: {_one_line(exc)}") from None
    finally:
        for archive in archives.values():
            archive.close()


def _decode_pngs(files: list[tuple[str, bytes]]) -> bytes:
    """Preprocessed pixels of `files`, concatenated. Runs in a worker process."""
    out = bytearray()
    for where, data in files:
        try:
            with Image.open(BytesIO(data)) as image:
                out += preprocess_image(image).tobytes()
        except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError, ValueError) as exc:
            raise DataError(f"cannot read image {where}: {_one_line(exc)}") from None
    return bytes(out)


def _decode_all(drawings: list[Drawing], workers: int, chunk: int = 1000) -> np.ndarray:
    """(n, 28, 28) pixels of `drawings`: this process reads the bytes, `workers` processes decode.

    PNG decoding and resampling hold the GIL, so threads would not help. Each chunk is handed
    out as soon as it is read, so decoding starts at once.
    """
    files = _read_files(drawings)
    if workers <= 1 or len(drawings) <= chunk:
        data = _decode_pngs(list(files))
    else:
        # forkserver, not fork: forking a process that already runs Ray's threads is unsafe.
        # Like spawn, it re-imports the main script, so scripts need `if __name__ == "__main__":`.
        context = multiprocessing.get_context("forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else None)
        with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
            futures = []
            while batch := list(islice(files, chunk)):
                futures.append(pool.submit(_decode_pngs, batch))
            data = b"".join(f.result() for f in futures)
    return np.frombuffer(data, dtype=np.uint8).reshape(len(drawings), IMAGE_SIZE, IMAGE_SIZE)


def _write_table(batch: pa.RecordBatch, out: Path) -> None:
    def write(sink: BinaryIO) -> None:
        with pa.ipc.new_file(sink, batch.schema) as writer:  # uncompressed: memory-mappable
            writer.write_batch(batch)

    atomic_write(out, write)


def _download(url: str, dest: Path, timeout: float) -> None:
    def fetch(sink: BinaryIO) -> None:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            shutil.copyfileobj(response, sink, 1 << 20)

    atomic_write(dest, fetch)


def default_sources(folder: str | Path = DEFAULT_SOURCE_DIR, url: str = OFFICIAL_URL, timeout: float = 20.0) -> list[Path]:
    """The two official zips in `folder`, downloading any that are missing from `url` ({name} = zip name)."""
    paths = [Path(folder) / f"images_{s}.zip" for s in SETS]
    for path in paths:
        if path.is_file():
            continue
        source = url.format(name=path.name)
        try:
            _download(source, path, timeout)
        except (urllib.error.URLError, OSError) as exc:
            raise DataError(
                f"no Omniglot source given, {path} is missing and downloading {source} failed "
                f"({_one_line(exc)}); pass {SOURCE_HINT}"
            ) from None
    return paths


def _worker_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def prepare_omniglot(sources: list[str | Path] | None, out: str | Path = DEFAULT_TABLE) -> dict:
    """Build the Omniglot table at `out` from the official release; returns a summary."""
    start = time.perf_counter()
    paths = [Path(s) for s in sources] if sources else default_sources()
    out = Path(out)
    drawings = _collect(paths)
    images = _decode_all(drawings, _worker_count())
    pixels = IMAGE_SIZE * IMAGE_SIZE
    columns = {
        "image": pa.FixedSizeBinaryArray.from_buffers(pa.binary(pixels), len(drawings), [None, pa.py_buffer(images)]),
        "set": pa.array([d.set for d in drawings], pa.string()),
        "alphabet": pa.array([d.alphabet for d in drawings], pa.string()),
        "character": pa.array([d.character for d in drawings], pa.string()),
        "file": pa.array([d.file for d in drawings], pa.string()),
    }
    metadata = {"reptile_dist.format": FORMAT, "image_size": str(IMAGE_SIZE)}
    batch = pa.RecordBatch.from_pydict(columns).replace_schema_metadata(metadata)
    _write_table(batch, out)
    sets = {}
    for set_name in SETS:
        mine = [d for d in drawings if d.set == set_name]
        sets[set_name] = {
            "alphabets": len({d.alphabet for d in mine}),
            "characters": len({(d.alphabet, d.character) for d in mine}),
            "images": len(mine),
        }
    return {
        "out": str(out),
        "characters": sum(s["characters"] for s in sets.values()),
        "images": len(drawings),
        "sets": sets,
        "seconds": round(time.perf_counter() - start, 2),
    }


def open_table(path: Path, table_format: str, what: str, build: str, rebuild: str) -> tuple[pa.Table, dict[str, str]]:
    """A prepared table, memory-mapped, and its schema metadata, after checking that it is one of
    `table_format` (DataError in one line naming `what` it should be, and how to `build` or
    `rebuild` it)."""
    if not path.is_file():
        raise DataError(f"{what} not found: {path} (build it with `{build}`)")
    try:
        reader = pa.ipc.open_file(pa.memory_map(str(path), "r"))
        metadata = {k.decode(errors="replace"): v.decode(errors="replace")
                    for k, v in (reader.schema.metadata or {}).items()}
        found = metadata.get("reptile_dist.format", "")
        if found != table_format:
            raise DataError(f"{path} is not an {what} (format '{found}', expected '{table_format}'); {rebuild}")
        table = reader.read_all()
        table.validate()
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{path} is not a valid {what} ({_one_line(exc)}); {rebuild}") from None
    return table, metadata


def _open_table(path: Path) -> tuple[pa.Table, int]:
    """The table, memory-mapped, and its image size, after checking it is an Omniglot table."""
    rebuild = "rebuild it with `reptile-dist data omniglot`"
    table, metadata = open_table(path, FORMAT, "Omniglot table", f"reptile-dist data omniglot {SOURCE_HINT}", rebuild)
    raw_size = metadata.get("image_size", "")
    size = int(raw_size) if raw_size.isdigit() else 0
    expected = pa.schema([("image", pa.binary(size * size))] + [(c, pa.string()) for c in ("set", "alphabet", "character", "file")])
    if size <= 0 or not table.schema.equals(expected) or table.num_rows == 0:
        raise DataError(f"{path} has an unexpected layout (columns {table.schema.names}, image_size {size}); {rebuild}")
    return table, size


def _image_view(table: pa.Table, size: int, channels: int = 1) -> np.ndarray:
    """The image column as a read-only (n, size, size) view of the mapped file, (n, size, size,
    channels) for more than one channel: no pixel copy."""
    column = table.column("image")
    # One record batch is one chunk; our writer always makes one. combine_chunks would copy.
    images = column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()
    pixels = size * size * channels
    data = np.frombuffer(images.buffers()[1], dtype=np.uint8, count=len(images) * pixels, offset=images.offset * pixels)
    return data.reshape((len(images), size, size) + ((channels,) if channels > 1 else ()))


def _characters(table: pa.Table, path: Path) -> tuple[np.ndarray, list[np.ndarray]]:
    """Characters sorted by (set, alphabet, character): the set of each and its row indices."""
    # "\0" never occurs in a file name, so sorting the joined key sorts the (set, alphabet, character) tuple.
    keys = pc.binary_join_element_wise(table["set"], table["alphabet"], table["character"], "\0")
    keys = keys.to_numpy(zero_copy_only=False)
    _, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
    rows = np.argsort(inverse, kind="stable")  # stable: rows of a character stay in file order
    bounds = np.cumsum(np.bincount(inverse))[:-1]
    sets = table["set"].to_numpy(zero_copy_only=False)[first]
    unknown = sorted(set(sets) - set(SETS))
    if unknown:
        raise DataError(f"{path} has rows of unknown set {unknown[0]!r} (expected one of {SETS})")
    return sets, np.split(rows, bounds)


def load_omniglot(
    path: str | Path = DEFAULT_TABLE, split: str = "paper", seed: int = 0, val_characters: int = 0
) -> ImageClasses:
    """Memory-map the table at `path` and split its characters into train / val / test classes.

    paper: the 1623 characters in sorted order, shuffled with `seed`; the first 1200 train (each
    rotated into 4 classes), the other 423 test, unrotated (Nichol et al. 2018).
    alphabet: background characters train (rotated), evaluation characters test, so no test
    alphabet is ever seen in training (Lake et al. 2019).
    val_characters: that many training characters (the last after a `seed` shuffle) move to
    "val", rotated like train.
    """
    if split not in SPLITS:
        raise DataError(f"split='{split}' is not one of {', '.join(SPLITS)}")
    path = Path(path)
    table, size = _open_table(path)
    sets, rows = _characters(table, path)
    rng = np.random.default_rng(seed)
    if split == "paper":
        if len(rows) <= PAPER_TRAIN_CHARACTERS:
            raise DataError(f"{path} has {len(rows)} characters; the paper split needs more than {PAPER_TRAIN_CHARACTERS}")
        order = rng.permutation(len(rows))
        train, test = order[:PAPER_TRAIN_CHARACTERS], order[PAPER_TRAIN_CHARACTERS:]
    else:
        train = rng.permutation(np.flatnonzero(sets == "background"))
        test = np.flatnonzero(sets == "evaluation")
    if not 0 <= val_characters < len(train):
        raise DataError(
            f"val_characters={val_characters} must be in [0, {len(train)}): the {split} split has {len(train)} training characters"
        )
    kept = len(train) - val_characters
    return ImageClasses(
        images=_image_view(table, size),
        splits={
            "train": [ImageClass(rows=rows[c], rotation=r) for c in train[:kept] for r in ROTATIONS],
            "val": [ImageClass(rows=rows[c], rotation=r) for c in train[kept:] for r in ROTATIONS],
            "test": [ImageClass(rows=rows[c], rotation=0) for c in test],
        },
        image_size=size,
    )


def split_summary(classes: ImageClasses) -> dict:
    """Per split: number of classes and the fewest / most images in a class."""
    summary = {}
    for name, members in classes.splits.items():
        counts = [len(c.rows) for c in members]
        summary[name] = {
            "classes": len(members),
            "images_per_class_min": min(counts, default=0),
            "images_per_class_max": max(counts, default=0),
        }
    return summary
