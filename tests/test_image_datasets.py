"""`reptile-dist data images`: every source layout prepared into the Arrow image table, loaded back
as classes; bad input ends in one line naming the file, with nothing left under --out."""
from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from image_fixtures import (
    CIFAR100_COARSE,
    CIFAR100_FINE,
    CIFAR100_SUPERCLASSES,
    class_colour,
    write_cifar100,
    write_flat,
    write_mini_imagenet_csv,
    write_mini_imagenet_pickles,
    write_split_folders,
)
from reptile_dist.cli import main
from reptile_dist.config import ConfigError
from reptile_dist.data import images as images_module
from reptile_dist.data.images import (
    CIFAR_FS_CLASSES,
    FC100_SUPERCLASSES,
    DataError,
    _load_pickle,
    load_image_table,
    prepare_images,
    preprocess_like,
    preprocessing_for,
)
from reptile_dist.errors import UserError
from reptile_dist.tasks.images import ImageFamily, load_images

SIZE = 16  # small tables: fast to build, still several pixels per class colour


def metadata_of(path: Path) -> dict[str, str]:
    schema = pa.ipc.open_file(str(path)).schema
    return {k.decode(): v.decode() for k, v in schema.metadata.items()}


def table_of(path: Path) -> pa.Table:
    return pa.ipc.open_file(str(path)).read_all()


def assert_one_line_naming(error, *names) -> None:
    message = str(error.value)
    assert "\n" not in message
    for name in names:
        assert str(name) in message, f"{name} not in: {message}"


def assert_nothing_written(folder: Path) -> None:
    assert not folder.exists() or not any(folder.iterdir()), list(folder.iterdir())


# --- Layouts -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def split_folders(tmp_path_factory) -> tuple[Path, dict[str, list[str]]]:
    root = tmp_path_factory.mktemp("split-folders")
    return root, write_split_folders(root)


def test_split_folders_become_rgb_classes_with_recorded_metadata(split_folders, tmp_path):
    root, classes = split_folders
    summary = prepare_images(root, tmp_path / "t.arrow", size=SIZE, channels=3)
    assert summary["layout"] == "split-folders" and summary["images"] == 9 * 3 and summary["classes"] == 9
    assert {s: v["classes"] for s, v in summary["splits"].items()} == {"train": 4, "val": 2, "test": 3}

    meta = metadata_of(tmp_path / "t.arrow")
    assert meta["reptile_dist.format"] == "images-v1" and meta["source_layout"] == "split-folders"
    assert (meta["image_size"], meta["channels"]) == (str(SIZE), "3")
    preprocessing = json.loads(meta["preprocessing"])
    assert preprocessing == preprocessing_for(SIZE, 3)
    assert {k: preprocessing[k] for k in ("size", "channels", "crop", "resize")} == {
        "size": SIZE, "channels": 3, "crop": "center-square", "resize": "lanczos"}
    assert json.loads(meta["split_recipe"]) == {"kind": "folders"}

    table = table_of(tmp_path / "t.arrow")
    assert table.schema.field("image").type == pa.binary(SIZE * SIZE * 3)
    assert table["file"][0].as_py() == "train/train_class0/img00.png"
    assert table["split"].to_pylist() == ["train"] * 12 + ["val"] * 6 + ["test"] * 9

    loaded = load_image_table(tmp_path / "t.arrow")
    assert loaded.images.shape == (27, SIZE, SIZE, 3) and loaded.images.dtype == np.uint8
    assert not loaded.images.flags.writeable  # a view of the mapped file
    assert (loaded.channels, loaded.image_size, loaded.preprocessing) == (3, SIZE, preprocessing)
    assert [len(loaded.splits[s]) for s in ("train", "val", "test")] == [4, 2, 3]
    # Each class's rows are its folder's files, each converted as preprocess_like converts it,
    # whatever the file's mode, size or format; an RGB file keeps its class's colour.
    files = table["file"].to_pylist()
    for index, cls in enumerate(c for s in ("train", "val", "test") for c in loaded.splits[s]):
        assert len(cls.rows) == 3 and cls.rotation == 0
        assert len({files[row].rsplit("/", 1)[0] for row in cls.rows}) == 1
        for row in cls.rows:
            with Image.open(root / files[row]) as source:
                assert np.array_equal(loaded.images[row], preprocess_like(source, preprocessing))
                if source.mode == "RGB":
                    assert np.abs(loaded.images[row].mean(axis=(0, 1)) - class_colour(index)).max() < 6


