"""Omniglot preparation and loading, on generated releases in the official layout (prepared once
per session by `prepare_omniglot`); the official release's own sizes where it is present."""
from __future__ import annotations

import zipfile
from io import BytesIO
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from conftest import PAPER_SIZED_RELEASE, SMALL_RELEASE
from reptile_dist.data.omniglot import (
    PAPER_TRAIN_CHARACTERS,
    DataError,
    default_sources,
    load_omniglot,
    prepare_omniglot,
    preprocess_image,
    split_summary,
)


def characters_of(classes) -> set[int]:
    """A character is identified by its first row (rows are disjoint between characters)."""
    return {int(c.rows[0]) for c in classes}


def characters_in(release: dict[str, list[int]], set_name: str | None = None) -> int:
    """Characters of a generated release (conftest), in one set or in all."""
    return sum(sum(sizes) for name, sizes in release.items() if set_name in (None, name))


def alphabets_of(table_path: Path, classes) -> set[tuple[str, str]]:
    table = pa.ipc.open_file(pa.memory_map(str(table_path))).read_all()
    sets, alphabets = table["set"].to_numpy(zero_copy_only=False), table["alphabet"].to_numpy(zero_copy_only=False)
    return {(sets[c.rows[0]], alphabets[c.rows[0]]) for c in classes}


