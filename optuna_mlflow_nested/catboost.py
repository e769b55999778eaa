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
import os
import threading
from typing import Any

import mlflow
import numpy as np
import optuna
import pandas as pd

from optuna_mlflow_nested import _compat
from optuna_mlflow_nested import tracking
from optuna_mlflow_nested._executor_checks import check_before_study
from optuna_mlflow_nested.catboost_checks import DATA_ATTR
from optuna_mlflow_nested.catboost_checks import SCORED
from optuna_mlflow_nested.catboost_checks import _stored_attrs
from optuna_mlflow_nested.catboost_checks import check_arguments
from optuna_mlflow_nested.catboost_checks import check_data
from optuna_mlflow_nested.catboost_checks import check_resume
from optuna_mlflow_nested.catboost_checks import data_fingerprint
from optuna_mlflow_nested.catboost_finish import VAL_METRIC
from optuna_mlflow_nested.catboost_finish import FinishError
from optuna_mlflow_nested.catboost_finish import _model_params
from optuna_mlflow_nested.catboost_finish import _rmse
from optuna_mlflow_nested.catboost_finish import finish as finish_job
from optuna_mlflow_nested.catboost_finish import load_best_model
from optuna_mlflow_nested.catboost_finish import refit_and_score
from optuna_mlflow_nested.data_inputs import describe
from optuna_mlflow_nested.data_inputs import log_parent_inputs
from optuna_mlflow_nested.factories import create_study
from optuna_mlflow_nested.search_space import DEFAULT_SEARCH_SPACE
from optuna_mlflow_nested.search_space import default_grid
from optuna_mlflow_nested.search_space import grid_from_space
from optuna_mlflow_nested.search_space import space_from
from optuna_mlflow_nested.search_space import suggest_all
from optuna_mlflow_nested.study import NestedStudy

__all__ = ["CatBoostResult", "DEFAULT_SEARCH_SPACE", "FinishError", "load_best_model",
           "tune_catboost", "grid_from_space", "refit_and_score"]


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
    #: the registered version (``registered_model_name``), else ``None``
    model_version: str | None = None

    def load_model(self) -> Any:
        """The logged model, loaded through the study's own tracking URI (no global state)."""
        with tracking.global_tracking_uri(self.study.tracking_uri):
            return mlflow.catboost.load_model(self.model_uri)


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


def _DEFAULT_PRUNER() -> optuna.pruners.BasePruner:
    return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=30)


def catboost_study(*, study_name: str | None, experiment_name: str | None,
                   tracking_uri: str | None, storage: Any, sampler: Any, seed: int,
                   grid: dict[str, list] | None = None, search_space: Mapping[str, Any] | None = None,
                   n_trials: int | None = None,
                   pruner: optuna.pruners.BasePruner | None = None,
                   fingerprint: dict[str, Any] | None = None) -> NestedStudy:
    """The study (and parent run) :func:`tune_catboost` works in: created once, joined after.

    For ``sampler="grid"`` give ``grid``, or ``search_space`` and ``n_trials`` to derive it.
    ``fingerprint`` (:func:`data_fingerprint`) is kept with the study for resumes to check.
    """
    if sampler == "grid":
        # Workers joining later must search the grid the study was created with.
        grid = _stored_grid(storage, study_name) or grid or default_grid(
            space_from(search_space), n_trials or 1)
    study = create_study(
        study_name, experiment_name=experiment_name, tracking_uri=tracking_uri, storage=storage,
        sampler=sampler, search_space=grid, seed=seed, load_if_exists=True, pruner=pruner,
        metric_name=VAL_METRIC, tags={"model": "CatBoostRegressor"},
    )
    attrs = study.user_attrs
    if grid is not None and GRID_ATTR not in attrs:
        study.set_user_attr(GRID_ATTR, grid)
    if fingerprint is not None:
        _keep_fingerprint(study, attrs.get(DATA_ATTR), fingerprint)
    return study


def _keep_fingerprint(study: NestedStudy, stored: dict[str, Any] | None,
                      fingerprint: dict[str, Any]) -> None:
    """``fingerprint`` kept with a new study. In one that has its own, the tree count is
    the new one while no trial was scored with the stored one (interrupted first:
    check_resume let the count change), so later resumes are checked against it."""
    trees = fingerprint.get("tuning_iterations")
    if stored is None:
        study.set_user_attr(DATA_ATTR, fingerprint)
    elif stored.get("tuning_iterations") != trees and not study.get_trials(
            deepcopy=False, states=SCORED):
        study.set_user_attr(DATA_ATTR, {**stored, "tuning_iterations": trees})


