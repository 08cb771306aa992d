"""`reptile-dist`: train, eval, data, config. Bad input ends in one line and exit code 2; a bug
keeps its traceback."""
from __future__ import annotations

import argparse
import errno
import json
import os
import signal
import sys
import threading
from typing import Callable

from reptile_dist.config import PRESETS, Config, load_config, parse_overrides

DEFAULT_CONFIG = "sine"
from reptile_dist.errors import RunFailed, UserError

# OSErrors the user can fix (a path that is missing, a folder, a file, not theirs; a disk that is
# full or read-only): one line naming the path. Any other OSError is not known to be the user's.
ENVIRONMENT_OSERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError)
ENVIRONMENT_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.ENAMETOOLONG})
WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS})  # only a write meets these


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help=f"preset ({', '.join(PRESETS)}) or YAML file (default: sine; with train "
                                    f"--resume, the configuration the run directory records)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key (repeatable), e.g. --set inner_steps=8")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="reptile-dist", description="Distributed Reptile meta-learning")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="meta-train")
    _config_args(train)
    train.add_argument("--out", required=True, help="run directory (local/shared folder, s3://..., gs://...)")
    train.add_argument("--backend", choices=("local", "ray"), help="overrides the config's backend")
    train.add_argument("--workers", type=int, help="adapt workers (ray backend)")
    train.add_argument("--mode", choices=("sync", "async", "allreduce"), help="aggregation (ray backend)")
    train.add_argument("--address", help="join an existing Ray cluster ('auto' or ray://host:10001); default: the one RAY_ADDRESS names, else a new local one")
    train.add_argument("--data", help="prepared image table (default: the config's `data`)")
    train.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")

    ev = sub.add_parser("eval", help="evaluate a checkpoint on held-out tasks")
    ev.add_argument("--checkpoint", required=True)
    ev.add_argument("--tasks", type=int, help="evaluation tasks (default: the checkpoint config's eval_tasks)")
    ev.add_argument("--split", default="test", choices=("train", "val", "test"))
    ev.add_argument("--data", help="prepared image table (default: the checkpoint config's `data`)")
    ev.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ev.add_argument("--workers", type=int, default=1,
                    help="Ray actors scoring the tasks in shards (default 1: this process, no Ray); the result is "
                         "the same")
    ev.add_argument("--address", help="join this Ray cluster (`auto`: the one on this machine) to score the shards; with --workers > 1 and no --address: the one RAY_ADDRESS names, else a new local one")
    ev.add_argument("--scores", metavar="FILE",
                    help="keep every task's scores in FILE (JSON lines) as they are computed; run again with the "
                         "same FILE, an evaluation stopped part way scores only the tasks still missing")

    data = sub.add_parser("data", help="prepare data sets")
    data_sub = data.add_subparsers(dest="dataset", required=True)
    omni = data_sub.add_parser("omniglot", help="build the Omniglot table from the official release")
    omni.add_argument("--source", nargs="*", default=[], help="images_background/images_evaluation zips or folders")
    omni.add_argument("--out", default=None, help="table to write (default data/omniglot.arrow)")
    images = data_sub.add_parser("images", help="build an image table from class folders, Mini-ImageNet or CIFAR-100")
    images.add_argument("--source", required=True,
                        help="folder: train/ val/ test/ of class folders; class folders (with --split); Mini-ImageNet's "
                             "images/ and CSVs or pickled caches; or cifar-100-python (with --layout)")
    images.add_argument("--out", required=True, help="table to write (.arrow)")
    images.add_argument("--size", type=int, default=84,
                        help="images are centre-cropped to a square and resized to N x N (default 84; CIFAR is 32)")
    images.add_argument("--channels", type=int, choices=(1, 3), default=3, help="1: grayscale, 3: RGB (default)")
    images.add_argument("--split", help="TRAIN:VAL:TEST class counts (64:16:20) or fractions (0.64:0.16:0.2), "
                                        "for a flat folder of class folders")
    images.add_argument("--seed", type=int, default=0, help="shuffles the classes that --split cuts (default 0)")
    images.add_argument("--layout", default="auto",
                        help="auto (default), split-folders, flat, mini-imagenet-csv, mini-imagenet-pickle, cifar-fs, fc100")

    cfg = sub.add_parser("config", help="show a resolved config, or every knob with its range")
    _config_args(cfg)
    cfg.add_argument("--list", action="store_true", help="every knob with its default and range")

    bench = sub.add_parser("bench", help="scale-out benchmark on the engine's actors: throughput, efficiency, PS capacity")
    bench.add_argument("--config", default="omniglot-5w1s", help=f"preset ({', '.join(PRESETS)}) or YAML file")
    bench.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    bench.add_argument("--out", required=True, help="folder for bench.parquet, bench.md and the plots")
    bench.add_argument("--workers", default="1,2", help="worker counts, e.g. 1,2,4 (W=1 always runs: the baseline)")
    bench.add_argument("--modes", default="sync,async", help="any of sync, async, async-prefetch (parameter server) and allreduce (Ray Train)")
    bench.add_argument("--seconds", type=float, default=20.0, help="measured seconds per combination")
    bench.add_argument("--warmup", type=float, default=5.0, help="seconds run before measuring")
    bench.add_argument("--straggler", type=float, default=1.0, metavar="FACTOR",
                       help="also run each mode at the largest W with worker 0 FACTOR times slower")
    bench.add_argument("--address", help="join an existing Ray cluster ('auto' or ray://host:10001); default: the one RAY_ADDRESS names, else a new local one")
    bench.add_argument("--capacity-params", default="", help="PS capacity sweep over model sizes, e.g. 100k,1M,10M")
    bench.add_argument("--capacity-dtypes", default="float64,float32,bfloat16,float16", help="delta precisions on the wire")
    bench.add_argument("--capacity-pushers", default="2", help="pusher actors feeding the PS, e.g. 1,2,4")
    bench.add_argument("--capacity-seconds", type=float, default=5.0, help="measured seconds per capacity point")
    bench.add_argument("--model-presets", default="omniglot-5w1s,omniglot-5w5s,omniglot-20w1s,omniglot-20w5s",
                       help="presets the scaling model gives worker limits for (with --capacity-params)")
    bench.add_argument("--no-engine", action="store_true", help="skip the engine runs (capacity sweep and model only)")
    bench.add_argument("--interleave", type=float, default=0.0, metavar="SECONDS",
                       help="also run each parameter-server mode x W in turns with the local trainer in the workers' own "
                            "processes, phases of SECONDS (e.g. 5): the efficiency against the local trainer without the machine's drift")
    bench.add_argument("--rounds", type=int, default=8, help="pairs of interleaved phases per combination (--interleave)")
    bench.add_argument("--no-baselines", action="store_true",
                       help="skip the local trainer against the plain loop, and its threads beside a busy process")

    tune = sub.add_parser("tune", help="hyperparameter sweep with Ray Tune (definitions in tuning/)")
    tune.add_argument("--sweep", required=True, help="sweep definition (YAML), e.g. tuning/sine.yaml")
    tune.add_argument("--address", help="join an existing Ray cluster ('auto' or ray://host:10001); default: the one RAY_ADDRESS names, else a new local one")
    tune.add_argument("--out", help="results folder or s3:// / gs:// URI (default runs/sweeps/<sweep name>)")
    tune.add_argument("--resume", action="store_true", help="continue an interrupted sweep in --out")
    tune.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                      help="override a key of the sweep's base configuration, e.g. --set data=/shared/omniglot.arrow")

    adapt = sub.add_parser("adapt", help="adapt a pretrained final.pt to your own few-shot task and classify images")
    adapt.add_argument("--checkpoint", required=True, help="final.pt of an image-classification run")
    adapt.add_argument("--support", required=True, help="folder with one subfolder of images per class")
    adapt.add_argument("--query", required=True, help="folder of images to classify")
    adapt.add_argument("--steps", type=int, help="inner steps (default: the checkpoint config's eval_inner_steps)")
    adapt.add_argument("--transductive", action="store_true", help="predict all queries in one batch")
    adapt.add_argument("--seed", type=int, default=0, help="seed of the inner loop's mini-batches")
    adapt.add_argument("--device", help="auto (a GPU when there is one; the default), cpu, cuda, cuda:N")
    adapt.add_argument("--out", help="also write the predictions as CSV: file,predicted_class,probability")

    export = sub.add_parser("export", help="write a final.pt from a mid-run checkpoint or another final.pt")
    export.add_argument("--checkpoint", required=True, help="checkpoints/ckpt-<step>.pt or final.pt of a run")
    export.add_argument("--out", required=True, help="final.pt to write (for eval and adapt)")
    export.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="change the model's config, e.g. --set shots=5 (the weights must still fit)")

    plot = sub.add_parser("plot", help="learning curves of one or more runs side by side (PNG), running or finished")
    plot.add_argument("runs", nargs="+", metavar="RUN", help="run directories (local folders or s3:// / gs:// URIs)")
    plot.add_argument("--out", default="curves.png", help="PNG to write (default curves.png)")
    plot.add_argument("--x", default="step", choices=("step", "tasks", "wall"),
                      help="x axis: meta-step, tasks adapted, or wall-clock seconds")

    status = sub.add_parser("status", help="step, tasks/s, ETA, latest evaluation of a running or finished run")
    status.add_argument("run", metavar="RUN", help="run directory (local folder or s3:// / gs:// URI)")
    status.add_argument("--json", action="store_true", help="print the status as JSON")
    return parser


