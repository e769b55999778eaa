"""Benchmark problems: the shipped CatBoost ones (plain and cross-validated) by name."""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Sequence
import dataclasses
import os
from typing import Any

import numpy as np
import optuna

__all__ = ["Problem", "catboost_problem", "get_problem", "CATBOOST_PROBLEMS"]

Objective = Callable[[optuna.Trial], float]

CATBOOST_PROBLEMS = ("diabetes", "friedman1", "wide", "diabetes-cv", "friedman1-cv")


@dataclasses.dataclass(frozen=True)
class Problem:
    """A benchmark problem: objective, a same-budget grid, an optional finish step.

    ``grid`` names every parameter the objective suggests; ``finish`` maps a study to
    extra result columns (e.g. ``test_rmse``); ``metric`` names the objective's value.
    """

    name: str
    objective: Objective
    grid: dict[str, list[Any]]
    finish: Callable[[optuna.Study], dict[str, float]] | None
    noise_rmse: float | None = None
    direction: str = "minimize"
    metric: str = "value"


def catboost_problem(name: str, *, seed: int = 0, tuning_iterations: int = 200,
                     max_iterations: int = 2000, early_stopping_rounds: int = 50,
                     grid_shape: Sequence[int] | None = None, folds: int = 3) -> Problem:
    """A CatBoost regression problem over the project's CatBoost search space.

    Args:
        name: ``"diabetes"`` or ``"friedman1"`` over learning_rate x depth x
            l2_leaf_reg (grid 4 x 4 x 3 = 48); ``"wide"``: diabetes over six
            parameters, where a 48-point grid (3 x 2 x 2 x 2 x 2, the sixth held at
            one value) is necessarily coarse; ``"diabetes-cv"``, ``"friedman1-cv"``:
            the three-parameter problem scored by ``folds``-fold cross-validation on
            train+validation, the running mean RMSE reported after each fold
            (``trial.report``) and the trial stopped when ``trial.should_prune()``.
        seed: the data split's and CatBoost's seed.
        tuning_iterations: trees per trial (fixed).
        grid_shape: points per parameter of the grid.
        folds: cross-validation folds of the ``-cv`` problems.

    Returns:
        The :class:`Problem` (minimise validation RMSE; ``finish`` early-stops, refits
        on train+validation and scores the test set once: ``test_rmse``).

    Raises:
        ValueError: an unknown name.
    """
    from optuna_mlflow_nested import catboost as cb
    from optuna_mlflow_nested import datasets

    if name not in CATBOOST_PROBLEMS:
        raise ValueError(f"unknown problem {name!r}: {', '.join(CATBOOST_PROBLEMS)}")
    X, y = datasets.load("friedman1" if name.startswith("friedman1") else "diabetes", seed=seed)
    X_tr, X_va, X_te, y_tr, y_va, y_te = datasets.train_val_test_split(X, y, seed=seed)
    names = ["learning_rate", "depth", "l2_leaf_reg"]
    shape = list(grid_shape or (4, 4, 3))
    if name == "wide":
        names += ["random_strength", "bagging_temperature", "border_count"]
        shape = list(grid_shape or (3, 2, 2, 2, 2, 1))
    space = {k: cb.DEFAULT_SEARCH_SPACE[k] for k in names}  # the one CatBoost search space
    grid = cb.grid_from_space(space, dict(zip(space, shape)))
    if name == "wide" and grid_shape is None:
        grid["border_count"] = [128]
    common = {"random_seed": seed, "allow_writing_files": False, "verbose": False,
              "thread_count": os.cpu_count() or 1, "loss_function": "RMSE"}

    def holdout(trial: optuna.Trial) -> float:
        from catboost import CatBoostRegressor

        params = cb.suggest_all(trial, space)
        model = CatBoostRegressor(iterations=tuning_iterations, **common, **params)
        model.fit(X_tr, y_tr)
        return cb._rmse(y_va, model.predict(X_va))

    objective: Objective = holdout
    if name.endswith("-cv"):
        objective = _cv_objective(np.concatenate([X_tr, X_va]), np.concatenate([y_tr, y_va]),
                                  space, common, tuning_iterations, folds, seed)

    def finish(study: optuna.Study) -> dict[str, float]:
        refit = cb.refit_and_score(study.best_params, X_tr, y_tr, X_va, y_va, X_te, y_te,
                                   common=common, max_iterations=max_iterations,
                                   early_stopping_rounds=early_stopping_rounds)
        out = {"test_rmse": refit.test["test_rmse"]}
        if name.startswith("friedman1"):
            out["test_rmse_ratio_to_noise"] = refit.test["test_rmse"] / datasets.FRIEDMAN1_NOISE
        return out

    return Problem(name, objective, grid, finish,
                   datasets.FRIEDMAN1_NOISE if name.startswith("friedman1") else None,
                   metric="CV RMSE" if name.endswith("-cv") else "validation RMSE")


def _cv_objective(X: Any, y: Any, space: dict[str, Any], common: dict[str, Any],
                  iterations: int, folds: int, seed: int) -> Objective:
    """K-fold RMSE, fold by fold: the running mean goes to ``trial.report`` after each
    fold, and a pruner may stop the trial before the last one."""
    from sklearn.model_selection import KFold

    from optuna_mlflow_nested import catboost as cb

    splits = list(KFold(folds, shuffle=True, random_state=seed).split(X))

    def objective(trial: optuna.Trial) -> float:
        from catboost import CatBoostRegressor

        params = cb.suggest_all(trial, space)
        scores = []
        for fold, (train, test) in enumerate(splits):
            model = CatBoostRegressor(iterations=iterations, **common, **params)
            model.fit(X[train], y[train])
            scores.append(cb._rmse(y[test], model.predict(X[test])))
            trial.report(float(np.mean(scores)), fold)
            if fold + 1 < len(splits) and trial.should_prune():
                raise optuna.TrialPruned(f"pruned after fold {fold + 1} of {len(splits)}")
        return float(np.mean(scores))

    return objective


def get_problem(name: str, *, n_trials: int = 48, tuning_iterations: int = 200,
                seed: int = 0) -> Problem:
    """A shipped problem by name: a CatBoost one (:data:`CATBOOST_PROBLEMS`) or a
    synthetic one (``sphere-2d``, ``rosenbrock-5d``, ...; see
    :func:`~optuna_mlflow_nested.benchmark.synthetic_problem`), with a grid sized to
    ``n_trials`` where it can be.

    Returns:
        The :class:`Problem`.

    Raises:
        ValueError: an unknown name.

    Example:
        >>> get_problem("rastrigin-3d", n_trials=27).grid["x2"][:2]
        [-5.12, 0.0]
    """
    from optuna_mlflow_nested.benchmark import synthetic

    if synthetic.is_synthetic(name):
        return synthetic.synthetic_problem(name, n_trials=n_trials, seed=seed)
    if name not in CATBOOST_PROBLEMS:
        raise ValueError(f"unknown problem {name!r}: {', '.join(CATBOOST_PROBLEMS)} or a "
                         f"synthetic one like sphere-2d, rosenbrock-5d, rastrigin-3d, ackley-10d")
    grid_shape = None
    if n_trials != 48:  # a grid as close to the budget as the dimensions allow
        grid_shape = (n_trials, 1, 1) if name != "wide" else (n_trials, 1, 1, 1, 1, 1)
    return catboost_problem(name, seed=seed, tuning_iterations=tuning_iterations,
                            grid_shape=grid_shape)