def test_one_channel_tables_hold_luma_images(split_folders, tmp_path):
    root, _ = split_folders
    prepare_images(root, tmp_path / "gray.arrow", size=SIZE, channels=1)
    loaded = load_image_table(tmp_path / "gray.arrow")
    assert loaded.images.shape == (27, SIZE, SIZE) and loaded.channels == 1
    source = Image.open(root / "train" / "train_class0" / "img00.png")
    assert np.array_equal(loaded.images[0], preprocess_like(source, loaded.preprocessing))
    assert abs(float(loaded.images[0].mean()) - float(np.asarray(source.convert("L"), dtype=float).mean())) < 3


def test_flat_folder_split_is_seeded_and_recorded(tmp_path):
    root = tmp_path / "flat"
    names = write_flat(root, classes=10, per_class=2)

    def assignment(seed: int, split: str = "6:2:2") -> dict[str, set[str]]:
        out = tmp_path / f"flat-{seed}-{split}.arrow"
        summary = prepare_images(root, out, size=8, split=split, seed=seed)
        assert summary["layout"] == "flat"
        table = table_of(out)
        pairs = set(zip(table["split"].to_pylist(), table["class"].to_pylist()))
        recipe = json.loads(metadata_of(out)["split_recipe"])
        assert recipe["seed"] == seed and recipe["split"] == split and recipe["kind"] == "seeded"
        assert recipe["classes"] == {"train": 6, "val": 2, "test": 2}
        return {s: {c for t, c in pairs if t == s} for s in ("train", "val", "test")}

    first = assignment(0)
    assert [len(first[s]) for s in ("train", "val", "test")] == [6, 2, 2]
    assert set().union(*first.values()) == set(names)
    assert assignment(0) == first  # same seed, same split
    assert assignment(0, "0.6:0.2:0.2") == first  # fractions name the same counts
    assert any(assignment(seed) != first for seed in (1, 2, 3))


@pytest.mark.parametrize("split, message", [
    ("6:2", "must be TRAIN:VAL:TEST"),
    ("a:b:c", "must be TRAIN:VAL:TEST"),
    ("5:5:5", "names 15 classes, but the source has 10"),
    ("10:0:0", "leaves split 'val' empty"),
    ("0.5:0.4:0.4", "sum to 1"),
])
def test_bad_split_is_one_line(tmp_path, split, message):
    write_flat(tmp_path / "flat", classes=10, per_class=1)
    with pytest.raises(DataError, match=message) as error:
        prepare_images(tmp_path / "flat", tmp_path / "out" / "t.arrow", size=8, split=split)
    assert_one_line_naming(error, split)
    assert_nothing_written(tmp_path / "out")


def test_split_fractions_round_to_counts_that_sum_to_the_classes(tmp_path):
    write_flat(tmp_path / "flat", classes=7, per_class=1)
    summary = prepare_images(tmp_path / "flat", tmp_path / "t.arrow", size=4, split="0.64:0.16:0.2")
    assert [summary["splits"][s]["classes"] for s in ("train", "val", "test")] == [5, 1, 1]


def test_flat_folder_without_split_says_to_pass_one_and_split_folders_refuse_one(split_folders, tmp_path):
    write_flat(tmp_path / "flat", classes=4, per_class=1)
    with pytest.raises(DataError, match="pass --split TRAIN:VAL:TEST") as error:
        prepare_images(tmp_path / "flat", tmp_path / "t.arrow", size=4)
    assert_one_line_naming(error, tmp_path / "flat")
    with pytest.raises(DataError, match="--split applies to a flat folder"):
        prepare_images(split_folders[0], tmp_path / "t.arrow", size=4, layout="split-folders", split="1:1:1")


def test_mini_imagenet_csv_layout(tmp_path):
    classes = write_mini_imagenet_csv(tmp_path / "mini")
    summary = prepare_images(tmp_path / "mini", tmp_path / "t.arrow", size=SIZE)
    assert summary["layout"] == "mini-imagenet-csv" and summary["images"] == 27
    loaded = load_image_table(tmp_path / "t.arrow")
    table = table_of(tmp_path / "t.arrow")
    assert sorted(set(table.filter(pa.compute.equal(table["split"], "val"))["class"].to_pylist())) == classes["val"]
    assert table["file"][0].as_py().startswith("images/n00000000")
    assert loaded.images.shape == (27, SIZE, SIZE, 3)


