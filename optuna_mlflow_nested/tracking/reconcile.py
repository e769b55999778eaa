"""MLflow made to agree with Optuna's storage, the source of truth."""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Sequence
import time
import warnings

from mlflow.entities import Run
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID
import optuna
from optuna.trial import FrozenTrial
from optuna.trial import TrialState

from optuna_mlflow_nested._utils import redact_secrets
from optuna_mlflow_nested.tracking.clients import set_run_status
from optuna_mlflow_nested.tracking.delivery import deliver
from optuna_mlflow_nested.tracking.delivery import equals_clause
from optuna_mlflow_nested.tracking.delivery import is_retryable
from optuna_mlflow_nested.tracking.delivery import search_equal
from optuna_mlflow_nested.tracking.records import TRIAL_NUMBER_TAG
from optuna_mlflow_nested.tracking.records import RunRecord
from optuna_mlflow_nested.tracking.records import trial_record
from optuna_mlflow_nested.tracking.run_pool import PENDING_RUN_NAME


def runs_to_keep(study: optuna.Study, k: int) -> list[FrozenTrial]:
    """Under ``trial_runs=k``: the ``k`` best complete trials (the Pareto front, best
    first, for several objectives) and every failed trial (for its traceback)."""
    trials = study.get_trials(deepcopy=False)
    if len(study.directions) == 1:
        complete = [t for t in trials if t.state == TrialState.COMPLETE and t.value is not None]
        maximize = study.direction == optuna.study.StudyDirection.MAXIMIZE
        best = sorted(complete, key=lambda t: (t.value, t.number), reverse=maximize)[:k]
    else:
        best = sorted(study.best_trials, key=lambda t: t.number)[:k]
    return best + [t for t in trials if t.state == TrialState.FAIL]


def running_children(client: MlflowClient, experiment_id: str, parent_run_id: str) -> list[Run]:
    """The parent's child runs that are RUNNING (trials' runs not yet ended, spare runs)."""
    return search_equal(client, [experiment_id], {MLFLOW_PARENT_RUN_ID: parent_run_id},
                        equals_clause("attributes.status", "RUNNING"))


def reconcile_study(
    client: MlflowClient, study: optuna.Study, *, experiment_id: str, parent_run_id: str,
    tracking_uri: str, run_ids: Callable[[], dict[int, str]], metric_name: str | Sequence[str] = "value",
    orphan_age: float = 3600.0, create_missing: bool = False,
    remember: Callable[[int, str], None] | None = None,
) -> int:
    """Finish RUNNING child runs of finished trials, delete stale spare runs and, with
    ``create_missing``, write a child run for every finished trial that has none
    (and tell ``remember`` its trial number and run id, for the trial -> run mapping).

    ``run_ids`` gives the trial number -> run id mapping; it is read after the search
    for RUNNING runs, so a run a live trial took from the pool before the search (still
    named ``trial-pending``) is known as that trial's and never taken for a spare.

    Returns the number of runs written.
    """
    children = {MLFLOW_PARENT_RUN_ID: parent_run_id}
    running = running_children(client, experiment_id, parent_run_id)
    finished = {t.number: t for t in study.get_trials(deepcopy=False) if t.state.is_finished()}
    mapping = run_ids()
    trial_of_run = {run_id: finished[n] for n, run_id in mapping.items() if n in finished}
    in_use = set(mapping.values())
    mended = 0
    now_ms = time.time() * 1000
    for run in running:
        trial = trial_of_run.get(run.info.run_id)
        if trial is not None:
            mended += _deliver_beside_its_writer(client, trial_record(
                study, trial, tracking_uri=tracking_uri, experiment_id=experiment_id,
                parent_run_id=parent_run_id, run_id=run.info.run_id, metric_name=metric_name),
                run.info.run_id)
        elif (run.info.run_name == PENDING_RUN_NAME and run.info.run_id not in in_use
              and now_ms - run.info.start_time > orphan_age * 1000):
            set_run_status(client, run.info.run_id, "KILLED")  # deleted runs must not stay RUNNING
            client.delete_run(run.info.run_id)
    if create_missing:
        have = {r.data.tags.get(TRIAL_NUMBER_TAG) for r in search_equal(client, [experiment_id], children)}
        for trial in finished.values():
            if str(trial.number) not in have:
                run_id = deliver(client, trial_record(
                    study, trial, tracking_uri=tracking_uri, experiment_id=experiment_id,
                    parent_run_id=parent_run_id, run_id=None, metric_name=metric_name),
                    lookup=False)
                if remember is not None:
                    remember(trial.number, run_id)
                mended += 1
    return mended


def _deliver_beside_its_writer(client: MlflowClient, record: RunRecord, run_id: str,
                               attempts: int = 3) -> int:
    """Deliver the record of a finished trial whose run ``run_id`` is RUNNING; 1 if this
    wrote it, 0 if the trial's own writer ended it meanwhile.

    That writer (another live process) may be writing the same run at the same moment:
    the values are the same, but MLflow checks a run's params (and datasets) and then
    inserts them, so the second insert of the two can fail (an IntegrityError, SQLite's
    "UNIQUE constraint failed"). After any retryable store error the run is read again:
    ended, it is the writer's; else the delivery (idempotent) is made again, at most
    ``attempts`` times in all.
    """
    for _ in range(attempts - 1):
        try:
            deliver(client, record)
            return 1
        except MlflowException as exc:
            if not is_retryable(exc):
                raise
            if client.get_run(run_id).info.status != "RUNNING":
                return 0
    deliver(client, record)  # the last attempt: its error is raised
    return 1


def mend_after_lost_writer(study: optuna.Study) -> None:
    """The writer process died under a search of ``study`` (a ``NestedStudy``; warned):
    the trial runs it had not written are rebuilt from Optuna's storage, also those of
    trials that had no run yet."""
    try:
        study.reconcile(create_missing=True)  # type: ignore[attr-defined]
    except Exception as exc:
        warnings.warn("could not rebuild the runs the writer process had not written: "
                      f"{redact_secrets(exc)}; `optuna-mlflow-nested sync` does",
                      RuntimeWarning, stacklevel=4)
