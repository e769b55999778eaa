"""The tracker's side of a writer process session (one ``optimize``), and when to use one.

A :class:`ProcessSession` hands each trial's record to the shared
:class:`~optuna_mlflow_nested.tracking.writer_process.WriterProcess` and takes the runs it
makes ahead. While a fresh writer process starts, runs are made ahead here instead; if it
dies mid-search, :class:`WriterProcessLost` tells the tracker to go on with threads.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
import contextlib
import contextvars
import os
import threading
import uuid

from mlflow.entities import Run

from optuna_mlflow_nested.tracking.records import RunRecord
from optuna_mlflow_nested.tracking.writer import Lag
from optuna_mlflow_nested.tracking.writer_process import WriterProcess

#: True while this thread runs an executor worker's task (see executors.run_worker).
in_executor_worker: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "omn_in_executor_worker", default=False)


def uses_writer_process() -> bool:
    """Whether ``optimize`` writes through the writer process rather than writer threads.

    ``OMN_WRITER=process`` or ``threads`` decides; by default (``auto``) the calling
    process uses the writer process, and executor workers use threads: they run one per
    core, so a writer process each would add a process per busy core and its start-up
    (``benchmarks/RESULTS.md``: 2 workers on 2 cores, 1.50x against 1.83x with threads).
    """
    mode = os.environ.get("OMN_WRITER", "auto")
    if mode in ("process", "threads"):
        return mode == "process"
    return not in_executor_worker.get()


def prepare_writer(tracking_uri: str) -> None:
    """Start the writer process ahead, if it is in use (its imports take seconds)."""
    if uses_writer_process():
        from optuna_mlflow_nested.tracking.writer_process import WriterProcess

        WriterProcess.prestart(tracking_uri)


class WriterProcessLost(RuntimeError):
    """The writer process died under a session (killed: the OOM killer, a ``pkill``).

    The tracker then writes the rest of the session from threads in the calling
    process; the records the writer process had not delivered are rebuilt from Optuna's
    storage at the session's end (see ``TrialTracker.take_writer_lost``). If it died as
    the session opened, the whole search writes from threads.
    """


class ProcessSession:
    """One ``optimize``'s writer and run pool, living in the writer process.

    The same calls as the in-process writer and pool: :meth:`put`, :meth:`take`,
    :meth:`flush`, :meth:`close`.
    """

    def __init__(self, *, tracking_uri: str, experiment_id: str, parent_run_id: str,
                 study_name: str, spare: int, threads: int, spool_path: str,
                 retry_deadline: float, pool_tags: dict[str, str] | None,
                 create_run: Callable[[], Run | None], limit: int | None = None) -> None:
        """``create_run`` makes a trial's run in this process while the writer process
        is still starting (its imports take seconds in a fresh process), so that the
        first trials do not wait for it. A thread makes up to ``spare`` of those runs
        ahead, so a trial takes one ready-made instead of making it on its own path;
        the thread stops once the writer process has made this session's first run.
        The trials' records are handed off all the same; the writer process reads them
        once it is up. ``limit``: the most runs the session needs (``n_trials``): past
        it, :meth:`take` gives none (see :attr:`exhausted`)."""
        self._process = WriterProcess.get()  # (started anew if it died since last used)
        self._id = uuid.uuid4().hex
        self._retry_deadline = retry_deadline
        self._create_run = create_run
        self.unsaved: list[RunRecord] = []
        self._given_back: collections.deque[Run] = collections.deque()  # see put_back
        self._limit = limit
        self._handed = 0  # runs taken from the child or made here
        self._handed_lock = threading.Condition()  # n_jobs > 1: trials take runs in threads
        self._ahead: collections.deque[Run] = collections.deque()  # made here while starting
        self._ahead_active = False  # while the thread below keeps runs ready
        self._waiting = 0  # trials waiting for the run it is making
        self.spare = spare  # runs kept ready for the trials
        self._closing = False
        # It may die between get() and the open: nothing of this session is lost yet.
        if not self._process.alive():
            raise self._lost("died as the search began")
        try:
            self._process.send("open", self._id, dict(
                tracking_uri=tracking_uri, experiment_id=experiment_id,
                parent_run_id=parent_run_id, study_name=study_name, spare=spare,
                threads=threads, spool_path=spool_path, retry_deadline=retry_deadline,
                pool_tags=pool_tags, limit=limit))
        except OSError as exc:
            raise self._lost("died as the search began") from exc
        self._ahead_thread: threading.Thread | None = None
        if self._starting():
            self._ahead_active = True
            self._ahead_thread = threading.Thread(target=self._make_ahead, daemon=True,
                                                  name="omn-runs-while-starting")
            self._ahead_thread.start()

    def _lost(self, what: str = "died") -> WriterProcessLost:
        return WriterProcessLost(f"the writer process (pid {self.pid}) {what}")

    def _starting(self) -> bool:
        return not self._process.ready and self._process.alive()

    def _child_pool_starting(self) -> bool:
        # Ready comes before the child has opened the store and made this session's
        # first run, which takes a while in a fresh process.
        return self._process.alive() and not self._process.has_pushed(self._id)

    def _make_ahead(self) -> None:
        """While the writer process starts: keep up to ``spare`` runs ready here."""
        try:
            while self._room_ahead():
                run = self._create_run()
                if run is None:
                    return  # the store is away: trials make (or go without) their runs
                with self._handed_lock:
                    self._ahead.append(run)  # first: a trial or close() has it whatever follows
                    self._handed_lock.notify_all()
                with contextlib.suppress(OSError):  # the writer process died: take() says so
                    self._process.send("made", self._id)  # one fewer for the child to make
        finally:
            with self._handed_lock:
                self._ahead_active = False
                self._handed_lock.notify_all()

    def _room_ahead(self) -> bool:
        """Waits until another run is wanted ahead (``True``) or none will be."""
        with self._handed_lock:
            while not self._closing and self._child_pool_starting():
                given = self._handed - self._waiting  # a waiting trial still needs one
                if self._limit is not None and given + len(self._ahead) >= self._limit:
                    return False  # the budget has every run it needs
                if len(self._ahead) < self.spare:
                    return True
                # Woken by a take; the timeout notices the writer process's first run.
                self._handed_lock.wait(0.05)
            return False

    def put(self, record: RunRecord) -> None:
        """Hand ``record`` to the writer process.

        Raises:
            WriterProcessLost: it died; ``record`` was not handed off.
        """
        try:
            self._process.send("record", self._id, record)
        except OSError as exc:  # the pipe's reader is gone
            raise self._lost() from exc
        self._process.repeat_warnings()

    @property
    def pid(self) -> int:
        return self._process.pid

    @property
    def budget_left(self) -> int | None:
        """Runs of the ``limit`` not handed out yet (``None``: no limit)."""
        with self._handed_lock:  # a run given back is the budget's again
            if self._limit is None:
                return None
            return max(0, self._limit - self._handed + len(self._given_back))

    def abandon(self) -> list[str]:
        """The writer process died: stop making runs here, and return the ids of the
        runs no trial took (given back, made ahead here, made by the writer process:
        it said so as it made each), for the caller to delete."""
        self._process.forget(self._id)
        made_there = self._process.spares_left(self._id)
        with self._handed_lock:
            self._closing = True
            self._handed_lock.notify_all()
        if self._ahead_thread is not None:
            self._ahead_thread.join(self._retry_deadline)
        with self._handed_lock:
            unused = {r.info.run_id for r in (*self._given_back, *self._ahead)} | made_there
            self._given_back.clear()
            self._ahead.clear()
        return sorted(unused)

    def lag(self) -> Lag | None:
        """The writer process's report that this session's writes fell behind, if any."""
        return self._process.lag(self._id)

    def take(self, timeout: float) -> Run | None:
        with contextlib.suppress(IndexError):
            return self._given_back.popleft()
        with self._handed_lock:
            if self.exhausted:
                return None  # past the budget: TrialTracker.take_run makes the run
            self._handed += 1  # counted now: a thread that comes later sees it
            if self._ahead_active and not self._ahead:  # one is on its way
                self._waiting += 1
                try:
                    self._handed_lock.wait_for(lambda: self._ahead or not self._ahead_active,
                                               timeout)
                finally:
                    self._waiting -= 1
            if self._ahead:
                self._handed_lock.notify_all()  # room for the next one
                return self._ahead.popleft()
            starting = self._starting()
        if starting:
            run = self._create_run()
            with contextlib.suppress(OSError):  # it died: the next take or put says so
                self._process.send("made", self._id)  # one fewer for the child to make
            return run
        run = self._process.take_run(self._id, timeout)
        if run is None and not self._process.alive():
            with self._handed_lock:
                self._handed -= 1  # not handed: the budget left is the tracker's now
            raise self._lost()
        if run is not None:  # the child pushes another spare and knows this one is taken
            with contextlib.suppress(OSError):  # died since: this run is the trial's
                self._process.send("took", self._id, run.info.run_id)
        return run

    @property
    def exhausted(self) -> bool:
        """Whether every run of the ``limit`` was handed out (as :attr:`RunPool.exhausted`)."""
        return self._limit is not None and self._handed >= self._limit

    def put_back(self, run: Run) -> None:
        """A run :meth:`take` gave that no trial got: the next trial takes it first."""
        self._given_back.appendleft(run)

    def flush(self, timeout: float | None = None) -> bool:
        reply = self._process.request("flush", self._id, timeout=timeout or 1e9)
        return reply is not None and bool(reply)

    def close(self, timeout: float | None = None,
              meanwhile: Callable[[], None] | None = None) -> bool:
        """Deliver the session's records and end it; ``meanwhile`` runs here while the
        child delivers."""
        self._process.forget(self._id)
        with self._handed_lock:
            self._closing = True
            self._handed_lock.notify_all()
        if self._ahead_thread is not None:  # ends after the run it may be making
            self._ahead_thread.join(timeout or self._retry_deadline)
        with self._handed_lock:  # taken, yet no trial's; or made ahead, not taken
            unused = [*self._given_back, *self._ahead]
        given_back = [r.info.run_id for r in unused]
        try:
            token = self._process.submit("close", self._id, given_back)
        except OSError as exc:  # died: abandon() has the runs to delete
            raise self._lost() from exc
        with self._handed_lock:  # the child deletes them now
            self._given_back.clear()
            self._ahead.clear()
        try:
            if meanwhile is not None:
                meanwhile()
        finally:  # also on Ctrl-C meanwhile: what the child could not deliver is known
            reply = self._process.reply(token, timeout=(timeout or self._retry_deadline) + 30)
            if reply is not None:
                self.unsaved.extend(reply[1])
        self._process.repeat_warnings()
        if reply is None and not self._process.alive():
            # Died while delivering: which records landed is not known here.
            self._given_back.extend(unused)  # it may not have deleted them
            raise self._lost()
        self._process.spares_left(self._id)  # the child deleted those no trial took
        return reply is not None and bool(reply[0])
