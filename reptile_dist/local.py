"""The single-process trainer: Reptile as the paper writes it, one meta-step after another."""
from __future__ import annotations

import math
import time
from typing import Any, Callable

import torch
from tqdm import tqdm

from reptile_dist.config import Config
from reptile_dist.evaluation import evaluate
from reptile_dist.plugins import Plugins
from reptile_dist.training import (RunSetup, checkpoint_state, evaluate_before, finish_run, finished_run, meta_train,
                                   prepare_run, resolve_device, set_torch_threads, setup_run)

SHOWN = ("train_loss", "eval_accuracy", "eval_loss", "tasks_per_s")


def train_local(cfg: Config, out: str, resume: bool = False, progress: bool = True,
                say: Callable[[str], None] = print, on_log: Callable[[dict[str, Any]], None] | None = None,
                plugins: Plugins | None = None) -> dict[str, Any]:
    """Meta-train in this process, on `cfg.device`. `on_log(row)`: called with every logged row.
    `plugins`: the family and network factories (default: the config's)."""
    started = time.perf_counter()
    finished = finished_run(out, resume, say)
    if finished is not None:
        return finished
    device = resolve_device(cfg)
    threads = set_torch_threads(cfg)
    try:
        s = setup_run(cfg, out, resume, say, prepare_run(cfg, plugins, device))
        try:
            return _train(cfg, s, started, progress, say, on_log)
        finally:
            s.run.release()
    finally:
        torch.set_num_threads(threads)  # a caller's process (rd.train in a notebook) keeps its own


def _train(cfg: Config, s: RunSetup, started: float, progress: bool, say: Callable[[str], None],
           on_log: Callable[[dict[str, Any]], None] | None) -> dict[str, Any]:
    before = evaluate_before(s, say) if s.start_step == 0 else None
    bar = tqdm(total=cfg.meta_iters, initial=s.start_step, disable=not progress, desc="meta-train", dynamic_ncols=True)

    def evaluate_split(split: str, tasks: int) -> dict[str, float]:
        return evaluate(s.learner, s.family, s.outer.theta, cfg, split, tasks, s.outer.inner_moment)

    def record(step: int, row: dict[str, Any] | None, checkpoint: bool) -> None:
        if row is not None:
            s.run.log(row)
            if on_log is not None:
                on_log(dict(row))
            bar.set_postfix({k: f"{v:.3g}" for k, v in row.items() if k in SHOWN and not math.isnan(v)})
        if checkpoint:
            s.run.save_checkpoint(step, checkpoint_state(cfg, step, s.outer.state_dict(),
                                                                 family_info=s.learner.family_info), cfg.keep_checkpoints)

    throughput = meta_train(cfg, s.learner, s.family, s.outer, s.start_step, range(cfg.meta_batch_size),
                            evaluate_split, record, on_step=lambda step: bar.update(step - bar.n))
    bar.close()
    return finish_run(s, s.outer.theta, cfg.meta_iters, throughput, time.perf_counter() - started, before, say=say,
                      moment=s.outer.inner_moment)