def cmd_train(args) -> int:
    overrides = parse_overrides(args.overrides)
    for key in ("backend", "workers", "mode", "data", "address"):
        if getattr(args, key) is not None:
            overrides[key] = getattr(args, key)
    if args.mode is not None or args.workers is not None:
        overrides.setdefault("backend", "ray")
    if args.config is None and args.resume:  # the run directory records its configuration
        from reptile_dist.rundir import RunDir, RunDirError

        recorded = RunDir(args.out).recorded_config()
        if recorded is None:
            raise RunDirError(f"{args.out} holds no run to resume (no config.yaml)")
        cfg = recorded.replace(**overrides)
    else:
        cfg = load_config(args.config or DEFAULT_CONFIG, overrides)
    from reptile_dist.api import train
    from reptile_dist.rundir import json_safe

    summary = train(cfg, args.out, resume=args.resume, progress=not args.no_progress)

    shown = {k: summary.get(k) for k in ("test_accuracy", "test_ci95", "test_loss", "meta_iters", "tasks_per_s", "wall_s")}
    print(json.dumps(json_safe(shown), allow_nan=False))
    return 0


def cmd_eval(args) -> int:
    from reptile_dist.api import evaluate
    from reptile_dist.evaluation import headline

    overrides = parse_overrides(args.overrides)
    if args.data:
        overrides["data"] = args.data
    if args.tasks:
        overrides["eval_tasks"] = args.tasks
    # Carried inner state: tasks start from the estimate training left (`--set inner_state=fresh`: from zero).
    result = evaluate(args.checkpoint, split=args.split, overrides=overrides, workers=args.workers,
                      address=args.address, scores=args.scores)
    print(f"{args.split}: {headline(result, 'classification' if 'accuracy' in result else 'regression')}")
    print(json.dumps(result))
    return 0