def test_csv_naming_a_missing_file_is_one_line_naming_both(tmp_path):
    write_mini_imagenet_csv(tmp_path / "mini")
    with open(tmp_path / "mini" / "val.csv", "a") as stream:
        stream.write("n99999999.jpg,n00000004\n")
    with pytest.raises(DataError, match="does not exist") as error:
        prepare_images(tmp_path / "mini", tmp_path / "out" / "t.arrow")
    assert_one_line_naming(error, tmp_path / "mini" / "val.csv", "line 8", tmp_path / "mini" / "images" / "n99999999.jpg")
    assert_nothing_written(tmp_path / "out")


def test_mini_imagenet_pickles_keep_their_pixels_at_their_own_size(tmp_path):
    caches = write_mini_imagenet_pickles(tmp_path / "mini", size=8)
    summary = prepare_images(tmp_path / "mini", tmp_path / "t.arrow", size=8)
    assert summary["layout"] == "mini-imagenet-pickle" and summary["images"] == 27
    loaded = load_image_table(tmp_path / "t.arrow")
    table = table_of(tmp_path / "t.arrow")
    files, splits = table["file"].to_pylist(), table["split"].to_pylist()
    for split, cache in caches.items():
        for name, rows in cache["class_dict"].items():
            for r in rows:
                i = files.index(f"mini-imagenet-cache-{split}.pkl:{r}")
                assert splits[i] == split
                assert np.array_equal(loaded.images[i], cache["image_data"][r])  # 8x8 -> 8x8 changes nothing


