"""cross_validate: scikit-learn's cross-validation with each fold a nested MLflow run."""

from __future__ import annotations

from collections.abc import Callable
import functools
from pathlib import Path
import time
from typing import Any
import uuid
import warnings

import mlflow
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
from optuna_mlflow_nested.tracking.delivery import deliver_retried
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
    trial = tracking.current_trial()
    fold_runs = _FoldRuns(tracking.get_client(mlflow.get_tracking_uri()),
                         parent.info.experiment_id if parent else _compat.default_experiment_id(),
                         parent.info.run_id if parent else None)
    folds: list[dict[str, Any]] = []
    for fold, (train_idx, test_idx) in enumerate(splits):
        out = sklearn_cross_validate(
            estimator, X, y, scoring=scoring, cv=[(train_idx, test_idx)], params=params,
            return_train_score=return_train_score, return_estimator=True,
            error_score=error_score,
        )
        scores = {k: float(v[0]) for k, v in out.items() if k not in ("estimator", "indices")}
        fold_runs.log(fold, metrics={**scores, "fold": float(fold)},
                      params={"n_train": len(train_idx), "n_test": len(test_idx)},
                      model=out["estimator"][0] if log_models else None)
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


class _FoldRuns:
    """The fold runs of one :func:`cross_validate` call, each a finished run ``fold-<i>``
    under ``parent_run_id`` (``None``: top-level runs).

    A busy store is waited out. A store that still refuses (a server that is away) fails
    neither the folds nor their trial: the run's record goes to the spool (without the
    model: a warning says so), and ``optuna-mlflow-nested sync`` writes it. The call's
    later folds then go to the spool at once (each would wait for the store again).
    """

    def __init__(self, client: MlflowClient, experiment_id: str,
                 parent_run_id: str | None) -> None:
        self.client, self.experiment_id, self.parent_run_id = client, experiment_id, parent_run_id
        self.store_failed = False

    def log(self, fold: int, *, metrics: dict[str, float], params: dict[str, Any],
            model: Any = None) -> str | None:
        """Returns the run's id; ``None`` if the store did not make it (it is spooled)."""
        import requests

        # The key finds this fold's run when its record is replayed: the run is created
        # with it (a creation whose answer was lost is found, not made again), and no
        # other fold of the same name and parent (a second call in one run) is taken.
        tags = {tracking.ROLE_TAG: "fold", "fold": str(fold),
                tracking.RUN_KEY_TAG: uuid.uuid4().hex}
        if self.parent_run_id:
            tags[MLFLOW_PARENT_RUN_ID] = self.parent_run_id
        now = int(time.time() * 1000)
        record = tracking.RunRecord(
            tracking_uri=self.client.tracking_uri, experiment_id=self.experiment_id,
            parent_run_id=self.parent_run_id, study_name="", trial_number=None, run_id=None,
            run_name=f"fold-{fold}", status="FINISHED", end_time=now, start_time=now,
            params=safe_mapping(params, param_value), tags=tags,
            metrics=[(safe_key(k), float(v), now, 0) for k, v in metrics.items()])
        if self.store_failed:
            _spool_fold(record, "the store failed an earlier fold", model is not None)
            return None
        try:
            return self._write(record, model)
        except (MlflowException, requests.RequestException, OSError) as exc:
            self.store_failed = True
            _spool_fold(record, redact_secrets(exc), model is not None)
            return record.run_id

    def _write(self, record: tracking.RunRecord, model: Any) -> str:
        run_id = deliver_retried(self.client, record, wait_out_busy_store, lookup=False)
        if model is not None:
            _log_model(self.client.get_run(run_id), model)
        return run_id


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


def _spool_fold(record: tracking.RunRecord, why: str, model_lost: bool) -> None:
    spool = _spool_at(tracking.default_spool_path())
    what = f"the run {record.run_name} of run {record.parent_run_id} was not written ({why})"
    try:
        spool.append(record)  # its one warning says where its runs are kept
    except OSError as spool_error:
        warnings.warn(f"{what}, nor could the spool {spool.path} keep it ({spool_error}): "
                      "it is lost", RuntimeWarning, stacklevel=4)
        return
    if model_lost:
        warnings.warn(f"{what}: it is in the spool, its model is not", RuntimeWarning,
                      stacklevel=4)