def cmd_data(args) -> int:
    if args.dataset == "images":
        from reptile_dist.data.images import prepare_images

        summary = prepare_images(args.source, args.out, size=args.size, channels=args.channels, split=args.split,
                                 layout=args.layout, seed=args.seed)
    else:
        from reptile_dist.data.omniglot import DEFAULT_TABLE, prepare_omniglot

        summary = prepare_omniglot(args.source, args.out or DEFAULT_TABLE)
    print(json.dumps(summary))
    return 0


def cmd_config(args) -> int:
    from reptile_dist.config import describe

    if args.list:
        print(describe())
        return 0
    import yaml

    print(yaml.safe_dump(load_config(args.config or DEFAULT_CONFIG, parse_overrides(args.overrides)).to_dict(),
                         sort_keys=False), end="")
    return 0


def cmd_tune(args) -> int:
    from reptile_dist.sweep import load_sweep
    from reptile_dist.sweep.runner import run_sweep

    spec = load_sweep(args.sweep, parse_overrides(args.overrides))  # validated before anything starts
    outcome = run_sweep(spec, args.out or f"runs/sweeps/{spec.name}", address=args.address, resume=args.resume)
    if outcome["interrupted"]:
        return 130
    return 0 if outcome["best"] is not None else 1


def cmd_bench(args) -> int:
    import shlex
    from pathlib import Path

    from reptile_dist.bench.suite import BenchPlan, count, csv, run_bench

    plan = BenchPlan(
        config=args.config, overrides=parse_overrides(args.overrides), workers=csv(args.workers, int, "--workers"),
        modes=() if args.no_engine else csv(args.modes, str, "--modes"), seconds=args.seconds, warmup=args.warmup,
        straggler_factor=args.straggler, address=args.address,
        capacity_params=csv(args.capacity_params, count, "--capacity-params"),
        capacity_dtypes=csv(args.capacity_dtypes, str, "--capacity-dtypes"),
        capacity_pushers=csv(args.capacity_pushers, int, "--capacity-pushers"), capacity_seconds=args.capacity_seconds,
        model_presets=csv(args.model_presets, str, "--model-presets"), baselines=not args.no_baselines,
        interleave=args.interleave, rounds=args.rounds,
    )
    command = shlex.join(["reptile-dist", *sys.argv[1:]]) if Path(sys.argv[0]).name == "reptile-dist" else ""
    written = run_bench(plan, args.out, command)
    print(written["bench.md"].read_text(), end="")
    print("wrote " + ", ".join(str(path) for path in written.values()))
    return 0


