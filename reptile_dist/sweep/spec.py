"""A sweep definition: YAML -> validated `SweepSpec` -> Ray Tune search space.

Everything is checked here, before any trial starts: an unknown field, an empty range, a value
out of the field's range or a metric the periodic evaluation does not produce is one
`SweepError` naming the field.

    name: sine
    base: {config: sine, set: {workers: 1}}       # preset or YAML file, then overrides
    space:                                        # config field -> one distribution
      meta_step_size: {loguniform: [0.05, 1.0]}
      inner_steps: {choice: [1, 3, 5]}
    metric: eval_loss                             # periodic evaluation on validation tasks
    scheduler: {name: asha, grace_period: 100}    # or {name: pbt, perturbation_interval: 200}
    search: random                                # or optuna (pip install 'reptile-dist[tune]')
    budget: {num_samples: 8, meta_iters: 800, report_every: 100, max_concurrent_trials: 2}
    best: {set: {meta_iters: 3000}}               # written into the best configuration

`space: cases:` names whole recipes, tried like a grid (each case in every sample), for fields
that only make sense together (a Nesterov step size beside the paper's SGD one):

    space:
      cases:
        paper: {outer_optimizer: sgd, meta_step_size: 1.0}
        diloco: {outer_optimizer: nesterov, outer_momentum: 0.9, meta_step_size: 0.7}

With `budget: {unit: tasks}` the budget's meta_iters and report_every, and ASHA's grace_period,
count meta-training tasks instead of meta-steps: a trial runs meta_iters // meta_batch_size
meta-steps, so trials with different meta-batch sizes get the same number of tasks, and ASHA
compares them at equal tasks adapted.
"""
from __future__ import annotations

import importlib.util
import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


from reptile_dist.config import FIELDS, Config, ConfigError, load_config, read_yaml_mapping
from reptile_dist.engine.cluster import bundle_cpus
from reptile_dist.errors import UserError
from reptile_dist.sweep.placement import trial_bundles

DISTRIBUTIONS = ("choice", "grid", "uniform", "loguniform")
CASES = "cases"  # space key for named recipes: {case name: {config field: value}}
SCHEDULERS = ("asha", "pbt")
SEARCHES = ("random", "optuna")
# Fields a search space may not name: the budget and the reports set the first four, the rest
# define the problem being tuned (a seed would only reshuffle it).
SWEEP_OWNED = ("meta_iters", "eval_every", "checkpoint_every", "keep_checkpoints", "backend", "family", "model",
               "data", "split", "val_characters", "seed")
# Fields that set a trial's placement group; PBT keeps a trial's resources fixed.
RESOURCE_FIELDS = ("workers", "cpus_per_worker", "gpus_per_worker", "placement")
TOP_KEYS = ("name", "base", "space", "metric", "mode", "scheduler", "search", "budget", "best", "seed")


class SweepError(UserError):
    """A sweep definition is invalid; the message names the field."""


@dataclass(frozen=True)
class Dimension:
    """One searched config field and its distribution."""

    field: str
    kind: str  # one of DISTRIBUTIONS, or "cases" (field CASES)
    values: tuple  # choice/grid: the values; uniform/loguniform: (low, high); cases: the case names
    cases: tuple = ()  # cases: (name, {field: value}) pairs

    @property
    def is_grid(self) -> bool:
        """Tried exhaustively (every value in every sample), never sampled or perturbed."""
        return self.kind in ("grid", CASES)

    @property
    def is_int(self) -> bool:
        return FIELDS[self.field].type == "int"

    def tune_domain(self):
        from ray import tune

        if self.kind == "choice":
            return tune.choice(list(self.values))
        if self.is_grid:
            return tune.grid_search(list(self.values))
        low, high = self.values
        if self.is_int:  # inclusive integer ranges
            return tune.randint(low, high + 1) if self.kind == "uniform" else tune.lograndint(low, high + 1)
        return tune.uniform(low, high) if self.kind == "uniform" else tune.loguniform(low, high)


