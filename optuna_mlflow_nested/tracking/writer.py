"""Background delivery of run records: a bounded queue, writer threads, retries, flush.

When one record has exhausted its retry deadline the tracking server is taken to be
away: later records go straight to the spool, and one probe write every
``probe_interval`` seconds finds out when it is back. A writer thread never dies on
an exception: a record that can be neither delivered nor spooled is kept in memory
(:attr:`Writer.unsaved`) for the caller to report.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import queue
import threading
import time

from mlflow.tracking import MlflowClient

from optuna_mlflow_nested import _compat
from optuna_mlflow_nested._utils import redact_secrets
from optuna_mlflow_nested._utils import redact_uri
from optuna_mlflow_nested.tracking.delivery import RetryPolicy
from optuna_mlflow_nested.tracking.delivery import deliver
from optuna_mlflow_nested.tracking.delivery import deliver_retried
from optuna_mlflow_nested.tracking.delivery import is_retryable
from optuna_mlflow_nested.tracking.records import RunRecord
from optuna_mlflow_nested.tracking.spool import Spool

_logger = logging.getLogger(__name__)


#: Records waiting for the writer beyond which it has fallen behind the trials.
LAG_BACKLOG = 64
#: Writes before the store's rate is quoted: one write, the first on a cold connection
#: (slower), would understate it, and none gives no rate (it once said "0.0 runs/s").
RATE_SAMPLE = 8
#: Seconds after the writer's start when a lag is reported even short of RATE_SAMPLE.
SLOW_START_S = 5.0


@dataclasses.dataclass(frozen=True)
class Lag:
    """The writer has fallen behind: trials end faster than the store takes their runs."""

    backlog: int  #: records queued, not yet written
    trials_per_s: float  #: records handed to the writer per second, since it started
    #: runs the store took per second of writing (all threads); None before the first
    store_runs_per_s: float | None
    since_start_s: float  #: seconds since the writer started

    def message(self, tracking_uri: str) -> str:
        store = (f"the store writes about {self.store_runs_per_s:.1f} runs/s"
                 if self.store_runs_per_s is not None else
                 f"no run written yet, {self.since_start_s:.1f} s after the writer started")
        return (
            f"trials end faster than the tracking store {redact_uri(tracking_uri)} takes their "
            f"runs: {self.backlog} runs wait to be written, trials end at "
            f"{self.trials_per_s:.1f}/s and {store}. Nothing is lost (optimize waits for the "
            "writes before it returns), but above that rate use an `mlflow server` as "
            "tracking, or trial_runs=K (only the best K trials become runs)")


class Writer:
    """Writer threads draining a bounded queue of run records (back-pressure, not growth)."""

    def __init__(self, client: MlflowClient, threads: int, spool: Spool, retry: RetryPolicy,
                 probe_interval: float = 10.0) -> None:
        self._client = client
        self._spool = spool
        self._retry = retry
        self._probe_interval = probe_interval
        self._queue: queue.Queue[RunRecord | None] = queue.Queue(maxsize=256)
        self._in_flight: dict[int, RunRecord] = {}
        self._lock = threading.Lock()
        self._offline_since: float | None = None
        self._last_probe = 0.0
        self._stop = threading.Event()
        _compat.quiet_retried_store_errors()  # failed attempts are retried: no tracebacks
        #: Records that could be neither delivered nor spooled (the spool is unwritable).
        self.unsaved: list[RunRecord] = []
        self._started = time.monotonic()
        self._received = 0
        self._written = 0
        self._busy = 0.0  # seconds spent writing, summed over threads
        self._n_threads = max(threads, 1)
        self._threads = [
            threading.Thread(target=self._work, name=f"omn-writer-{i}", daemon=True)
            for i in range(threads)
        ]
        for thread in self._threads:
            thread.start()

    def put(self, record: RunRecord) -> None:
        """Queue ``record`` for the writer threads (blocks while the queue is full)."""
        with self._lock:
            self._received += 1
        self._queue.put(record)

    def lag(self) -> Lag | None:
        """A :class:`Lag` when ``LAG_BACKLOG`` or more records wait, else ``None``; not
        before ``RATE_SAMPLE`` writes have ended (the store's rate is then measured) unless
        ``SLOW_START_S`` seconds have passed since the writer started."""
        backlog = self._queue.qsize()
        if backlog < LAG_BACKLOG:
            return None
        with self._lock:
            elapsed = max(time.monotonic() - self._started, 1e-9)
            if self._written < RATE_SAMPLE and elapsed < SLOW_START_S:
                return None
            store_rate = self._n_threads * self._written / self._busy if self._busy > 0 else None
            return Lag(backlog=backlog, trials_per_s=self._received / elapsed,
                       store_runs_per_s=store_rate, since_start_s=elapsed)

    def write(self, record: RunRecord, lookup: bool = True) -> None:
        """Deliver ``record`` now, in the calling thread (retried, else spooled)."""
        try:
            self._write(record, lookup)
        except Exception:
            self._keep(record)

    def _should_probe(self) -> bool:
        with self._lock:
            if self._offline_since is None:
                return True
            now = time.monotonic()
            if now - self._last_probe >= self._probe_interval:
                self._last_probe = now
                return True
            return False

    def _work(self) -> None:
        while True:
            record = self._queue.get()
            try:
                if record is None:
                    return
                self._write(record)
            except BaseException as exc:  # never let a writer thread die
                _logger.warning("writing %s failed: %s", getattr(record, "run_name", "?"),
                                redact_secrets(exc))
                if record is not None:
                    self._keep(record)
            finally:
                self._queue.task_done()

    def _keep(self, record: RunRecord) -> None:
        """Spool ``record``; if even that fails, hold it in memory and say so once."""
        try:
            self._spool.append(record)
            return
        except Exception as exc:
            error = exc
        with self._lock:
            self.unsaved.append(record)
        with contextlib.suppress(Exception):  # a warnings filter "error" must not kill us
            self._spool.warn_unwritable(error)  # once, also for a tracker's two writers

    def _write(self, record: RunRecord, lookup: bool = True) -> None:
        if not self._should_probe():
            self._keep(record)
            return
        key = id(record)
        with self._lock:
            self._in_flight[key] = record
        start = time.monotonic()
        try:
            if self._offline_since is None:
                deliver_retried(self._client, record,
                                lambda attempt: self._retry.call(attempt, self._stop),
                                lookup=lookup)
            else:
                deliver(self._client, record, lookup=lookup)
            with self._lock:
                self._offline_since = None
                self._written += 1
                self._busy += time.monotonic() - start
        except Exception as exc:
            if is_retryable(exc):
                with self._lock:
                    if self._offline_since is None:
                        self._offline_since = self._last_probe = time.monotonic()
                self._keep(record)
            else:
                _logger.warning("MLflow rejected %s: %s", record.run_name, redact_secrets(exc))
        finally:
            with self._lock:
                self._in_flight.pop(key, None)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait for the queue; past ``timeout`` seconds spool what is left. True if drained."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._queue.all_tasks_done:
            while self._queue.unfinished_tasks:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    break
                self._queue.all_tasks_done.wait(left)
            else:
                return True
        # Give up on the server: spool everything queued or under way. A write still
        # under way may land later; replay is idempotent, so nothing duplicates.
        self._stop.set()
        with self._lock:
            pending = list(self._in_flight.values())
        while True:
            try:
                record = self._queue.get_nowait()
            except queue.Empty:
                break
            if record is not None:
                pending.append(record)
            self._queue.task_done()
        for record in pending:
            self._keep(record)
        return False

    def close(self, timeout: float | None = None) -> bool:
        drained = self.flush(timeout)
        for _ in self._threads:
            with contextlib.suppress(queue.Full):
                self._queue.put(None, timeout=1)
        for thread in self._threads:
            thread.join(timeout=5 if drained else 0.1)
        return drained
