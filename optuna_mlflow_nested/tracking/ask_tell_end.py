"""The end of a search made through ``ask``/``tell``: when the process exits.

``optimize`` ends its search: the parent run's summary, its figures and its status.
``ask``/``tell`` have no end, so the parent stayed RUNNING with no summary. As MLflow
ends a run left active by ``mlflow.start_run`` when the process exits, a study told
trials outside ``optimize`` since its last end gets that end then, if the study object
is still alive (one dropped earlier keeps what its last end wrote; its next
``optimize`` or ``optuna-mlflow-nested sync`` writes the summary). The status is
FINISHED, or FAILED (KILLED for Ctrl-C) when the program dies of an uncaught exception.
As with hand-started ``optimize`` workers, an end that finds another process's trial of
the study running leaves the figures to that one's end.
"""

from __future__ import annotations

import atexit
import gc
import logging
import os
import sys
import threading
import time
from typing import Any
import warnings
import weakref

from optuna_mlflow_nested._utils import redact_secrets

_logger = logging.getLogger(__name__)
_told: weakref.WeakKeyDictionary[Any, float] = weakref.WeakKeyDictionary()  # -> first tell
_lock = threading.Lock()
_registered_in: int | None = None  # the process whose exit ends them


def _forget_in_child() -> None:
    """A forked child ends only the studies it tells itself (not its parent's)."""
    global _lock
    _lock = threading.Lock()  # (another thread may have held it at the fork)
    _told.clear()


os.register_at_fork(after_in_child=_forget_in_child)


def search_told(study: Any) -> None:
    """``study`` was told a trial outside ``optimize``: end its search at exit (the first
    tell since its last end reopens the parent, as ``optimize`` does as it begins)."""
    global _registered_in
    with _lock:
        first = study not in _told
        _told.setdefault(study, time.time())
        if _registered_in != os.getpid():  # once per process (also in a forked child)
            _registered_in = os.getpid()
            # Imported now: the figures' scikit-learn imports them, and their import
            # registers an exit handler, which Python refuses once the exit has begun.
            import concurrent.futures.process
            import concurrent.futures.thread  # noqa: F401

            atexit.register(end_told_searches)
    if first:
        _reopen(study)


def _reopen(study: Any) -> None:
    from optuna_mlflow_nested.tracking.clients import set_run_status
    from optuna_mlflow_nested.tracking.clients import short_http_retries
    from optuna_mlflow_nested.tracking.delivery import wait_out_busy_store

    try:
        with short_http_retries(study.tracking_uri):
            wait_out_busy_store(lambda: set_run_status(study._client, study.parent_run_id,
                                                       "RUNNING"))
    except Exception as exc:  # a store that is away: the tell stands, the end writes later
        _logger.debug("parent run not reopened: %s", redact_secrets(exc))


def search_ended(study: Any) -> None:
    """``study``'s search was ended (by ``optimize``): nothing is left for the exit."""
    with _lock:
        _told.pop(study, None)


def end_told_searches() -> None:
    """The summary, the figures (drawn here: no writer process is started at exit) and
    the status of the parent of every live study told trials since its last end."""
    from optuna_mlflow_nested.tracking.clients import short_http_retries
    from optuna_mlflow_nested.tracking.parent import SearchEnd

    if _registered_in != os.getpid() or not _told:
        return
    gc.collect()  # studies dropped in reference cycles are not alive: no end for them
    uncaught = getattr(sys, "last_type", None)  # set when the program died of one
    status = ("KILLED" if uncaught is KeyboardInterrupt else
              "FAILED" if uncaught is not None else "FINISHED")
    while True:
        with _lock:
            study, began = _told.popitem() if _told else (None, 0.0)
        if study is None:
            return
        try:
            ending = SearchEnd(study, others_may_run=True, draw_here=True)
            ending.began = began  # another process's trial that started since: its figures
            with short_http_retries(study.tracking_uri):
                study._finish(status, ending)
        except Exception as exc:  # the next study still gets its end
            warnings.warn(f"the parent run {study.parent_run_id} of study "
                          f"{study.study_name!r} could not be ended: {redact_secrets(exc)}",
                          RuntimeWarning, stacklevel=1)
