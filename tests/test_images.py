"""N-way K-shot task sampling (ImageFamily) over a prepared Omniglot table (the generated release,
alphabet split: rotated background characters train, evaluation characters test).

Each task image is traced back to its class by its pixels: an index maps the bytes of every
(rotated) image of a split to the class it belongs to and to how many rows carry those bytes
(a few drawings in Omniglot are pixel-identical, always within one character).
"""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from conftest import SMALL_RELEASE
from reptile_dist.config import ConfigError
from reptile_dist.data.omniglot import load_omniglot
from reptile_dist.tasks.images import ImageFamily

ClassKey = tuple[int, int]  # (first row of the character, rotation)


@pytest.fixture(scope="module")
def omniglot(generated_omniglot_table):
    return load_omniglot(generated_omniglot_table, split="alphabet", seed=0)


def pixel_index(classes, split: str) -> dict[bytes, tuple[ClassKey, int]]:
    """Image bytes -> (its class, number of rows with those bytes) for every image of `split`."""
    index: dict[bytes, tuple[ClassKey, int]] = {}
    for cls in classes.splits[split]:
        rotated = np.ascontiguousarray(np.rot90(classes.images[cls.rows], k=cls.rotation // 90, axes=(1, 2)))
        key = (int(cls.rows[0]), cls.rotation)
        for image in rotated:
            found, copies = index.get(image.tobytes(), (key, 0))
            assert found == key, "identical pixels in two classes: the index cannot tell them apart"
            index[image.tobytes()] = (key, copies + 1)
    return index


@pytest.fixture(scope="module")
def train_index(omniglot):
    return pixel_index(omniglot, "train")


@pytest.fixture(scope="module")
def test_index(omniglot):
    return pixel_index(omniglot, "test")


def as_bytes(x) -> list[bytes]:
    pixels = np.rint(x.numpy()[:, 0] * 255).astype(np.uint8)
    return [image.tobytes() for image in pixels]


def check_task(task, index, ways: int, shots: int, queries: int) -> None:
    """N distinct classes, labels 0..N-1, K distinct images each, no query image in the support."""
    assert task.support_y.tolist() == [label for label in range(ways) for _ in range(shots)]
    assert task.query_y.tolist() == [label for label in range(ways) for _ in range(queries)]
    support, query = as_bytes(task.support_x), as_bytes(task.query_x)
    assert all(image in index for image in support + query), "a task image is not an image of the split"
    classes_of_label = {}
    for label in range(ways):
        mine = support[label * shots : (label + 1) * shots] + query[label * queries : (label + 1) * queries]
        keys = {index[image][0] for image in mine}
        assert len(keys) == 1, f"label {label} mixes classes"
        classes_of_label[label] = keys.pop()
        # Each row is drawn at most once: pixels repeat only as often as rows carry them.
        assert all(count <= index[image][1] for image, count in Counter(mine).items())
    assert len(set(classes_of_label.values())) == ways
    if queries:
        repeated = set(support) & set(query)
        assert all(index[image][1] > 1 for image in repeated), "a query image is also in the support set"


@pytest.mark.parametrize("ways, train_shots", [(5, 10), (20, 5)])
def test_train_tasks_draw_n_distinct_classes_with_k_distinct_shots(omniglot, train_index, ways, train_shots):
    family = ImageFamily(omniglot, ways=ways, train_shots=train_shots, shots=1, queries=1)
    for seed in range(5):
        task = family.train_task(np.random.default_rng(seed))
        check_task(task, train_index, ways, train_shots, queries=0)


@pytest.mark.parametrize("ways, shots, queries", [(5, 1, 19), (5, 5, 15), (20, 1, 5)])
def test_eval_tasks_keep_queries_out_of_the_support_set(omniglot, test_index, ways, shots, queries):
    family = ImageFamily(omniglot, ways=ways, train_shots=5, shots=shots, queries=queries)
    for seed in range(5):
        check_task(family.eval_task(np.random.default_rng(seed), "test"), test_index, ways, shots, queries)


def test_eval_tasks_from_test_use_only_test_classes(omniglot, train_index, test_index):
    family = ImageFamily(omniglot, ways=20, train_shots=5, shots=5, queries=5)
    test_keys = {key for key, _ in test_index.values()}
    for seed in range(10):
        task = family.eval_task(np.random.default_rng(seed), "test")
        images = as_bytes(task.support_x) + as_bytes(task.query_x)
        assert {test_index[image][0] for image in images} <= test_keys
        assert not any(image in train_index for image in images)


def test_tasks_are_a_function_of_the_generator_seed(omniglot):
    family = ImageFamily(omniglot, ways=5, train_shots=5, shots=1, queries=5)
    first, again = (family.eval_task(np.random.default_rng(7), "test") for _ in range(2))
    other = family.eval_task(np.random.default_rng(8), "test")
    assert all((a == b).all() for a, b in zip(vars(first).values(), vars(again).values()))
    assert not (first.support_x == other.support_x).all()


def test_more_ways_than_test_classes_names_ways(omniglot):
    test_classes = sum(SMALL_RELEASE["evaluation"])
    assert len(omniglot.splits["test"]) == test_classes
    with pytest.raises(ConfigError, match=rf"ways={test_classes + 1} .* {test_classes} classes of split 'test'"):
        ImageFamily(omniglot, ways=test_classes + 1, train_shots=5, shots=1, queries=1)
    ImageFamily(omniglot, ways=test_classes, train_shots=5, shots=1, queries=1)  # every class is allowed


def test_more_shots_and_queries_than_20_drawings_names_the_fields(omniglot):
    with pytest.raises(ConfigError, match=r"shots \+ queries = 21 exceeds the 20 images"):
        ImageFamily(omniglot, ways=5, train_shots=5, shots=15, queries=6)
    with pytest.raises(ConfigError, match=r"train_shots = 21 exceeds the 20 images"):
        ImageFamily(omniglot, ways=5, train_shots=21, shots=1, queries=1)


def test_eval_task_from_an_empty_split_names_it(omniglot):
    family = ImageFamily(omniglot, ways=5, train_shots=5, shots=1, queries=1)
    with pytest.raises(ConfigError, match="split 'val' has no classes"):
        family.eval_task(np.random.default_rng(0), "val")