def png_bytes(image: Image.Image) -> bytes:
    buffer = BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def stroke(size: int = 105, mode: str = "1") -> Image.Image:
    """Black ink (a bar) on white paper, like an Omniglot drawing."""
    pixels = np.full((size, size), 255, dtype=np.uint8)
    pixels[size // 3 : 2 * size // 3, size // 4 : 3 * size // 4] = 0
    return Image.fromarray(pixels).convert(mode)


def write_release(folder: Path, broken: str | None = None) -> None:
    """A tiny release in the official folder layout: 2 sets x 2 characters x 3 drawings."""
    for set_name in ("background", "evaluation"):
        for character in ("character01", "character02"):
            leaf = folder / f"images_{set_name}" / f"Alpha_{set_name}" / character
            leaf.mkdir(parents=True)
            for i in range(3):
                (leaf / f"{i:04d}_{i:02d}.png").write_bytes(png_bytes(stroke()))
    if broken:
        (folder / broken).write_bytes(b"not a png")


@pytest.mark.slow  # prepares the full release (32,460 drawings)
def test_paper_split_has_4800_rotated_train_classes_and_423_test_classes_of_20(official_omniglot_table):
    classes = load_omniglot(official_omniglot_table, split="paper")
    summary = split_summary(classes)
    assert summary["train"] == {"classes": 4800, "images_per_class_min": 20, "images_per_class_max": 20}
    assert summary["test"] == {"classes": 423, "images_per_class_min": 20, "images_per_class_max": 20}
    assert summary["val"]["classes"] == 0
    assert len(characters_of(classes.splits["train"])) == 1200
    assert sorted({c.rotation for c in classes.splits["train"]}) == [0, 90, 180, 270]
    assert {c.rotation for c in classes.splits["test"]} == {0}
    assert classes.images.shape == (32460, 28, 28) and classes.images.dtype == np.uint8


@pytest.mark.slow  # prepares the full release (32,460 drawings)
def test_alphabet_split_of_the_release_has_964_background_and_659_evaluation_characters(official_omniglot_table):
    classes = load_omniglot(official_omniglot_table, split="alphabet")
    summary = split_summary(classes)
    assert summary["train"]["classes"] == 4 * 964 and summary["test"]["classes"] == 659
    assert len(alphabets_of(official_omniglot_table, classes.splits["train"])) == 30
    assert len(alphabets_of(official_omniglot_table, classes.splits["test"])) == 20


def test_paper_split_trains_on_1200_rotated_characters_and_tests_on_the_rest(paper_sized_omniglot_table):
    classes = load_omniglot(paper_sized_omniglot_table, split="paper")
    summary = split_summary(classes)
    held_out = characters_in(PAPER_SIZED_RELEASE) - PAPER_TRAIN_CHARACTERS
    assert summary["train"] == {"classes": 4 * PAPER_TRAIN_CHARACTERS, "images_per_class_min": 2, "images_per_class_max": 2}
    assert summary["test"] == {"classes": held_out, "images_per_class_min": 2, "images_per_class_max": 2}
    assert summary["val"]["classes"] == 0
    assert len(characters_of(classes.splits["train"])) == PAPER_TRAIN_CHARACTERS
    assert sorted({c.rotation for c in classes.splits["train"]}) == [0, 90, 180, 270]
    assert {c.rotation for c in classes.splits["test"]} == {0}
    # The shuffle draws test characters from both sets, unlike the alphabet split.
    assert {s for s, _ in alphabets_of(paper_sized_omniglot_table, classes.splits["test"])} == {"background", "evaluation"}


def test_paper_split_is_a_function_of_the_seed(paper_sized_omniglot_table):
    first = characters_of(load_omniglot(paper_sized_omniglot_table, seed=0).splits["test"])
    assert first == characters_of(load_omniglot(paper_sized_omniglot_table, seed=0).splits["test"])
    assert first != characters_of(load_omniglot(paper_sized_omniglot_table, seed=1).splits["test"])


def test_alphabet_split_trains_on_background_and_tests_on_evaluation(generated_omniglot_table):
    classes = load_omniglot(generated_omniglot_table, split="alphabet")
    summary = split_summary(classes)
    assert summary["train"]["classes"] == 4 * characters_in(SMALL_RELEASE, "background")
    assert summary["test"]["classes"] == characters_in(SMALL_RELEASE, "evaluation")
    assert summary["test"]["images_per_class_min"] == summary["test"]["images_per_class_max"] == 20
    train_alphabets = alphabets_of(generated_omniglot_table, classes.splits["train"])
    test_alphabets = alphabets_of(generated_omniglot_table, classes.splits["test"])
    assert {s for s, _ in train_alphabets} == {"background"} and len(train_alphabets) == len(SMALL_RELEASE["background"])
    assert {s for s, _ in test_alphabets} == {"evaluation"} and len(test_alphabets) == len(SMALL_RELEASE["evaluation"])
    assert not {a for _, a in train_alphabets} & {a for _, a in test_alphabets}


@pytest.mark.parametrize("table, split, val_characters", [
    ("paper_sized_omniglot_table", "paper", 50),
    ("generated_omniglot_table", "alphabet", 5),
])
def test_meta_test_characters_are_never_seen_in_meta_training(request, table, split, val_characters):
    classes = load_omniglot(request.getfixturevalue(table), split=split, val_characters=val_characters)
    train, val, test = (characters_of(classes.splits[s]) for s in ("train", "val", "test"))
    assert not train & test and not val & test and not train & val
    rows = [np.concatenate([c.rows for c in classes.splits[s]]) for s in ("train", "test")]
    assert not np.intersect1d(rows[0], rows[1]).size


def test_val_characters_are_carved_out_of_training(paper_sized_omniglot_table):
    classes = load_omniglot(paper_sized_omniglot_table, split="paper", val_characters=100)
    summary = split_summary(classes)
    held_out = characters_in(PAPER_SIZED_RELEASE) - PAPER_TRAIN_CHARACTERS
    assert (summary["train"]["classes"], summary["val"]["classes"], summary["test"]["classes"]) == (
        4 * (PAPER_TRAIN_CHARACTERS - 100), 4 * 100, held_out)
    whole = characters_of(load_omniglot(paper_sized_omniglot_table, split="paper").splits["train"])
    assert characters_of(classes.splits["train"]) | characters_of(classes.splits["val"]) == whole


@pytest.mark.parametrize("val_characters", [-1, PAPER_TRAIN_CHARACTERS])
def test_val_characters_out_of_range_names_the_field(paper_sized_omniglot_table, val_characters):
    with pytest.raises(ValueError, match=f"val_characters={val_characters} must be in \\[0, {PAPER_TRAIN_CHARACTERS}\\)"):
        load_omniglot(paper_sized_omniglot_table, split="paper", val_characters=val_characters)


def test_paper_split_of_too_few_characters_says_how_many_it_needs(generated_omniglot_table):
    with pytest.raises(DataError, match=f"{characters_in(SMALL_RELEASE)} characters; .* more than {PAPER_TRAIN_CHARACTERS}"):
        load_omniglot(generated_omniglot_table, split="paper")


def test_unknown_split_names_the_field(generated_omniglot_table):
    with pytest.raises(ValueError, match="split='lake'"):
        load_omniglot(generated_omniglot_table, split="lake")


def test_image_column_is_a_read_only_view_of_the_mapped_file(generated_omniglot_table):
    allocated = pa.total_allocated_bytes()
    images = load_omniglot(generated_omniglot_table, split="alphabet").images
    assert pa.total_allocated_bytes() - allocated < images.nbytes // 10  # the pixels were not read into memory
    assert not images.flags.writeable
    if not Path("/proc/self/maps").exists():
        return  # the allocation check above still holds off Linux
    address = images.__array_interface__["data"][0]
    mapped = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5] == str(generated_omniglot_table.resolve()):
            low, high = (int(x, 16) for x in fields[0].split("-"))
            mapped.append(low <= address and address + images.nbytes <= high)
    assert any(mapped), "image pixels do not lie in a mapping of the table file"


