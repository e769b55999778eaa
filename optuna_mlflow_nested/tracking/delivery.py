"""Writing one run record to MLflow: idempotent, batched, retried with backoff."""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Iterator
import dataclasses
import itertools
import logging
import os
import random
import threading
import time
from typing import Any

from mlflow.entities import Metric
from mlflow.entities import Param
from mlflow.entities import Run
from mlflow.entities import RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID
from mlflow.utils.mlflow_tags import MLFLOW_RUN_NAME
from mlflow.utils.validation import MAX_ENTITIES_PER_BATCH
from mlflow.utils.validation import MAX_METRICS_PER_BATCH
from mlflow.utils.validation import MAX_PARAMS_TAGS_PER_BATCH

from optuna_mlflow_nested import _compat
from optuna_mlflow_nested._utils import masks_secrets
from optuna_mlflow_nested._utils import redact_secrets
from optuna_mlflow_nested._utils import tag_value
from optuna_mlflow_nested.tracking.records import RUN_KEY_TAG
from optuna_mlflow_nested.tracking.records import STUDY_TAG
from optuna_mlflow_nested.tracking.records import TRIAL_NUMBER_TAG
from optuna_mlflow_nested.tracking.records import RunRecord

_logger = logging.getLogger(__name__)

_NON_RETRYABLE = {"INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST", "RESOURCE_ALREADY_EXISTS"}


def equals_clause(field: str, value: str) -> str:
    """A filter-string clause ``field = value`` with ``value`` quoted as MLflow parses it.

    MLflow's filter strings have no escape for quotes: a value with ``'`` is put in
    double quotes; one with both kinds becomes a ``LIKE`` pattern with ``_`` for each
    quote, which can match more runs, so callers check the value again (see
    :func:`search_equal`).

    Example:
        >>> equals_clause("tags.s", "it's")
        'tags.s = "it\\'s"'
    """
    if "'" not in value:
        return f"{field} = '{value}'"
    if '"' not in value:
        return f'{field} = "{value}"'
    return f"{field} LIKE '{value.replace(chr(39), '_').replace(chr(34), '_')}'"


@masks_secrets
def search_equal(client: MlflowClient, experiment_ids: list[str], tags: dict[str, str],
                 extra: str = "", max_results: int = 50_000) -> list[Run]:
    """Runs whose tags equal ``tags`` exactly (any value, quotes included)."""
    clauses = [equals_clause(f"tags.`{k}`", v) for k, v in tags.items()]
    if extra:
        clauses.append(extra)
    runs = client.search_runs(experiment_ids, " and ".join(clauses), max_results=max_results)
    return [r for r in runs if all(r.data.tags.get(k) == v for k, v in tags.items())]


def is_retryable(exc: BaseException) -> bool:
    code = getattr(exc, "error_code", None)
    return not (isinstance(exc, MlflowException) and code in _NON_RETRYABLE)


def store_was_busy(exc: BaseException) -> bool:
    """A store that refused a call for now: SQLite's "database is locked" (another
    connection held the file's lock past MLflow's busy timeout). Not one that is away or
    refuses for good (read-only, full, missing), though MLflow gives every SQL
    ``OperationalError`` the same code."""
    return (isinstance(exc, MlflowException) and exc.error_code == "TEMPORARILY_UNAVAILABLE"
            and "is locked" in str(exc))  # "database is locked", "database table is locked"


def _lookup_tags(record: RunRecord) -> dict[str, str]:
    """The tags that identify ``record``'s run: its key (:data:`RUN_KEY_TAG`) if it has
    one, else its study, trial number and parent (and its name, for a run of no trial)."""
    if RUN_KEY_TAG in record.tags:
        return {RUN_KEY_TAG: record.tags[RUN_KEY_TAG]}
    tags = {STUDY_TAG: record.study_name}
    if record.trial_number is not None:
        tags[TRIAL_NUMBER_TAG] = str(record.trial_number)
    if record.parent_run_id:
        tags[MLFLOW_PARENT_RUN_ID] = record.parent_run_id
    return tags


def _find_trial_run(client: MlflowClient, record: RunRecord) -> str | None:
    """An existing run for (study, trial), so that replays never duplicate."""
    by_name = record.trial_number is None and RUN_KEY_TAG not in record.tags
    extra = equals_clause("attributes.run_name", record.run_name) if by_name else ""
    runs = search_equal(client, [record.experiment_id], _lookup_tags(record), extra, max_results=100)
    return runs[0].info.run_id if runs else None


