"""cross_validate: scikit-learn's cross-validation with each fold a nested MLflow run."""

from __future__ import annotations

from collections.abc import Callable
import functools
from pathlib import Path
import time
from typing import Any
import warnings

import mlflow
from mlflow.entities import Metric
from mlflow.entities import Param
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID
import numpy as np

from optuna_mlflow_nested import _compat
from optuna_mlflow_nested import tracking
from optuna_mlflow_nested._utils import param_value
from optuna_mlflow_nested._utils import redact_secrets
from optuna_mlflow_nested._utils import safe_key
from optuna_mlflow_nested._utils import safe_mapping
from optuna_mlflow_nested.tracking.delivery import wait_out_busy_store

__all__ = ["cross_validate"]


def cross_validate(
    estimator: Any,
    X: Any,
    y: Any = None,
    *,
    groups: Any = None,
    scoring: Any = None,
    cv: Any = 5,
    params: dict[str, Any] | None = None,
    return_train_score: bool = False,
    return_estimator: bool = False,
    return_indices: bool = False,
    error_score: Any = np.nan,
    log_models: bool = False,
    prune: bool = False,
) -> dict[str, Any]:
    """:func:`sklearn.model_selection.cross_validate`, each fold a run ``fold-<i>``
    nested in the active MLflow run.

    The arguments and the returned dict are scikit-learn's (``test_score`` or
    ``test_<name>`` per scorer, ``fit_time``, ``score_time``, and with the flags
    ``train_*``, ``estimator``, ``indices``); folds run one after another. Each fold
    run holds the fold index, its scores and times and, with ``log_models=True``, the
    fitted model. Inside an objective of a
    :class:`~optuna_mlflow_nested.NestedStudy` this makes the tree study -> trial ->
    fold, and after each fold the running mean of the (first) test score goes to
    ``trial.report(value, step=fold)`` on the study's scale (scikit-learn's scores are
    greater-is-better: the mean for a maximising study, its negative for a minimising
    one, as an objective returning ``-mean(test_score)`` would). With ``prune=True``
    the folds stop as soon as the study's pruner says so (``optuna.TrialPruned`` is
    raised after that fold's run is logged). Without an active run the folds are
    top-level runs. The tracking never fails the folds: a store that is busy is waited
    out, and a fold run that MLflow does not take (a server that is away) is kept in the
    spool for ``optuna-mlflow-nested sync``, with a warning (its model, if any, is not).

    Raises:
        ValueError: ``cv`` is an int below 2 (and whatever scikit-learn raises).
        optuna.TrialPruned: with ``prune=True``, when the pruner stops the trial.

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
        >>> mlflow.set_tracking_uri(None)
    """
    from sklearn.base import is_classifier
    from sklearn.model_selection import check_cv
    from sklearn.model_selection import cross_validate as sklearn_cross_validate

    if isinstance(cv, int) and cv < 2:
        raise ValueError(f"cv must be at least 2 folds, got {cv}")
    splits = list(check_cv(cv, y, classifier=is_classifier(estimator)).split(X, y, groups))
    parent = mlflow.active_run()
    client = tracking.get_client(mlflow.get_tracking_uri())
    experiment_id = parent.info.experiment_id if parent else _compat.default_experiment_id()
    trial = tracking.current_trial()
    folds: list[dict[str, Any]] = []
    for fold, (train_idx, test_idx) in enumerate(splits):
        out = sklearn_cross_validate(
            estimator, X, y, scoring=scoring, cv=[(train_idx, test_idx)], params=params,
            return_train_score=return_train_score, return_estimator=True,
            error_score=error_score,
        )
        scores = {k: float(v[0]) for k, v in out.items() if k not in ("estimator", "indices")}
        log_fold_run(client, experiment_id, parent.info.run_id if parent else None, fold,
                     metrics={**scores, "fold": float(fold)},
                     params={"n_train": len(train_idx), "n_test": len(test_idx)},
                     model=out["estimator"][0] if log_models else None,
                     study_name=trial.study.study_name if trial is not None else "")
        folds.append(out)
        if trial is not None and _report(trial, folds, fold) and prune and trial.should_prune():
            import optuna

            raise optuna.TrialPruned(f"pruned after fold {fold}")
    result: dict[str, Any] = {key: np.concatenate([f[key] for f in folds]) for key in folds[0]
                              if key not in ("estimator", "indices")}
    if return_estimator:
        result["estimator"] = [f["estimator"][0] for f in folds]
    if return_indices:
        result["indices"] = {"train": [tr for tr, _ in splits], "test": [te for _, te in splits]}
    return result


