"""tune_catboost: fixed-tree tuning, early stopping, refit on train+validation, test, tag.

The flow careful practitioners follow:

1. every trial fits ``tuning_iterations`` trees on train and is scored on validation
   (fixed tree count: trials compare hyperparameters, not training lengths);
2. the best parameters are refitted on train with the validation set as ``eval_set``,
   up to ``max_iterations`` trees with ``early_stopping_rounds``: the best iteration
   gives the tree count;
3. a model with that many trees (best iteration + 1) is refitted on train +
   validation and scored once on the test set;
4. the parent run gets the test metrics, the learning curve, a predicted-vs-actual
   plot, the model (CatBoost's native format, with signature and input example) and
   the tag ``best_model=true``.
"""

from __future__ import annotations

from collections.abc import Mapping
from collections.abc import Sequence
import contextlib
import dataclasses
import json
import math
import os
import threading
from typing import Any

import mlflow
from mlflow.entities import Metric
import numpy as np
import optuna
from optuna.distributions import BaseDistribution
from optuna.distributions import CategoricalDistribution
from optuna.distributions import FloatDistribution
from optuna.distributions import IntDistribution
import pandas as pd

from optuna_mlflow_nested import tracking
from optuna_mlflow_nested.study import NestedStudy
from optuna_mlflow_nested.study import create_study

__all__ = ["CatBoostResult", "DEFAULT_SEARCH_SPACE", "load_best_model", "tune_catboost",
           "grid_from_space", "refit_and_score"]

#: The default search space (a user ``search_space`` replaces it whole).
DEFAULT_SEARCH_SPACE: dict[str, BaseDistribution] = {
    "learning_rate": FloatDistribution(0.01, 0.3, log=True),
    "depth": IntDistribution(3, 8),
    "l2_leaf_reg": FloatDistribution(0.5, 30.0, log=True),
    "random_strength": FloatDistribution(0.0, 2.0),
    "bagging_temperature": FloatDistribution(0.0, 1.0),
    "border_count": IntDistribution(32, 255),
    "min_data_in_leaf": IntDistribution(1, 50),
}

BEST_MODEL_TAG = "best_model"
MODEL_URI_TAG = "best_model_uri"
VAL_METRIC = "val_rmse"

# catboost#2620: CatBoost fits from concurrent Python threads have crashed. Trials in
# threads take turns for the fit itself; sampling and logging still overlap. For real
# parallelism use worker processes (``optuna-mlflow-nested tune --workers N``).
_FIT_LOCK = threading.Lock()


@dataclasses.dataclass(frozen=True)
class CatBoostResult:
    """What :func:`tune_catboost` found and logged."""

    best_params: dict[str, Any]
    best_value: float
    best_iteration: int
    tree_count: int
    val_rmse_early_stopped: float
    test_rmse: float | None
    test_mae: float | None
    test_r2: float | None
    model: Any
    model_uri: str
    parent_run_id: str
    study: NestedStudy


def _space(search_space: Mapping[str, Any] | None) -> dict[str, BaseDistribution]:
    if search_space is None:
        return dict(DEFAULT_SEARCH_SPACE)
    if not isinstance(search_space, Mapping) or not search_space:
        raise ValueError("search_space must be a non-empty dict of name -> distribution or values")
    space: dict[str, BaseDistribution] = {}
    for name, spec in search_space.items():
        if isinstance(spec, BaseDistribution):
            space[name] = spec
        elif isinstance(spec, Sequence) and not isinstance(spec, str) and len(spec) > 0:
            space[name] = CategoricalDistribution(list(spec))
        else:
            raise ValueError(f"search_space[{name!r}] must be an Optuna distribution or a "
                             f"list of values, got {spec!r}")
    return space