def test_table_is_sorted_with_ink_high_and_format_metadata(generated_omniglot_table):
    table = pa.ipc.open_file(pa.memory_map(str(generated_omniglot_table))).read_all()
    assert table.schema.metadata == {b"reptile_dist.format": b"omniglot-v1", b"image_size": b"28"}
    assert table.schema.field("image").type == pa.binary(784)
    keys = list(zip(*(table[c].to_pylist() for c in ("set", "alphabet", "character", "file"))))
    assert keys == sorted(keys) and len(set(keys)) == 20 * characters_in(SMALL_RELEASE)
    images = load_omniglot(generated_omniglot_table, split="alphabet").images
    assert images[:, 0, 0].mean() < 1  # paper is 0: corners are blank in nearly every drawing
    assert images.reshape(len(images), -1).max(axis=1).min() > 128  # every drawing has ink


def test_prepare_summarises_each_set_of_zips_in_the_official_layout(generated_omniglot_zips, tmp_path):
    summary = prepare_omniglot(generated_omniglot_zips, tmp_path / "omniglot.arrow")
    for set_name, sizes in SMALL_RELEASE.items():
        assert summary["sets"][set_name] == {"alphabets": len(sizes), "characters": sum(sizes), "images": 20 * sum(sizes)}
    assert summary["characters"] == characters_in(SMALL_RELEASE) and summary["images"] == 20 * characters_in(SMALL_RELEASE)


def test_prepare_reads_unpacked_folders_in_every_accepted_layout(tmp_path):
    write_release(tmp_path / "release")
    whole = prepare_omniglot([tmp_path / "release"], tmp_path / "a.arrow")
    assert whole["characters"] == 4 and whole["images"] == 12
    assert whole["sets"]["background"] == {"alphabets": 1, "characters": 2, "images": 6}
    per_set = prepare_omniglot(
        [tmp_path / "release" / "images_evaluation", tmp_path / "release" / "images_background"], tmp_path / "b.arrow"
    )
    assert per_set["images"] == 12
    assert (tmp_path / "a.arrow").read_bytes() == (tmp_path / "b.arrow").read_bytes()


def test_prepare_reads_a_folder_holding_the_two_zips(tmp_path):
    write_release(tmp_path / "release")
    for set_name in ("background", "evaluation"):
        with zipfile.ZipFile(tmp_path / f"images_{set_name}.zip", "w") as archive:
            for png in sorted((tmp_path / "release").glob(f"images_{set_name}/*/*/*.png")):
                archive.write(png, png.relative_to(tmp_path / "release").as_posix())
    summary = prepare_omniglot([tmp_path], tmp_path / "out" / "omniglot.arrow")
    assert summary["images"] == 12
    prepare_omniglot([tmp_path / "release"], tmp_path / "folders.arrow")
    assert (tmp_path / "out" / "omniglot.arrow").read_bytes() == (tmp_path / "folders.arrow").read_bytes()


def assert_one_line_naming(error: pytest.ExceptionInfo, path: Path | str) -> None:
    message = str(error.value)
    assert "\n" not in message and str(path) in message, message


def test_missing_zip_is_a_one_line_error_naming_it(tmp_path):
    missing = tmp_path / "images_background.zip"
    with pytest.raises(DataError, match="not found") as error:
        prepare_omniglot([missing], tmp_path / "out.arrow")
    assert_one_line_naming(error, missing)


def test_corrupt_zip_is_a_one_line_error_naming_it(tmp_path):
    corrupt = tmp_path / "images_background.zip"
    corrupt.write_bytes(b"PK\x03\x04 this is not really a zip\n" * 100)
    with pytest.raises(DataError, match="not a valid zip file") as error:
        prepare_omniglot([corrupt], tmp_path / "out.arrow")
    assert_one_line_naming(error, corrupt)