@pytest.fixture(scope="module")
def cifar(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("cifar")
    return root, write_cifar100(root)


def test_cifar_fs_uses_the_published_64_16_20_class_lists(cifar, tmp_path):
    assert [len(CIFAR_FS_CLASSES[s]) for s in ("train", "val", "test")] == [64, 16, 20]
    assert sorted(sum(CIFAR_FS_CLASSES.values(), ())) == CIFAR100_FINE  # each CIFAR-100 class exactly once
    root, parts = cifar
    summary = prepare_images(root, tmp_path / "fs.arrow", size=32, layout="cifar-fs")
    assert summary["images"] == 300 and [summary["splits"][s]["classes"] for s in ("train", "val", "test")] == [64, 16, 20]
    assert summary["splits"]["train"]["images_per_class_min"] == 3  # CIFAR's train and test images together
    table = table_of(tmp_path / "fs.arrow")
    for split in ("train", "val", "test"):
        chosen = table.filter(pa.compute.equal(table["split"], split))
        assert set(chosen["class"].to_pylist()) == set(CIFAR_FS_CLASSES[split])
    loaded = load_image_table(tmp_path / "fs.arrow")
    files = table["file"].to_pylist()
    i = files.index(f"train/{parts['train']['filenames'][5]}")
    assert np.array_equal(loaded.images[i], parts["train"]["images"][5])  # CIFAR's planes become HWC pixels
    assert json.loads(metadata_of(tmp_path / "fs.arrow")["split_recipe"])["name"] == "cifar-fs"


def test_fc100_splits_by_superclass(cifar, tmp_path):
    root, _ = cifar
    summary = prepare_images(root / "cifar-100-python", tmp_path / "fc.arrow", size=8, channels=1, layout="fc100")
    assert [summary["splits"][s]["classes"] for s in ("train", "val", "test")] == [60, 20, 20]
    table = table_of(tmp_path / "fc.arrow")
    for split, coarse in FC100_SUPERCLASSES.items():
        chosen = table.filter(pa.compute.equal(table["split"], split))
        expected = {fine for c in coarse for fine in CIFAR100_SUPERCLASSES[CIFAR100_COARSE[c]]}
        assert set(chosen["class"].to_pylist()) == expected
    assert {CIFAR100_COARSE[c] for c in FC100_SUPERCLASSES["test"]} == {"aquatic_mammals", "insects", "medium_mammals", "people"}
    assert load_image_table(tmp_path / "fc.arrow").images.shape == (300, 8, 8)


def test_cifar_without_a_named_split_asks_for_one(cifar, tmp_path):
    with pytest.raises(DataError, match="--layout cifar-fs .* --layout fc100"):
        prepare_images(cifar[0], tmp_path / "t.arrow")


# --- Pickles are data, not code ------------------------------------------------------------------


class RunsCode:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class RunsBuiltin:
    def __reduce__(self):
        return (eval, ("__import__('os').getpid()",))


@pytest.mark.parametrize("payload", ["os.system", "eval"])
def test_a_crafted_pickle_runs_no_code(tmp_path, payload):
    marker = tmp_path / "ran"
    write_mini_imagenet_pickles(tmp_path / "mini", size=4)
    evil = RunsCode(marker) if payload == "os.system" else RunsBuiltin()
    with open(tmp_path / "mini" / "mini-imagenet-cache-val.pkl", "wb") as stream:
        pickle.dump({"image_data": evil, "class_dict": {}}, stream)
    with pytest.raises(DataError, match="not allowed") as error:
        prepare_images(tmp_path / "mini", tmp_path / "out" / "t.arrow", size=4)
    assert_one_line_naming(error, tmp_path / "mini" / "mini-imagenet-cache-val.pkl")
    assert not marker.exists()
    assert_nothing_written(tmp_path / "out")


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_plain_data_pickles_of_every_protocol_load(tmp_path, protocol):
    data = {"a": np.arange(12, dtype=np.uint8).reshape(3, 4), "b": [np.int64(3), np.float32(0.5)],
            "c": OrderedDict(x={1, 2}), "d": (b"bytes", frozenset({"s"}), bytearray(b"ba"))}
    path = tmp_path / "plain.pkl"
    path.write_bytes(pickle.dumps(data, protocol=protocol))
    loaded = _load_pickle(path)
    assert np.array_equal(loaded["a"], data["a"]) and loaded["b"] == data["b"]
    assert loaded["c"] == data["c"] and loaded["d"] == data["d"]


def test_a_truncated_pickle_is_one_line_naming_it(tmp_path):
    path = tmp_path / "mini-imagenet-cache-train.pkl"
    path.write_bytes(pickle.dumps({"image_data": np.zeros((2, 4, 4, 3), np.uint8)})[:40])
    with pytest.raises(DataError, match="cannot read pickle") as error:
        _load_pickle(path)
    assert_one_line_naming(error, path)


# --- Bad images, empty splits, stray classes -----------------------------------------------------


def test_a_corrupt_image_is_named_and_no_table_is_left_behind(tmp_path):
    write_split_folders(tmp_path / "src")
    broken = tmp_path / "src" / "val" / "val_class1" / "img01.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 this is not really a JPEG")
    with pytest.raises(DataError, match="cannot read image") as error:
        prepare_images(tmp_path / "src", tmp_path / "out" / "t.arrow", size=8)
    assert_one_line_naming(error, broken)
    assert_nothing_written(tmp_path / "out")


def test_a_truncated_png_is_named(tmp_path):
    write_split_folders(tmp_path / "src")
    png = tmp_path / "src" / "test" / "test_class2" / "img00.png"
    png.write_bytes(png.read_bytes()[:-200])
    with pytest.raises(DataError, match="cannot read image") as error:
        prepare_images(tmp_path / "src", tmp_path / "t.arrow", size=8)
    assert_one_line_naming(error, png)


def test_an_empty_split_is_one_line_naming_it(tmp_path):
    write_split_folders(tmp_path / "src", counts={"train": 2, "val": 0, "test": 2}, per_class=1)
    (tmp_path / "src" / "val").mkdir()
    with pytest.raises(DataError, match="split 'val' is empty") as error:
        prepare_images(tmp_path / "src", tmp_path / "out" / "t.arrow", size=8)
    assert_one_line_naming(error, tmp_path / "src" / "val")
    assert_nothing_written(tmp_path / "out")


def test_an_empty_csv_split_is_named(tmp_path):
    write_mini_imagenet_csv(tmp_path / "mini")
    (tmp_path / "mini" / "test.csv").write_text("filename,label\n")
    with pytest.raises(DataError, match="split 'test' is empty") as error:
        prepare_images(tmp_path / "mini", tmp_path / "t.arrow")
    assert_one_line_naming(error, tmp_path / "mini" / "test.csv")