@dataclass(frozen=True)
class SweepSpec:
    name: str
    base: Config  # every trial's configuration before its searched values
    space: tuple[Dimension, ...]
    metric: str
    mode: str
    scheduler: str
    scheduler_options: dict[str, Any]
    search: str
    num_samples: int
    meta_iters: int  # per trial; ASHA's max_t
    report_every: int  # meta-steps between reports; each has a validation eval and a checkpoint
    max_concurrent_trials: int
    seed: int
    best_overrides: dict[str, Any] = field(default_factory=dict)
    unit: str = "meta_steps"  # what meta_iters, report_every and the scheduler's intervals count: or "tasks"

    @property
    def time_attr(self) -> str:
        """The reported value the scheduler measures a trial's progress by."""
        return "tasks" if self.unit == "tasks" else "meta_step"

    def param_space(self) -> dict[str, Any]:
        return {d.field: d.tune_domain() for d in self.space}

    def mutations(self) -> dict[str, Any]:
        """PBT's hyperparam_mutations: choices move to a neighbouring value, ranges are resampled
        or scaled by 0.8 / 1.2; grid fields are never perturbed (an exploiting trial copies them
        with the rest of the donor's configuration)."""
        return {d.field: list(d.values) if d.kind == "choice" else d.tune_domain() for d in self.space if not d.is_grid}

    def case(self, name: str) -> dict[str, Any]:
        """The config fields a named case sets."""
        cases = dict(case_pairs(self.space))
        if name not in cases:  # a sweep resumed after its definition lost the case
            raise SweepError(f"space.{CASES}: no case named {name!r} (cases: {', '.join(cases) or 'none'})")
        return cases[name]

    def trial_config(self, params: dict[str, Any]) -> Config:
        """The configuration one trial runs: base + its case's fields + its searched values (PBT may
        perturb an integer field into a float, so values are cast to the field's type)."""
        params = dict(params)
        case = self.case(params.pop(CASES)) if CASES in params else {}
        cfg = self.base.replace(**case, **{k: cast(k, v) for k, v in params.items()})
        return in_meta_steps(cfg, self.meta_iters, self.report_every, self.unit)

    def best_config(self, params: dict[str, Any]) -> Config:
        return self.trial_config(params).replace(**self.best_overrides)

    def num_trials(self) -> int:
        """num_samples times every grid's length (Tune repeats the grid per sample)."""
        return self.num_samples * math.prod(len(d.values) for d in self.space if d.is_grid)

    def placement_cpus(self, cluster_has_gpus: bool) -> float:
        """Logical CPUs one trial's placement group asks for at most over the search space."""

        def extremes(name):
            dim = next((d for d in self.space if d.field == name), None)
            return {min(dim.values), max(dim.values)} if dim else {getattr(self.base, name)}

        # A trial's CPUs grow with workers and cpus_per_worker; gpus_per_worker only counts as zero
        # (CPU workers) or not, so the extremes of each searched value bound every trial.
        corners = itertools.product(extremes("workers"), extremes("cpus_per_worker"), extremes("gpus_per_worker"))
        return max(bundle_cpus(trial_bundles(self.base.replace(workers=w, cpus_per_worker=c, gpus_per_worker=g),
                                             cluster_has_gpus))
                   for w, c, g in corners)


def in_meta_steps(cfg: Config, meta_iters: int, report_every: int, unit: str) -> Config:
    """cfg with the budget's length and report interval, converted to meta-steps when the budget
    counts tasks. Every report carries a validation evaluation and the checkpoint of the same
    meta-step; evaluations can fall behind training, so the engine keeps every checkpoint until then."""
    if unit == "tasks":
        meta_iters, report_every = meta_iters // cfg.meta_batch_size, report_every // cfg.meta_batch_size
        if report_every < 1:
            raise SweepError(f"budget.report_every is fewer tasks than one meta-step of meta_batch_size="
                             f"{cfg.meta_batch_size}")
    return cfg.replace(backend="ray", meta_iters=meta_iters, eval_every=report_every, checkpoint_every=report_every,
                       log_every=min(cfg.log_every, report_every), keep_checkpoints=math.ceil(meta_iters / report_every))


