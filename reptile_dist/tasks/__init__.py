"""Task families: where few-shot tasks come from. Plain numpy/torch, no Ray."""
from __future__ import annotations

from reptile_dist.config import Config
from reptile_dist.tasks.base import Task, TaskFamily, task_rng


def build_family(cfg: Config) -> TaskFamily:
    """The task family a config names, with its data loaded (memory-mapped for images)."""
    if cfg.family == "sine":
        from reptile_dist.tasks.sine import SineFamily

        return SineFamily(cfg.train_shots, cfg.shots, cfg.queries)
    from reptile_dist.tasks.images import ImageFamily

    if cfg.family == "synthetic":
        from reptile_dist.tasks.synthetic import synthetic_classes

        classes = synthetic_classes(seed=cfg.seed)
    else:
        from reptile_dist.data.omniglot import load_omniglot

        classes = load_omniglot(cfg.data, split=cfg.split, seed=0, val_characters=cfg.val_characters)
    return ImageFamily(classes, cfg.ways, cfg.train_shots, cfg.shots, cfg.queries)


def image_size(family: TaskFamily) -> int:
    classes = getattr(family, "classes", None)
    return classes.image_size if classes is not None else 28


__all__ = ["Task", "TaskFamily", "task_rng", "build_family", "image_size"]