def test_a_class_in_two_splits_is_refused(tmp_path):
    write_split_folders(tmp_path / "src", per_class=1)
    (tmp_path / "src" / "test" / "train_class0").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "src" / "test" / "train_class0" / "x.png")
    with pytest.raises(DataError, match="class 'train_class0' is in both train and test"):
        prepare_images(tmp_path / "src", tmp_path / "t.arrow", size=8)


def test_a_class_folder_without_images_is_named(tmp_path):
    write_split_folders(tmp_path / "src", per_class=1)
    (tmp_path / "src" / "train" / "empty").mkdir()
    (tmp_path / "src" / "train" / "empty" / "notes.txt").write_text("no pictures here")
    with pytest.raises(DataError, match="has no images") as error:
        prepare_images(tmp_path / "src", tmp_path / "t.arrow", size=8)
    assert_one_line_naming(error, tmp_path / "src" / "train" / "empty")


def test_too_few_images_per_class_names_the_numbers_at_training(split_folders, tmp_path):
    prepare_images(split_folders[0], tmp_path / "t.arrow", size=8)
    classes = load_image_table(tmp_path / "t.arrow")
    with pytest.raises(ConfigError, match=r"shots \+ queries = 5 exceeds the 3 images per class of split 'train'"):
        ImageFamily(classes, ways=2, train_shots=1, shots=1, queries=4)
    with pytest.raises(ConfigError, match=r"ways=3 is larger than the 2 classes of split 'val'"):
        ImageFamily(classes, ways=3, train_shots=1, shots=1, queries=1)


# --- Preprocessing -------------------------------------------------------------------------------


def test_non_square_images_are_centre_cropped_not_stretched():
    # Red and green bands at the ends of the long side; blue wider than the centred square.
    wide = np.zeros((30, 60, 3), dtype=np.uint8)
    wide[:, :10] = (255, 0, 0)
    wide[:, 10:50] = (0, 0, 255)
    wide[:, 50:] = (0, 255, 0)
    pixels = preprocess_like(Image.fromarray(wide), preprocessing_for(12, 3))
    assert pixels.shape == (12, 12, 3)
    assert pixels[..., 2].min() > 240 and pixels[..., :2].max() < 15  # only the blue centre is left
    tall = preprocess_like(Image.fromarray(wide.transpose(1, 0, 2)), preprocessing_for(12, 3))
    assert np.array_equal(tall, pixels.transpose(1, 0, 2))