GRID_ATTR = "omn.grid"
#: Trial system attribute: the trial was cut short by Ctrl-C or SIGTERM (not counted when
#: the same command resumes the budget).
INTERRUPTED_ATTR = "omn.interrupted"
def _stored_grid(storage: Any, study_name: str | None) -> dict[str, list] | None:
    return _stored_attrs(storage, study_name).get(GRID_ATTR)


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
    executor: Any = None,
    n_workers: int | None = None,
    registered_model_name: str | None = None,
) -> CatBoostResult:
    """Tune a ``CatBoostRegressor`` on validation RMSE, then finish the job (see module doc).

    ``n_trials`` is the total budget: re-running with the same ``study_name`` and
    ``storage`` resumes and only runs the trials still missing, under the same parent
    run, then finishes again on the final best. With ``pruning=True`` each trial reports
    validation RMSE every 10 trees and
    ``pruner`` (default ``MedianPruner(n_startup_trials=5, n_warmup_steps=30)``) may
    stop it; pruned trials end KILLED in MLflow. With ``executor`` (a process pool,
    Dask's ``client.get_executor()``, ...) the trials run in its workers
    (:meth:`NestedStudy.optimize`'s ``executor``; the storage must be shared), each fit
    with its share of the cores; the finish step runs once, here.

    Train, validation and test are logged as MLflow datasets on the parent run (the
    training data on each trial run too). With ``registered_model_name`` the final model
    becomes a new version of that registered model, aliased ``challenger``, and
    ``champion`` only if it beats the champion's validation RMSE on the same validation
    data (:mod:`optuna_mlflow_nested.registry`).

    Example:
        >>> import optuna_mlflow_nested as omn, tempfile, os
        >>> from optuna_mlflow_nested.datasets import load_diabetes, train_val_test_split
        >>> X_tr, X_va, X_te, y_tr, y_va, y_te = train_val_test_split(*load_diabetes(), seed=0)
        >>> uri = "sqlite:///" + os.path.join(tempfile.mkdtemp(), "mlflow.db")
        >>> result = omn.tune_catboost(X_tr, y_tr, X_va, y_va, X_te, y_te, n_trials=2,
        ...                            tuning_iterations=20, max_iterations=50, tracking_uri=uri)
        >>> result.tree_count == result.best_iteration + 1
        True

    Raises:
        ValueError: before anything is written, naming the argument (and column): a bad
            number, a study or experiment name too long for MLflow's or Optuna's
            databases, a constant target, NaN or infinity in a target, infinity in a
            feature (NaN there is a missing value), or a resume with other data, another
            target, another seed or another ``tuning_iterations`` than the study's
            trials were scored with.
        FinishError: the finish step failed; the parent run is FAILED and still records
            its previous finish (see :func:`~optuna_mlflow_nested.catboost_finish.finish`).
    """
    result = _tune(**locals())
    assert isinstance(result, CatBoostResult)
    return result


@dataclasses.dataclass(frozen=True)
class _Objective:
    """The tuning objective: fixed-tree CatBoost fit on train, RMSE on validation.

    A module-level class, so executors' worker processes can receive it (pickled).
    """

    X_train: Any
    y_train: Any
    X_val: Any
    y_val: Any
    space: Mapping[str, Any]
    grid: dict[str, list] | None
    tuning_iterations: int
    common: dict[str, Any]
    pruning: bool
    take_turns: bool  # trials in threads of one process: fits take turns (catboost#2620)

    def __call__(self, trial: optuna.Trial) -> float:
        from catboost import CatBoostRegressor

        params = suggest_all(trial, self.space) if self.grid is None else {
            name: trial.suggest_categorical(name, values) for name, values in self.grid.items()}
        model = CatBoostRegressor(iterations=self.tuning_iterations, **self.common,
                                  **_model_params(params))
        callback = _PruningCallback(trial) if self.pruning else None
        try:
            with _FIT_LOCK if self.take_turns else contextlib.nullcontext():
                model.fit(self.X_train, self.y_train,
                          eval_set=(self.X_val, self.y_val) if self.pruning else None,
                          callbacks=[callback] if callback else None)
        except KeyboardInterrupt:  # not the trial's fault: a resume runs it again
            _compat.set_trial_system_attr(trial, INTERRUPTED_ATTR, True)
            raise
        if callback is not None and callback.pruned:
            raise optuna.TrialPruned()
        return _rmse(self.y_val, model.predict(self.X_val))


