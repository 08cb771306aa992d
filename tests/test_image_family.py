"""`family: images` on a table `reptile-dist data images` prepared: RGB at any size, trained by
the reference's Mini-ImageNet network, then `adapt` on a user's RGB images of any size."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import reptile_dist as rd
from reptile_dist.cli import main
from reptile_dist.config import load_config
from reptile_dist.data.images import prepare_images
from reptile_dist.models import MiniImageNetConv
from reptile_dist.plugins import build_family

from image_fixtures import class_colour, picture, save, write_split_folders


@pytest.fixture(scope="module")
def rgb_table(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("photos")
    write_split_folders(root / "src", {"train": 8, "val": 3, "test": 4}, per_class=6)
    prepare_images(root / "src", root / "photos.arrow", size=16, channels=3, workers=1)
    return root / "photos.arrow"


def image_config(table: Path, **changes):
    base = dict(data=str(table), ways=3, shots=1, train_shots=4, queries=2, meta_iters=30, meta_batch_size=3,
                inner_steps=4, inner_batch_size=6, eval_tasks=40, eval_every=0, eval_inner_steps=10, eval_batch_size=3,
                log_every=10, checkpoint_every=0, torch_threads=1, loggers=[])
    base.update(changes)
    return load_config("miniimagenet-5w1s", base)


def test_presets_are_the_papers_mini_imagenet_recipe():
    one, five = load_config("miniimagenet-5w1s"), load_config("miniimagenet-5w5s")
    assert (one.family, one.model, one.ways, one.shots, five.shots) == ("images", "miniimagenet_conv", 5, 1, 5)
    assert (one.inner_batch_size, one.inner_steps, one.train_shots, one.inner_lr) == (10, 8, 15, 0.001)
    assert (one.meta_step_size, one.meta_step_size_final, one.meta_batch_size, one.meta_iters) == (1.0, 0.0, 5, 100_000)
    assert (one.eval_inner_steps, one.eval_batch_size, five.eval_batch_size) == (50, 5, 15)


def test_the_network_is_the_references():
    net = MiniImageNetConv(5)
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [32] * 4 and all(c.kernel_size == (3, 3) for c in convs)
    assert not list(net.buffers())  # batch statistics, no running averages: theta is the parameters
    assert net(torch.zeros(2, 3, 84, 84)).shape == (2, 5)


def test_the_family_sizes_the_network_from_the_table(rgb_table):
    cfg = image_config(rgb_table)
    family = build_family(cfg)
    assert family.input_shape == (3, 16, 16)
    task = family.train_task(np.random.default_rng(0))
    assert task.support_x.shape == (3 * 4, 3, 16, 16) and task.support_x.dtype == torch.float32
    rotated = build_family(cfg.replace(family_args={"rotations": True}))
    assert len(rotated.classes.splits["train"]) == 4 * len(family.classes.splits["train"])


def test_too_few_images_per_class_is_one_line_naming_the_numbers(rgb_table, tmp_path, capsys):
    code = main(["train", "--config", "miniimagenet-5w1s", "--data", str(rgb_table), "--out", str(tmp_path / "r"),
                 "--set", "ways=3", "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "train_shots = 15 exceeds the 6 images per class of split 'train'" in err


@pytest.mark.slow
def test_a_short_run_learns_above_chance_and_adapts_to_rgb_images(rgb_table, tmp_path, capsys):
    out = tmp_path / "run"
    summary = rd.train(image_config(rgb_table), str(out))
    assert summary["test_accuracy"] > 0.6, summary  # 3-way: chance is 1/3
    final = torch.load(out / "final.pt", weights_only=True)
    assert final["family_info"]["input_shape"] == [3, 16, 16]
    assert final["family_info"]["preprocessing"]["size"] == 16

    # A user's own task: three new colours, photos of any size, RGB and RGBA.
    rng = np.random.default_rng(1)
    support, query = tmp_path / "support", tmp_path / "query"
    names = ["amber", "blue", "crimson"]
    colours = [class_colour(100 + i) for i in range(3)]
    query.mkdir()
    for name, colour in zip(names, colours):
        (support / name).mkdir(parents=True)
        save(picture(rng, colour, (60, 40)), support / name / "a", "png-rgb")
        save(picture(rng, colour, (33, 70)), query / f"{name}-q", "jpeg-rgb")
    csv = tmp_path / "predictions.csv"
    assert main(["adapt", "--checkpoint", str(out / "final.pt"), "--support", str(support), "--query", str(query),
                 "--out", str(csv)]) == 0
    rows = [line.split(",") for line in csv.read_text().splitlines()[1:]]
    assert len(rows) == 3
    correct = sum(row[0].startswith(row[1]) for row in rows)
    assert correct >= 2, rows
