"""Once-per-process costs of the end of a search, paid while its trials run."""

from __future__ import annotations

import contextlib
import threading
from typing import Any

from mlflow.tracking import MlflowClient

from optuna_mlflow_nested.tracking.reconcile import running_children

#: Tracking URIs whose end-of-search reads this process has made.
_warmed_up: set[str] = set()
_lock = threading.Lock()


def start_end_reads(client: MlflowClient, study: Any, begin: threading.Event,
                    skip: threading.Event) -> threading.Thread | None:
    """Make the reads of a search's end once, in a background thread, while it runs.

    A process's first ``get_run``, metric history and run search on a database store
    cost more than their later calls (SQLAlchemy compiles each statement once per
    engine), and pandas sets up its string arrays on first use: paid at the end of a
    fresh program's first search, they made it slower than a later one
    (``benchmarks/RESULTS.md``). The thread only reads, once per tracking URI and
    process; the end joins it before its first step, so it never runs on after
    ``optimize``. It waits for ``begin``, set as the first objective starts, so that
    it does not compete for the GIL with the search's own start. ``skip``, set before
    ``begin``, ends it without reading.

    Returns:
        The thread, or ``None`` if this process has made those reads already.
    """
    uri = study.tracking_uri
    with _lock:
        if uri in _warmed_up:
            return None
        _warmed_up.add(uri)
    # A server compiles its own statements, and a call to one that is away would wait
    # out its retries while the end joins this thread: pandas only.
    over_http = uri.startswith(("http:", "https:"))

    def reads() -> None:
        begin.wait()
        if skip.is_set():
            with _lock:
                _warmed_up.discard(uri)
            return
        with contextlib.suppress(Exception):  # only a head start: the end reads again
            end_reads(client, study, store=not over_http)

    thread = threading.Thread(target=reads, name="omn-warm-up-end", daemon=True)
    thread.start()
    return thread


def end_reads(client: MlflowClient, study: Any, *, store: bool = True) -> int:
    """The reads of a search's end, once (``store=False``: pandas only).

    Returns:
        The number of the parent's RUNNING child runs (reconcile's own query).

    Raises:
        MlflowException: the store cannot be read.
    """
    import pandas as pd

    pd.MultiIndex.from_tuples([("params", "x")])  # trials_dataframe's column index
    if not store:
        return 0
    client.get_run(study.parent_run_id)
    client.get_metric_history(study.parent_run_id, "best_value")
    return len(running_children(client, study.experiment_id, study.parent_run_id))
