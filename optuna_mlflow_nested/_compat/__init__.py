"""Every touch of a private MLflow or Optuna name, each with why no public API does it.

Each function here, in ``fluent_state.py`` (MLflow's per-process settings) and in
``trials.py`` (a trial's id, an executor's budget added in
chunks) has a test in ``tests/test_compat.py`` that fails if a supported MLflow or
Optuna version changes what it relies on.
"""

from __future__ import annotations

from collections.abc import Iterator
import contextlib
import logging
import threading
from typing import Any

from mlflow.entities import Run
from mlflow.entities import RunStatus
from mlflow.tracking import MlflowClient
import optuna
from optuna.trial import TrialState

from optuna_mlflow_nested._compat.fluent_state import active_experiment
from optuna_mlflow_nested._compat.fluent_state import active_run_ids_of_all_threads
from optuna_mlflow_nested._compat.fluent_state import default_experiment_id
from optuna_mlflow_nested._compat.fluent_state import explicit_tracking_uri
from optuna_mlflow_nested._compat.fluent_state import set_active_experiment
from optuna_mlflow_nested._compat.trials import add_waiting_trials
from optuna_mlflow_nested._compat.trials import trial_id

__all__ = [
    "active_experiment", "active_run", "active_run_ids_of_all_threads", "add_trial",
    "add_waiting_trials", "claim_trial", "default_experiment_id", "executor_worker_count",
    "explicit_tracking_uri", "journal_file", "never_create_sqlite_stores", "open_store",
    "quiet_retried_store_errors", "rdb_url", "record_first_heartbeat", "retried_store_call",
    "running_trials_without_heartbeat", "set_active_experiment", "set_trial_system_attr",
    "stop_heartbeats_left_running", "study_storage", "trial_active_run", "trial_id",
    "update_run_info",
]


#: MLflow's SQL session maker logs every ``OperationalError`` (SQLite's "database is
#: locked" under many writers) with its traceback before it raises it; no setting turns
#: that one log line off.
_SQL_SESSION_LOGGER = "mlflow.store.db.utils"


