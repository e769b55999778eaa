"""Benchmarks: samplers and pruners compared on equal budgets, paired over seeds.

Every arm x seed study is a parent run nested under one benchmark run (benchmark ->
study -> trials), tagged with its sampler, pruner and seed; every arm gets the same
seeds and the same number of trials. The reports compare arms per seed (paired), so
that the text never claims a win the numbers do not support.

- :mod:`.compare`: :func:`compare_samplers`, :func:`compare_pruners` (the sweep)
- :mod:`.arms`: samplers and pruners by name or factory, checked up front
- :mod:`.report`: :class:`SamplerReport`, :class:`PrunerReport`, :func:`paired_test`
- :mod:`.plot`: the best-so-far figure
- :mod:`.problems`: :class:`Problem`, the CatBoost problems, :func:`get_problem`
- :mod:`.synthetic`: sphere, Rosenbrock, Rastrigin, Ackley in any dimension
"""

from __future__ import annotations

from optuna_mlflow_nested.benchmark.arms import make_pruner
from optuna_mlflow_nested.benchmark.compare import compare_pruners
from optuna_mlflow_nested.benchmark.compare import compare_samplers
from optuna_mlflow_nested.benchmark.problems import Problem
from optuna_mlflow_nested.benchmark.problems import catboost_problem
from optuna_mlflow_nested.benchmark.problems import get_problem
from optuna_mlflow_nested.benchmark.report import PrunerReport
from optuna_mlflow_nested.benchmark.report import SamplerReport
from optuna_mlflow_nested.benchmark.report import paired_test
from optuna_mlflow_nested.benchmark.synthetic import synthetic_problem

__all__ = [
    "Problem",
    "PrunerReport",
    "SamplerReport",
    "catboost_problem",
    "compare_pruners",
    "compare_samplers",
    "get_problem",
    "make_pruner",
    "paired_test",
    "synthetic_problem",
]