def case_pairs(space: tuple[Dimension, ...]) -> tuple[tuple[str, dict[str, Any]], ...]:
    """The space's named cases as (name, {field: value}) pairs; () without `cases`."""
    return next((d.cases for d in space if d.kind == CASES), ())


def cast(name: str, value: Any) -> Any:
    """A sampled value as the field's type (Tune's samplers give numpy scalars; PBT multiplies)."""
    if hasattr(value, "item"):
        value = value.item()
    if name == CASES:
        return value
    kind = FIELDS[name].type
    if kind == "int" and isinstance(value, float):
        return int(round(value))
    if kind == "float" and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def load_sweep(path: str | Path, overrides: dict[str, Any] | None = None) -> SweepSpec:
    """The definition at `path`; `overrides` are added to its `base: set:` (the CLI's --set)."""
    path = Path(path)
    if not path.is_file():
        raise SweepError(f"sweep file not found: {path}")
    data = read_yaml_mapping(path, SweepError, "name, base, space, metric, scheduler, budget")
    try:
        if overrides:
            base = data.get("base") if isinstance(data.get("base"), dict) else {}
            data = {**data, "base": {**base, "set": {**(base.get("set") or {}), **overrides}}}
        return parse_sweep(data, default_name=path.stem, base_dir=path.parent)
    except SweepError as exc:
        raise SweepError(f"{path}: {exc}") from None


