"""NestedStudy, create_study, load_study: an ``optuna.Study`` with one MLflow parent run."""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Iterable
from collections.abc import Iterator
from collections.abc import Sequence
import contextlib
import functools
import threading
from typing import Any
import warnings

import optuna
from optuna.distributions import BaseDistribution
from optuna.trial import FrozenTrial
from optuna.trial import TrialState
import pandas as pd

from optuna_mlflow_nested import _compat
from optuna_mlflow_nested import tracking
from optuna_mlflow_nested._executor_checks import check_optimize_args
from optuna_mlflow_nested._study_setup import EXPERIMENT_ATTR
from optuna_mlflow_nested._study_setup import PARENT_RUN_ATTR
from optuna_mlflow_nested.executors import SESSION_TAG
from optuna_mlflow_nested.executors import BudgetSpent
from optuna_mlflow_nested.executors import QueuedBudget
from optuna_mlflow_nested.executors import optimize_with_executor
from optuna_mlflow_nested.samplers import SAMPLER_NAMES
from optuna_mlflow_nested.samplers import make_sampler
from optuna_mlflow_nested.tracking import ask_tell_end
from optuna_mlflow_nested.tracking import parent as parent_run
from optuna_mlflow_nested.tracking.delivery import equals_clause
from optuna_mlflow_nested.tracking.process_session import prepare_writer
from optuna_mlflow_nested.tracking.reconcile import mend_after_lost_writer
from optuna_mlflow_nested.tracking.reconcile import reconcile_study
from optuna_mlflow_nested.tracking.reconcile import runs_to_keep

__all__ = ["NestedStudy", "make_sampler", "SAMPLER_NAMES", "EXPERIMENT_ATTR", "PARENT_RUN_ATTR"]

#: Study system attribute ``mlflow_run_id:<trial number>`` -> that trial's child run id.
RUN_ATTR_PREFIX = "mlflow_run_id:"

ObjectiveFunc = Callable[[optuna.Trial], "float | Sequence[float]"]