def _report(trial: Any, folds: list[dict[str, Any]], fold: int) -> bool:
    """The running mean of the first test score, on the study's scale, for Optuna's
    pruners. Returns whether it was reported."""
    import optuna

    key = "test_score" if "test_score" in folds[0] else next(k for k in folds[0] if k.startswith("test_"))
    values = np.array([f[key][0] for f in folds], dtype=float)
    directions = trial.study.directions
    if np.all(np.isnan(values)) or len(directions) != 1:
        return False  # nothing to report; multi-objective trials cannot report
    mean = float(np.nanmean(values))
    if directions[0] == optuna.study.StudyDirection.MINIMIZE:
        mean = -mean
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a step reported twice: Optuna keeps the first
        trial.report(mean, step=fold)
    return True


@functools.cache
def _sklearn_log_model_kwargs() -> Callable[[Any], dict[str, Any]]:
    """Whether this MLflow saves scikit-learn models with skops and takes
    ``skops_trusted_types`` (3.17 does, 3.8 does not); checked once, not per fold."""
    import inspect

    import mlflow.sklearn

    def none(model: Any) -> dict[str, Any]:
        return {}

    if "skops_trusted_types" not in inspect.signature(mlflow.sklearn.log_model).parameters:
        return none
    try:
        import skops.io
    except ImportError:
        return none

    def trusted(model: Any) -> dict[str, Any]:
        # MLflow saves with skops; the types of a model we just fitted are ours to trust.
        return {"skops_trusted_types": skops.io.get_untrusted_types(data=skops.io.dumps(model))}

    return trusted


def log_fold_run(client: MlflowClient, experiment_id: str, parent_run_id: str | None, fold: int,
                 *, metrics: dict[str, float], params: dict[str, Any], model: Any = None,
                 study_name: str = "") -> str | None:
    """One cross-validation fold as a finished run ``fold-<i>`` under ``parent_run_id``.

    A busy store is waited out. A store that still refuses (a server that is away) does
    not fail the fold, nor its trial: the run's record goes to the spool (without the
    model), with a warning, and ``optuna-mlflow-nested sync`` writes it.

    Returns:
        The run's id; ``None`` if the store never made it (the record is in the spool).
    """
    import requests

    tags = {tracking.ROLE_TAG: "fold", "fold": str(fold)}
    if parent_run_id:
        tags[MLFLOW_PARENT_RUN_ID] = parent_run_id
    now = int(time.time() * 1000)
    metric_list = [Metric(safe_key(k), float(v), now, 0) for k, v in metrics.items()]
    param_map = safe_mapping(params, param_value)
    run: Any = None
    try:
        run = wait_out_busy_store(lambda: client.create_run(experiment_id, tags=tags,
                                                            run_name=f"fold-{fold}"))
        wait_out_busy_store(lambda: client.log_batch(
            run.info.run_id, metrics=metric_list,
            params=[Param(k, v) for k, v in param_map.items()], synchronous=True))
        if model is not None:
            _log_model(run, model)
        wait_out_busy_store(lambda: _compat.update_run_info(client, run.info.run_id,
                                                            "FINISHED", now))
        return str(run.info.run_id)
    except (MlflowException, requests.RequestException, OSError) as exc:
        record = tracking.RunRecord(
            tracking_uri=client.tracking_uri, experiment_id=experiment_id,
            parent_run_id=parent_run_id, study_name=study_name, trial_number=None,
            run_id=run and run.info.run_id, run_name=f"fold-{fold}", status="FINISHED",
            end_time=now, start_time=now, params=param_map, tags=tags,
            metrics=[(m.key, m.value, m.timestamp, m.step) for m in metric_list])
        _spool_fold(record, exc, model_lost=model is not None)
        return record.run_id


def _log_model(run: Any, model: Any) -> None:
    import mlflow.sklearn
    import sklearn

    # Explicit requirements: inferring them starts a subprocess per model (seconds each).
    with _compat.active_run(run):
        mlflow.sklearn.log_model(model, name="model",
                                 pip_requirements=[f"scikit-learn=={sklearn.__version__}"],
                                 **_sklearn_log_model_kwargs()(model))


@functools.cache
def _spool_at(path: Path) -> tracking.Spool:
    return tracking.Spool(path)  # one per file: its warning says once where runs are kept


def _spool_fold(record: tracking.RunRecord, exc: BaseException, *, model_lost: bool) -> None:
    spool = _spool_at(tracking.default_spool_path())
    what = f"MLflow did not take the run {record.run_name} of run {record.parent_run_id}"
    try:
        spool.append(record)
    except OSError as spool_error:
        warnings.warn(f"{what} ({redact_secrets(exc)}), nor could the spool {spool.path} keep it "
                      f"({spool_error}): the run is lost", RuntimeWarning, stacklevel=4)
        return
    if model_lost:
        warnings.warn(f"{what} ({redact_secrets(exc)}); it is in the spool, its model is not",
                      RuntimeWarning, stacklevel=4)
