"""``optimize(executor=...)``: trials fanned out over any ``concurrent.futures.Executor``.

Process pools, Dask's ``client.get_executor()``, submitit's executors: each task loads
the study from the shared storage and runs trials until an exact budget is spent.

The budget is a queue: the calling process enqueues ``n_trials`` empty trials
(WAITING) and workers only take those, so the total is exact whatever the number of
workers, their speed, or an engine retrying a task. The call holds its queue with a
lease (``_queue_leases``), so another executor call on the study leaves it alone.
With heartbeats (RDB storages), a worker killed mid-trial (or after its claim, before
the first heartbeat) has its trial failed and its run ended FAILED before ``optimize``
returns; its spare runs are deleted.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from collections.abc import Sequence
import contextlib
import dataclasses
import time
from typing import TYPE_CHECKING
from typing import Any
import uuid
import warnings

from filelock import FileLock
import optuna
from optuna.trial import TrialState

from optuna_mlflow_nested import _compat
from optuna_mlflow_nested import tracking
from optuna_mlflow_nested._executor_checks import resolve_workers
from optuna_mlflow_nested._executor_checks import shared_storage
from optuna_mlflow_nested._executor_ends import settle
from optuna_mlflow_nested._heartbeats import Heartbeats
from optuna_mlflow_nested._queue_leases import QueueLease
from optuna_mlflow_nested._utils import error_that_travels
from optuna_mlflow_nested._utils import quick_exit_if_submitit_job
from optuna_mlflow_nested._utils import redact_secrets
from optuna_mlflow_nested.tracking.delivery import equals_clause
from optuna_mlflow_nested.tracking.delivery import search_equal
from optuna_mlflow_nested.tracking.run_pool import PENDING_RUN_NAME

if TYPE_CHECKING:
    from optuna_mlflow_nested.study import NestedStudy

__all__ = ["BudgetSpent", "QueuedBudget", "optimize_with_executor", "run_worker"]

SESSION_TAG = "omn.session"


class BudgetSpent(Exception):
    """Raised by a worker's ``ask`` when the shared budget has no queued trial left."""


class QueuedBudget:
    """A worker's share of the budget: the queued trials' ids, each tried once in order (a
    claim costs a write or two whatever the budget), and the file lock SQLite claims take
    (read WAITING, write RUNNING is not atomic there across processes)."""

    def __init__(self, study: optuna.Study, trial_ids: Sequence[int]) -> None:
        self._ids = collections.deque(trial_ids)
        storage, _ = _compat.study_storage(study)
        path = tracking.clients.sqlite_path(_compat.rdb_url(storage) or "")
        self._lock: contextlib.AbstractContextManager[object] = (
            FileLock(f"{path}.claim.lock") if path is not None else contextlib.nullcontext())

    def claim(self, study: optuna.Study) -> optuna.Trial:
        """A queued trial for this worker, or :class:`BudgetSpent`."""
        while self._ids and not _stop_requested:  # an interrupted worker takes no more
            for attempt in range(5):
                try:
                    with self._lock:
                        trial = _compat.claim_trial(study, self._ids[0])
                    break
                except optuna.exceptions.StorageInternalError:
                    # SQLite locked by another writer (heartbeats, a worker killed mid-write):
                    # the claim was rolled back, so trying again takes no trial twice.
                    if attempt == 4:
                        raise
                    time.sleep(0.2 * (attempt + 1))
            self._ids.popleft()
            if trial is not None:
                return trial
        raise BudgetSpent(study.study_name)


@dataclasses.dataclass(frozen=True)
class WorkerSpec:
    """What a worker task needs to join the study; sent to the worker by the engine."""

    study_name: str
    storage: Any
    tracking_uri: str
    metric_name: str | Sequence[str]
    sampler: optuna.samplers.BaseSampler
    pruner: optuna.pruners.BasePruner
    func: Callable[[optuna.Trial], Any]
    catch: tuple[type[Exception], ...]
    callbacks: tuple[Callable[..., None], ...]
    gc_after_trial: bool
    deadline: float | None  # epoch seconds
    session: str
    heartbeats: Heartbeats  # those of the calling process's storage (RDB storages)
    trial_inputs: tuple[dict[str, Any], ...] = ()  # datasets every trial run logs
    queued: tuple[int, ...] = ()  # the budget: ids of the WAITING trials, in number order


_in_objective = False
_stop_requested = False  # set by SIGINT in a pool worker: take no further trial


def _interrupt_in_task(signum: int, frame: Any) -> None:
    # Only the objective is interrupted: an interrupt inside ask (the trial claimed,
    # its run being opened) or tell would leave the trial RUNNING. Elsewhere the flag
    # ends the task at its next ask.
    global _stop_requested
    _stop_requested = True
    if _in_objective:
        raise KeyboardInterrupt


def _interruptible(func: Callable[[optuna.Trial], Any]) -> Callable[[optuna.Trial], Any]:
    """``func`` with SIGINT delivered as KeyboardInterrupt while it runs (the trial fails)."""

    def objective(trial: optuna.Trial) -> Any:
        global _in_objective
        if _stop_requested:  # interrupted while this trial was being claimed
            raise KeyboardInterrupt
        _in_objective = True
        try:
            return func(trial)
        finally:
            _in_objective = False

    return objective


