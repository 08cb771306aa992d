"""The single-process trainer: Reptile as the paper writes it, one meta-step after another."""
from __future__ import annotations

import math
import time
from typing import Any, Callable

import torch
from tqdm import tqdm

from reptile_dist.config import Config
from reptile_dist.evaluation import evaluate
from reptile_dist.reptile import adapt_tasks
from reptile_dist.training import (Throughput, checkpoint_state, evaluate_before, finish_run, periodic_split,
                                   setup_run)


def train_local(cfg: Config, out: str, resume: bool = False, progress: bool = True,
                say: Callable[[str], None] = print) -> dict[str, Any]:
    started = time.perf_counter()
    if cfg.torch_threads:
        torch.set_num_threads(cfg.torch_threads)
    s = setup_run(cfg, out, resume, say)
    before = evaluate_before(s, say) if s.start_step == 0 else None
    throughput = Throughput()
    bar = tqdm(range(s.start_step, cfg.meta_iters), initial=s.start_step, total=cfg.meta_iters,
               disable=not progress, desc="meta-train", dynamic_ncols=True)
    for step in bar:
        throughput.resume()
        result = adapt_tasks(s.learner, s.family, s.outer.theta, cfg, step, range(cfg.meta_batch_size),
                             s.outer.inner_moment)
        step_size = cfg.meta_step_size_at(step)
        s.outer.apply((result.delta / result.tasks).float(), step_size, result.mean_moment())
        throughput.pause(result.tasks)
        done = step + 1
        if done % cfg.log_every == 0 or done == cfg.meta_iters:
            row = {"step": done, "meta_step_size": step_size, "train_loss": result.loss_sum / result.tasks,
                   "train_accuracy": result.accuracy_sum / result.tasks, "tasks_per_s": throughput.tasks_per_s,
                   "wall_s": time.perf_counter() - started}
            if cfg.eval_every and (done % cfg.eval_every == 0 or done == cfg.meta_iters):
                ev = evaluate(s.learner, s.family, s.outer.theta, cfg, periodic_split(s.family), cfg.eval_tasks_periodic,
                              s.outer.inner_moment)
                row.update({f"eval_{k}": v for k, v in ev.items() if k != "tasks"})
            s.run.log(row)
            bar.set_postfix({k: f"{v:.3g}" for k, v in row.items() if k in ("train_loss", "eval_accuracy", "eval_loss",
                                                                             "tasks_per_s") and not math.isnan(v)})
        if cfg.checkpoint_every and done % cfg.checkpoint_every == 0:
            s.run.save_checkpoint(done, checkpoint_state(cfg, done, s.outer.state_dict()), cfg.keep_checkpoints)
    bar.close()
    return finish_run(s, s.outer.theta, cfg.meta_iters, throughput, time.perf_counter() - started, before, say=say,
                      moment=s.outer.inner_moment)
