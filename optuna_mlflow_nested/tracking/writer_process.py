"""A writer process: child runs created and written outside the objective's interpreter.

The MLflow client's work (SQLAlchemy for a SQLite store, HTTP and JSON for a server) is
CPU-bound Python; in a thread it competes with a CPU-bound objective for the GIL. Here
it runs in one child process per Python process (started once, reused by every study),
so the trial's own cost is a hand-off: a pickled record written to a pipe.

The child (:mod:`~optuna_mlflow_nested.tracking.writer_child`) is a plain ``python -m``
subprocess (not ``multiprocessing``'s spawn, which
would re-run the user's ``__main__``); messages are pickles framed by
``multiprocessing.connection.Connection`` over two pipes. In the child, each session
(one ``optimize``) has the same :class:`~optuna_mlflow_nested.tracking.writer.Writer`
and :class:`~optuna_mlflow_nested.tracking.run_pool.RunPool` as the in-process path:
retries, spool on outage, spare runs created ahead.

Guarantees: a record whose hand-off returned is in the kernel's pipe buffer; the child
delivers (or spools) it even if the objective's process is killed right after, and
then exits when it reads the end of the pipe. Not guaranteed: a trial whose process
died before its record was handed off (``sync`` rebuilds it from Optuna's storage).
"""

from __future__ import annotations

import atexit
import builtins
import collections
from collections.abc import Callable
import contextlib
from multiprocessing.connection import Connection
import os
import subprocess
import sys
import threading
import time
from typing import Any
import uuid
import warnings

from mlflow.entities import Run

from optuna_mlflow_nested.tracking.records import RunRecord
from optuna_mlflow_nested.tracking.writer import Lag

_START_TIMEOUT = float(os.environ.get("OMN_WRITER_START_TIMEOUT", "60"))


