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
If the writer process itself dies (the OOM killer), the search goes on with writer
threads and rebuilds what it had not written from Optuna's storage (see
:mod:`~optuna_mlflow_nested.tracking.process_session`).
"""

from __future__ import annotations

import atexit
import builtins
import collections
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
        self._spares: dict[str, set[str]] = {}  # session -> runs it made, not taken yet
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

    @property
    def pid(self) -> int:
        return self._proc.pid

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
                elif kind == "spare":  # made (pushed later): if it dies, it is known here
                    self._spares.setdefault(key, set()).add(payload)  # also once forgotten
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
            run: Run = self._runs[session].popleft()
            self._spares.get(session, set()).discard(run.info.run_id)
            return run

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

    def spares_left(self, session: str) -> set[str]:
        """The ids of the runs the child made for ``session`` that it did not take,
        pushed or not (asked once: when the session closed, or the child died).

        A dead child's messages are all read first (its pipe's end comes soon after).
        """
        if not self.alive():
            self._reader.join(timeout=5)
        with self._cond:
            return self._spares.pop(session, set())

    def stop(self) -> None:
        """Close the pipe: the child delivers what it has, then exits."""
        with contextlib.suppress(OSError):
            self._send_conn.close()
        if not self._used:  # only started ahead (a study, no optimize): nothing to deliver
            with contextlib.suppress(OSError):
                self._proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._proc.wait(timeout=float(os.environ.get("OMN_RETRY_DEADLINE", "60")) + 30)