def worker_initializer() -> None:
    """For process pools: SIGINT interrupts a task's objective (its trial fails, its runs
    are flushed, it takes no further trial) but not an idle worker, which would die
    printing a traceback, nor Optuna's ask/tell, which would leave the trial RUNNING."""
    import signal
    import sys

    signal.signal(signal.SIGINT, _interrupt_in_task)
    default_hook = sys.unraisablehook

    def quiet_interrupt(unraisable: Any) -> None:
        # An interrupt that landed in a finalizer (a weakref callback, __del__) is
        # dropped by Python with a traceback; the stop flag still ends the task after
        # its current trial.
        if unraisable.exc_type is not KeyboardInterrupt:
            default_hook(unraisable)

    sys.unraisablehook = quiet_interrupt


def run_worker(spec: WorkerSpec, task: int = 0) -> int:
    """One executor task: join the study, run queued trials until none is left.

    Args:
        spec: what every task of one ``optimize`` shares.
        task: this task's index, unused; Dask runs equal submissions as one task.

    Returns:
        How many trials this task ran.
    """
    from optuna_mlflow_nested.tracking.tracker import in_executor_worker

    token = in_executor_worker.set(True)  # writer threads here (see uses_writer_process)
    try:
        return _run_worker(spec)
    except Exception as exc:
        if (sent := error_that_travels(exc)) is not exc:
            raise sent from None
        raise
    finally:
        in_executor_worker.reset(token)
        # optimize waits for a submitit job's process to exit: its last collections
        # took a median 0.45 s more (benchmarks/exit_time.py --submitit).
        quick_exit_if_submitit_job()


def _run_worker(spec: WorkerSpec) -> int:
    from optuna_mlflow_nested.factories import load_study

    storage = spec.storage
    url = _compat.rdb_url(storage) if not isinstance(storage, str) else storage
    if url is not None and url.startswith(("sqlite", "postgresql", "mysql")):
        storage = spec.heartbeats.storage(url)
    study = load_study(spec.study_name, storage, tracking_uri=spec.tracking_uri,
                       sampler=spec.sampler, pruner=spec.pruner, metric_name=spec.metric_name)
    study.sampler.reseed_rng()  # every worker got the same sampler state
    study._worker_session = spec.session
    study._worker_budget = QueuedBudget(study, spec.queued)
    if spec.trial_inputs:
        study._tracking.trial_inputs = list(spec.trial_inputs)
    before = len(study.get_trials(deepcopy=False))
    timeout = None if spec.deadline is None else max(0.0, spec.deadline - time.time())
    if timeout == 0.0 or _stop_requested:
        return 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.optimize(_interruptible(spec.func), timeout=timeout, catch=spec.catch,
                       callbacks=list(spec.callbacks), gc_after_trial=spec.gc_after_trial)
    return len(study.get_trials(deepcopy=False)) - before


def optimize_with_executor(
    study: NestedStudy, func: Callable[[optuna.Trial], Any], *, n_trials: int | None,
    timeout: float | None, catch: tuple[type[Exception], ...],
    callbacks: Sequence[Callable[..., None]], gc_after_trial: bool, show_progress_bar: bool,
    executor: Any, n_workers: int | None,
) -> None:
    """The body of ``NestedStudy.optimize(executor=...)``: queue the budget, submit one
    task per worker, wait, then clean up after dead workers. The arguments were checked
    before the search began (``_executor_checks.check_optimize_args``)."""
    if not n_trials:
        return
    workers = resolve_workers(executor, n_workers)
    storage, _ = _compat.study_storage(study)
    session = uuid.uuid4().hex
    lease = QueueLease(study, session)  # (another call's queue is not this one's budget)
    try:
        _queue_and_run(study, func, n_trials, timeout, catch, callbacks, gc_after_trial,
                       show_progress_bar, executor, workers, storage, session, lease)
    finally:
        lease.release()


