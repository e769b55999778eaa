"""Optuna searches recorded in MLflow as a tree: study -> trial -> fold."""

from __future__ import annotations

from optuna_mlflow_nested import datasets
from optuna_mlflow_nested.benchmark import SamplerReport
from optuna_mlflow_nested.benchmark import compare_samplers
from optuna_mlflow_nested.callback import MLflowCallback
from optuna_mlflow_nested.catboost import CatBoostResult
from optuna_mlflow_nested.catboost import load_best_model
from optuna_mlflow_nested.catboost import tune_catboost
from optuna_mlflow_nested.cv import cross_validate
from optuna_mlflow_nested.seeding import seed_everything
from optuna_mlflow_nested.study import NestedStudy
from optuna_mlflow_nested.study import create_study
from optuna_mlflow_nested.study import load_study

__version__ = "0.1.0"

__all__ = [
    "CatBoostResult",
    "MLflowCallback",
    "NestedStudy",
    "SamplerReport",
    "compare_samplers",
    "create_study",
    "cross_validate",
    "datasets",
    "load_best_model",
    "load_study",
    "seed_everything",
    "tune_catboost",
]
