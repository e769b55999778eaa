"""cross_validate: scikit-learn's cross-validation with each fold a nested MLflow run."""

from __future__ import annotations

from typing import Any

import mlflow
import numpy as np
from sklearn.base import clone
from sklearn.metrics import check_scoring
from sklearn.model_selection import check_cv
from sklearn.base import is_classifier
import time

from optuna_mlflow_nested import tracking

__all__ = ["cross_validate"]


def cross_validate(
    estimator: Any,
    X: Any,
    y: Any,
    *,
    cv: Any = 5,
    scoring: Any = None,
    log_models: bool = False,
) -> dict[str, np.ndarray]:
    """Cross-validate ``estimator``; each fold is a run ``fold-<i>`` nested in the active run.

    Returns scikit-learn's ``cross_validate`` dict (``test_score``, ``fit_time``,
    ``score_time``; ``test_<name>`` per scorer when ``scoring`` is a list or dict). The
    fold runs go in the active run's experiment and hold the fold index, the scores,
    the fit time and, with ``log_models=True``, the fitted model. Inside an objective
    wrapped by :class:`~optuna_mlflow_nested.NestedStudy` this makes the tree
    study -> trial -> fold. Without an active run the folds are top-level runs.

    Example:
        >>> import mlflow, tempfile, os, optuna_mlflow_nested as omn
        >>> from sklearn.datasets import load_diabetes
        >>> from sklearn.linear_model import Ridge
        >>> mlflow.set_tracking_uri("sqlite:///" + os.path.join(tempfile.mkdtemp(), "m.db"))
        >>> X, y = load_diabetes(return_X_y=True)
        >>> with mlflow.start_run():
        ...     out = omn.cross_validate(Ridge(), X, y, cv=3)
        >>> len(out["test_score"])
        3
    """
    if isinstance(cv, int) and cv < 2:
        raise ValueError(f"cv must be at least 2 folds, got {cv}")
    splitter = check_cv(cv, y, classifier=is_classifier(estimator))
    scorers: dict[str, Any]
    if scoring is None or isinstance(scoring, str) or callable(scoring):
        scorers = {"score": check_scoring(estimator, scoring=scoring)}
    elif isinstance(scoring, dict):
        scorers = {name: check_scoring(estimator, scoring=s) for name, s in scoring.items()}
    else:
        scorers = {name: check_scoring(estimator, scoring=name) for name in scoring}
    parent = mlflow.active_run()
    client = tracking.get_client(mlflow.get_tracking_uri())
    experiment_id = parent.info.experiment_id if parent else mlflow.tracking.fluent._get_experiment_id()
    X_arr, y_arr = X, np.asarray(y)
    result: dict[str, list[float]] = {"fit_time": [], "score_time": []}
    for name in scorers:
        result[f"test_{name}"] = []
    for fold, (train_idx, test_idx) in enumerate(splitter.split(X_arr, y_arr)):
        model = clone(estimator)
        start = time.perf_counter()
        model.fit(_take(X_arr, train_idx), y_arr[train_idx])
        fit_time = time.perf_counter() - start
        start = time.perf_counter()
        scores = {n: float(s(model, _take(X_arr, test_idx), y_arr[test_idx])) for n, s in scorers.items()}
        score_time = time.perf_counter() - start
        result["fit_time"].append(fit_time)
        result["score_time"].append(score_time)
        for name, value in scores.items():
            result[f"test_{name}"].append(value)
        tracking.log_fold_run(
            client, experiment_id, parent.info.run_id if parent else None, fold,
            metrics={**{f"test_{k}": v for k, v in scores.items()}, "fit_time": fit_time,
                     "score_time": score_time, "fold": float(fold)},
            params={"n_train": len(train_idx), "n_test": len(test_idx)},
            model=model if log_models else None,
        )
    return {key: np.asarray(values) for key, values in result.items()}


def _take(X: Any, idx: np.ndarray) -> Any:
    return X.iloc[idx] if hasattr(X, "iloc") else np.asarray(X)[idx]