class WriterProcess:
    """The parent's end: one child per process, shared by every session."""

    _instance: WriterProcess | None = None
    _instance_lock = threading.Lock()

    @classmethod
    def prestart(cls, tracking_uri: str) -> None:
        """Start the writer process now, without waiting for it: its imports, opening
        ``tracking_uri``'s store and loading matplotlib take seconds, which a study's
        first ``optimize`` then does not wait for."""
        with contextlib.suppress(Exception):
            process = cls.get()
            if not process._prepared:  # once: a program that makes many studies (a test
                process._prepared = True  # suite) would open every store here for nothing
                process.send("prepare", "", tracking_uri)

    @classmethod
    def get(cls) -> WriterProcess:
        """The running writer process, started on first use (or after it died)."""
        with cls._instance_lock:
            if cls._instance is None or not cls._instance.alive():
                cls._instance = cls()
            return cls._instance

    def __init__(self) -> None:
        to_child_r, to_child_w = os.pipe()
        from_child_r, from_child_w = os.pipe()
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "optuna_mlflow_nested.tracking.writer_child",
             str(to_child_r), str(from_child_w)],
            pass_fds=(to_child_r, from_child_w), stdin=subprocess.DEVNULL,
            start_new_session=True,  # a Ctrl-C to the user's process group must not kill it
        )
        os.close(to_child_r)
        os.close(from_child_w)
        self._send_conn = Connection(to_child_w, readable=False)
        self._recv_conn = Connection(from_child_r, writable=False)
        self._send_lock = threading.Lock()
        self._cond = threading.Condition()
        self._runs: dict[str, collections.deque[Run]] = {}
        self._replies: dict[str, Any] = {}
        self._lags: dict[str, Lag] = {}  # session -> the writer fell behind (reported once)
        self._closed: set[str] = set()
        self._unhealthy: set[str] = set()  # sessions whose pool cannot create runs now
        self._warnings: list[tuple[str, str]] = []  # (category name, text) from the child
        self._used = False
        self._prepared = False
        self._ready = False
        self._reader = threading.Thread(target=self._read, name="omn-writer-reader", daemon=True)
        self._reader.start()
        atexit.register(self.stop)

    def alive(self) -> bool:
        return self._proc.poll() is None and self._reader.is_alive()

    def send(self, *message: Any) -> None:
        with self._send_lock:
            if message[0] != "prepare":
                self._used = True  # from now on it may hold writes to deliver at exit
            self._send_conn.send(message)

    def _read(self) -> None:
        while True:
            try:
                kind, key, payload = self._recv_conn.recv()
            except (EOFError, OSError):
                with self._cond:
                    self._cond.notify_all()
                return
            with self._cond:
                if kind == "ready":
                    self._ready = True
                elif kind == "run":
                    if key not in self._closed:  # one pushed as the session closed: the
                        self._runs.setdefault(key, collections.deque()).append(payload)  # child deletes it
                elif kind == "lag":
                    self._lags[key] = payload
                elif kind == "warn":  # said in the child (the spool): said again here
                    self._warnings.append(payload)
                elif kind == "health":  # the child's run pool reaches the store, or not
                    (self._unhealthy.discard if payload else self._unhealthy.add)(key)
                else:  # a reply to a request
                    self._replies[key] = payload
                self._cond.notify_all()

    @property
    def ready(self) -> bool:
        """Whether the child has started (imported what it needs) and reads messages."""
        return self._ready

    def wait_ready(self, timeout: float = _START_TIMEOUT) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self._ready or not self.alive(), timeout) \
                and self._ready

    def take_run(self, session: str, timeout: float) -> Run | None:
        """A spare run of ``session``: waits up to ``timeout`` seconds while the child
        creates runs, and only briefly while it reports the store away (as
        :meth:`RunPool.take`: the trial then runs without a live run)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not self._runs.get(session):
                if session in self._unhealthy or not self.alive():
                    deadline = min(deadline, time.monotonic() + 0.5)
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._cond.wait(left)
            return self._runs[session].popleft()

    def request(self, kind: str, *args: Any, timeout: float) -> Any:
        """Send a request and wait for its reply (``None`` if none came in time)."""
        return self.reply(self.submit(kind, *args), timeout)

    def submit(self, kind: str, *args: Any) -> str:
        """Send a request; :meth:`reply` with the token returned waits for its answer."""
        token = uuid.uuid4().hex
        self.send(kind, token, *args)
        return token

    def reply(self, token: str, timeout: float) -> Any:
        """The reply to request ``token`` (``None`` if none came in time or the child died)."""
        with self._cond:
            self._cond.wait_for(lambda: token in self._replies or not self.alive(), timeout)
            return self._replies.pop(token, None)

    def lag(self, session: str) -> Lag | None:
        return self._lags.get(session)

    def has_pushed(self, session: str) -> bool:
        """Whether the child has pushed a run of ``session`` yet."""
        return session in self._runs

    def repeat_warnings(self) -> None:
        """Warn, in the calling thread, what the child warned (e.g. where the spool is),
        so that the user's warning filters and ``catch_warnings`` see it."""
        if not self._warnings:  # the per-trial case: no lock taken
            return
        with self._cond:
            said, self._warnings = self._warnings, []
        for category_name, text in said:
            category = getattr(builtins, category_name, None)
            if not (isinstance(category, type) and issubclass(category, Warning)):
                category = RuntimeWarning
            warnings.warn(text, category, stacklevel=3)

    def forget(self, session: str) -> None:
        """``session`` closes: runs the child pushes for it from now on are dropped here
        (the child deletes every run it pushed that the session did not take)."""
        with self._cond:
            self._closed.add(session)
            self._lags.pop(session, None)
            self._runs.pop(session, None)

    def stop(self) -> None:
        """Close the pipe: the child delivers what it has, then exits."""
        with contextlib.suppress(OSError):
            self._send_conn.close()
        if not self._used:  # only started ahead (a study, no optimize): nothing to deliver
            with contextlib.suppress(OSError):
                self._proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._proc.wait(timeout=float(os.environ.get("OMN_RETRY_DEADLINE", "60")) + 30)


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
        self._process = WriterProcess.get()
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
        self._spare = spare
        self._closing = False
        if not self._process.alive():
            raise RuntimeError("the writer process did not start")
        self._process.send("open", self._id, dict(
            tracking_uri=tracking_uri, experiment_id=experiment_id, parent_run_id=parent_run_id,
            study_name=study_name, spare=spare, threads=threads, spool_path=spool_path,
            retry_deadline=retry_deadline, pool_tags=pool_tags, limit=limit))
        self._ahead_thread: threading.Thread | None = None
        if self._starting():
            self._ahead_active = True
            self._ahead_thread = threading.Thread(target=self._make_ahead, daemon=True,
                                                  name="omn-runs-while-starting")
            self._ahead_thread.start()

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
                if len(self._ahead) < self._spare:
                    return True
                # Woken by a take; the timeout notices the writer process's first run.
                self._handed_lock.wait(0.05)
            return False

    def put(self, record: RunRecord) -> None:
        self._process.send("record", self._id, record)
        self._process.repeat_warnings()

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
            self._process.send("made", self._id)  # one fewer for the child to make
            return run
        run = self._process.take_run(self._id, timeout)
        if run is not None:  # the child pushes another spare and knows this one is taken
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
            self._given_back.clear()
            self._ahead.clear()
        given_back = [r.info.run_id for r in unused]
        token = self._process.submit("close", self._id, given_back)
        try:
            if meanwhile is not None:
                meanwhile()
        finally:  # also on Ctrl-C meanwhile: what the child could not deliver is known
            reply = self._process.reply(token, timeout=(timeout or self._retry_deadline) + 30)
            if reply is not None:
                self.unsaved.extend(reply[1])
        self._process.repeat_warnings()
        return reply is not None and bool(reply[0])
