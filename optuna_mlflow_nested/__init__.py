"""Optuna searches recorded in MLflow as a tree: study -> trial -> fold.

The public names; modules that import heavy libraries (CatBoost, scikit-learn, SciPy,
matplotlib) load on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING
from typing import Any

from optuna_mlflow_nested.callback import MLflowCallback
from optuna_mlflow_nested.factories import create_study
from optuna_mlflow_nested.factories import load_study
from optuna_mlflow_nested.seeding import seed_everything
from optuna_mlflow_nested.study import NestedStudy

if TYPE_CHECKING:
    from optuna_mlflow_nested import datasets
    from optuna_mlflow_nested.benchmark import PrunerReport
    from optuna_mlflow_nested.benchmark import SamplerReport
    from optuna_mlflow_nested.benchmark import compare_pruners
    from optuna_mlflow_nested.benchmark import compare_samplers
    from optuna_mlflow_nested.catboost import CatBoostResult
    from optuna_mlflow_nested.catboost import FinishError
    from optuna_mlflow_nested.catboost import load_best_model
    from optuna_mlflow_nested.catboost import tune_catboost
    from optuna_mlflow_nested.cv import cross_validate

__version__ = "0.1.0"

_LAZY = {
    "SamplerReport": "optuna_mlflow_nested.benchmark",
    "compare_samplers": "optuna_mlflow_nested.benchmark",
    "CatBoostResult": "optuna_mlflow_nested.catboost",
    "load_best_model": "optuna_mlflow_nested.catboost",
    "tune_catboost": "optuna_mlflow_nested.catboost",
    "cross_validate": "optuna_mlflow_nested.cv",
    "compare_pruners": "optuna_mlflow_nested.benchmark",
    "PrunerReport": "optuna_mlflow_nested.benchmark",
    "FinishError": "optuna_mlflow_nested.catboost",
}


def __getattr__(name: str) -> Any:
    if name == "datasets":
        return importlib.import_module("optuna_mlflow_nested.datasets")
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'optuna_mlflow_nested' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)


__all__ = [
    "CatBoostResult",
    "FinishError",
    "MLflowCallback",
    "NestedStudy",
    "PrunerReport",
    "SamplerReport",
    "compare_pruners",
    "compare_samplers",
    "create_study",
    "cross_validate",
    "datasets",
    "load_best_model",
    "load_study",
    "seed_everything",
    "tune_catboost",
]
