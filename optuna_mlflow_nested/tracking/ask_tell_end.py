"""The end of a search made through ``ask``/``tell``: when the process exits.

``optimize`` ends its search: the parent run's summary, its figures and FINISHED.
``ask``/``tell`` have no end, so the parent stayed RUNNING with no summary. As MLflow
ends a run left active by ``mlflow.start_run`` when the process exits, a study told
trials outside ``optimize`` since its last end gets that end then, if the study object
is still alive (one dropped earlier keeps what its last end wrote; its next
``optimize`` or ``optuna-mlflow-nested sync`` writes the summary).
"""

from __future__ import annotations

import atexit
import gc
import os
import threading
from typing import Any
import warnings
import weakref

from optuna_mlflow_nested._utils import redact_secrets

_told: weakref.WeakSet[Any] = weakref.WeakSet()
_lock = threading.Lock()
_registered_in: int | None = None  # the process whose exit ends them


def search_told(study: Any) -> None:
    """``study`` was told a trial outside ``optimize``: end its search at exit."""
    global _registered_in
    with _lock:
        _told.add(study)
        if _registered_in != os.getpid():  # once per process (also in a forked child)
            _registered_in = os.getpid()
            atexit.register(end_told_searches)


def search_ended(study: Any) -> None:
    """``study``'s search was ended (by ``optimize``): nothing is left for the exit."""
    _told.discard(study)


def end_told_searches() -> None:
    """The summary, the figures (drawn here: no writer process is started at exit) and
    FINISHED on the parent of every live study told trials since its last end."""
    from optuna_mlflow_nested.tracking.clients import short_http_retries
    from optuna_mlflow_nested.tracking.parent import SearchEnd

    if _registered_in != os.getpid() or not _told:  # a forked child: its parent ends them
        return
    gc.collect()  # studies dropped in reference cycles are not alive: no end for them
    while True:
        with _lock:
            study = _told.pop() if _told else None
        if study is None:
            return
        try:
            with short_http_retries(study.tracking_uri):
                study._finish("FINISHED", SearchEnd(study, draw_here=True))
        except Exception as exc:  # the next study still gets its end
            warnings.warn(f"the parent run {study.parent_run_id} of study "
                          f"{study.study_name!r} could not be ended: {redact_secrets(exc)}",
                          RuntimeWarning, stacklevel=1)
