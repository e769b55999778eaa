"""Trial lifecycle -> MLflow: open a child run when a trial starts, record it when it ends.

During ``optimize`` child runs come from a :class:`RunPool` (created ahead by
background threads) and records go to a background :class:`Writer`; outside
``optimize`` (``ask``/``tell``, ``add_trial``) the same happens synchronously.
"""

from __future__ import annotations

import atexit
from collections.abc import Callable
from collections.abc import Iterator
from collections.abc import Sequence
import contextlib
import os
import threading
import traceback
from typing import Any
import warnings
import weakref

from mlflow.entities import Run
import optuna
from optuna.trial import FrozenTrial

from optuna_mlflow_nested import _compat
from optuna_mlflow_nested._utils import redact_secrets
from optuna_mlflow_nested._utils import scrub_exception
from optuna_mlflow_nested.tracking.clients import discard_runs
from optuna_mlflow_nested.tracking.clients import get_client
from optuna_mlflow_nested.tracking.clients import short_http_retries
from optuna_mlflow_nested.tracking.delivery import RetryPolicy
from optuna_mlflow_nested.tracking.process_session import ProcessSession
from optuna_mlflow_nested.tracking.process_session import WriterProcessLost
from optuna_mlflow_nested.tracking.process_session import in_executor_worker
from optuna_mlflow_nested.tracking.process_session import uses_writer_process
from optuna_mlflow_nested.tracking.records import as_failed
from optuna_mlflow_nested.tracking.records import fail_non_finite
from optuna_mlflow_nested.tracking.records import trial_record
from optuna_mlflow_nested.tracking.run_pool import RunPool
from optuna_mlflow_nested.tracking.run_pool import create_pending_run
from optuna_mlflow_nested.tracking.spool import Spool
from optuna_mlflow_nested.tracking.spool import default_spool_path
from optuna_mlflow_nested.tracking.writer import Writer

_live_trackers: weakref.WeakSet[TrialTracker] = weakref.WeakSet()
_current = threading.local()


def current_trial() -> optuna.Trial | None:
    """The trial whose objective runs in this thread (inside a tracked study), if any."""
    return getattr(_current, "trial", None)


@contextlib.contextmanager
def running_trial(trial: optuna.Trial) -> Iterator[None]:
    previous = current_trial()
    _current.trial = trial
    try:
        yield
    finally:
        _current.trial = previous


@atexit.register
def _flush_at_exit() -> None:
    for tracker in list(_live_trackers):
        with contextlib.suppress(Exception):
            tracker.stop()