def test_source_without_omniglot_images_is_named(tmp_path):
    other = tmp_path / "photos.zip"
    with zipfile.ZipFile(other, "w") as archive:
        archive.writestr("holiday/beach.png", png_bytes(stroke()))
    with pytest.raises(DataError, match="no Omniglot images") as error:
        prepare_omniglot([other], tmp_path / "out.arrow")
    assert_one_line_naming(error, other)


def test_unreadable_png_is_named_and_no_table_is_left_behind(tmp_path):
    write_release(tmp_path / "release", broken="images_evaluation/Alpha_evaluation/character02/0009_09.png")
    with pytest.raises(DataError, match="cannot read image") as error:
        prepare_omniglot([tmp_path / "release"], tmp_path / "out" / "omniglot.arrow")
    assert_one_line_naming(error, "character02/0009_09.png")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_default_folder_zips_are_used_without_downloading(generated_omniglot_zips, tmp_path):
    for zip_path in generated_omniglot_zips:
        (tmp_path / zip_path.name).symlink_to(zip_path)
    found = default_sources(tmp_path, url="file:///nonexistent/{name}")
    assert found == [tmp_path / "images_background.zip", tmp_path / "images_evaluation.zip"]
    assert [p.read_bytes() for p in found] == [z.read_bytes() for z in generated_omniglot_zips]


def test_failed_download_says_what_to_pass(tmp_path):
    with pytest.raises(DataError, match="--source path/to/images_background.zip path/to/images_evaluation.zip") as error:
        default_sources(tmp_path / "data", url=(tmp_path / "offline").as_uri() + "/{name}")
    assert_one_line_naming(error, tmp_path / "data" / "images_background.zip")
    assert not list((tmp_path / "data").iterdir())  # no partial download left behind


def test_truncated_table_is_a_one_line_error_naming_it(generated_omniglot_table, tmp_path):
    truncated = tmp_path / "truncated.arrow"
    truncated.write_bytes(generated_omniglot_table.read_bytes()[: generated_omniglot_table.stat().st_size // 2])
    with pytest.raises(DataError) as error:
        load_omniglot(truncated)
    assert_one_line_naming(error, truncated)


def test_missing_or_foreign_table_is_a_one_line_error_naming_it(tmp_path):
    with pytest.raises(DataError, match="not found") as error:
        load_omniglot(tmp_path / "absent.arrow")
    assert_one_line_naming(error, tmp_path / "absent.arrow")
    foreign = tmp_path / "foreign.arrow"
    table = pa.table({"x": [1, 2, 3]})
    with pa.OSFile(str(foreign), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    with pytest.raises(DataError, match="not an Omniglot table") as error:
        load_omniglot(foreign)
    assert_one_line_naming(error, foreign)


@pytest.mark.parametrize("mode", ["1", "L", "P", "RGB", "RGBA", "CMYK", "I;16"])
def test_preprocess_puts_ink_high_for_every_mode(mode):
    image = stroke(mode="L")
    if mode == "I;16":
        image = Image.fromarray(np.asarray(image).astype(np.uint16) * 257)
    else:
        image = image.convert(mode)
    pixels = preprocess_image(image)
    assert pixels.shape == (28, 28) and pixels.dtype == np.uint8
    assert pixels[14, 14] > 240 and pixels[0, 0] < 15


def test_preprocess_flattens_transparency_onto_paper():
    ink = np.zeros((60, 60, 4), dtype=np.uint8)  # transparent black everywhere ...
    ink[20:40, 20:40, 3] = 255  # ... except an opaque black square
    pixels = preprocess_image(Image.fromarray(ink, mode="RGBA"))
    assert pixels[14, 14] > 240 and pixels[0, 0] == 0


def test_preprocess_shrinks_large_colour_photos_and_keeps_aspect():
    photo = np.full((1200, 3000, 3), (250, 245, 235), dtype=np.uint8)  # cream paper
    photo[300:900, 1200:1800] = (20, 20, 120)  # a dark blue square of ink
    jpeg = BytesIO()
    Image.fromarray(photo).save(jpeg, format="JPEG")
    pixels = preprocess_image(Image.open(BytesIO(jpeg.getvalue())))
    assert pixels.shape == (28, 28) and pixels[14, 14] > 200 and pixels[:8].max() < 30
    ink = np.argwhere(pixels > 128)
    height, width = ink.max(axis=0) - ink.min(axis=0) + 1
    assert abs(int(height) - int(width)) <= 1  # the square stays square
