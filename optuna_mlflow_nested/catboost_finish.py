"""The finish step of :func:`~optuna_mlflow_nested.tune_catboost`: early-stop the best
parameters on validation, refit on train+validation, score once on the test set, log
the model on the parent run and tag it ``best_model``.

A finish lands whole or not at all: the model is logged first, and the scores, the
``final.*`` tags and the pointer to the model (``best_model_uri``, ``best_model=true``)
follow last, in one batch. A failed finish leaves the previous one in place and marks
the parent run (FAILED, ``finish.status=failed``, ``finish.error``)."""

from __future__ import annotations

from collections.abc import Mapping
from collections.abc import Sequence
import contextlib
import dataclasses
import json
import time
from typing import TYPE_CHECKING
from typing import Any
import warnings

import mlflow
from mlflow.entities import Metric
from mlflow.entities import RunTag
from mlflow.utils.validation import MAX_PARAMS_TAGS_PER_BATCH
import numpy as np
import pandas as pd

from optuna_mlflow_nested import _compat
from optuna_mlflow_nested import tracking
from optuna_mlflow_nested._utils import redact_secrets
from optuna_mlflow_nested._utils import tag_value
from optuna_mlflow_nested.tracking.delivery import wait_out_busy_store
from optuna_mlflow_nested.tracking.parent import MODEL_URI_TAG
from optuna_mlflow_nested.tracking.parent import REGISTERED_TAG
from optuna_mlflow_nested.tracking.parent import log_in_batches
from optuna_mlflow_nested.tracking.parent import refresh_description

if TYPE_CHECKING:
    from optuna_mlflow_nested.catboost import CatBoostResult
    from optuna_mlflow_nested.study import NestedStudy

__all__ = ["BEST_MODEL_TAG", "FINISH_ERROR_TAG", "FINISH_STATUS_TAG", "MODEL_URI_TAG", "VAL_METRIC",
           "FinishError", "finish", "load_best_model", "refit_and_score"]

BEST_MODEL_TAG = "best_model"
VAL_METRIC = "val_rmse"
#: ``running`` while a finish is being written, then ``complete`` or ``failed``.
FINISH_STATUS_TAG = "finish.status"
FINISH_ERROR_TAG = "finish.error"


def _rmse(y_true: Any, y_pred: Any) -> float:
    return float(np.sqrt(np.mean((np.asarray(y_true, dtype=float) - np.asarray(y_pred)) ** 2)))


