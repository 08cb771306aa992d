"""Hyperparameter sweeps with Ray Tune: spec.py (YAML -> validated spec -> search space),
trainable.py (one trial = the distributed engine in the trial's placement group),
runner.py (Tuner, results table, best configuration)."""
from reptile_dist.sweep.spec import SweepError, SweepSpec, load_sweep, parse_sweep

__all__ = ["SweepError", "SweepSpec", "load_sweep", "parse_sweep"]