def cmd_adapt(args) -> int:
    from reptile_dist.pretrained import adapt_and_predict, check_output_file, to_table, write_csv

    if args.out:
        check_output_file(args.out)  # before adapting, so a bad --out costs no work
    if args.device is not None:
        Config(device=args.device)  # a bad name is one line before the model is loaded
    predictions = adapt_and_predict(args.checkpoint, args.support, args.query, steps=args.steps,
                                    transductive=args.transductive, seed=args.seed, device=args.device)
    print(to_table(predictions), end="")
    if args.out:
        write_csv(predictions, args.out)
        print(f"wrote {args.out}", file=sys.stderr)
    return 0


def cmd_export(args) -> int:
    from reptile_dist.pretrained import export_final

    final = export_final(args.checkpoint, args.out, parse_overrides(args.overrides))
    print(f"wrote {args.out} (meta-step {final['step']}, {final['family']}, {final['config']['ways']}-way)")
    return 0


def cmd_plot(args) -> int:
    from reptile_dist.runview import plot_runs

    print(f"wrote {plot_runs(args.runs, args.out, args.x)}")
    return 0


def cmd_status(args) -> int:
    from reptile_dist.rundir import json_safe
    from reptile_dist.runview import format_status, run_status

    status = run_status(args.run)
    print(json.dumps(json_safe(status), allow_nan=False) if args.json else format_status(status))
    return 0


def _kept_on_interrupt(args) -> str:
    """What a Ctrl-C (or SIGTERM) leaves behind for the next try, said after `interrupted`."""
    if args.command == "train":
        return "; the run directory keeps its last checkpoint"
    if args.command == "eval" and args.scores:
        return f"; {args.scores} keeps the tasks scored so far (the same command goes on from them)"
    return ""


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "data": cmd_data, "config": cmd_config, "tune": cmd_tune, "bench": cmd_bench,
            "adapt": cmd_adapt, "export": cmd_export, "plot": cmd_plot, "status": cmd_status}