def _model_params(params: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(params)
    if "min_data_in_leaf" in out and "grow_policy" not in out:
        out["grow_policy"] = "Depthwise"  # SymmetricTree ignores min_data_in_leaf
    return out


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


class FinishError(RuntimeError):
    """The finish step failed: the parent run is FAILED and still records the previous
    finish (model, scores, ``final.*`` tags), or none."""


def finish(study: NestedStudy, common: dict[str, Any], X_train: Any, y_train: Any, X_val: Any,
           y_val: Any, X_test: Any, y_test: Any, *, max_iterations: int,
           early_stopping_rounds: int, registered_model_name: str | None = None,
           data_digest: str = "") -> CatBoostResult:
    """Refit, score and record the study's best parameters on its parent run: all or nothing.

    The model is logged first; its scores, ``final.*`` tags, ``best_model_uri`` and
    ``best_model=true`` follow in one batch, last. On any failure that batch is not
    written, the parent keeps the previous finish, ends FAILED (KILLED on Ctrl-C) with
    ``finish.status=failed`` and ``finish.error``, and :class:`FinishError` is raised.
    After the finish has landed, ``registered_model_name`` registers the model (see
    :func:`optuna_mlflow_nested.registry.register`; ``data_digest`` decides comparability).
    """
    best = dict(study.best_params)
    logged: dict[str, str] = {}
    try:
        refit = refit_and_score(best, X_train, y_train, X_val, y_val, X_test, y_test,
                                common=common, max_iterations=max_iterations,
                                early_stopping_rounds=early_stopping_rounds)
        tree_count = refit.best_iteration + 1
        if X_test is not None:
            plot_x, plot_y, plot_name = X_test, y_test, "test"
        else:
            plot_x, plot_y, plot_name = X_val, y_val, "validation"
        model_uri = _log_finish(study, refit.model, best, refit.curve, plot_x, plot_y, plot_name,
                                logged, metrics={
            VAL_METRIC: refit.val_rmse, "best_iteration": float(refit.best_iteration),
            "tree_count": float(tree_count), "best_trial_val_rmse": float(study.best_value),
            **refit.test})
    except BaseException as exc:
        message = _failure_message(study, exc, logged)
        _mark_failed(study, message, "FAILED" if isinstance(exc, Exception) else "KILLED")
        if not isinstance(exc, Exception):
            raise
        # the original exception chained only where its text holds no secret
        raise FinishError(message) from (exc if redact_secrets(exc) == str(exc) else None)
    from optuna_mlflow_nested.catboost import CatBoostResult

    version = None
    if registered_model_name:
        from optuna_mlflow_nested import registry

        version = registry.register(
            study.tracking_uri, registered_model_name, model_uri, model_id=logged.get("model_id"),
            run_id=study.parent_run_id, study_name=study.study_name, digest=data_digest,
            val_rmse=refit.val_rmse, test_rmse=refit.test.get("test_rmse"))
    _describe_model(study, f"{registered_model_name}/{version}" if version else None)

    return CatBoostResult(
        best_params=best, best_value=float(study.best_value), best_iteration=refit.best_iteration,
        tree_count=tree_count, val_rmse_early_stopped=refit.val_rmse,
        test_rmse=refit.test.get("test_rmse"), test_mae=refit.test.get("test_mae"),
        test_r2=refit.test.get("test_r2"), model=refit.model, model_uri=model_uri,
        parent_run_id=study.parent_run_id, study=study, model_version=version,
    )


def _describe_model(study: NestedStudy, registered: str | None) -> None:
    """The parent's description says how to load the model (best effort: the finish
    itself has landed)."""
    client = study._client
    try:
        if registered:
            wait_out_busy_store(lambda: client.set_tag(study.parent_run_id, REGISTERED_TAG,
                                                       registered))
        wait_out_busy_store(lambda: refresh_description(client, study.parent_run_id, study,
                                                        study.run_ids()))
    except Exception as exc:
        warnings.warn(f"could not update the description of run {study.parent_run_id}: "
                      f"{redact_secrets(exc)}", RuntimeWarning, stacklevel=3)


def _failure_message(study: NestedStudy, exc: BaseException, logged: dict[str, str]) -> str:
    cause = redact_secrets(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)
    cause = " ".join(cause.split())[:1000]
    run = f"parent run {study.parent_run_id}"
    previous = logged.get("previous")
    if previous is None:
        kept = f"{run} keeps its previous finish, if any"
    elif previous:
        kept = f"{run} still records the previous finish (model {previous})"
    else:
        kept = f"{run} records no finish"
    unused = f"; model {logged['model']} was logged but not recorded" if "model" in logged else ""
    return f"the finish step of study {study.study_name!r} failed ({cause}); {kept}{unused}"


def _mark_failed(study: NestedStudy, message: str, status: str) -> None:
    """Best effort: a tracking server that is gone cannot be told (the run then keeps
    ``finish.status=running``)."""
    client = study._client
    with tracking.short_http_retries(study.tracking_uri):
        try:
            wait_out_busy_store(lambda: client.log_batch(study.parent_run_id, tags=[
                RunTag(FINISH_STATUS_TAG, "failed"), RunTag(FINISH_ERROR_TAG, tag_value(message))],
                synchronous=True))
            wait_out_busy_store(lambda: tracking.set_run_status(client, study.parent_run_id,
                                                                status))
        except Exception as exc:
            warnings.warn(f"could not mark the parent run {study.parent_run_id} {status}: "
                          f"{redact_secrets(exc)}", RuntimeWarning, stacklevel=3)


def _log_finish(study: NestedStudy, model: Any, best: dict[str, Any], curve: Sequence[float],
                X_plot: Any, y_plot: Any, plot_name: str, logged: dict[str, str],
                metrics: dict[str, float]) -> str:
    """The finish step's record on the parent run; returns the logged model's URI.

    Order matters: the attempt is marked, the model logged, the learning curve and
    files written, and only then, in one batch, the scores and the tags that point at
    the model (the commit). ``logged`` gets the previous model URI ("previous", "" for
    none) and the new one ("model") as soon as it exists.
    """
    import catboost
    from matplotlib.figure import Figure
    from mlflow.models import infer_signature

    client = study._client
    run_id = study.parent_run_id
    run = client.get_run(run_id)
    logged["previous"] = run.data.tags.get(MODEL_URI_TAG, "")
    # Each write to the store waits out a busy one (the model's own, through MLflow's
    # log_model, is tried once: trying it again could log a second model).
    wait_out_busy_store(lambda: client.set_tag(run_id, FINISH_STATUS_TAG, "running"))

    example = X_plot.head(5) if isinstance(X_plot, pd.DataFrame) else np.asarray(X_plot)[:5]
    signature = infer_signature(example, model.predict(example))
    with tracking.global_tracking_uri(study.tracking_uri), _compat.active_run(run):
        info = mlflow.catboost.log_model(
            model, name="model", signature=signature, input_example=example,
            pip_requirements=[f"catboost=={catboost.__version__}"],
            tags={"omn.study": study.study_name, "omn.parent_run_id": run_id,
                  f"omn.{VAL_METRIC}": repr(metrics[VAL_METRIC])},
        )
    logged["model"] = info.model_uri
    if info.model_id:
        logged["model_id"] = info.model_id

    now = int(time.time() * 1000)
    history = [Metric("early_stopping_val_rmse", float(v), now, i) for i, v in enumerate(curve)]
    wait_out_busy_store(lambda: log_in_batches(client, run_id, history, []))
    final = {**best, "iterations": int(metrics["tree_count"]), "model_uri": info.model_uri}
    client.log_text(run_id, json.dumps(final, indent=2), "final_params.json")
    client.log_figure(run_id, _plot(model, X_plot, y_plot, plot_name, Figure),
                      "predicted_vs_actual.png")

    # The commit: final params are tags (a resumed study may find another best, and
    # MLflow params cannot change), written with the scores and the model pointer. Each
    # finish logs its scores one step after the last: the latest is the last finish's
    # whatever the clocks of the machines that ran them.
    step = 1 + max((m.step for m in client.get_metric_history(run_id, VAL_METRIC)), default=-1)
    tags = [RunTag(f"final.{name}", tag_value(value)) for name, value in best.items()]
    head, tags = tags[:-MAX_TAGS_WITH_COMMIT], tags[-MAX_TAGS_WITH_COMMIT:]
    wait_out_busy_store(lambda: log_in_batches(client, run_id, [], head))  # > 96 parameters
    tags += [RunTag(MODEL_URI_TAG, info.model_uri), RunTag(BEST_MODEL_TAG, "true"),
             RunTag(FINISH_STATUS_TAG, "complete")]
    wait_out_busy_store(lambda: client.log_batch(
        run_id, metrics=[Metric(k, v, now, step) for k, v in metrics.items()], tags=tags,
        synchronous=True))
    # The finish has landed; what follows clears the marks of an earlier failed finish.
    if FINISH_ERROR_TAG in run.data.tags:
        with contextlib.suppress(Exception):
            client.delete_tag(run_id, FINISH_ERROR_TAG)
    if run.info.status == "FAILED" and run.data.tags.get(FINISH_STATUS_TAG) == "failed":
        with contextlib.suppress(Exception):
            tracking.set_run_status(client, run_id, "FINISHED")
    return str(info.model_uri)


#: ``final.*`` tags written in the commit batch itself (with 3 more, MLflow's limit is 100).
MAX_TAGS_WITH_COMMIT = MAX_PARAMS_TAGS_PER_BATCH - 3


def _plot(model: Any, X_plot: Any, y_plot: Any, plot_name: str, figure_class: Any) -> Any:
    predicted = model.predict(X_plot)
    figure = figure_class(figsize=(5, 5))
    axes = figure.add_subplot()
    y_arr = np.asarray(y_plot, dtype=float)
    axes.scatter(y_arr, predicted, s=10, alpha=0.6)
    low, high = float(min(y_arr.min(), predicted.min())), float(max(y_arr.max(), predicted.max()))
    axes.plot([low, high], [low, high], color="grey", linestyle="--", linewidth=1)
    axes.set_xlabel(f"actual ({plot_name})")
    axes.set_ylabel("predicted")
    axes.set_title(f"CatBoost, {plot_name} set")
    figure.tight_layout()
    return figure


def load_best_model(experiment_name: str | None = None, *, tracking_uri: str | None = None,
                    model_name: str | None = None) -> Any:
    """The CatBoost model of the run tagged ``best_model=true`` with the best validation
    RMSE in ``experiment_name`` (never chosen by test score). A finish writes a run's
    ``val_rmse`` and ``best_model_uri`` in one batch, so a model is always ranked by its
    own finish's score, also after a finish failed half-way.

    With ``model_name`` (or ``experiment_name="models:/NAME@alias"``) it is the registered
    model's ``@champion`` (or ``@alias``), resolved in ``tracking_uri``'s own registry.

    Example:
        >>> import optuna_mlflow_nested as omn
        >>> omn.load_best_model("no-such-experiment", tracking_uri="sqlite:///:memory:")
        Traceback (most recent call last):
        ...
        ValueError: no MLflow experiment named 'no-such-experiment'
    """
    uri = tracking.absolute_uri(tracking_uri or mlflow.get_tracking_uri())
    alias = "champion"
    if model_name is None and experiment_name and experiment_name.startswith("models:/"):
        model_name, _, alias = experiment_name[len("models:/"):].partition("@")
    if model_name is not None:
        from optuna_mlflow_nested import registry

        model_uri = registry.champion_uri(uri, model_name, alias or "champion")
        with tracking.global_tracking_uri(uri):
            return mlflow.catboost.load_model(model_uri)
    if experiment_name is None:
        raise ValueError("give experiment_name or model_name")
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