class NestedStudy(optuna.Study):
    """An :class:`optuna.Study` whose trials are child runs of one MLflow parent run.

    Create it with :func:`create_study` or :func:`load_study`. It *is* an Optuna study:
    Optuna's visualization, importance, callbacks and ``copy_study`` take it as it is.
    Every trial gets a child run, whichever way it is made: :meth:`optimize` (threads
    too), :meth:`ask`/:meth:`tell`, :meth:`enqueue_trial` and :meth:`add_trial`.

    Example:
        >>> import mlflow, optuna, optuna_mlflow_nested as omn, tempfile, os
        >>> uri = "sqlite:///" + os.path.join(tempfile.mkdtemp(), "mlflow.db")
        >>> study = omn.create_study("doc", tracking_uri=uri, seed=0)
        >>> study.optimize(lambda t: t.suggest_float("x", -1, 1) ** 2, n_trials=3)
        >>> trial = study.ask()
        >>> with study.trial_run(trial):
        ...     mlflow.log_metric("seen", 1.0)   # lands in the trial's run
        >>> _ = study.tell(trial, trial.suggest_float("x", -1, 1) ** 2)
        >>> isinstance(study, optuna.Study), len(study.child_runs())
        (True, 4)
    """

    def __init__(
        self,
        study_name: str,
        storage: str | optuna.storages.BaseStorage,
        sampler: optuna.samplers.BaseSampler | None = None,
        pruner: optuna.pruners.BasePruner | None = None,
        *,
        tracking_uri: str,
        experiment_id: str,
        parent_run_id: str,
        metric_name: str | Sequence[str] = "value",
        seed: int | None = None,
        trial_runs: int | None = None,
    ) -> None:
        super().__init__(study_name=study_name, storage=storage, sampler=sampler, pruner=pruner)
        #: ``None``: every trial a child run; K: only the K best (and failed) trials, at
        #: the end of each optimize; every trial is in the parent's trials table.
        self.trial_runs = trial_runs
        self.tracking_uri = tracking_uri
        self.experiment_id = experiment_id
        self.parent_run_id = parent_run_id
        self.metric_name = metric_name
        self.seed = seed
        self._warned_reseed = False
        self._tracker: tracking.TrialTracker | None = None
        self._omn_local = threading.local()
        self._searching: set[int] = set()  # threads in optimize: the last ends the parent
        self._figures_pending: Callable[[float], bool] | None = None  # drawn elsewhere
        #: Set in executor workers: ask() only takes queued trials of the shared budget.
        self._worker_session: str | None = None
        self._worker_budget: QueuedBudget | None = None  # the queued trials it may take
        if trial_runs is None:
            prepare_writer(tracking_uri)  # its imports take seconds: ready when optimize comes

    # pickling (executors send the study to workers): no threads, no clients ---------
    def __getstate__(self) -> dict[Any, Any]:
        state = super().__getstate__()
        for name in ("_tracker", "_omn_local", "_figures_pending"):
            state.pop(name, None)
        return state

    def __setstate__(self, state: dict[Any, Any]) -> None:
        super().__setstate__(state)
        self._tracker = None
        self._omn_local, self._searching = threading.local(), set()
        self._figures_pending = None

    @property
    def _tracking(self) -> tracking.TrialTracker:
        if self._tracker is None:
            self._tracker = tracking.TrialTracker(
                tracking_uri=self.tracking_uri, experiment_id=self.experiment_id,
                parent_run_id=self.parent_run_id, study_name=self.study_name,
                metric_name=self.metric_name,
                pool_tags={SESSION_TAG: self._worker_session} if self._worker_session else None)
        return self._tracker

    @property
    def _client(self) -> Any:
        return tracking.get_client(self.tracking_uri)

    # trials ----------------------------------------------------------------------
    def optimize(
        self,
        func: ObjectiveFunc,
        n_trials: int | None = None,
        timeout: float | None = None,
        n_jobs: int = 1,
        catch: Iterable[type[Exception]] | type[Exception] = (),
        callbacks: Iterable[Callable[[optuna.Study, FrozenTrial], None]] | None = None,
        gc_after_trial: bool = False,
        show_progress_bar: bool = False,
        *,
        executor: Any = None,
        n_workers: int | None = None,
    ) -> None:
        """:meth:`optuna.Study.optimize`, every trial recorded as a child run.

        Writes happen in background threads and are flushed before this returns (or
        raises). Inside ``func``, ``mlflow.log_*`` calls land in the trial's run, also
        with ``n_jobs > 1``. At the end the parent run gets its summary.

        Args:
            executor: any ``concurrent.futures.Executor`` (a process pool, Dask's
                ``client.get_executor()``, submitit's): ``n_trials`` (required) is then
                the exact total over ``n_workers`` tasks, each joining the study from
                its shared storage (see :mod:`optuna_mlflow_nested.executors`).
            n_workers: tasks to submit; by default the executor's worker count where it
                can be known.

        Raises:
            ValueError: a bad argument; with ``executor``, an in-memory store, or an
                objective, callback, sampler, pruner or ``catch`` that cannot be pickled.
        """
        if getattr(self._omn_local, "optimizing", False):
            # Optuna refuses nested optimize; let it say so without touching our runs.
            return super().optimize(func, n_trials, timeout, n_jobs, catch, callbacks,
                                    gc_after_trial, show_progress_bar)
        catch = tuple(catch) if isinstance(catch, Iterable) else (catch,)
        callbacks = list(callbacks or [])  # checked, then used: a generator would be spent
        n_workers = check_optimize_args(self, func, n_trials, timeout, n_jobs, executor, n_workers,
                                        callbacks, catch)
        tracking.clients.check_tracking_uri_free(self.tracking_uri)
        if n_jobs != 1 and self.seed is not None and not self._warned_reseed:
            self._warned_reseed = True
            warnings.warn(f"n_jobs={n_jobs}: Optuna reseeds the sampler for parallel trials, so "
                          "the seed does not make this search reproducible; use n_jobs=1 for "
                          "bit-identical runs.", UserWarning, stacklevel=2)
        worker = self._worker_session is not None  # a task of an executor optimize
        ending = None
        if not worker:
            parent_run.start_search(self, n_trials=n_trials, timeout=timeout, n_jobs=n_jobs,
                                    executor=executor)
            ending = parent_run.SearchEnd(self, others_may_run=executor is None)
            self._searching.add(threading.get_ident())
        status = "FAILED"
        try:
            if executor is not None:
                optimize_with_executor(
                    self, func, n_trials=n_trials, timeout=timeout, catch=catch,
                    callbacks=callbacks, gc_after_trial=gc_after_trial,
                    show_progress_bar=show_progress_bar, executor=executor, n_workers=n_workers)
            else:
                self._optimize_here(func, n_trials, timeout, n_jobs, catch, callbacks,
                                    gc_after_trial, show_progress_bar, ending)
            status = "FINISHED"
        except KeyboardInterrupt:
            status = "KILLED"
            raise
        finally:
            if status != "FINISHED":  # a with block of Optuna's left before its exit: else
                _compat.stop_heartbeats_left_running(self)  # the process cannot exit
            if not worker:  # (short HTTP retries: MLflow's own last minutes per call)
                self._searching.discard(threading.get_ident())
                with tracking.short_http_retries(self.tracking_uri):
                    self._finish(None if self._searching else status, ending)

    def _optimize_here(self, func: ObjectiveFunc, n_trials: int | None, timeout: float | None,
                       n_jobs: int, catch: tuple[type[Exception], ...],
                       callbacks: Iterable[Callable[[optuna.Study, FrozenTrial], None]] | None,
                       gc_after_trial: bool, show_progress_bar: bool,
                       ending: parent_run.SearchEnd | None = None) -> None:
        """Optuna's optimize in this process, every trial in its child run; flushed after
        (meanwhile, ``ending`` writes the parent's summary)."""
        tracker = self._tracking
        if self.trial_runs is not None and tracker.fallback_run is None:
            # Trials without a run of their own log into the parent, not a stray run.
            tracker.fallback_run = self._client.get_run(self.parent_run_id)
        self._omn_local.optimizing = True
        with tracking.global_tracking_uri(self.tracking_uri, self.experiment_id), \
                tracking.short_http_retries(self.tracking_uri):
            tracker.start(n_jobs, n_trials)
            try:
                super().optimize(
                    ending.warm_up(tracker.wrap(func)) if ending else tracker.wrap(func), n_trials,
                    timeout=timeout, n_jobs=n_jobs, catch=catch, gc_after_trial=gc_after_trial,
                    callbacks=self._callbacks(tracker, callbacks), show_progress_bar=show_progress_bar)
            except BudgetSpent:  # an executor worker found the shared budget spent
                pass
            finally:
                self._omn_local.optimizing = False
                tracker.close_open_trials(self)
                tracker.stop(meanwhile=ending.write_summary if ending else None)
                if tracker.take_writer_lost():  # warned: rebuild the runs it had not written
                    mend_after_lost_writer(self)

    def _callbacks(self, tracker: tracking.TrialTracker,
                   callbacks: Iterable[Callable[[optuna.Study, FrozenTrial], None]] | None,
                   ) -> list[Callable[[optuna.Study, FrozenTrial], None]] | None:
        # Optuna deep-copies every trial for callbacks: none of ours when no trial has a
        # run of its own (trial_runs=K), so big searches run at Optuna's own speed.
        ours = [tracker.close_trial] if self.trial_runs is None else []
        return [*ours, *(callbacks or [])] or None

    def ask(self, fixed_distributions: dict[str, BaseDistribution] | None = None) -> optuna.Trial:
        """:meth:`optuna.Study.ask`; the trial's child run exists when this returns.

        Use :meth:`trial_run` to make it the active MLflow run until :meth:`tell`.
        """
        if self.trial_runs is not None:
            return self._new_trial(fixed_distributions)
        trial, run = self._tracking.open_new_trial(self, lambda: self._new_trial(fixed_distributions))
        if run is not None:
            self._remember_run(trial.number, run.info.run_id)
        return trial

    def _new_trial(self, fixed_distributions: dict[str, BaseDistribution] | None) -> optuna.Trial:
        if self._worker_budget is not None:
            return self._worker_budget.claim(self)
        return super().ask(fixed_distributions)

    def tell(
        self,
        trial: optuna.Trial | int,
        values: float | Sequence[float] | None = None,
        state: TrialState | None = None,
        skip_if_finished: bool = False,
    ) -> FrozenTrial:
        """:meth:`optuna.Study.tell`; the trial's child run gets its outcome and ends (the
        parent's summary: at the next ``optimize``'s end, else as the process exits)."""
        number = trial if isinstance(trial, int) else getattr(trial, "number", None)
        if not isinstance(number, int):
            return super().tell(trial, values, state, skip_if_finished)  # Optuna says what's wrong
        tracker = self._tracking
        known_run = None
        if not tracker.is_open(number):  # asked by another process or study object
            before = self._trial_by_number(number)
            if before is not None and not before.state.is_finished():
                known_run = self.run_ids().get(number)
        frozen = super().tell(trial, values, state, skip_if_finished)
        if tracker.is_open(number):
            tracker.close_trial(self, frozen)
        elif known_run is not None:
            tracker.record(self, frozen, run_id=known_run)
        ask_tell_end.search_told(self)
        return frozen

    def add_trial(self, trial: FrozenTrial) -> None:
        """:meth:`optuna.Study.add_trial`; a finished added trial gets its child run now."""
        added = _compat.add_trial(self, trial)
        if self.trial_runs is not None:
            return  # recorded in the table (and as a run if among the best) by optimize
        if added.state.is_finished():
            run_id = self._tracking.record(self, added, run_id=None)
            if run_id is not None:
                self._remember_run(added.number, run_id)
        elif added.state == TrialState.RUNNING:
            run = self._tracking.open_trial(added.number)
            if run is not None:
                self._remember_run(added.number, run.info.run_id)

    @contextlib.contextmanager
    def trial_run(self, trial: optuna.Trial) -> Iterator[Any]:
        """Make ``trial``'s child run the active MLflow run (for code between ask and tell).

        Yields the :class:`mlflow.entities.Run`, or ``None`` when the tracking server
        was away at :meth:`ask` (the run is then created when the trial is told).
        """
        with tracking.global_tracking_uri(self.tracking_uri, self.experiment_id), \
                self._tracking.activate(trial) as run:
            yield run

    # the trial -> run mapping ----------------------------------------------------
    def _remember_run(self, number: int, run_id: str) -> None:
        storage, study_id = _compat.study_storage(self)
        storage.set_study_system_attr(study_id, f"{RUN_ATTR_PREFIX}{number}", run_id)

    def run_ids(self) -> dict[int, str]:
        """Trial number -> child run id, for every trial that has a run."""
        storage, study_id = _compat.study_storage(self)
        attrs = storage.get_study_system_attrs(study_id)
        return {int(k[len(RUN_ATTR_PREFIX):]): v for k, v in attrs.items()
                if k.startswith(RUN_ATTR_PREFIX)}

    def _trial_by_number(self, number: int) -> FrozenTrial | None:
        return next((t for t in self.get_trials(deepcopy=False) if t.number == number), None)

    def child_run_id(self, trial_number: int) -> str:
        """The MLflow run id of trial ``trial_number``."""
        run_id = self.run_ids().get(trial_number)
        if run_id is not None:
            return run_id
        if self._trial_by_number(trial_number) is None:
            raise KeyError(f"no trial number {trial_number} in study {self.study_name!r}")
        raise KeyError(f"trial {trial_number} has no MLflow run (yet)")

    def child_runs(self) -> pd.DataFrame:
        """``mlflow.search_runs`` of this study's trial runs, oldest first."""
        # This study's own client: MLflow's process-wide URI may be another study's now.
        with tracking.short_http_retries(self.tracking_uri):
            return tracking.clients.search_runs_frame(
                self._client, [self.experiment_id],
                equals_clause("tags.mlflow.parentRunId", self.parent_run_id)
                + " and " + equals_clause(f"tags.`{tracking.ROLE_TAG}`", "trial"),
                order_by=["attributes.start_time ASC"],
            )

    def reconcile(self, create_missing: bool = False, orphan_age: float = 3600.0) -> int:
        """Mend MLflow from Optuna's storage: finish runs of trials that died with their
        worker and, with ``create_missing``, give each finished trial one run (a new one
        if it has none; of two, which processes racing to make it can leave, one is
        deleted). Spare runs older than ``orphan_age`` seconds (left by a dead worker)
        are ended and deleted.

        Returns:
            The number of runs written or deleted.
        """
        # trial_runs=K: runs for the K best trials (and the failed ones) only
        wanted = None if self.trial_runs is None else {
            t.number for t in runs_to_keep(self, self.trial_runs)}
        return reconcile_study(
            self._client, self, experiment_id=self.experiment_id,
            parent_run_id=self.parent_run_id, tracking_uri=self.tracking_uri,
            run_ids=self.run_ids, metric_name=self.metric_name, orphan_age=orphan_age,
            create_missing=create_missing or wanted is not None, remember=self._remember_run,
            wanted=wanted, create=None if wanted is None else functools.partial(
                self._tracking.record, self, run_id=None, lookup=False),
        )

    def wait_for_figures(self, timeout: float = 300.0) -> bool:
        """Wait until the parent run has the figures of the last ``optimize``, if due.

        ``optimize`` returns once every trial's run and the parent's summary are written;
        the figures are drawn in the writer process and land a fraction of a second later,
        also if this process exits or is killed first. None are due after a search that
        ends while another worker's search of the study runs a trial: that one draws them.

        Returns:
            ``True`` when they are logged or none are due; ``False`` if still drawn after ``timeout`` s.
        """
        pending = self._figures_pending
        if pending is not None and pending(timeout):
            self._figures_pending = pending = None
        return pending is None

    def _finish(self, status: str | None,  # status None: the summary only
                ending: parent_run.SearchEnd | None = None) -> None:
        self._tracking.warn_if_unsaved(stacklevel=4)
        ask_tell_end.search_ended(self)
        self.wait_for_figures(timeout=0)  # not waited for: the writer process draws in order
        self._figures_pending = (ending or parent_run.SearchEnd(self)).finish(status)


def __getattr__(name: str) -> Any:
    # create_study and load_study live in factories.py (they import this module).
    if name in ("create_study", "load_study"):
        from optuna_mlflow_nested import factories

        return getattr(factories, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
