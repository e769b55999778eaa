"""Optuna searches recorded in MLflow as a tree: study -> trial -> fold."""

from __future__ import annotations

from optuna_mlflow_nested.cv import cross_validate
from optuna_mlflow_nested.seeding import seed_everything
from optuna_mlflow_nested.study import NestedStudy
from optuna_mlflow_nested.study import create_study
from optuna_mlflow_nested.study import load_study

__version__ = "0.1.0"

__all__ = [
    "NestedStudy",
    "create_study",
    "cross_validate",
    "load_study",
    "seed_everything",
]