def _tune(
    X_train: Any, y_train: Any, X_val: Any, y_val: Any, X_test: Any = None, y_test: Any = None,
    *, n_trials: int = 50, seed: int = 42, sampler: Any = "tpe",
    search_space: Mapping[str, Any] | None = None, tuning_iterations: int = 300,
    max_iterations: int = 5000, early_stopping_rounds: int = 100,
    cat_features: Sequence[Any] | None = None, study_name: str | None = None,
    experiment_name: str | None = None, tracking_uri: str | None = None, storage: Any = None,
    n_jobs: int = 1, timeout: float | None = None, pruning: bool = False,
    pruner: optuna.pruners.BasePruner | None = None, show_progress_bar: bool = False,
    finish: bool = True, more_trials: bool = False, threads_per_fit: int | None = None,
    data_source: str | None = None, executor: Any = None, n_workers: int | None = None,
    registered_model_name: str | None = None,
) -> CatBoostResult | NestedStudy:
    """:func:`tune_catboost`, and for worker processes: with ``finish=False`` only the
    trials run (the study is returned); with ``more_trials=True`` ``n_trials`` more
    trials run whatever the study holds; ``threads_per_fit`` overrides CatBoost's
    ``thread_count`` (default: all cores, as fits in one process take turns);
    ``data_source`` names the data in the study's fingerprint (the CLI's ``--data``)."""
    for name, value in (("n_trials", n_trials), ("tuning_iterations", tuning_iterations),
                        ("max_iterations", max_iterations),
                        ("early_stopping_rounds", early_stopping_rounds)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    # Everything that can be checked is checked before the study or a run exists.
    check_arguments(timeout=timeout, seed=seed, study_name=study_name,
                    experiment_name=experiment_name, sampler=sampler,
                    registered_model_name=registered_model_name)
    check_before_study(n_trials=n_trials, timeout=timeout, n_jobs=n_jobs, executor=executor,
                       n_workers=n_workers, storage=storage)
    check_data(X_train, y_train, X_val, y_val, X_test, y_test)
    space = space_from(search_space)
    fingerprint = data_fingerprint(X_train, y_train, X_val, y_val, seed=seed, source=data_source,
                                   tuning_iterations=tuning_iterations)
    check_resume(storage, study_name, fingerprint)
    described = [describe(X, y, name) for X, y, name in (
        (X_train, y_train, "train"), (X_val, y_val, "validation"), (X_test, y_test, "test"))
        if X is not None]  # digests computed once, before CatBoost's copies
    cats = _cat_features(X_train, cat_features)
    X_train, X_val = _prepare(X_train, cats), _prepare(X_val, cats)
    X_test = _prepare(X_test, cats) if X_test is not None else None
    grid = default_grid(space, n_trials) if sampler == "grid" else None
    # Fits in one process take turns (_FIT_LOCK), so each may use every core.
    threads = os.cpu_count() or 1
    common = {"random_seed": seed, "allow_writing_files": False, "thread_count": threads,
              "verbose": False, "loss_function": "RMSE", "cat_features": cats}
    study = catboost_study(study_name=study_name, experiment_name=experiment_name,
                           tracking_uri=tracking_uri, storage=storage, sampler=sampler, grid=grid,
                           seed=seed, pruner=(pruner or _DEFAULT_PRUNER()) if pruning else None,
                           fingerprint=fingerprint)
    if grid is not None:
        grid = study.user_attrs[GRID_ATTR]  # the study's own grid, when it already had one
    if threads_per_fit is not None:
        common["thread_count"] = threads_per_fit
    study._tracking.trial_inputs = described[:1]
    if finish:
        log_parent_inputs(study._client, study.parent_run_id, described)

    if executor is not None and threads_per_fit is None:
        # Worker processes fit side by side: each gets its share of the cores.
        workers = n_workers or _compat.executor_worker_count(executor) or 1
        common["thread_count"] = max(1, (os.cpu_count() or 1) // workers)
    objective = _Objective(X_train, y_train, X_val, y_val, space, grid, tuning_iterations,
                           common, pruning, take_turns=n_jobs != 1)
    done = len([t for t in study.trials
                if t.state.is_finished() and INTERRUPTED_ATTR not in t.system_attrs])
    remaining = n_trials if more_trials else n_trials - done
    if remaining > 0:
        if executor is not None:
            study.optimize(objective, n_trials=remaining, timeout=timeout, executor=executor,
                           n_workers=n_workers, show_progress_bar=show_progress_bar)
        else:
            study.optimize(objective, n_trials=remaining, n_jobs=n_jobs, timeout=timeout,
                           show_progress_bar=show_progress_bar)
    if not finish:
        return study
    # The finish starts from a whole parent: the search's figures drawn (if due here), or
    # their failure (a server gone) said now rather than in the middle of the finish's output.
    study.wait_for_figures()
    if not any(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials):
        raise FinishError(f"study {study.study_name!r} has no completed trial to finish with "
                          f"({len(study.trials)} trial(s), none complete): run more trials, "
                          "or give them more time")
    return finish_job(study, common, X_train, y_train, X_val, y_val, X_test, y_test,
                      max_iterations=max_iterations, early_stopping_rounds=early_stopping_rounds,
                      registered_model_name=registered_model_name,
                      data_digest=study.user_attrs.get(DATA_ATTR, fingerprint)["digest"])