def grid_from_space(space: Mapping[str, BaseDistribution], points: Mapping[str, int] | int) -> dict[str, list]:
    """A fixed grid over the same ranges: ``points`` values per parameter (evenly spaced,
    on a log scale for log distributions).

    Example:
        >>> from optuna_mlflow_nested.catboost import grid_from_space, DEFAULT_SEARCH_SPACE
        >>> grid = grid_from_space({"depth": DEFAULT_SEARCH_SPACE["depth"]}, 3)
        >>> grid["depth"]
        [3, 6, 8]
    """
    grid: dict[str, list] = {}
    for name, dist in space.items():
        k = points if isinstance(points, int) else points[name]
        if isinstance(dist, CategoricalDistribution):
            grid[name] = list(dist.choices)[:k]
        elif isinstance(dist, (FloatDistribution, IntDistribution)):
            low, high = float(dist.low), float(dist.high)
            values = (np.geomspace(low, high, k) if dist.log else np.linspace(low, high, k))
            if isinstance(dist, IntDistribution):
                grid[name] = sorted({int(round(v)) for v in values})
            else:
                grid[name] = [float(v) for v in values]
        else:
            raise ValueError(f"cannot make a grid for {name!r}: {dist!r}")
    return grid


def _default_grid(space: Mapping[str, BaseDistribution], n_trials: int) -> dict[str, list]:
    per_dim = max(2, int(math.floor(n_trials ** (1 / len(space)) + 1e-9)))
    return grid_from_space(space, per_dim)


def _cat_features(X: Any, cat_features: Sequence[Any] | None) -> list[Any] | None:
    if cat_features is not None:
        return list(cat_features)
    if isinstance(X, pd.DataFrame):
        found = [c for c in X.columns if isinstance(X[c].dtype, pd.CategoricalDtype)
                 or X[c].dtype == object or pd.api.types.is_string_dtype(X[c].dtype)]
        return found or None
    return None


def _prepare(X: Any, cat_features: list[Any] | None) -> Any:
    """CatBoost wants categorical columns as strings or ints, not pandas categories."""
    if not isinstance(X, pd.DataFrame) or not cat_features:
        return X
    X = X.copy()
    for column in cat_features:
        X[column] = X[column].astype(str)
    return X


def _rmse(y_true: Any, y_pred: Any) -> float:
    return float(np.sqrt(np.mean((np.asarray(y_true, dtype=float) - np.asarray(y_pred)) ** 2)))


class _PruningCallback:
    """Reports validation RMSE every ``every`` iterations; stops the fit when Optuna prunes."""

    def __init__(self, trial: optuna.Trial, every: int = 10) -> None:
        self.trial = trial
        self.every = every
        self.pruned = False

    def after_iteration(self, info: Any) -> bool:
        if info.iteration % self.every:
            return True
        value = info.metrics["validation"]["RMSE"][-1]
        self.trial.report(value, info.iteration)
        if self.trial.should_prune():
            self.pruned = True
            return False
        return True


def _suggest(trial: optuna.Trial, space: Mapping[str, BaseDistribution]) -> dict[str, Any]:
    return {name: trial._suggest(name, dist) for name, dist in space.items()}


def _model_params(params: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(params)
    if "min_data_in_leaf" in out and "grow_policy" not in out:
        out["grow_policy"] = "Depthwise"  # SymmetricTree ignores min_data_in_leaf
    return out


def _DEFAULT_PRUNER() -> optuna.pruners.BasePruner:
    return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=30)


def catboost_study(*, study_name: str | None, experiment_name: str | None,
                   tracking_uri: str | None, storage: Any, sampler: Any, seed: int,
                   grid: dict[str, list] | None = None, search_space: Mapping[str, Any] | None = None,
                   n_trials: int | None = None,
                   pruner: optuna.pruners.BasePruner | None = None) -> NestedStudy:
    """The study (and parent run) :func:`tune_catboost` works in: created once, joined after.

    For ``sampler="grid"`` give ``grid``, or ``search_space`` and ``n_trials`` to derive it.
    """
    if sampler == "grid":
        # Workers joining later must search the grid the study was created with.
        grid = _stored_grid(storage, study_name) or grid or _default_grid(
            _space(search_space), n_trials or 1)
    study = create_study(
        study_name, experiment_name=experiment_name, tracking_uri=tracking_uri, storage=storage,
        sampler=sampler, search_space=grid, seed=seed, load_if_exists=True, pruner=pruner,
        metric_name=VAL_METRIC, tags={"model": "CatBoostRegressor"},
    )
    if grid is not None and GRID_ATTR not in study.user_attrs:
        study.set_user_attr(GRID_ATTR, grid)
    return study


GRID_ATTR = "omn.grid"


