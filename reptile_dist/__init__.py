"""Distributed Reptile meta-learning on Ray.

    import reptile_dist as rd
    rd.train(rd.load_config("sine"), "runs/sine", family=my_family, model=my_model)

The public API is `__all__` (reptile_dist/api.py); everything else is internal. It is loaded on
first use, so importing one of the package's modules (a Ray worker does) never loads the rest.
"""
from __future__ import annotations

__all__ = ["Config", "FamilyInfo", "InnerMoment", "Task", "TaskFamily", "TrainedModel", "adapt", "evaluate",
           "load_config", "load_model", "predict", "train"]


def __getattr__(name: str):
    if name in __all__:
        from reptile_dist import api

        return getattr(api, name)
    raise AttributeError(f"module 'reptile_dist' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