@masks_secrets
def deliver(client: MlflowClient, record: RunRecord, *, lookup: bool = True,
            create_tags: dict[str, str] | None = None) -> str:
    """Write one run record: create the run if needed, one batch per limit, then close it.

    Idempotent: params and tags overwrite with equal values, and a record without a
    run id first looks the trial's run up by study name and trial number (unless
    ``lookup=False``: the caller knows there is none). ``create_tags`` go on a run
    created here.
    """
    run_id = record.run_id or (_find_trial_run(client, record) if lookup else None)
    if run_id is None:
        # Created with the tags _find_trial_run looks for: if the server commits the run
        # and dies before answering, the retry finds it instead of making a second one.
        tags = {**(create_tags or {}), **_lookup_tags(record)}
        run_id = client.create_run(
            record.experiment_id, start_time=record.start_time, tags=tags,
            run_name=record.run_name,
        ).info.run_id
        record.run_id = run_id
    metrics = [Metric(k, v, ts, step) for k, v, ts, step in record.metrics]
    params = [Param(k, v) for k, v in record.params.items()]
    # No mlflow.runName tag here: the store turns that tag into a set_tag and an
    # update_run_info of its own (two more transactions per trial on SQLite), and the
    # update_run_info at the end sets the name (and its tag) anyway.
    run_tags = [RunTag(k, v) for k, v in record.tags.items() if k != MLFLOW_RUN_NAME]
    for batch_metrics, batch_params, batch_tags in batches(metrics, params, run_tags):
        _log_batch_or_items(client, run_id, batch_metrics, batch_params, batch_tags)
    for name, text in record.texts.items():
        client.log_text(run_id, text, name)
    if record.inputs:  # one call; MLflow keeps a dataset input once per run
        from optuna_mlflow_nested.data_inputs import dataset_input

        client.log_inputs(run_id, datasets=[dataset_input(d) for d in record.inputs])
    _compat.update_run_info(client, run_id, record.status, record.end_time, record.run_name)
    return run_id


def deliver_retried(client: MlflowClient, record: RunRecord,
                    retry: Callable[[Callable[[], str]], str], *, lookup: bool = True) -> str:
    """:func:`deliver` through ``retry`` (a retrying call). A failed try may have made
    the run (its answer lost): every later try looks for it, also where the caller knew
    of none (``lookup=False``)."""
    tries = itertools.count()
    return retry(lambda: deliver(client, record, lookup=lookup or next(tries) > 0))


def batches(metrics: list[Metric], params: list[Param], tags: list[RunTag],
            ) -> Iterator[tuple[list[Metric], list[Param], list[RunTag]]]:
    """``(metrics, params, tags)`` for successive ``log_batch`` calls, each as full as
    MLflow's per-call limits allow (100 params and tags together, 1000 metrics, 1000
    entities in all)."""
    while metrics or params or tags:
        batch_params, params = params[:MAX_PARAMS_TAGS_PER_BATCH], params[MAX_PARAMS_TAGS_PER_BATCH:]
        room = MAX_PARAMS_TAGS_PER_BATCH - len(batch_params)
        batch_tags, tags = tags[:room], tags[room:]
        room = min(MAX_METRICS_PER_BATCH, MAX_ENTITIES_PER_BATCH - len(batch_params) - len(batch_tags))
        batch_metrics, metrics = metrics[:room], metrics[room:]
        yield batch_metrics, batch_params, batch_tags


def _log_batch_or_items(client: MlflowClient, run_id: str, metrics: list[Metric],
                        params: list[Param], tags: list[RunTag]) -> None:
    """One ``log_batch``; if MLflow rejects it, each item alone, skipping only the rejects."""
    try:
        client.log_batch(run_id, metrics=metrics, params=params, tags=tags, synchronous=True)
        return
    except MlflowException as exc:
        if exc.error_code != "INVALID_PARAMETER_VALUE":
            raise
    if client.get_run(run_id).info.lifecycle_stage == "deleted":
        # A sync took the run for a spare a dead worker left (older than its grace
        # period) while a live worker's trial had it: bring the trial's run back.
        client.restore_run(run_id)
        client.log_batch(run_id, metrics=metrics, params=params, tags=tags, synchronous=True)
        return
    rejected = []
    singles: list[tuple[Any, dict[str, Any]]] = [
        *((m, {"metrics": [m]}) for m in metrics), *((p, {"params": [p]}) for p in params),
        *((t, {"tags": [t]}) for t in tags)]
    for item, batch in singles:
        try:
            client.log_batch(run_id, synchronous=True, **batch)
        except MlflowException as exc:
            if exc.error_code != "INVALID_PARAMETER_VALUE":
                raise
            rejected.append(item.key)
    _logger.warning("MLflow rejected %s on run %s", ", ".join(rejected), run_id)
    client.set_tag(run_id, "omn.rejected", tag_value(", ".join(rejected)))


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter, up to ``deadline`` seconds per write."""

    deadline: float = 60.0
    first_delay: float = 0.2
    max_delay: float = 5.0

    def call(self, fn: Callable[[], Any], stop: threading.Event | None = None, *,
             retryable: Callable[[BaseException], bool] = is_retryable) -> Any:
        start = time.monotonic()
        delay = self.first_delay
        while True:
            try:
                return fn()
            except Exception as exc:
                if not retryable(exc) or time.monotonic() - start + delay > self.deadline:
                    raise
                _logger.debug("MLflow write failed (%s); retrying in %.1fs",
                              redact_secrets(exc), delay)
                if stop is not None and stop.wait(delay * random.uniform(0.5, 1.0)):
                    raise
                elif stop is None:
                    time.sleep(delay)
                delay = min(delay * 2, self.max_delay)

    @classmethod
    def from_env(cls) -> RetryPolicy:
        """The policy with ``OMN_RETRY_DEADLINE`` seconds (default 60) per write."""
        return cls(deadline=float(os.environ.get("OMN_RETRY_DEADLINE", "60")))


def wait_out_busy_store(fn: Callable[[], Any]) -> Any:
    """``fn()``, called again while the store is busy (:func:`store_was_busy`), up to
    ``OMN_RETRY_DEADLINE``, with MLflow's traceback for each refusal kept off stderr (as
    in the writer). A server that is away is not waited for: nothing must hang on it."""
    with _compat.retried_store_call():
        return RetryPolicy.from_env().call(fn, retryable=store_was_busy)