def _describe_os_error(exc: OSError, out: str | None = None) -> str:
    """`cannot write /x/y: No space left on device`, `/x/y: Is a directory`. A write error that
    names no path (a full disk seen by write()) is put on `out`, where the command writes."""
    reason = exc.strerror or " ".join(str(exc).split()) or type(exc).__name__
    path = exc.filename if exc.filename is not None else (out if exc.errno in WRITE_ERRNOS else None)
    if path is None:
        return reason
    if exc.filename2 is not None:
        path = f"{path} -> {exc.filename2}"
    return f"cannot write {path}: {reason}" if exc.errno in WRITE_ERRNOS else f"{path}: {reason}"


def _error(message: str) -> int:
    print("reptile-dist: error: " + " ".join(message.splitlines()), file=sys.stderr)
    return 2


class Terminated(KeyboardInterrupt):
    """SIGTERM: a scheduler's preemption (Slurm, Kubernetes), `kill`, a stopped `ray job`. The
    command stops as Ctrl-C stops it: what it saved stays, and a run resumes from it."""


_sigterm_received = False  # set by _terminate: which signal a KeyboardInterrupt came from
# After SIGTERM the command has this long for its clean-up, then the process ends anyway, with the
# same line and exit status. A SIGTERM sent to the whole process group (`timeout`, Slurm's
# scancel, systemd's stop) also reaches the local cluster's GCS and raylet, which share the
# driver's group; Ray's own shutdown would then wait 60 s for the GCS and end in its own abort.
# What a run saved is on disk already (written whole, then renamed). Under the 30 s a scheduler
# gives by default (Slurm's KillWait, Kubernetes' grace period) before it kills outright.
TERMINATE_GRACE_S = 20.0
_terminated_line: Callable[[], str] = lambda: "reptile-dist: terminated (SIGTERM)"  # main() names the run's folder
_said_terminated = threading.Event()  # the line is out: the watchdog only ends the process


def _terminate(signum, frame) -> None:
    global _sigterm_received
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second one must not cut the clean-up short
    _sigterm_received = True
    watchdog = threading.Timer(TERMINATE_GRACE_S, _end_overdue_cleanup)
    watchdog.daemon = True
    watchdog.start()
    raise Terminated()


def _end_overdue_cleanup() -> None:
    if not _said_terminated.is_set():
        print(_terminated_line(), file=sys.stderr, flush=True)
    os._exit(143)


def main(argv: list[str] | None = None) -> int:
    """Run a command. UserError and an environment OSError: one line, exit 2. A failed run: exit
    1. Ctrl-C: exit 130, SIGTERM: exit 143, both after the command's own clean-up. Anything else
    is a bug in reptile-dist and is raised with its traceback."""
    global _sigterm_received, _terminated_line
    args = build_parser().parse_args(argv)
    in_main_thread = threading.current_thread() is threading.main_thread()  # only it may set handlers
    before = None
    if in_main_thread:
        _sigterm_received = False  # main() may be called again in-process (tests, notebooks)
        _said_terminated.clear()
        _terminated_line = lambda: f"reptile-dist: terminated (SIGTERM){_kept_on_interrupt(args)}"  # noqa: E731
        before = signal.signal(signal.SIGTERM, _terminate)  # kept past ray.init: engine/cluster.py
    try:
        return COMMANDS[args.command](args)
    except UserError as exc:
        return _error(str(exc))
    except OSError as exc:
        if not (isinstance(exc, ENVIRONMENT_OSERRORS) or exc.errno in ENVIRONMENT_ERRNOS):
            raise
        return _error(_describe_os_error(exc, getattr(args, "out", None)))
    except RunFailed as exc:
        print(f"reptile-dist: run stopped: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        # The flag, not the exception's class: Ray turns a Terminated raised inside a blocking
        # ray.get into a plain KeyboardInterrupt (an all-reduce run waits in one for Ray Train's controller).
        if _sigterm_received:
            print(_terminated_line(), file=sys.stderr, flush=True)
            _said_terminated.set()
            return 143
        print(f"reptile-dist: interrupted{_kept_on_interrupt(args)}", file=sys.stderr)
        return 130
    finally:
        if before is not None:  # None: not ours to set (another thread), or a handler set outside Python
            signal.signal(signal.SIGTERM, before)  # main() called in-process (tests, notebooks) leaves no trace


if __name__ == "__main__":
    sys.exit(main())