def test_preprocessing_turns_photos_upright_by_their_exif_orientation(tmp_path):
    pixels = np.zeros((10, 20, 3), dtype=np.uint8)
    pixels[:, :10] = (255, 0, 0)  # left half red, right half blue, as stored
    pixels[:, 10:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to view"
    Image.fromarray(pixels).save(tmp_path / "photo.png", exif=exif)
    with Image.open(tmp_path / "photo.png") as photo:
        upright = preprocess_like(photo, preprocessing_for(10, 3))
    assert upright[1, 5, 0] > 240 and upright[8, 5, 2] > 240  # red on top, blue below


def test_preprocessing_flattens_transparency_onto_white_and_scales_16_bit():
    clear = np.zeros((10, 10, 4), dtype=np.uint8)  # transparent black
    assert preprocess_like(Image.fromarray(clear, mode="RGBA"), preprocessing_for(4, 3)).min() == 255
    deep = Image.fromarray(np.full((10, 10), 65535, dtype=np.uint16))
    assert preprocess_like(deep, preprocessing_for(4, 3)).min() == 255
    assert preprocess_like(deep, preprocessing_for(4, 1)).shape == (4, 4)


def test_preprocess_like_refuses_a_record_it_cannot_reproduce():
    record = dict(preprocessing_for(8, 3), resize="bilinear")
    with pytest.raises(DataError, match="not one this version"):
        preprocess_like(Image.new("RGB", (8, 8)), record)
    with pytest.raises(DataError, match="channels=2"):
        preprocess_like(Image.new("RGB", (8, 8)), dict(preprocessing_for(8, 3), channels=2))


def test_parallel_decoding_writes_the_same_table(split_folders, tmp_path, monkeypatch):
    root, _ = split_folders
    prepare_images(root, tmp_path / "one.arrow", size=SIZE, workers=1)
    monkeypatch.setattr(images_module, "_CHUNK", 4)
    prepare_images(root, tmp_path / "two.arrow", size=SIZE, workers=2)
    assert table_of(tmp_path / "one.arrow").equals(table_of(tmp_path / "two.arrow"))


def test_a_corrupt_image_in_a_worker_process_is_named(tmp_path, monkeypatch):
    write_split_folders(tmp_path / "src", per_class=2)
    broken = tmp_path / "src" / "test" / "test_class0" / "img01.jpg"
    broken.write_bytes(b"not an image")
    monkeypatch.setattr(images_module, "_CHUNK", 3)
    with pytest.raises(DataError, match="cannot read image") as error:
        prepare_images(tmp_path / "src", tmp_path / "out" / "t.arrow", size=8, workers=2)
    assert_one_line_naming(error, broken)
    assert_nothing_written(tmp_path / "out")


def test_load_images_puts_channels_first_and_rotates_height_and_width():
    rng = np.random.default_rng(0)
    colour = rng.integers(0, 256, size=(5, 6, 6, 3), dtype=np.uint8)
    batch = load_images(colour, np.array([3, 1]), rotation=90)
    assert batch.shape == (2, 3, 6, 6) and batch.dtype == np.float32 and batch.flags.c_contiguous
    for c in range(3):
        assert np.allclose(batch[0, c], np.rot90(colour[3, :, :, c]) / 255.0)
    gray = colour[..., 0]
    assert np.array_equal(load_images(gray, np.array([3, 1]), rotation=90), batch[:, :1])


# --- Tables and the command line -----------------------------------------------------------------


def test_missing_truncated_or_foreign_tables_are_one_line(split_folders, tmp_path, generated_omniglot_table):
    with pytest.raises(DataError, match="not found") as error:
        load_image_table(tmp_path / "absent.arrow")
    assert_one_line_naming(error, tmp_path / "absent.arrow")
    with pytest.raises(DataError, match="not an image table") as error:
        load_image_table(generated_omniglot_table)
    assert_one_line_naming(error, generated_omniglot_table)
    prepare_images(split_folders[0], tmp_path / "t.arrow", size=8)
    truncated = tmp_path / "truncated.arrow"
    truncated.write_bytes((tmp_path / "t.arrow").read_bytes()[:500])
    with pytest.raises(DataError) as error:
        load_image_table(truncated)
    assert_one_line_naming(error, truncated)


def test_cli_prepares_a_table_and_prints_the_summary(split_folders, tmp_path, capsys):
    out = tmp_path / "cli.arrow"
    assert main(["data", "images", "--source", str(split_folders[0]), "--out", str(out), "--size", "8",
                 "--channels", "1"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["images"] == 27 and summary["channels"] == 1 and summary["image_size"] == 8
    assert load_image_table(out).images.shape == (27, 8, 8)


@pytest.mark.parametrize("case", ["missing-source", "bad-layout", "bad-size", "crafted-pickle", "missing-csv-file"])
def test_cli_errors_are_one_line_with_exit_code_2(tmp_path, capsys, case):
    source, extra = tmp_path / "src", []
    if case == "bad-layout":
        write_split_folders(source, per_class=1)
        extra = ["--layout", "imagenet"]
    elif case == "bad-size":
        write_split_folders(source, per_class=1)
        extra = ["--size", "0"]
    elif case == "crafted-pickle":
        write_mini_imagenet_pickles(source, size=4)
        (source / "mini-imagenet-cache-train.pkl").write_bytes(pickle.dumps(RunsCode(tmp_path / "ran")))
    elif case == "missing-csv-file":
        write_mini_imagenet_csv(source)
        next((source / "images").iterdir()).unlink()
    code = main(["data", "images", "--source", str(source), "--out", str(tmp_path / "out" / "t.arrow"), *extra])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("reptile-dist: error: ") and err.count("\n") == 1, err
    assert not (tmp_path / "ran").exists()
    assert_nothing_written(tmp_path / "out")


def test_data_errors_are_user_errors():
    assert issubclass(DataError, UserError)


def test_the_images_data_module_imports_without_torch():
    # Its decode worker processes re-import it; torch would cost each of them seconds.
    code = "import sys, reptile_dist.data.images; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