def _stored_grid(storage: Any, study_name: str | None) -> dict[str, list] | None:
    if storage is None or study_name is None:
        return None
    try:
        store = optuna.storages.get_storage(storage)
        attrs = store.get_study_user_attrs(store.get_study_id_from_name(study_name))
    except KeyError:
        return None
    return attrs.get(GRID_ATTR)


def tune_catboost(
    X_train: Any, y_train: Any, X_val: Any, y_val: Any, X_test: Any = None, y_test: Any = None,
    *,
    n_trials: int = 50,
    seed: int = 42,
    sampler: str | optuna.samplers.BaseSampler = "tpe",
    search_space: Mapping[str, Any] | None = None,
    tuning_iterations: int = 300,
    max_iterations: int = 5000,
    early_stopping_rounds: int = 100,
    cat_features: Sequence[Any] | None = None,
    study_name: str | None = None,
    experiment_name: str | None = None,
    tracking_uri: str | None = None,
    storage: str | optuna.storages.BaseStorage | None = None,
    n_jobs: int = 1,
    timeout: float | None = None,
    pruning: bool = False,
    pruner: optuna.pruners.BasePruner | None = None,
    show_progress_bar: bool = False,
    finish: bool = True,
    more_trials: bool = False,
    threads_per_fit: int | None = None,
) -> CatBoostResult | NestedStudy:
    """Tune a ``CatBoostRegressor`` on validation RMSE, then finish the job (see module doc).

    ``n_trials`` is the total budget: re-running with the same ``study_name`` and
    ``storage`` resumes and only runs the trials still missing, under the same parent
    run, then finishes again on the final best. With ``finish=False`` only the trials
    run and the :class:`NestedStudy` is returned; with ``more_trials=True`` ``n_trials``
    more trials run whatever the study holds (what worker processes do).
    ``threads_per_fit`` overrides CatBoost's ``thread_count`` (default: all cores, as
    fits in one process take turns; worker processes pass their share).
    With ``pruning=True`` each trial reports validation RMSE every 10 trees and
    ``pruner`` (default ``MedianPruner(n_startup_trials=5, n_warmup_steps=30)``) may
    stop it; pruned trials end KILLED in MLflow.

    Example:
        >>> import optuna_mlflow_nested as omn, tempfile, os
        >>> from optuna_mlflow_nested.datasets import load_diabetes, train_val_test_split
        >>> X_tr, X_va, X_te, y_tr, y_va, y_te = train_val_test_split(*load_diabetes(), seed=0)
        >>> uri = "sqlite:///" + os.path.join(tempfile.mkdtemp(), "mlflow.db")
        >>> result = omn.tune_catboost(X_tr, y_tr, X_va, y_va, X_te, y_te, n_trials=2,
        ...                            tuning_iterations=20, max_iterations=50, tracking_uri=uri)
        >>> result.tree_count == result.best_iteration + 1
        True
    """
    for name, value in (("n_trials", n_trials), ("tuning_iterations", tuning_iterations),
                        ("max_iterations", max_iterations),
                        ("early_stopping_rounds", early_stopping_rounds)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if (X_test is None) != (y_test is None):
        raise ValueError("give both X_test and y_test, or neither")
    space = _space(search_space)
    cats = _cat_features(X_train, cat_features)
    X_train, X_val = _prepare(X_train, cats), _prepare(X_val, cats)
    X_test = _prepare(X_test, cats) if X_test is not None else None
    grid = _default_grid(space, n_trials) if sampler == "grid" else None
    # Fits in one process take turns (_FIT_LOCK), so each may use every core.
    threads = os.cpu_count() or 1
    common = {"random_seed": seed, "allow_writing_files": False, "thread_count": threads,
              "verbose": False, "loss_function": "RMSE", "cat_features": cats}
    study = catboost_study(study_name=study_name, experiment_name=experiment_name,
                           tracking_uri=tracking_uri, storage=storage, sampler=sampler, grid=grid,
                           seed=seed, pruner=(pruner or _DEFAULT_PRUNER()) if pruning else None)
    if grid is not None:
        grid = study.user_attrs[GRID_ATTR]  # the study's own grid, when it already had one
    if threads_per_fit is not None:
        common["thread_count"] = threads_per_fit

    def objective(trial: optuna.Trial) -> float:
        from catboost import CatBoostRegressor

        params = _suggest(trial, space) if grid is None else {
            name: trial.suggest_categorical(name, values) for name, values in grid.items()}
        model = CatBoostRegressor(iterations=tuning_iterations, **common, **_model_params(params))
        callback = _PruningCallback(trial) if pruning else None
        with _FIT_LOCK if n_jobs != 1 else contextlib.nullcontext():
            model.fit(X_train, y_train, eval_set=(X_val, y_val) if pruning else None,
                      callbacks=[callback] if callback else None)
        if callback is not None and callback.pruned:
            raise optuna.TrialPruned()
        return _rmse(y_val, model.predict(X_val))

    done = len([t for t in study.trials if t.state.is_finished()])
    remaining = n_trials if more_trials else n_trials - done
    if remaining > 0:
        study.optimize(objective, n_trials=remaining, n_jobs=n_jobs, timeout=timeout,
                       show_progress_bar=show_progress_bar)
    if not finish:
        return study
    if not any(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials):
        raise RuntimeError(f"study {study.study_name!r} has no completed trial to finish with")
    return _finish(study, common, X_train, y_train, X_val, y_val, X_test, y_test,
                   max_iterations=max_iterations, early_stopping_rounds=early_stopping_rounds)


def _concat(a: Any, b: Any) -> Any:
    if isinstance(a, (pd.DataFrame, pd.Series)):
        return pd.concat([a, b])
    return np.concatenate([np.asarray(a), np.asarray(b)])


@dataclasses.dataclass(frozen=True)
class _Refit:
    model: Any
    best_iteration: int
    val_rmse: float
    curve: list[float]
    test: dict[str, float]


def refit_and_score(params: Mapping[str, Any], X_train: Any, y_train: Any, X_val: Any, y_val: Any,
                    X_test: Any = None, y_test: Any = None, *, common: Mapping[str, Any],
                    max_iterations: int, early_stopping_rounds: int) -> _Refit:
    """Steps 2-3 of the flow: early-stop on validation, refit best iteration + 1 trees on
    train+validation, score once on the test set (if given)."""
    from catboost import CatBoostRegressor

    full = {**common, **_model_params(params)}
    stopped = CatBoostRegressor(iterations=max_iterations, early_stopping_rounds=early_stopping_rounds,
                                **full)
    stopped.fit(X_train, y_train, eval_set=(X_val, y_val), use_best_model=True)
    best_iteration = int(stopped.get_best_iteration())
    final = CatBoostRegressor(iterations=best_iteration + 1, **full)
    final.fit(_concat(X_train, X_val), _concat(y_train, y_val))
    test: dict[str, float] = {}
    if X_test is not None:
        from sklearn.metrics import mean_absolute_error
        from sklearn.metrics import r2_score

        predicted = final.predict(X_test)
        test = {"test_rmse": _rmse(y_test, predicted),
                "test_mae": float(mean_absolute_error(y_test, predicted)),
                "test_r2": float(r2_score(y_test, predicted))}
    return _Refit(final, best_iteration, float(stopped.get_best_score()["validation"]["RMSE"]),
                  list(stopped.get_evals_result()["validation"]["RMSE"]), test)


def _finish(study: NestedStudy, common: dict[str, Any], X_train: Any, y_train: Any, X_val: Any,
            y_val: Any, X_test: Any, y_test: Any, *, max_iterations: int,
            early_stopping_rounds: int) -> CatBoostResult:
    best = dict(study.best_params)
    refit = refit_and_score(best, X_train, y_train, X_val, y_val, X_test, y_test, common=common,
                            max_iterations=max_iterations,
                            early_stopping_rounds=early_stopping_rounds)
    tree_count = refit.best_iteration + 1
    if X_test is not None:
        plot_x, plot_y, plot_name = X_test, y_test, "test"
    else:
        plot_x, plot_y, plot_name = X_val, y_val, "validation"
    model_uri = _log_finish(study, refit.model, best, refit.curve, plot_x, plot_y, plot_name, metrics={
        VAL_METRIC: refit.val_rmse, "best_iteration": float(refit.best_iteration),
        "tree_count": float(tree_count), "best_trial_val_rmse": float(study.best_value),
        **refit.test})
    return CatBoostResult(
        best_params=best, best_value=float(study.best_value), best_iteration=refit.best_iteration,
        tree_count=tree_count, val_rmse_early_stopped=refit.val_rmse,
        test_rmse=refit.test.get("test_rmse"), test_mae=refit.test.get("test_mae"),
        test_r2=refit.test.get("test_r2"), model=refit.model, model_uri=model_uri,
        parent_run_id=study.parent_run_id, study=study,
    )


def _log_finish(study: NestedStudy, model: Any, best: dict[str, Any], curve: Sequence[float],
                X_plot: Any, y_plot: Any, plot_name: str, metrics: dict[str, float]) -> str:
    """The finish step's record on the parent run; returns the logged model's URI."""
    import catboost
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure
    from mlflow.models import infer_signature

    client = study._client
    run_id = study.parent_run_id
    import time

    now = int(time.time() * 1000)
    history = [Metric("early_stopping_val_rmse", float(v), now, i) for i, v in enumerate(curve)]
    for i in range(0, len(history), 1000):
        client.log_batch(run_id, metrics=history[i : i + 1000], synchronous=True)
    client.log_batch(run_id, metrics=[Metric(k, v, now, 0) for k, v in metrics.items()],
                     synchronous=True)
    # Final params are tags (and a JSON file): a resumed study may find another best,
    # and MLflow params cannot change.
    for name, value in best.items():
        client.set_tag(run_id, f"final.{name}", str(value))
    client.log_text(run_id, json.dumps({**best, "iterations": int(metrics["tree_count"])}, indent=2),
                    "final_params.json")

    predicted = model.predict(X_plot)
    figure = Figure(figsize=(5, 5))
    axes = figure.add_subplot()
    y_arr = np.asarray(y_plot, dtype=float)
    axes.scatter(y_arr, predicted, s=10, alpha=0.6)
    low, high = float(min(y_arr.min(), predicted.min())), float(max(y_arr.max(), predicted.max()))
    axes.plot([low, high], [low, high], color="grey", linestyle="--", linewidth=1)
    axes.set_xlabel(f"actual ({plot_name})")
    axes.set_ylabel("predicted")
    axes.set_title(f"CatBoost, {plot_name} set")
    figure.tight_layout()
    client.log_figure(run_id, figure, "predicted_vs_actual.png")

    example = X_plot.head(5) if isinstance(X_plot, pd.DataFrame) else np.asarray(X_plot)[:5]
    signature = infer_signature(example, model.predict(example))
    run = client.get_run(run_id)
    with tracking.global_tracking_uri(study.tracking_uri), tracking.active_run(run):
        info = mlflow.catboost.log_model(
            model, name="model", signature=signature, input_example=example,
            pip_requirements=[f"catboost=={catboost.__version__}"],
        )
    client.set_tag(run_id, MODEL_URI_TAG, info.model_uri)
    client.set_tag(run_id, BEST_MODEL_TAG, "true")
    return info.model_uri


def load_best_model(experiment_name: str, *, tracking_uri: str | None = None) -> Any:
    """The CatBoost model of the run tagged ``best_model=true`` with the best validation
    RMSE in ``experiment_name`` (never chosen by test score).

    Example:
        >>> import optuna_mlflow_nested as omn
        >>> omn.load_best_model("no-such-experiment", tracking_uri="sqlite:///:memory:")
        Traceback (most recent call last):
        ...
        ValueError: no MLflow experiment named 'no-such-experiment'
    """
    uri = tracking.absolute_uri(tracking_uri or mlflow.get_tracking_uri())
    client = tracking.get_client(uri)
    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is None:
        raise ValueError(f"no MLflow experiment named {experiment_name!r}")
    runs = client.search_runs(
        [experiment.experiment_id], f"tags.{BEST_MODEL_TAG} = 'true'",
        order_by=[f"metrics.{VAL_METRIC} ASC"], max_results=1,
    )
    if not runs:
        raise ValueError(f"no run tagged {BEST_MODEL_TAG}=true in experiment {experiment_name!r}")
    with tracking.global_tracking_uri(uri):
        return mlflow.catboost.load_model(runs[0].data.tags[MODEL_URI_TAG])