class TrialTracker:
    """Opens a child run per trial and records its outcome, off the trial's critical path."""

    def __init__(
        self,
        *,
        tracking_uri: str,
        experiment_id: str,
        parent_run_id: str,
        study_name: str,
        metric_name: str | Sequence[str] = "value",
        threads: int | None = None,
        spool_path: str | os.PathLike[str] | None = None,
        run_wait: float = 120.0,
        pool_tags: dict[str, str] | None = None,
    ) -> None:
        self.tracking_uri = tracking_uri
        self.experiment_id = experiment_id
        self.parent_run_id = parent_run_id
        self.study_name = study_name
        self.metric_name = metric_name
        self._client = get_client(tracking_uri)
        remote = tracking_uri.startswith(("http://", "https://"))
        self._threads = threads or (4 if remote else 1)
        self._spool = Spool(spool_path or default_spool_path())
        self._retry = RetryPolicy.from_env()
        self._run_wait = run_wait
        self._pool_tags = pool_tags  # e.g. the executor session that owns the spare runs
        self._lock = threading.Lock()
        self._open: dict[int, Run | None] = {}  # trial number -> its run (None: made later)
        self._in_objective: set[int] = set()  # trials whose code runs in their run now
        self._errors: dict[int, str] = {}
        self._pool: RunPool | None = None
        self._writer: Writer | None = None
        self._inline = Writer(self._client, 0, self._spool, self._retry)
        self._http_retries = contextlib.ExitStack()
        self._lag_warned = False
        self._writer_lost = False  # see take_writer_lost
        self._switch_lock = threading.Lock()

    # lifecycle -------------------------------------------------------------------
    def start(self, n_jobs: int = 1, n_trials: int | None = None) -> None:
        """Background run creation and writing, for ``optimize`` (``n_trials``: its
        budget, if known: no more runs are made ahead than it needs)."""
        if self._writer is not None:
            return
        self._lag_warned = False
        workers = n_jobs if n_jobs > 0 else (os.cpu_count() or 1)
        self._http_retries.enter_context(short_http_retries(self.tracking_uri))
        if uses_writer_process():
            try:
                self._writer = self._pool = ProcessSession(  # type: ignore[assignment]
                    tracking_uri=self.tracking_uri, experiment_id=self.experiment_id,
                    parent_run_id=self.parent_run_id, study_name=self.study_name,
                    spare=workers + 1, threads=self._threads, spool_path=str(self._spool.path),
                    retry_deadline=self._retry.deadline, pool_tags=self._pool_tags,
                    create_run=self._create_run, limit=n_trials)
            except WriterProcessLost as exc:  # died as the search began: nothing to mend
                warnings.warn(f"{exc}; this search writes its runs from threads in this "
                              "process", RuntimeWarning, stacklevel=4)
        if self._writer is None:
            self._start_threads(workers + 1, n_trials)
        _live_trackers.add(self)

    def _start_threads(self, spare: int, limit: int | None) -> None:
        self._writer = Writer(self._client, self._threads, self._spool, self._retry)
        self._pool = RunPool(self._client, self.experiment_id, self.parent_run_id,
                             self.study_name, spare=spare, threads=self._threads,
                             tags=self._pool_tags, limit=limit)

    def _writer_process_lost(self, session: Any) -> tuple[Writer | None, RunPool | None]:
        """The writer process died under ``session`` (the OOM killer, a ``pkill``): the
        rest of the search writes from threads here. Returns the writer and run pool to
        use now (``None`` once :meth:`stop` ran)."""
        with self._switch_lock:  # n_jobs > 1: several trials may find it dead at once
            if self._writer is session and isinstance(session, ProcessSession):
                # Threads first: a run a failed ask gives back from now on goes to them.
                self._start_threads(session.spare, session.budget_left)
                self._abandon(session, "the rest of this search writes its runs from "
                                       "threads in this process, and the")
            return self._writer, self._pool

    def _abandon(self, session: ProcessSession, going_on: str) -> None:
        discard_runs(self._client, session.abandon())
        self._writer_lost = True
        warnings.warn(f"the writer process (pid {session.pid}) died mid-search; {going_on} "
                      "runs of trials it had not written yet are rebuilt from Optuna's "
                      "storage when optimize ends", RuntimeWarning, stacklevel=5)

    def take_writer_lost(self) -> bool:
        """Whether the writer process died under this search since last asked (warned):
        the study then rebuilds the runs it had not written, once :meth:`stop` ran."""
        lost, self._writer_lost = self._writer_lost, False
        return lost

    def stop(self, meanwhile: Callable[[], None] | None = None) -> None:
        """Deliver (or spool) every queued write and delete unused spare runs; with the
        writer process, call ``meanwhile`` while it delivers (writer threads would
        share this process's GIL with it: not called)."""
        pool, writer = self._pool, self._writer
        self._pool = self._writer = None
        try:
            if pool is not None and pool is not writer:
                pool.close()
            if writer is not None:
                if pool is writer:  # the writer process
                    try:
                        writer.close(timeout=self._retry.deadline + 30,  # type: ignore[call-arg]
                                     meanwhile=meanwhile)
                    except WriterProcessLost:
                        self._abandon(writer, "the")  # type: ignore[arg-type]
                else:
                    writer.close(timeout=self._retry.deadline + 30)
                self._inline.unsaved.extend(writer.unsaved)
        finally:
            self._http_retries.close()
            _live_trackers.discard(self)

    def warn_if_unsaved(self, stacklevel: int) -> None:
        """One warning for records neither delivered nor spooled, saying how to rebuild them."""
        if self.unsaved:
            warnings.warn(f"{len(self.unsaved)} trial run(s) could be neither delivered nor "
                          "spooled; `optuna-mlflow-nested sync --study-name ... --storage ...` "
                          "rebuilds them from Optuna's storage", RuntimeWarning,
                          stacklevel=stacklevel)

    @property
    def unsaved(self) -> list[Any]:
        """Records neither delivered nor spooled (the spool could not be written)."""
        return list(self._inline.unsaved)

    # per trial -------------------------------------------------------------------
    def open_trial(self, number: int) -> Run | None:
        """The run for trial ``number``: a spare one, or (outside optimize) a new one."""
        return self.assign(number, self.take_run())

    def open_new_trial(self, study: optuna.Study, create: Callable[[], optuna.Trial],
                       ) -> tuple[optuna.Trial, Run | None]:
        """A trial made by ``create`` and its run, taken before the trial exists.

        Waiting for a run (a slow server) then never holds a RUNNING trial that has no
        heartbeat yet, which no sync could fail if this process were killed meanwhile.
        """
        run = self.take_run()
        try:
            trial = create()
        except BaseException:
            self.give_back(run)
            raise
        # Optuna's heartbeat thread starts right after this ask. An executor worker's
        # trial skips this write: optimize(executor=...) fails a trial of its budget
        # left RUNNING without a heartbeat once every task has ended.
        if self.in_optimize and not in_executor_worker.get():
            _compat.record_first_heartbeat(study, trial)
        return trial, self.assign(trial.number, run)

    def take_run(self) -> Run | None:
        """A run for the next trial (``None`` if the tracking server is away)."""
        pool = self._pool
        if pool is not None:
            try:
                run = pool.take(self._run_wait)
            except WriterProcessLost:
                _, pool = self._writer_process_lost(pool)
                if pool is None:
                    return self._create_run()
                run = pool.take(self._run_wait)
            if run is not None or not pool.exhausted:
                return run
            # More trials than the budget the pool was sized for (a failed ask's run is
            # reused, so this is rare): made here, as outside optimize.
        return self._create_run()

    def _create_run(self) -> Run | None:
        """A new run for a trial, made now in this process (as the run pool makes them)."""
        try:
            with _compat.retried_store_call():
                return create_pending_run(self._client, self.experiment_id, self.parent_run_id,
                                          self.study_name, self._pool_tags)
        except Exception:
            return None  # the record creates it later, or goes to the spool

    def assign(self, number: int, run: Run | None) -> Run | None:
        """Trial ``number``'s run is ``run`` (from :meth:`take_run`)."""
        with self._lock:
            self._open[number] = run
        return run

    def give_back(self, run: Run | None) -> None:
        """A run from :meth:`take_run` that no trial got (the ask failed)."""
        if run is None:
            return
        if self._pool is not None:
            self._pool.put_back(run)
        else:
            discard_runs(self._client, [run.info.run_id])

    @property
    def in_optimize(self) -> bool:
        """Whether ``optimize`` runs (spare runs are kept ready only then)."""
        return self._pool is not None

    def run_of(self, number: int) -> Run | None:
        with self._lock:
            return self._open.get(number)

    def is_open(self, number: int) -> bool:
        with self._lock:
            return number in self._open

    #: The run made active for trials that have none of their own (``trial_runs=K``).
    fallback_run: Run | None = None
    #: Datasets every trial run logs (``data_inputs.describe`` dicts); none: no extra call.
    trial_inputs: list[dict[str, Any]] | None = None

    @contextlib.contextmanager
    def activate(self, trial: optuna.Trial) -> Iterator[Run | None]:
        """Trial ``trial``'s run is the calling thread's active MLflow run inside."""
        run = self.run_of(trial.number) or self.fallback_run
        ended: list[str] = []
        self._in_objective.add(trial.number)  # (set.add and discard are atomic: no lock)
        try:
            with _compat.trial_active_run(run, self._client) as ended, running_trial(trial):
                yield run
        finally:
            self._in_objective.discard(trial.number)
            if run is None and ended:
                # No run to make active (the server was away when the trial began): the
                # objective's mlflow.log_* calls started runs of their own in MLflow's
                # default experiment. They are ended, not left RUNNING and active for
                # the next trials of this thread.
                warnings.warn(
                    f"trial {trial.number} had no MLflow run (the tracking server was away "
                    f"when it started); the run(s) its MLflow calls started, {ended}, are "
                    "ended, outside the study's tree", RuntimeWarning, stacklevel=3)

    def wrap(self, objective: Callable[[optuna.Trial], Any]) -> Callable[[optuna.Trial], Any]:
        """The objective, run inside its trial's child run."""

        def run_in_child(trial: optuna.Trial) -> Any:
            try:
                with self.activate(trial):
                    result = objective(trial)
            except optuna.TrialPruned:
                raise
            except BaseException as exc:
                # MLflow's messages carry the tracking URI, password included: mask it
                # before Optuna logs the exception and the run keeps its traceback.
                scrub_exception(exc)
                self._errors[trial.number] = redact_secrets(traceback.format_exc())
                raise
            return fail_non_finite(trial, result)

        return run_in_child

    def close_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        """Record a finished trial (once: later calls for the same trial do nothing)."""
        with self._lock:
            if trial.number not in self._open:
                return
            run = self._open.pop(trial.number)
        record = trial_record(
            study, trial, tracking_uri=self.tracking_uri, experiment_id=self.experiment_id,
            parent_run_id=self.parent_run_id, run_id=run.info.run_id if run else None,
            metric_name=self.metric_name, error_text=self._errors.pop(trial.number, None),
        )
        record.inputs = list(self.trial_inputs or ())
        writer = self._writer
        if writer is not None:
            try:
                writer.put(record)
            except WriterProcessLost:
                writer, _ = self._writer_process_lost(writer)
                if writer is None:
                    self._inline.write(record)
                    return
                writer.put(record)
            self._warn_if_behind(writer)
        else:
            self._inline.write(record)

    def _warn_if_behind(self, writer: Writer) -> None:
        """Say once per optimize when trials end faster than the store takes their runs."""
        if self._lag_warned:
            return
        lag = writer.lag()
        if lag is not None:
            self._lag_warned = True
            warnings.warn(lag.message(self.tracking_uri), RuntimeWarning, stacklevel=2)

    def record(self, study: optuna.Study, trial: FrozenTrial, *, run_id: str | None,
               lookup: bool = True) -> str | None:
        """Record a finished trial this tracker did not open, now; returns its run id.
        ``lookup=False``: the trial is known to have no run yet (no search first)."""
        record = trial_record(
            study, trial, tracking_uri=self.tracking_uri, experiment_id=self.experiment_id,
            parent_run_id=self.parent_run_id, run_id=run_id, metric_name=self.metric_name,
            error_text=self._errors.pop(trial.number, None),
        )
        record.inputs = list(self.trial_inputs or ())
        self._inline.write(record, lookup=lookup)
        return record.run_id

    def close_open_trials(self, study: optuna.Study) -> None:
        """Close trials whose callback never ran (an exception or interrupt ended optimize);
        not those whose code still runs in their run (another thread's optimize of this
        study, or ``trial_run``)."""
        with self._lock:
            numbers = [n for n in self._open if n not in self._in_objective]
        if not numbers:
            return
        trials = {t.number: t for t in study.get_trials(deepcopy=False)}
        for number in numbers:
            trial = trials.get(number)
            if trial is None:
                continue
            if not trial.state.is_finished():
                # Interrupted mid-objective: Optuna will never finish it in this process.
                trial = as_failed(trial)
            self.close_trial(study, trial)
