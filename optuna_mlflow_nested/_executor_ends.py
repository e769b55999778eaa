"""The end of ``optimize(executor=...)`` in the calling process: what its tasks' errors
and its budget's leftovers mean for the caller (raised, or said in a warning)."""

from __future__ import annotations

import concurrent.futures
import time
from typing import Any
import warnings

from optuna.trial import TrialState

from optuna_mlflow_nested._utils import redact_secrets


def settle(study: Any, errors: list[BaseException], queued: set[int],
           deadline: float | None) -> None:
    """Raise the first task error, or warn about lost jobs or an unspent budget.

    Args:
        study: the study searched.
        errors: the tasks' exceptions, in order.
        queued: the numbers of this call's queued trials (its budget).
        deadline: the call's ``timeout`` as epoch seconds (its leftovers are expected).

    Raises:
        BaseException: the first task error, a broken engine's with what is left.
    """
    if errors and all(map(_lost_job, errors)) and not _budget_left(study, queued):
        # submitit does not run a dead job again: the other jobs ran the rest of the
        # budget, and the dead job's trial was failed.
        first = (str(errors[0]).splitlines() or [type(errors[0]).__name__])[0]
        warnings.warn(f"{len(errors)} worker task(s) of study {study.study_name!r} were lost "
                      f"({redact_secrets(first)}); their trials were failed and the other "
                      "workers ran the rest of the budget", RuntimeWarning, stacklevel=5)
    elif errors:
        raise _with_budget_left(study, errors[0], queued)
    elif deadline is None or time.time() < deadline:
        left = _budget_left(study, queued, (TrialState.WAITING,))
        if left:  # study.stop() in a worker: Optuna stops that worker's loop
            warnings.warn(
                f"{left} trial(s) of this call's budget were not run: the workers stopped "
                "before taking them (study.stop() stops the worker that calls it: in a "
                "callback, or the GridSampler's once its grid is done); they stay queued in "
                f"study {study.study_name!r}, and the next optimize runs them first, within "
                "its n_trials", RuntimeWarning, stacklevel=5)


def _lost_job(error: BaseException) -> bool:
    """Whether ``error`` is submitit's word for a job that ended without a result (killed).

    Not a broken process pool (it stopped every worker, and is unusable from then on)
    nor Dask's ``KilledWorker`` (the task itself is suspected): those are raised.
    """
    return (type(error).__name__ == "UncompletedJobError"
            and type(error).__module__.startswith("submitit"))


def _budget_left(study: Any, queued: set[int],
                 states: tuple[TrialState, ...] = (TrialState.WAITING, TrialState.RUNNING)) -> int:
    """How many trials of the budget (numbers ``queued``) are in ``states`` (unfinished)."""
    return sum(t.number in queued for t in study.get_trials(deepcopy=False, states=states))


def _with_budget_left(study: Any, error: BaseException, queued: set[int]) -> BaseException:
    """A broken engine (a pool whose worker was killed) says what is left of the budget."""
    left = _budget_left(study, queued, (TrialState.WAITING,))
    if not left:
        return error
    advice = (f"{left} trial(s) of the budget are still queued in study {study.study_name!r}: "
              f"optimize(..., n_trials={left}, executor=...) with a working executor runs "
              "exactly those")
    if isinstance(error, concurrent.futures.BrokenExecutor):
        broken = type(error)(f"{error} The worker's trial was failed and its run ended; {advice}")
        broken.__cause__ = error
        return broken
    warnings.warn(advice, RuntimeWarning, stacklevel=6)
    return error