def parse_sweep(data: dict[str, Any], default_name: str = "sweep", base_dir: Path = Path(".")) -> SweepSpec:
    unknown = sorted(set(data) - set(TOP_KEYS))
    if unknown:
        raise SweepError(f"unknown key '{unknown[0]}' (known: {', '.join(TOP_KEYS)})")
    budget = _mapping(data, "budget")
    _only(budget, "budget", ("num_samples", "meta_iters", "report_every", "max_concurrent_trials", "unit"))
    unit = budget.get("unit", "meta_steps")
    if unit not in ("meta_steps", "tasks"):
        raise SweepError(f"budget.unit={unit!r} is not one of meta_steps, tasks")
    num_samples = _positive_int(budget, "budget.num_samples", 1)
    meta_iters = _positive_int(budget, "budget.meta_iters", None)
    report_every = _positive_int(budget, "budget.report_every", max(1, meta_iters // 10))
    max_concurrent = _positive_int(budget, "budget.max_concurrent_trials", 1)
    if meta_iters % report_every:
        raise SweepError(f"budget.report_every={report_every} must divide budget.meta_iters={meta_iters}")

    base = _base_config(_mapping(data, "base"), base_dir, meta_iters, report_every, unit)
    space = _space(_mapping(data, "space"), base)
    if unit == "tasks":
        batch = next((d for d in space if d.field == "meta_batch_size"), None)
        sizes = set(batch.values if batch is not None else
                    [c.get("meta_batch_size", base.meta_batch_size) for _, c in case_pairs(space)] or [base.meta_batch_size])
        for size in sorted(sizes):
            in_meta_steps(base.replace(meta_batch_size=size), meta_iters, report_every, unit)

    metric, mode = _metric(data, base, _family_kind(base))
    search = data.get("search") or "random"
    if search not in SEARCHES:
        raise SweepError(f"search={search!r} is not one of {', '.join(SEARCHES)}")
    if search == "optuna":
        if importlib.util.find_spec("optuna") is None:
            raise SweepError("search: optuna is not installed (pip install 'reptile-dist[tune]')")
        grids = [d for d in space if d.is_grid]
        if grids:
            hint = "use choice" if grids[0].kind == "grid" else "search: random tries every case"
            raise SweepError(f"space.{grids[0].field}: {grids[0].kind} is not supported with search: optuna ({hint})")

    scheduler, options = _scheduler(data.get("scheduler") or {"name": "asha"}, meta_iters, report_every, space)
    if unit == "tasks" and scheduler != "asha":
        raise SweepError("budget.unit: tasks needs scheduler asha (PBT pauses trials at meta-step checkpoints)")

    best = _mapping(data, "best")
    _only(best, "best", ("set",))
    best_overrides = dict(best.get("set") or {})
    for _, case in case_pairs(space) or (("", {}),):
        try:
            base.replace(**case, **best_overrides)
        except ConfigError as exc:
            raise SweepError(f"best.set: {exc}") from None

    seed = data.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise SweepError(f"seed={seed!r} must be an integer >= 0")
    name = data.get("name", default_name)
    if not isinstance(name, str) or not name or "/" in name:
        raise SweepError(f"name={name!r} must be a non-empty string without '/'")
    return SweepSpec(name, base, space, metric, mode, scheduler, options, search, num_samples, meta_iters,
                     report_every, max_concurrent, seed, best_overrides, unit)


def _base_config(base: dict[str, Any], base_dir: Path, meta_iters: int, report_every: int, unit: str) -> Config:
    _only(base, "base", ("config", "set"))
    source = base.get("config", "sine")
    if not isinstance(source, str):
        raise SweepError(f"base.config={source!r} must be a preset name or a YAML file")
    if Path(source).suffix and not Path(source).is_absolute() and (base_dir / source).exists():
        source = str(base_dir / source)
    overrides = base.get("set") or {}
    if not isinstance(overrides, dict):
        raise SweepError("base.set must be a mapping of config keys")
    owned = sorted(set(overrides) & {"meta_iters", "eval_every", "checkpoint_every"})
    if owned:
        raise SweepError(f"base.set.{owned[0]}: set by the sweep's budget (meta_iters, report_every)")
    try:
        cfg = in_meta_steps(load_config(source, overrides), meta_iters, report_every, unit)
    except ConfigError as exc:
        raise SweepError(f"base: {exc}") from None
    if cfg.family in ("omniglot", "images") and "://" not in cfg.data and not Path(cfg.data).is_absolute():
        # Trials run in Tune's per-trial working directories: anchor the table where the sweep starts.
        cfg = cfg.replace(data=str(Path(cfg.data).resolve()))
    if cfg.mode == "allreduce":
        raise SweepError("base.set.mode: sweeps run the parameter-server engine (sync or async), not allreduce")
    if cfg.family == "synthetic":
        raise SweepError("base.config: the synthetic family has no validation split to score trials on")
    if cfg.family == "omniglot" and not cfg.val_characters:
        raise SweepError("base.set.val_characters: must be > 0 so trials are scored on held-out training "
                         "characters, never the test split")
    _family_kind(cfg)  # a plug-in or an image table: imported, built and checked for a validation split now
    return cfg


_KINDS: dict[str, str] = {}


def _family_kind(cfg: Config) -> str:
    """The family's kind; for a plug-in or an image table, built once here (before Tune starts: a
    plug-in that does not import is one line, not a failure in every trial), and refused when it
    would score trials on the test split."""
    builtin = {"sine": "regression", "omniglot": "classification", "synthetic": "classification"}
    if cfg.family in builtin:
        return builtin[cfg.family]
    key = f"{cfg.family}|{cfg.data}|{sorted(cfg.family_args.items())}"
    if key not in _KINDS:
        from reptile_dist.plugins import build_family
        from reptile_dist.training import periodic_split

        try:
            family = build_family(cfg)
        except UserError as exc:
            raise SweepError(f"base: {exc}") from None
        if family.kind == "classification" and periodic_split(family) != "val":
            raise SweepError(f"base: family {cfg.family} has no validation split ('val' classes) to score trials "
                             f"on, and trials must never see the test split")
        _KINDS[key] = family.kind
    return _KINDS[key]


def _space(space: dict[str, Any], base: Config) -> tuple[Dimension, ...]:
    if not space:
        raise SweepError("space: name at least one config field to search")
    dims = []
    for name, dist in space.items():
        where = f"space.{name}"
        if name == CASES:
            continue  # after the fields: each case is checked with their values
        if name not in FIELDS:
            raise SweepError(f"{where}: unknown config field '{name}'")
        if name in SWEEP_OWNED:
            raise SweepError(f"{where}: set by the sweep itself (base or budget), not searchable")
        if not isinstance(dist, dict) or len(dist) != 1 or next(iter(dist)) not in DISTRIBUTIONS:
            raise SweepError(f"{where}: expected one of {', '.join(f'{{{d}: ...}}' for d in DISTRIBUTIONS)}")
        kind, values = next(iter(dist.items()))
        if not isinstance(values, list):
            raise SweepError(f"{where}: {kind} expects a list, got {values!r}")
        if kind in ("choice", "grid"):
            if not values:
                raise SweepError(f"{where}: empty {kind} list")
        else:
            values = _range(where, name, kind, values)
        for value in values:  # each value (each end of a range) must be valid for the field
            try:
                base.replace(**{name: value})
            except ConfigError as exc:
                raise SweepError(f"{where}: {exc}") from None
        dims.append(Dimension(name, kind, tuple(cast(name, v) for v in values)))
    if CASES in space:
        cases = _cases(space[CASES], base, set(space) - {CASES})
        for case_name, case in cases.cases:
            for dim in dims:  # every value (each end of a range) with the case's fields
                for value in dim.values:
                    try:
                        base.replace(**case, **{dim.field: value})
                    except ConfigError as exc:
                        raise SweepError(f"space.{CASES}.{case_name} with {dim.field}={value!r}: {exc}") from None
        dims.append(cases)
    return tuple(dims)


def _cases(cases: Any, base: Config, searched: set[str]) -> Dimension:
    """space.cases: {name: {field: value}}; every case a valid configuration, setting no field the
    sweep owns, a trial's resources (its placement group is sized over the searched values) or a
    field also searched on its own."""
    if not isinstance(cases, dict) or not cases:
        raise SweepError(f"space.{CASES}: expected a mapping of case names to config fields, got {cases!r}")
    pairs = []
    for name, fields in cases.items():
        where = f"space.{CASES}.{name}"
        if not isinstance(name, str) or not name:
            raise SweepError(f"space.{CASES}: case names must be non-empty strings, got {name!r}")
        if not isinstance(fields, dict) or not fields:
            raise SweepError(f"{where}: expected a mapping of config fields, got {fields!r}")
        for key in fields:
            if key not in FIELDS:
                raise SweepError(f"{where}: unknown config field '{key}'")
            if key in SWEEP_OWNED:
                raise SweepError(f"{where}.{key}: set by the sweep itself (base or budget), not per case")
            if key in RESOURCE_FIELDS:
                raise SweepError(f"{where}.{key}: a trial's resources are sized over the whole space; "
                                 f"search {key} in space.{key}, not per case")
            if key in searched:
                raise SweepError(f"{where}.{key}: also searched in space.{key}; name it in one place")
        try:
            cfg = base.replace(**fields)
        except ConfigError as exc:
            raise SweepError(f"{where}: {exc}") from None
        if cfg.mode == "allreduce":
            raise SweepError(f"{where}.mode: sweeps run the parameter-server engine (sync or async), not allreduce")
        pairs.append((name, {k: cast(k, v) for k, v in fields.items()}))
    return Dimension(CASES, CASES, tuple(name for name, _ in pairs), tuple(pairs))


def _range(where: str, name: str, kind: str, values: list) -> list:
    if len(values) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        raise SweepError(f"{where}: {kind} expects [low, high], got {values!r}")
    low, high = values
    if FIELDS[name].type not in ("int", "float"):
        raise SweepError(f"{where}: {kind} needs a numeric field; {name} is {FIELDS[name].type} (use choice)")
    if FIELDS[name].type == "int" and not all(float(v).is_integer() for v in values):
        raise SweepError(f"{where}: {name} is an integer field; {kind} bounds must be integers")
    if not low < high:
        raise SweepError(f"{where}: empty range {kind} [{low}, {high}] (low must be < high)")
    if kind == "loguniform" and low <= 0:
        raise SweepError(f"{where}: loguniform needs low > 0, got {low}")
    return [low, high]


def _metric(data: dict[str, Any], base: Config, kind: str) -> tuple[str, str]:
    allowed = {"eval_loss": "min"}
    if kind == "classification":
        allowed.update(eval_accuracy="max", eval_transductive_accuracy="max")
    metric = data.get("metric", "eval_loss" if kind == "regression" else "eval_accuracy")
    if metric not in allowed:
        raise SweepError(f"metric={metric!r} is not one of {', '.join(allowed)} "
                         f"(the periodic evaluation on validation tasks of the {base.family} family)")
    mode = data.get("mode", allowed[metric])
    if mode not in ("min", "max"):
        raise SweepError(f"mode={mode!r} is not one of min, max")
    return metric, mode


def _scheduler(sched: Any, meta_iters: int, report_every: int, space: tuple[Dimension, ...]) -> tuple[str, dict]:
    if isinstance(sched, str):
        sched = {"name": sched}
    if not isinstance(sched, dict):
        raise SweepError("scheduler must be a mapping with a name (asha or pbt)")
    name = sched.get("name", "asha")
    if name not in SCHEDULERS:
        raise SweepError(f"scheduler.name={name!r} is not one of {', '.join(SCHEDULERS)}")
    if name == "asha":
        _only(sched, "scheduler", ("name", "grace_period", "reduction_factor"))
        options = {"grace_period": _positive_int(sched, "scheduler.grace_period", report_every),
                   "reduction_factor": sched.get("reduction_factor", 2)}
        if options["grace_period"] > meta_iters:
            raise SweepError(f"scheduler.grace_period={options['grace_period']} exceeds budget.meta_iters={meta_iters}")
        rf = options["reduction_factor"]
        if not isinstance(rf, (int, float)) or isinstance(rf, bool) or not rf > 1:
            raise SweepError(f"scheduler.reduction_factor={rf!r} must be a number > 1")
    else:
        _only(sched, "scheduler", ("name", "perturbation_interval", "quantile_fraction", "resample_probability"))
        options = {"perturbation_interval": _positive_int(sched, "scheduler.perturbation_interval", 2 * report_every),
                   "quantile_fraction": sched.get("quantile_fraction", 0.25),
                   "resample_probability": sched.get("resample_probability", 0.25)}
        if options["perturbation_interval"] % report_every:
            raise SweepError(f"scheduler.perturbation_interval={options['perturbation_interval']} must be a multiple "
                             f"of budget.report_every={report_every} (trials can only be paused at a checkpoint)")
        for key in ("quantile_fraction", "resample_probability"):
            value = options[key]
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value <= (0.5 if key == "quantile_fraction" else 1):
                raise SweepError(f"scheduler.{key}={value!r} is out of range")
        fixed = [d.field for d in space if d.field in RESOURCE_FIELDS]
        if fixed:
            raise SweepError(f"space.{fixed[0]}: PBT keeps a trial's resources fixed; sweep it with asha")
        if any(d.kind == CASES for d in space):
            raise SweepError(f"space.{CASES}: PBT copies a better trial's whole configuration, its case too; "
                             "compare cases with asha")
        if all(d.is_grid for d in space):
            raise SweepError("space: PBT needs a field to perturb (choice, uniform or loguniform)")
    return name, options


def _mapping(data: dict[str, Any], key: str) -> dict[str, Any]:
    value = data.get(key) or {}
    if not isinstance(value, dict):
        raise SweepError(f"{key} must be a mapping")
    return value


def _only(data: dict[str, Any], where: str, known: tuple[str, ...]) -> None:
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise SweepError(f"{where}.{unknown[0]}: unknown key (known: {', '.join(known)})")


def _positive_int(data: dict[str, Any], where: str, default: int | None) -> int:
    """data[key] for where = 'section.key'."""
    value = data.get(where.rsplit(".", 1)[-1], default)
    if value is None:
        raise SweepError(f"{where} is required")
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise SweepError(f"{where}={value!r} must be an integer >= 1")
    return value