class _RetriedStoreErrors(logging.Filter):
    """Drops MLflow's traceback for a store error raised in a thread that retries it."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and (threading.current_thread().name.startswith(_RETRYING)
                                         or getattr(_retried_here, "on", False)))


_RETRYING = ("omn-writer", "omn-runpool", "omn-session")
_quiet_filter = _RetriedStoreErrors()
_retried_here = threading.local()


@contextlib.contextmanager
def retried_store_call() -> Iterator[None]:
    """Inside, the calling thread's store errors are quiet as in the writer's threads:
    for a call whose failure this project handles (a trial's run then made by its
    record's writer, with retries)."""
    quiet_retried_store_errors()
    outer, _retried_here.on = getattr(_retried_here, "on", False), True
    try:
        yield
    finally:
        _retried_here.on = outer


def quiet_retried_store_errors() -> None:
    """No traceback on stderr for a store error that this project's writer retries: its
    threads (``omn-writer-*``, ``omn-runpool-*``, ``omn-session-*``) retry with backoff and
    warn once if a write finally fails. The user's own MLflow calls still log as MLflow
    does."""
    logger = logging.getLogger(_SQL_SESSION_LOGGER)
    if _quiet_filter not in logger.filters:
        logger.addFilter(_quiet_filter)


@contextlib.contextmanager
def active_run(run: Run) -> Iterator[None]:
    """Make ``run`` the active run of the calling thread without a round trip:
    ``mlflow.start_run(run_id=...)`` does a ``get_run`` and a status update per call and
    ends the run on exit; a trial needs neither (the writer finishes the run). MLflow's
    active run is a thread-local stack with no public push/pop."""
    from mlflow.tracking import fluent

    stack = fluent._active_run_stack.get()
    stack.append(fluent.ActiveRun(run))
    try:
        yield
    finally:
        for i in range(len(stack) - 1, -1, -1):
            if stack[i].info.run_id == run.info.run_id:
                del stack[i]
                break


def open_store(client: MlflowClient) -> Any:
    """Open (and for SQLite, migrate) the client's store now rather than on first use
    (MLflow opens it lazily): the first open of a fresh SQLite file runs MLflow's schema
    migration, which the caller must do under a file lock."""
    return client._tracking_client.store


def update_run_info(client: MlflowClient, run_id: str, status: str, end_time: int | None,
                    run_name: str | None = None) -> None:
    """Set a run's status, end time and name in one store call.

    ``client.set_terminated`` first does a ``get_run`` round trip to print a 'View run'
    URL against a server, on every trial; ``client.update_run`` cannot set the end time.
    """
    client._tracking_client.store.update_run_info(run_id, RunStatus.from_string(status), end_time,
                                                  run_name)


def study_storage(study: optuna.Study) -> tuple[optuna.storages.BaseStorage, int]:
    """The study's storage and id, for study system attributes.

    Optuna 4 removed ``Study.set_system_attr``; the parent run id and the trial -> run
    mapping live in study system attributes so they stay out of ``trials_dataframe()``.
    """
    return study._storage, study._study_id


def record_first_heartbeat(study: optuna.Study, trial: optuna.Trial) -> None:
    """Record trial ``trial``'s first heartbeat now, if the study's storage keeps them.

    Optuna's ``optimize`` records it only once ``ask`` has returned; a process killed in
    between leaves a RUNNING trial without one, which ``fail_stale_trials`` never fails.
    ``study.ask`` calls this inside ``optimize`` only (an ask/tell trial gets no later
    heartbeats and would go stale). No public API says whether heartbeats are on.
    """
    from optuna.storages._heartbeat import is_heartbeat_enabled

    storage = study._storage
    if is_heartbeat_enabled(storage):
        storage.record_heartbeat(trial._trial_id)  # type: ignore[attr-defined]


def running_trials_without_heartbeat(study: optuna.Study) -> set[int]:
    """Numbers of the study's RUNNING trials that never recorded a heartbeat.

    Such a trial's process died before its first heartbeat; ``fail_stale_trials`` skips
    it for good. No public API tells (the RDB model is private). Storages without
    heartbeats give an empty set."""
    from optuna.storages._heartbeat import is_heartbeat_enabled
    from optuna.storages._rdb import models

    storage = study._storage
    backend = rdb_storage(storage)
    if backend is None or not is_heartbeat_enabled(storage):
        return set()
    session = backend.scoped_session()
    try:
        rows = (session.query(models.TrialModel.number)
                .outerjoin(models.TrialHeartbeatModel)
                .filter(models.TrialModel.study_id == study._study_id,
                        models.TrialModel.state == optuna.trial.TrialState.RUNNING,
                        models.TrialHeartbeatModel.trial_heartbeat_id.is_(None))
                .all())
    finally:
        backend.scoped_session.remove()
    return {number for (number,) in rows}


def stop_heartbeats_left_running(study: optuna.Study) -> None:
    """Stop the study's heartbeat threads that Optuna started but will never stop.

    A KeyboardInterrupt (or SystemExit) as ``_run_trial``'s ``with
    get_heartbeat_thread(...)`` starts its non-daemon thread skips the ``__exit__`` that
    stops it, and the interpreter then waits for it forever at exit. Optuna keeps no
    reference: it is found by its target, stopped by its stop event (``_target``/``_args``).
    """
    from optuna.storages._heartbeat import HeartbeatThread

    for thread in threading.enumerate():
        args: Any = getattr(thread, "_args", ())
        if getattr(thread, "_target", None) is HeartbeatThread._record_heartbeat \
                and len(args) == 3 and args[1] is study._storage:  # not another study's
            args[2].set()


def add_trial(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> optuna.trial.FrozenTrial:
    """``study.add_trial(trial)``, returning the trial as added (with its number), which
    gives it a run; ``Study.add_trial`` returns nothing. Its body (Optuna 4.0-5.0)."""
    trial._validate()
    if trial.values is not None and len(study.directions) != len(trial.values):
        raise ValueError(
            f"The added trial has {len(trial.values)} values, which is different from the "
            f"number of objectives {len(study.directions)} in the study (determined by "
            "Study.directions)."
        )
    trial_id = study._storage.create_new_trial(study._study_id, template_trial=trial)
    return study._storage.get_trial(trial_id)


def never_create_sqlite_stores() -> None:
    """From now on, in this process, opening a SQLite tracking store whose file is
    missing, or whose folder goes as SQLite opens it, raises ``FileNotFoundError``.

    For ``clients.get_client(create=False)``: the writer process opens only stores the
    calling process made; one removed since (a temporary folder) would be made again and
    left behind, or (its folder removed during the open) retried for about 100 s. MLflow
    3.x makes the folders (``_make_parent_dirs_if_sqlite``) and retries a failed open
    (``create_sqlalchemy_engine_with_retry``, called through the module) with no option
    to do either. Not covered: a file unlinked as SQLite opens it (it makes it anew)."""
    from optuna_mlflow_nested.tracking.clients import sqlite_path  # (it imports this module)

    try:
        from mlflow.store.db import utils
    except ImportError:
        return
    make_parent_dirs = getattr(utils, "_make_parent_dirs_if_sqlite", None)
    open_with_retry = getattr(utils, "create_sqlalchemy_engine_with_retry", None)
    if make_parent_dirs is None or open_with_retry is None or getattr(
            open_with_retry, "omn_refuses_missing", False):
        return

    def refuse_missing(db_uri: str) -> None:
        path = sqlite_path(db_uri)
        if path is not None and not path.exists():
            raise FileNotFoundError(f"{path} was removed")
        make_parent_dirs(db_uri)

    def open_existing(db_uri: str) -> Any:
        import sqlalchemy  # (not for a tracking server)

        if sqlite_path(db_uri) is None:
            return open_with_retry(db_uri)
        refuse_missing(db_uri)
        engine = utils.create_sqlalchemy_engine(db_uri)
        try:
            sqlalchemy.inspect(engine)  # MLflow's own test of an open
            return engine
        except Exception:
            refuse_missing(db_uri)  # removed meanwhile: no retries
        return open_with_retry(db_uri)  # a locked file, say

    open_existing.omn_refuses_missing = True  # type: ignore[attr-defined]
    utils._make_parent_dirs_if_sqlite = refuse_missing
    utils.create_sqlalchemy_engine_with_retry = open_existing


def set_trial_system_attr(trial: optuna.Trial, key: str, value: Any) -> None:
    """A system attribute on a running trial.

    Optuna 4 removed ``Trial.set_system_attr``. MLflowCallback's ``track_in_mlflow``
    hands the run it opened to the callback through the trial's storage, as it did.
    """
    trial.storage.set_trial_system_attr(trial._trial_id, key, value)


def claim_trial(study: optuna.Study, trial_id: int) -> optuna.Trial | None:
    """Take the queued trial ``trial_id`` (WAITING to RUNNING) as ``study.ask()`` would.

    Workers of one ``optimize(executor=...)`` share an exact budget of queued trials and
    know their ids. Optuna's ``ask`` pops one by reading every unfinished trial (private
    ``_pop_waiting_trial_id``): O(budget) rows per trial. This pops one known trial.

    Returns:
        The trial, or ``None`` when it is not WAITING any more (another worker took
        it, or it finished).
    """
    try:
        if not study._storage.set_trial_state_values(trial_id, state=TrialState.RUNNING):
            return None
    except optuna.exceptions.UpdateFinishedTrialError:
        return None
    study._thread_local.cached_all_trials = None  # what ask() does: see the latest trials
    return optuna.Trial(study, trial_id)


def journal_file(storage: optuna.storages.BaseStorage) -> tuple[Any, str, Any, str | None] | None:
    """A journal file storage's backend, file path, lock, and the path its lock was made
    for (``None`` for a lock class other than Optuna's two), as given, else ``None``.

    Relative paths must reach executor workers absolute; ``JournalFileBackend`` and the
    locks keep their paths privately (a lock's file is its path + ``".lock"``).
    """
    from optuna.storages.journal import JournalFileBackend
    from optuna.storages.journal import JournalFileOpenLock
    from optuna.storages.journal import JournalFileSymlinkLock

    backend = getattr(storage, "_backend", None)
    if not (isinstance(storage, optuna.storages.JournalStorage)
            and isinstance(backend, JournalFileBackend)):
        return None
    lock: Any = backend._lock
    known = isinstance(lock, (JournalFileOpenLock, JournalFileSymlinkLock))
    return backend, backend._file_path, lock, lock._lock_file[:-5] if known else None


def rdb_storage(storage: Any) -> optuna.storages.RDBStorage | None:
    """The RDB storage itself, also behind the private cache class that
    ``optuna.storages.get_storage`` and ``Study`` wrap it in, else ``None``."""
    backend = getattr(storage, "_backend", storage)
    return backend if isinstance(backend, optuna.storages.RDBStorage) else None


def rdb_url(storage: optuna.storages.BaseStorage) -> str | None:
    """The database URL of an RDB storage (also behind Optuna's cache), else ``None``.

    Executor workers reopen it with heartbeats on (and the user's heartbeat settings).
    """
    url = getattr(rdb_storage(storage), "url", None)
    return url if isinstance(url, str) else None


def executor_worker_count(executor: Any) -> int | None:
    """How many tasks ``executor`` runs at once, where it can be known.

    The standard pools keep it in ``_max_workers``; Dask's ``ClientExecutor`` in its
    client's worker threads. Neither has a public attribute.
    """
    count = getattr(executor, "_max_workers", None)
    if isinstance(count, int):
        return count
    client = getattr(executor, "_client", None)
    if client is not None and hasattr(client, "nthreads"):
        return int(sum(client.nthreads().values())) or None
    return None


@contextlib.contextmanager
def trial_active_run(run: Run | None, client: MlflowClient) -> Iterator[list[str]]:
    """:func:`active_run` for a trial's objective, proof against ``mlflow.end_run()``.

    ``mlflow.end_run()`` in an objective pops the trial's run off MLflow's thread-local
    stack (no public push/pop); the next ``mlflow.log_*`` would start a stray RUNNING run
    in the default experiment, active for the thread's later trials. So the run is
    pushed twice: ``end_run`` ends it (the record sets its final status later) and pops
    one copy. Runs the objective started and left active are ended here (FAILED if it
    raised, as ``with mlflow.start_run()``) and popped.
    ``run=None`` (the server was away when the trial started) pushes nothing. The list
    yielded holds, on exit, the ids of the runs so ended.
    """
    import time

    from mlflow.tracking import fluent

    stack = fluent._active_run_stack.get()
    depth = len(stack)
    if run is not None:
        stack.extend([fluent.ActiveRun(run), fluent.ActiveRun(run)])
    own = run.info.run_id if run is not None else None
    ended: list[str] = []
    status = "FAILED"
    try:
        yield ended
        status = "FINISHED"
    finally:
        left = [r.info.run_id for r in stack[depth:] if r.info.run_id != own]
        del stack[min(depth, len(stack)):]
        for run_id in dict.fromkeys(left):
            ended.append(run_id)
            with contextlib.suppress(Exception):  # the server may be away: not our run
                update_run_info(client, run_id, status, int(time.time() * 1000))
