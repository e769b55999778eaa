"""Child runs created ahead of the trials, so opening a trial's run is a queue pop."""

from __future__ import annotations

import collections
from collections.abc import Callable
import functools
import logging
import threading
import time

from mlflow.entities import Run
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from optuna_mlflow_nested import _compat
from optuna_mlflow_nested._utils import redact_secrets
from optuna_mlflow_nested.tracking.clients import discard_runs
from optuna_mlflow_nested.tracking.records import ROLE_TAG
from optuna_mlflow_nested.tracking.records import STUDY_TAG

_logger = logging.getLogger(__name__)

#: The name of a spare run until its trial's record renames it ``trial-<n>``.
PENDING_RUN_NAME = "trial-pending"


def create_pending_run(client: MlflowClient, experiment_id: str, parent_run_id: str,
                       study_name: str, tags: dict[str, str] | None = None) -> Run:
    """A child run for a trial not known yet (named :data:`PENDING_RUN_NAME` until the
    trial's record renames it)."""
    return client.create_run(
        experiment_id, run_name=PENDING_RUN_NAME,
        tags={MLFLOW_PARENT_RUN_ID: parent_run_id, STUDY_TAG: study_name, ROLE_TAG: "trial",
              **(tags or {})})


class RunPool:
    """Background threads keep ``spare`` fresh child runs ready for the next trials.

    ``limit``: the most runs it creates in all (``optimize``'s ``n_trials``), so that a
    search whose budget is known leaves no spare run to end and delete at its close.
    """

    def __init__(self, client: MlflowClient, experiment_id: str, parent_run_id: str,
                 study_name: str, spare: int, threads: int,
                 tags: dict[str, str] | None = None, limit: int | None = None,
                 start: bool = True, on_made: Callable[[Run], None] | None = None) -> None:
        self._client = client
        self._new_run = functools.partial(create_pending_run, client, experiment_id,
                                          parent_run_id, study_name, tags)
        self._spare = spare
        self._on_made = on_made  # told of each run as it is made (before any take)
        self._left = limit  # runs it may still create (None: no limit)
        _compat.quiet_retried_store_errors()  # a failed creation is tried again
        self._ready: collections.deque[Run] = collections.deque()
        self._waiting: collections.deque[object] = collections.deque()
        self._creating = 0
        self.healthy = True
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._fill, name=f"omn-runpool-{i}", daemon=True)
            for i in range(threads)
        ]
        self._started = False
        if start:
            self.start()

    def start(self) -> None:
        """Start creating runs (at once unless made with ``start=False``)."""
        if not self._started:
            self._started = True
            for thread in self._threads:
                thread.start()

    def _fill(self) -> None:
        while True:
            with self._cond:
                while ((len(self._ready) + self._creating >= self._spare or self._left == 0)
                       and not self._stop.is_set()):
                    self._cond.wait()
                if self._stop.is_set():
                    return
                self._creating += 1
                if self._left is not None:
                    self._left -= 1
            run: Run | None
            try:
                run = self._new_run()
            except Exception as exc:
                _logger.debug("creating a spare run failed: %s", redact_secrets(exc))
                run = None
            if run is not None and self._on_made is not None:
                self._on_made(run)  # must not raise (the writer process's send does not)
            with self._cond:
                self._creating -= 1
                self.healthy = run is not None
                if run is not None:
                    self._ready.append(run)
                elif self._left is not None:
                    self._left += 1  # tried again
                self._cond.notify_all()
            if run is None:
                self._stop.wait(1.0)

    @property
    def exhausted(self) -> bool:
        """Whether every run of the ``limit`` was made and taken: no run will come."""
        with self._cond:  # reentrant: take() asks while it holds it
            return self._left == 0 and not self._ready and not self._creating

    def lower_limit(self, made_elsewhere: int) -> None:
        """``made_elsewhere`` runs of the budget were created without the pool."""
        with self._cond:
            if self._left is not None:
                self._left = max(0, self._left - made_elsewhere)
            self._cond.notify_all()

    def take(self, timeout: float) -> Run | None:
        """A fresh run, or ``None`` if none could be had in time (or the pool is
        :attr:`exhausted`).

        Waits up to ``timeout`` seconds while run creation works, and only briefly
        while the tracking server is away (the trial then runs without a live run and
        its record creates the run later, or goes to the spool).
        """
        deadline = time.monotonic() + timeout
        ticket = object()  # first come, first served: trials start in the order they asked
        with self._cond:
            self._waiting.append(ticket)
            try:
                while not (self._ready and self._waiting[0] is ticket):
                    if self._stop.is_set() or self.exhausted:
                        return None  # closed or exhausted: no run will come
                    if not self.healthy:
                        deadline = min(deadline, time.monotonic() + 0.5)
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return None
                    self._cond.wait(left)
                return self._ready.popleft()
            finally:
                self._waiting.remove(ticket)
                self._cond.notify_all()

    def put_back(self, run: Run) -> None:
        """A run :meth:`take` gave that no trial got: the next trial takes it first."""
        with self._cond:
            self._ready.appendleft(run)
            self._cond.notify_all()

    def close(self) -> None:
        """Stop creating runs and delete the spare ones nobody took."""
        with self._cond:
            self._stop.set()
            self._cond.notify_all()
        for thread in self._threads if self._started else ():
            thread.join(timeout=5)
        with self._cond:
            leftovers, self._ready = list(self._ready), collections.deque()
        discard_runs(self._client, [run.info.run_id for run in leftovers])
