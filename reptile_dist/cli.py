"""`reptile-dist`: train, eval, data, config. Bad input ends in one line and exit code 2."""
from __future__ import annotations

import argparse
import json
import sys

from reptile_dist.config import PRESETS, ConfigError, load_config, parse_overrides

USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, PermissionError)


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default="sine", help=f"preset ({', '.join(PRESETS)}) or YAML file")
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
    train.add_argument("--address", help="join an existing Ray cluster ('auto' or ray://host:10001)")
    train.add_argument("--data", help="prepared image table (default: the config's `data`)")
    train.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")

    ev = sub.add_parser("eval", help="evaluate a checkpoint on held-out tasks")
    ev.add_argument("--checkpoint", required=True)
    ev.add_argument("--tasks", type=int, help="evaluation tasks (default: the checkpoint config's eval_tasks)")
    ev.add_argument("--split", default="test", choices=("train", "val", "test"))
    ev.add_argument("--data", help="prepared image table (default: the checkpoint config's `data`)")
    ev.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")

    data = sub.add_parser("data", help="prepare data sets")
    data_sub = data.add_subparsers(dest="dataset", required=True)
    omni = data_sub.add_parser("omniglot", help="build the Omniglot table from the official release")
    omni.add_argument("--source", nargs="*", default=[], help="images_background/images_evaluation zips or folders")
    omni.add_argument("--out", default=None, help="table to write (default data/omniglot.arrow)")

    cfg = sub.add_parser("config", help="show a resolved config, or every knob with its range")
    _config_args(cfg)
    cfg.add_argument("--list", action="store_true", help="every knob with its default and range")
    return parser


def cmd_train(args) -> int:
    overrides = parse_overrides(args.overrides)
    for key in ("backend", "workers", "mode", "data"):
        if getattr(args, key) is not None:
            overrides[key] = getattr(args, key)
    if args.mode is not None or args.workers is not None:
        overrides.setdefault("backend", "ray")
    cfg = load_config(args.config, overrides)
    if cfg.backend == "local":
        if args.address:
            raise ConfigError("--address needs --backend ray")
        from reptile_dist.local import train_local

        summary = train_local(cfg, args.out, resume=args.resume, progress=not args.no_progress)
    else:
        from reptile_dist.engine.driver import train_ray

        summary = train_ray(cfg, args.out, address=args.address, resume=args.resume, progress=not args.no_progress)
    print(json.dumps({k: summary[k] for k in ("test_accuracy", "test_ci95", "test_loss", "meta_iters", "tasks_per_s", "wall_s")}))
    return 0


def cmd_eval(args) -> int:
    from reptile_dist.evaluation import evaluate, headline
    from reptile_dist.rundir import load_checkpoint
    from reptile_dist.training import FINAL_FORMAT, make_learner
    from reptile_dist.config import Config
    from reptile_dist.tasks import build_family
    from torch.nn.utils import parameters_to_vector

    state = load_checkpoint(args.checkpoint)
    if state.get("format") != FINAL_FORMAT:
        raise ConfigError(f"{args.checkpoint} is not a final.pt written by reptile-dist train")
    overrides = parse_overrides(args.overrides)
    if args.data:
        overrides["data"] = args.data
    if args.tasks:
        overrides["eval_tasks"] = args.tasks
    cfg = Config().replace(**state["config"]).replace(**overrides)
    family = build_family(cfg)
    learner = make_learner(cfg, family)
    learner.model.load_state_dict(state["model_state"])
    theta = parameters_to_vector(learner.model.parameters()).detach().clone()
    result = evaluate(learner, family, theta, cfg, args.split, cfg.eval_tasks)
    print(f"{args.split}: {headline(result, family.kind)}")
    print(json.dumps(result))
    return 0


def cmd_data(args) -> int:
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

    print(yaml.safe_dump(load_config(args.config, parse_overrides(args.overrides)).to_dict(), sort_keys=False), end="")
    return 0


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "data": cmd_data, "config": cmd_config}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except USER_ERRORS as exc:
        print(f"reptile-dist: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("reptile-dist: interrupted; the run directory keeps its last checkpoint", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
