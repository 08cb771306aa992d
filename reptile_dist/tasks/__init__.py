"""Task families: where few-shot tasks come from. Plain numpy/torch, no Ray. The built-in
families are plug-ins (reptile_dist/plugins.py builds them as it builds a user's)."""
from __future__ import annotations

from reptile_dist.tasks.base import Task, TaskFamily, task_rng

__all__ = ["Task", "TaskFamily", "task_rng"]
