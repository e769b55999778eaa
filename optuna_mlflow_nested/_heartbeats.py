"""Heartbeat settings of executor workers on RDB storages; the trials a live process may hold."""

from __future__ import annotations

from collections.abc import Callable
import dataclasses
import datetime
import inspect
import os
from typing import Any
import warnings

import optuna
from optuna.trial import FrozenTrial
from optuna.trial import TrialState

from optuna_mlflow_nested import _compat

#: Optuna 4.9 renamed ``failed_trial_callback`` (deprecated since, gone in Optuna 6).
_CALLBACK_ARGUMENT = ("heartbeat_stale_trial_callback" if "heartbeat_stale_trial_callback"
                      in inspect.signature(optuna.storages.RDBStorage).parameters
                      else "failed_trial_callback")


@dataclasses.dataclass(frozen=True)
class Heartbeats:
    """Executor workers' heartbeat settings on RDB storages: those of the user's own
    ``RDBStorage`` where it has heartbeats (every process of a study must agree: each
    fails the others' trials whose heartbeat is older than its own grace period), else
    ``OMN_HEARTBEAT_INTERVAL`` (5 s) and ``OMN_GRACE_PERIOD`` (4 intervals)."""

    interval: int
    grace: int
    stale_trial_callback: Callable[..., None] | None = None

    @classmethod
    def of(cls, storage: Any) -> Heartbeats:
        backend = _compat.rdb_storage(storage)
        if backend is not None and backend.heartbeat_interval:
            interval = backend.heartbeat_interval
            callback = (getattr(backend, "heartbeat_stale_trial_callback", None)  # Optuna 4.9+
                        or getattr(backend, "failed_trial_callback", None))  # (gone in 6)
            return cls(interval, backend.grace_period or 2 * interval,  # (Optuna's default)
                       callback)
        interval = int(os.environ.get("OMN_HEARTBEAT_INTERVAL", "5"))
        return cls(interval, int(os.environ.get("OMN_GRACE_PERIOD", str(4 * interval))))

    def storage(self, url: str) -> optuna.storages.RDBStorage:
        callback: dict[str, Any] = {_CALLBACK_ARGUMENT: self.stale_trial_callback}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(
                url, heartbeat_interval=self.interval, grace_period=self.grace,
                **callback)


def held_trials(study: optuna.Study, grace_period: float) -> list[FrozenTrial]:
    """The study's RUNNING trials that a live process may hold: all but those without a
    heartbeat ever that began over ``grace_period`` seconds ago, whose worker was killed
    between making one and its first heartbeat (Optuna's ``fail_stale_trials`` never
    fails them; see README). On a storage without heartbeats: every RUNNING trial."""
    silent = _compat.running_trials_without_heartbeat(study)
    began_before = datetime.datetime.now() - datetime.timedelta(seconds=grace_period)
    return [t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
            if t.number not in silent or t.datetime_start is None
            or t.datetime_start > began_before]