def _queue_and_run(study: NestedStudy, func: Callable[[optuna.Trial], Any], n_trials: int,
                   timeout: float | None, catch: tuple[type[Exception], ...],
                   callbacks: Sequence[Callable[..., None]], gc_after_trial: bool,
                   show_progress_bar: bool, executor: Any, workers: int,
                   storage: optuna.storages.BaseStorage, session: str,
                   lease: QueueLease) -> None:
    # Queued trials (enqueue_trial, a timeout's leftovers) count in the budget, oldest
    # first, as in Optuna: the rest wait for the next call.
    held = lease.held_by_others()
    waiting = [t for t in study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
               if t.number not in held][:n_trials]
    # Bare WAITING trials (not enqueue_trial({}), whose empty fixed params the
    # GridSampler refuses): the sampler picks their params when a worker takes them.
    waiting += _compat.add_waiting_trials(study, max(0, n_trials - len(waiting)))
    waiting = lease.hold_settled(study, waiting)
    queued = {t.number for t in waiting}
    spec = WorkerSpec(
        study_name=study.study_name, storage=shared_storage(storage, executor),
        tracking_uri=study.tracking_uri,
        metric_name=study.metric_name, sampler=study.sampler, pruner=study.pruner, func=func,
        catch=catch, callbacks=tuple(callbacks), gc_after_trial=gc_after_trial,
        deadline=None if timeout is None else time.time() + timeout, session=session,
        trial_inputs=tuple(study._tracking.trial_inputs or ()),
        queued=tuple(_compat.trial_id(t) for t in waiting),  # in number order
        heartbeats=Heartbeats.of(storage),
    )
    already = len(study.get_trials(deepcopy=False, states=_FINISHED))
    futures = [executor.submit(run_worker, spec, task) for task in range(min(workers, n_trials) or 1)]
    try:
        errors = _wait(study, futures, n_trials, already if show_progress_bar else None,
                       lease.renew)
    except KeyboardInterrupt:
        # The tasks were interrupted too: let them fail their trials and flush, then
        # end the spare runs they leave behind.
        deadline = time.monotonic() + 60
        with contextlib.suppress(KeyboardInterrupt):
            while not all(f.done() for f in futures) and time.monotonic() < deadline:
                time.sleep(0.1)
        _end_spare_runs(study, spec.session)
        raise
    if _fail_stale_trials(study, queued, spec.heartbeats):
        study.reconcile(create_missing=True)  # those trials died before their run was known
    _end_spare_runs(study, spec.session)
    settle(study, errors, queued, spec.deadline)


def _wait(study: NestedStudy, futures: list[Any], n_trials: int,
          progress_from: int | None, tick: Callable[[], None]) -> list[BaseException]:
    """Wait for every task (any future with done()/result()); their exceptions, in order.
    With ``progress_from`` (finished trials before), a progress bar; ``tick`` is called
    while waiting."""
    bar = None
    start = progress_from or 0
    if progress_from is not None:
        from tqdm.auto import tqdm

        bar = tqdm(total=n_trials, desc="trials", unit="trial")
    try:
        while not all(f.done() for f in futures):
            tick()
            if bar is not None:
                finished = len(study.get_trials(deepcopy=False, states=_FINISHED))
                bar.update(max(0, min(n_trials, finished - start) - bar.n))
            time.sleep(0.2)
    finally:
        if bar is not None:
            bar.close()
    errors: list[BaseException] = []
    for future in futures:
        try:
            future.result()
        except BaseException as exc:  # a worker's objective error, or the engine's
            errors.append(exc)
    return errors


_FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


def _fail_stale_trials(study: NestedStudy, budget: set[int], heartbeats: Heartbeats) -> int:
    """Fail trials of workers that died mid-trial (heartbeats, RDB storages only).

    Every task has ended, so a trial of ``budget`` (numbers) still RUNNING died with its
    worker: it is waited for until Optuna's ``fail_stale_trials`` fails it. One that
    never recorded a heartbeat after the whole grace period died between its claim and
    its first heartbeat (a pool terminating its workers): ``fail_stale_trials`` never
    fails it, so it is failed here. Trials outside the budget (another process's, an
    ``ask`` not told yet) are not waited for. Returns how many such trials were failed.
    """
    storage, _ = _compat.study_storage(study)
    url = _compat.rdb_url(storage)

    def running() -> set[int]:
        return budget & {t.number for t in study.get_trials(deepcopy=False,
                                                            states=(TrialState.RUNNING,))}

    if url is None or not running():
        return 0
    deadline = time.monotonic() + heartbeats.grace + 2 * heartbeats.interval + 5
    watched = optuna.load_study(study_name=study.study_name, storage=heartbeats.storage(url))
    silent = _compat.running_trials_without_heartbeat(watched) & budget
    while running():
        # A worker killed inside a write can hold SQLite's lock a while: try again.
        with contextlib.suppress(optuna.exceptions.StorageInternalError):
            optuna.storages.fail_stale_trials(watched)
        if time.monotonic() > deadline:
            break
        time.sleep(min(1.0, heartbeats.interval))
    orphans = silent & _compat.running_trials_without_heartbeat(watched)
    for number in sorted(orphans):
        watched.tell(number, state=TrialState.FAIL, skip_if_finished=True)
    return len(orphans)


def _end_spare_runs(study: NestedStudy, session: str) -> None:
    """Spare runs made by this session's workers are unused now: end and delete them."""
    client = tracking.get_client(study.tracking_uri)
    try:
        spares = search_equal(client, [study.experiment_id], {SESSION_TAG: session},
                              equals_clause("attributes.run_name", PENDING_RUN_NAME))
        used = set(study.run_ids().values())  # a dead worker's trial run: reconcile ends it
        for run in (r for r in spares if r.info.run_id not in used):
            tracking.set_run_status(client, run.info.run_id, "KILLED")
            client.delete_run(run.info.run_id)
    except Exception as exc:
        warnings.warn(f"could not delete spare runs of dead workers: {redact_secrets(exc)}",
                      RuntimeWarning, stacklevel=5)
