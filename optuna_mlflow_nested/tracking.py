"""Trial events to MLflow writes: the only module that writes trial data to MLflow.

Design, in short:

* Child runs are created *ahead* of the trials by background threads (a small pool
  of spare runs), so opening a trial's run costs a queue pop, not a round trip.
* The run is pushed onto MLflow's thread-local active-run stack of the thread that
  runs the objective, so the objective's own ``mlflow.log_*`` calls land in it, also
  in Optuna's worker threads (``n_jobs > 1``).
* When a trial ends, everything Optuna knows about it (params, values, intermediate
  values, tags, state, name, end time) goes to a bounded queue; writer threads turn
  it into one ``log_batch`` and one ``update_run_info`` per run, with retries and
  backoff. ``flush()`` waits for the queue; writes that cannot be delivered are
  appended to a local spool file (mode 0600) that ``optuna-mlflow-nested sync``
  replays.
* Spare runs that were never used are deleted when the tracker stops.
"""

from __future__ import annotations

import atexit
import collections
from collections.abc import Callable
from collections.abc import Sequence
import contextlib
import dataclasses
import fcntl
import functools
import io
import json
import logging
import math
import os
from pathlib import Path
import queue
import random
import threading
import time
import traceback
from typing import Any
import warnings
import weakref

import mlflow
from mlflow.entities import Metric
from mlflow.entities import Param
from mlflow.entities import Run
from mlflow.entities import RunStatus
from mlflow.entities import RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.tracking import fluent as _fluent
from mlflow.tracking._tracking_service import utils as _tracking_utils
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID
from mlflow.utils.mlflow_tags import MLFLOW_RUN_NAME
from mlflow.utils.validation import MAX_METRICS_PER_BATCH
from mlflow.utils.validation import MAX_PARAMS_TAGS_PER_BATCH
import optuna
from optuna.trial import FrozenTrial
from optuna.trial import TrialState

from optuna_mlflow_nested._utils import param_value
from optuna_mlflow_nested._utils import redact_secrets
from optuna_mlflow_nested._utils import redact_uri
from optuna_mlflow_nested._utils import safe_key
from optuna_mlflow_nested._utils import safe_mapping
from optuna_mlflow_nested._utils import tag_value

_logger = logging.getLogger(__name__)

RUN_ID_ATTRIBUTE_KEY = "mlflow_run_id"
STUDY_TAG = "optuna.study_name"
TRIAL_NUMBER_TAG = "optuna.trial_number"
ROLE_TAG = "optuna.role"

_STATUS = {
    TrialState.COMPLETE: "FINISHED",
    TrialState.PRUNED: "KILLED",
    TrialState.FAIL: "FAILED",
}
_NON_RETRYABLE = {"INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST", "RESOURCE_ALREADY_EXISTS"}


# --------------------------------------------------------------------------- clients


_client_lock = threading.Lock()
_clients: dict[str, MlflowClient] = {}


def _sqlite_path(uri: str) -> Path | None:
    if not uri.startswith("sqlite:///"):
        return None
    path = uri[len("sqlite:///") :]
    return None if path in ("", ":memory:") else Path(path)


def get_client(tracking_uri: str) -> MlflowClient:
    """A cached client whose store is initialised once per process.

    For SQLite files, the first store initialisation (MLflow's schema migration) runs
    under an exclusive file lock, because concurrent migrations of one fresh file
    corrupt it ("duplicate column name").
    """
    with _client_lock:
        client = _clients.get(tracking_uri)
        if client is not None:
            return client
        db_path = _sqlite_path(tracking_uri)
        if db_path is None:
            client = MlflowClient(tracking_uri)
            _ = client._tracking_client.store
        else:
            db_path.parent.mkdir(parents=True, exist_ok=True)
            with open(f"{db_path}.lock", "a") as lock_file:
                fcntl.flock(lock_file, fcntl.LOCK_EX)
                try:
                    # The constructor may already open the store (and migrate it).
                    client = MlflowClient(tracking_uri)
                    _ = client._tracking_client.store
                finally:
                    fcntl.flock(lock_file, fcntl.LOCK_UN)
        _clients[tracking_uri] = client
        return client


def absolute_uri(tracking_uri: str) -> str:
    """``sqlite:///mlflow.db`` -> ``sqlite:////abs/path/mlflow.db``.

    MLflow caches stores by URI string, so a relative SQLite URI keeps pointing at the
    first folder it was opened in after the process changes directory.
    """
    path = _sqlite_path(tracking_uri)
    if path is None or path.is_absolute():
        return tracking_uri
    return f"sqlite:///{path.resolve()}"


def check_tracking_uri(tracking_uri: str) -> None:
    """Fail fast, naming the URI, when it is malformed or its server is unreachable."""
    if not isinstance(tracking_uri, str) or not tracking_uri:
        raise ValueError(f"tracking_uri must be a non-empty string, got {tracking_uri!r}")
    shown = redact_uri(tracking_uri)
    if tracking_uri.startswith(("http://", "https://")):
        import requests

        try:
            requests.get(tracking_uri.rstrip("/") + "/health", timeout=5)
        except requests.RequestException as exc:
            raise ValueError(
                f"tracking_uri {shown!r} is unreachable: {type(exc).__name__}"
            ) from None
    try:
        get_client(absolute_uri(tracking_uri))
    except Exception as exc:  # MLflow raises many types for a bad URI
        raise ValueError(f"tracking_uri {shown!r} is not usable: {exc}") from None


def get_or_create_experiment(client: MlflowClient, name: str) -> str:
    """The id of experiment ``name``, created if missing; racing creators agree."""
    for _ in range(5):
        experiment = client.get_experiment_by_name(name)
        if experiment is not None:
            if experiment.lifecycle_stage == "deleted":
                client.restore_experiment(experiment.experiment_id)
            return experiment.experiment_id
        try:
            return client.create_experiment(name)
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS" and "already exists" not in str(exc):
                raise
        except Exception as exc:  # SQLAlchemy IntegrityError under a race
            if "UNIQUE" not in str(exc).upper() and "unique" not in str(exc):
                raise
    raise RuntimeError(f"could not create or find MLflow experiment {name!r}")


_uri_lock = threading.Lock()
_uri_users: dict[str, int] = {}
_uri_saved: tuple[str | None, str | None] | None = None


@contextlib.contextmanager
def global_tracking_uri(tracking_uri: str) -> Any:
    """Point MLflow's fluent API at ``tracking_uri`` and restore the user's setting after.

    Re-entrant across threads (parallel trials each enter it): the first entry saves
    the user's setting, the last exit restores it.
    """
    global _uri_saved
    with _uri_lock:
        if not _uri_users:
            _uri_saved = (_tracking_utils._tracking_uri, os.environ.get("MLFLOW_TRACKING_URI"))
        elif tracking_uri not in _uri_users:
            _logger.warning("two tracking URIs in use at once; MLflow's fluent calls follow %s",
                            redact_uri(tracking_uri))
        _uri_users[tracking_uri] = _uri_users.get(tracking_uri, 0) + 1
        if mlflow.get_tracking_uri() != tracking_uri:
            mlflow.set_tracking_uri(tracking_uri)
    try:
        yield
    finally:
        with _uri_lock:
            _uri_users[tracking_uri] -= 1
            if not _uri_users[tracking_uri]:
                del _uri_users[tracking_uri]
            if not _uri_users and _uri_saved is not None:
                previous, previous_env = _uri_saved
                _uri_saved = None
                if _tracking_utils._tracking_uri != previous:
                    mlflow.set_tracking_uri(previous)
                if previous_env is None:
                    os.environ.pop("MLFLOW_TRACKING_URI", None)
                else:
                    os.environ["MLFLOW_TRACKING_URI"] = previous_env


@contextlib.contextmanager
def active_run(run: Run) -> Any:
    """Make ``run`` the active run of the calling thread without a round trip."""
    stack = _fluent._active_run_stack.get()
    stack.append(_fluent.ActiveRun(run))
    try:
        yield
    finally:
        for i in range(len(stack) - 1, -1, -1):
            if stack[i].info.run_id == run.info.run_id:
                del stack[i]
                break


# --------------------------------------------------------------------------- records


@dataclasses.dataclass
class RunRecord:
    """Everything one run's final write needs; JSON-serialisable for the spool."""

    tracking_uri: str
    experiment_id: str
    parent_run_id: str | None
    study_name: str
    trial_number: int | None
    run_id: str | None
    run_name: str
    status: str
    end_time: int
    start_time: int | None = None
    params: dict[str, str] = dataclasses.field(default_factory=dict)
    tags: dict[str, str] = dataclasses.field(default_factory=dict)
    metrics: list[tuple[str, float, int, int]] = dataclasses.field(default_factory=list)
    texts: dict[str, str] = dataclasses.field(default_factory=dict)

    def to_json(self) -> str:
        # Credentials never reach the spool: `sync --tracking-uri` supplies them again.
        return json.dumps({**dataclasses.asdict(self), "tracking_uri": redact_uri(self.tracking_uri)})

    @classmethod
    def from_json(cls, line: str) -> RunRecord:
        data = json.loads(line)
        data["metrics"] = [tuple(m) for m in data["metrics"]]
        return cls(**data)


def trial_status(trial: FrozenTrial) -> str:
    """MLflow's status for a finished trial: FINISHED, KILLED (pruned) or FAILED."""
    return _STATUS.get(trial.state, "FAILED")


def metric_names(metric_name: str | Sequence[str], n_values: int) -> list[str]:
    """MLflowCallback's naming: one name, broadcast with ``_i`` suffixes, or one per value."""
    if isinstance(metric_name, str):
        if n_values > 1:
            return [f"{metric_name}_{i}" for i in range(n_values)]
        return [metric_name]
    if len(metric_name) != n_values:
        raise ValueError(
            "Running multi-objective optimization "
            f"with {n_values} objective values, but {len(metric_name)} names specified. "
            "Match objective values and names, or use default broadcasting."
        )
    return list(metric_name)


def _millis(dt: Any) -> int | None:
    return None if dt is None else int(dt.timestamp() * 1000)


def trial_record(
    study: optuna.Study,
    trial: FrozenTrial,
    *,
    tracking_uri: str,
    experiment_id: str,
    parent_run_id: str | None,
    run_id: str | None,
    metric_name: str | Sequence[str] = "value",
    error_text: str | None = None,
) -> RunRecord:
    """The child-run content DESIGN.md lists, built from Optuna's view of the trial."""
    end = _millis(trial.datetime_complete) or int(time.time() * 1000)
    step_time = _millis(trial.datetime_start) or end
    metrics: list[tuple[str, float, int, int]] = [("trial_number", float(trial.number), end, 0)]
    if trial.values is not None:
        names = metric_names(metric_name, len(trial.values))
        metrics += [
            (safe_key(n), float(v), end, 0)
            for n, v in zip(names, trial.values)
            if not math.isnan(v)
        ]
    value_key = safe_key(metric_name if isinstance(metric_name, str) else "value")
    metrics += [
        (f"{value_key}_intermediate", float(v), step_time, int(step))
        for step, v in sorted(trial.intermediate_values.items())
        if not math.isnan(v)
    ]
    tags: dict[str, str] = {
        "number": str(trial.number),
        "state": trial.state.name,
        "datetime_start": str(trial.datetime_start),
        "datetime_complete": str(trial.datetime_complete),
        "direction": ",".join(d.name for d in study.directions),
    }
    tags.update(
        safe_mapping({f"{k}_distribution": v for k, v in trial.distributions.items()}, tag_value)
    )
    if "fail_reason" in trial.system_attrs:
        tags["fail_reason"] = tag_value(trial.system_attrs["fail_reason"])
    # User attributes may overwrite the descriptive tags (as MLflowCallback lets them),
    # never the identity tags below.
    tags.update(safe_mapping(trial.user_attrs, tag_value))
    tags.update({STUDY_TAG: study.study_name, TRIAL_NUMBER_TAG: str(trial.number), ROLE_TAG: "trial"})
    if parent_run_id:
        tags[MLFLOW_PARENT_RUN_ID] = parent_run_id
    texts = {"traceback.txt": error_text} if error_text else {}
    return RunRecord(
        tracking_uri=tracking_uri,
        experiment_id=experiment_id,
        parent_run_id=parent_run_id,
        study_name=study.study_name,
        trial_number=trial.number,
        run_id=run_id,
        run_name=f"trial-{trial.number}",
        status=trial_status(trial),
        end_time=end,
        start_time=_millis(trial.datetime_start),
        params=safe_mapping(trial.params, param_value),
        tags=tags,
        metrics=metrics,
        texts=texts,
    )


# --------------------------------------------------------------------------- delivery


def _is_retryable(exc: BaseException) -> bool:
    code = getattr(exc, "error_code", None)
    return not (isinstance(exc, MlflowException) and code in _NON_RETRYABLE)


def _find_trial_run(client: MlflowClient, record: RunRecord) -> str | None:
    """An existing run for (study, trial), so that replays never duplicate."""
    filters = [f"tags.`{STUDY_TAG}` = '{record.study_name}'"]
    if record.trial_number is not None:
        filters.append(f"tags.`{TRIAL_NUMBER_TAG}` = '{record.trial_number}'")
    else:
        filters.append(f"attributes.run_name = '{record.run_name}'")
    runs = client.search_runs([record.experiment_id], " and ".join(filters), max_results=1)
    return runs[0].info.run_id if runs else None


def deliver(client: MlflowClient, record: RunRecord, *, lookup: bool = True,
            create_tags: dict[str, str] | None = None) -> str:
    """Write one run record: create the run if needed, one batch per limit, then close it.

    Idempotent: params and tags overwrite with equal values, and a record without a
    run id first looks the trial's run up by study name and trial number (unless
    ``lookup=False``: the caller knows there is none). ``create_tags`` go on a run
    created here.
    """
    run_id = record.run_id or (_find_trial_run(client, record) if lookup else None)
    if run_id is None:
        tags = dict(create_tags or {})
        if record.parent_run_id:
            tags[MLFLOW_PARENT_RUN_ID] = record.parent_run_id
        run_id = client.create_run(
            record.experiment_id, start_time=record.start_time, tags=tags,
            run_name=record.run_name,
        ).info.run_id
        record.run_id = run_id
    metrics = [Metric(k, v, ts, step) for k, v, ts, step in record.metrics]
    params = [Param(k, v) for k, v in record.params.items()]
    tags = [RunTag(k, v) for k, v in record.tags.items()]
    tags.append(RunTag(MLFLOW_RUN_NAME, record.run_name))
    while metrics or params or tags:
        batch_params, params = params[:MAX_PARAMS_TAGS_PER_BATCH], params[MAX_PARAMS_TAGS_PER_BATCH:]
        room = MAX_PARAMS_TAGS_PER_BATCH - len(batch_params)
        batch_tags, tags = tags[:room], tags[room:]
        batch_metrics, metrics = metrics[:MAX_METRICS_PER_BATCH], metrics[MAX_METRICS_PER_BATCH:]
        _log_batch_or_items(client, run_id, batch_metrics, batch_params, batch_tags)
    for name, text in record.texts.items():
        client.log_text(run_id, text, name)
    # The store call, not client.set_terminated: that one does an extra get_run to
    # print a 'View run' URL against a server.
    client._tracking_client.store.update_run_info(
        run_id, RunStatus.from_string(record.status), record.end_time, record.run_name
    )
    return run_id


def _log_batch_or_items(client: MlflowClient, run_id: str, metrics: list[Metric],
                        params: list[Param], tags: list[RunTag]) -> None:
    """One ``log_batch``; if MLflow rejects it, each item alone, skipping only the rejects."""
    try:
        client.log_batch(run_id, metrics=metrics, params=params, tags=tags, synchronous=True)
        return
    except MlflowException as exc:
        if exc.error_code != "INVALID_PARAMETER_VALUE":
            raise
    rejected = []
    for kind, items in (("metrics", metrics), ("params", params), ("tags", tags)):
        for item in items:
            try:
                client.log_batch(run_id, **{kind: [item]}, synchronous=True)
            except MlflowException as exc:
                if exc.error_code != "INVALID_PARAMETER_VALUE":
                    raise
                rejected.append(item.key)
    _logger.warning("MLflow rejected %s on run %s", ", ".join(rejected), run_id)
    client.set_tag(run_id, "omn.rejected", tag_value(", ".join(rejected)))


class Spool:
    """Append-only JSON-lines file of undelivered run records, created with mode 0600."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._warned = False

    def append(self, record: RunRecord) -> None:
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            with os.fdopen(fd, "a") as handle:
                handle.write(record.to_json() + "\n")
            if not self._warned:
                self._warned = True
                warnings.warn(
                    f"MLflow at {redact_uri(record.tracking_uri)!r} did not take some trial runs; "
                    f"they are kept in {self.path} (replay with `optuna-mlflow-nested sync "
                    f"--spool {self.path}`).",
                    RuntimeWarning,
                    stacklevel=2,
                )


def default_spool_path() -> Path:
    return Path(os.environ.get("OMN_SPOOL", Path.cwd() / "optuna-mlflow-nested.spool.jsonl"))


def replay_spool(path: str | os.PathLike[str], tracking_uri: str | None = None) -> tuple[int, int]:
    """Deliver every record of a spool file; keep the ones that still fail.

    ``tracking_uri`` overrides the (credential-free) URI kept in each record.
    Idempotent: replaying twice writes nothing new. Returns (delivered, remaining).
    """
    spool_path = Path(path)
    if not spool_path.exists():
        return 0, 0
    lines = [ln for ln in spool_path.read_text().splitlines() if ln.strip()]
    remaining: list[str] = []
    delivered = 0
    for line in lines:
        record = RunRecord.from_json(line)
        if tracking_uri is not None:
            record.tracking_uri = tracking_uri
        try:
            deliver(get_client(record.tracking_uri), record)
            delivered += 1
        except Exception as exc:
            _logger.warning("replay of %s failed: %s", record.run_name, redact_secrets(exc))
            remaining.append(line)
    tmp = spool_path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.writelines(line + "\n" for line in remaining)
    os.replace(tmp, spool_path)
    if not remaining:
        spool_path.unlink()
    return delivered, len(remaining)


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter, up to ``deadline`` seconds per write."""

    deadline: float = 60.0
    first_delay: float = 0.2
    max_delay: float = 5.0

    def call(self, fn: Callable[[], Any], stop: threading.Event | None = None) -> Any:
        start = time.monotonic()
        delay = self.first_delay
        while True:
            try:
                return fn()
            except Exception as exc:
                if not _is_retryable(exc) or time.monotonic() - start + delay > self.deadline:
                    raise
                _logger.debug("MLflow write failed (%s); retrying in %.1fs", exc, delay)
                if stop is not None and stop.wait(delay * random.uniform(0.5, 1.0)):
                    raise
                elif stop is None:
                    time.sleep(delay)
                delay = min(delay * 2, self.max_delay)


def retry_policy_from_env() -> RetryPolicy:
    return RetryPolicy(deadline=float(os.environ.get("OMN_RETRY_DEADLINE", "60")))


class _Writer:
    """Writer threads draining a bounded queue of run records (back-pressure, not growth).

    When one record has exhausted its retry deadline the tracking server is taken to
    be away: later records go straight to the spool, and one probe write every
    ``probe_interval`` seconds finds out when it is back.
    """

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
        self._threads = [
            threading.Thread(target=self._work, name=f"omn-writer-{i}", daemon=True)
            for i in range(threads)
        ]
        for thread in self._threads:
            thread.start()

    def put(self, record: RunRecord) -> None:
        self._queue.put(record)

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
            finally:
                self._queue.task_done()

    def _write(self, record: RunRecord) -> None:
        if not self._should_probe():
            self._spool.append(record)
            return
        key = id(record)
        with self._lock:
            self._in_flight[key] = record
        try:
            if self._offline_since is None:
                self._retry.call(lambda: deliver(self._client, record), self._stop)
            else:
                deliver(self._client, record)
            with self._lock:
                self._offline_since = None
        except Exception as exc:
            if _is_retryable(exc):
                with self._lock:
                    if self._offline_since is None:
                        self._offline_since = self._last_probe = time.monotonic()
                self._spool.append(record)
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
            self._spool.append(record)
        return False

    def close(self, timeout: float | None = None) -> bool:
        drained = self.flush(timeout)
        for _ in self._threads:
            with contextlib.suppress(queue.Full):
                self._queue.put(None, timeout=1)
        for thread in self._threads:
            thread.join(timeout=5 if drained else 0.1)
        return drained


class _RunPool:
    """Creates child runs ahead of need so a trial never waits for ``create_run``."""

    def __init__(self, client: MlflowClient, experiment_id: str, parent_run_id: str,
                 study_name: str, spare: int, threads: int, retry: RetryPolicy) -> None:
        self._client = client
        self._experiment_id = experiment_id
        self._tags = {MLFLOW_PARENT_RUN_ID: parent_run_id, STUDY_TAG: study_name, ROLE_TAG: "trial"}
        self._spare = spare
        self._retry = retry
        self._ready: collections.deque[Run] = collections.deque()
        self._creating = 0
        self.healthy = True
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._fill, name=f"omn-runpool-{i}", daemon=True)
            for i in range(threads)
        ]
        for thread in self._threads:
            thread.start()

    def _create(self) -> Run:
        return self._client.create_run(self._experiment_id, tags=self._tags, run_name="trial-pending")

    def _fill(self) -> None:
        while True:
            with self._cond:
                while len(self._ready) + self._creating >= self._spare and not self._stop.is_set():
                    self._cond.wait()
                if self._stop.is_set():
                    return
                self._creating += 1
            try:
                run = self._create()
            except Exception as exc:
                _logger.debug("creating a spare run failed: %s", exc)
                run = None
            with self._cond:
                self._creating -= 1
                self.healthy = run is not None
                if run is not None:
                    self._ready.append(run)
                self._cond.notify_all()
            if run is None and not self._stop.wait(1.0):
                continue

    def take(self, timeout: float) -> Run | None:
        """A fresh run, or ``None`` if none could be had in time.

        Waits up to ``timeout`` seconds while run creation works, and only briefly
        while the tracking server is away (the trial then runs without a live run and
        its record creates the run later, or goes to the spool).
        """
        deadline = time.monotonic() + timeout
        with self._cond:
            while not self._ready:
                if not self.healthy:
                    deadline = min(deadline, time.monotonic() + 0.5)
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._cond.wait(left)
            run = self._ready.popleft()
            self._cond.notify_all()
            return run

    def close(self) -> None:
        with self._cond:
            self._stop.set()
            self._cond.notify_all()
        for thread in self._threads:
            thread.join(timeout=5)
        with self._cond:
            leftovers, self._ready = list(self._ready), collections.deque()
        for run in leftovers:
            with contextlib.suppress(Exception):
                self._client.delete_run(run.info.run_id)


@contextlib.contextmanager
def short_http_retries(tracking_uri: str) -> Any:
    """MLflow's REST client retries a dead server for ~4 minutes per call by default.

    While a tracker runs, and unless the user set them, cap that at ~3 s so that our
    own backoff (``OMN_RETRY_DEADLINE``), offline mode and spool take over.
    """
    if not tracking_uri.startswith(("http://", "https://")):
        yield
        return
    # urllib3 logs every retry as a WARNING: keep the user's output clean.
    urllib3_logger = logging.getLogger("urllib3.connectionpool")
    previous_level = urllib3_logger.level
    urllib3_logger.setLevel(logging.ERROR)
    defaults = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}
    added = [k for k in defaults if k not in os.environ]
    for key in added:
        os.environ[key] = defaults[key]
    try:
        yield
    finally:
        urllib3_logger.setLevel(previous_level)
        for key in added:
            os.environ.pop(key, None)


def reconcile_study(
    client: MlflowClient, study: optuna.Study, *, experiment_id: str, parent_run_id: str,
    tracking_uri: str, metric_name: str | Sequence[str] = "value", orphan_age: float = 3600.0,
    create_missing: bool = False,
) -> int:
    """Make MLflow agree with Optuna's storage, the source of truth; returns runs mended.

    Finishes RUNNING child runs of finished trials, deletes stale spare runs and,
    with ``create_missing``, writes a child run for every finished trial that has none.
    """
    running = client.search_runs(
        [experiment_id],
        f"tags.mlflow.parentRunId = '{parent_run_id}' and attributes.status = 'RUNNING'",
        max_results=50_000,
    )
    finished = [t for t in study.get_trials(deepcopy=False) if t.state.is_finished()]
    by_run = {t.system_attrs.get(RUN_ID_ATTRIBUTE_KEY): t for t in finished}
    mended = 0
    now_ms = time.time() * 1000
    for run in running:
        trial = by_run.pop(run.info.run_id, None)
        if trial is not None:
            deliver(client, trial_record(study, trial, tracking_uri=tracking_uri,
                                         experiment_id=experiment_id, parent_run_id=parent_run_id,
                                         run_id=run.info.run_id, metric_name=metric_name))
            mended += 1
        elif run.info.run_name == "trial-pending" and now_ms - run.info.start_time > orphan_age * 1000:
            client.delete_run(run.info.run_id)
    if create_missing:
        have = {
            r.data.tags.get(TRIAL_NUMBER_TAG)
            for r in client.search_runs([experiment_id], f"tags.mlflow.parentRunId = '{parent_run_id}'",
                                        max_results=50_000)
        }
        for trial in finished:
            if str(trial.number) not in have:
                deliver(client, trial_record(study, trial, tracking_uri=tracking_uri,
                                             experiment_id=experiment_id, parent_run_id=parent_run_id,
                                             run_id=None, metric_name=metric_name))
                mended += 1
    return mended


# --------------------------------------------------------------------------- the tracker


_live_trackers: weakref.WeakSet[TrialTracker] = weakref.WeakSet()


@atexit.register
def _flush_at_exit() -> None:
    for tracker in list(_live_trackers):
        with contextlib.suppress(Exception):
            tracker.stop()


class TrialTracker:
    """Opens a child run per trial and records its outcome, off the trial's critical path.

    Used by :class:`~optuna_mlflow_nested.NestedStudy` and
    :class:`~optuna_mlflow_nested.MLflowCallback`; not meant to be used directly.
    """

    def __init__(
        self,
        *,
        tracking_uri: str,
        experiment_id: str,
        parent_run_id: str,
        study_name: str,
        metric_name: str | Sequence[str] = "value",
        threads: int | None = None,
        spool_path: str | os.PathLike[str] | None = None,
        run_wait: float = 120.0,
    ) -> None:
        self.tracking_uri = tracking_uri
        self.experiment_id = experiment_id
        self.parent_run_id = parent_run_id
        self.study_name = study_name
        self.metric_name = metric_name
        self._client = get_client(tracking_uri)
        remote = tracking_uri.startswith(("http://", "https://"))
        self._threads = threads or (4 if remote else 1)
        self._spool = Spool(spool_path or default_spool_path())
        self._retry = retry_policy_from_env()
        self._run_wait = run_wait
        self._lock = threading.Lock()
        self._open: dict[int, str | None] = {}  # trial number -> run id (None: deferred)
        self._errors: dict[int, str] = {}
        self._pool: _RunPool | None = None
        self._writer: _Writer | None = None
        self._http_retries: contextlib.ExitStack = contextlib.ExitStack()

    # lifecycle -------------------------------------------------------------------
    def start(self, n_jobs: int = 1) -> None:
        if self._writer is not None:
            return
        workers = n_jobs if n_jobs > 0 else (os.cpu_count() or 1)
        self._http_retries.enter_context(short_http_retries(self.tracking_uri))
        self._writer = _Writer(self._client, self._threads, self._spool, self._retry)
        self._pool = _RunPool(
            self._client, self.experiment_id, self.parent_run_id, self.study_name,
            spare=workers + 1, threads=self._threads, retry=self._retry,
        )
        _live_trackers.add(self)

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def stop(self) -> None:
        """Deliver (or spool) every queued write and delete unused spare runs."""
        pool, writer = self._pool, self._writer
        self._pool = self._writer = None
        try:
            if pool is not None:
                pool.close()
            if writer is not None:
                writer.close(timeout=self._retry.deadline + 30)
        finally:
            self._http_retries.close()
            _live_trackers.discard(self)

    @property
    def spool_path(self) -> Path:
        return self._spool.path

    # per trial -------------------------------------------------------------------
    def wrap(self, objective: Callable[[optuna.Trial], Any]) -> Callable[[optuna.Trial], Any]:
        """The objective, run inside its trial's child run."""

        def run_in_child(trial: optuna.Trial) -> Any:
            run = self.open_trial(trial)
            context = active_run(run) if run is not None else contextlib.nullcontext()
            try:
                with context:
                    result = objective(trial)
            except optuna.TrialPruned:
                raise
            except BaseException:
                self._errors[trial.number] = traceback.format_exc()
                raise
            return _fail_non_finite(trial, result)

        return run_in_child

    def open_trial(self, trial: optuna.Trial) -> Run | None:
        if self._pool is None:
            raise RuntimeError("TrialTracker.start() was not called")
        run = self._pool.take(self._run_wait)
        run_id = run.info.run_id if run is not None else None
        with self._lock:
            self._open[trial.number] = run_id
        if run_id is not None:
            trial.storage.set_trial_system_attr(trial._trial_id, RUN_ID_ATTRIBUTE_KEY, run_id)
        return run

    def close_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        """Queue the trial's final write (an Optuna callback: ``callbacks=[tracker.close_trial]``)."""
        with self._lock:
            if trial.number not in self._open:
                return
            run_id = self._open.pop(trial.number)
        record = trial_record(
            study, trial, tracking_uri=self.tracking_uri, experiment_id=self.experiment_id,
            parent_run_id=self.parent_run_id, run_id=run_id, metric_name=self.metric_name,
            error_text=self._errors.pop(trial.number, None),
        )
        assert self._writer is not None
        self._writer.put(record)

    def close_open_trials(self, study: optuna.Study) -> None:
        """Close trials whose callback never ran (an exception or interrupt ended optimize)."""
        with self._lock:
            numbers = list(self._open)
        if not numbers:
            return
        trials = {t.number: t for t in study.get_trials(deepcopy=False)}
        for number in numbers:
            trial = trials.get(number)
            if trial is None:
                continue
            if not trial.state.is_finished():
                # Interrupted mid-objective: Optuna will never finish it in this process.
                trial = _as_failed(trial)
            self.close_trial(study, trial)


def _as_failed(trial: FrozenTrial) -> FrozenTrial:
    import datetime

    frozen = FrozenTrial(
        number=trial.number, state=TrialState.FAIL, value=None,
        datetime_start=trial.datetime_start, datetime_complete=datetime.datetime.now(),
        params=trial.params, distributions=trial.distributions, user_attrs=trial.user_attrs,
        system_attrs=trial.system_attrs, intermediate_values=trial.intermediate_values,
        trial_id=trial._trial_id,
    )
    return frozen


def _fail_non_finite(trial: optuna.Trial, result: Any) -> Any:
    """Turn +/-inf into NaN, which Optuna records as a FAILED trial while the study goes on."""
    values = result if isinstance(result, Sequence) and not isinstance(result, str) else [result]
    try:
        if any(math.isinf(float(v)) for v in values):
            trial.set_user_attr("non_finite_value", str(result))
            return float("nan") if values is not result else [float("nan")] * len(values)
    except (TypeError, ValueError):
        pass
    return result


# --------------------------------------------------------------------------- parent run


def create_parent_run(
    client: MlflowClient, experiment_id: str, study_name: str, nest_under: str | None,
    tags: dict[str, Any] | None = None,
) -> str:
    all_tags = {ROLE_TAG: "study", STUDY_TAG: study_name}
    all_tags.update(safe_mapping(tags or {}, tag_value))
    if nest_under:
        all_tags[MLFLOW_PARENT_RUN_ID] = nest_under
    return client.create_run(experiment_id, tags=all_tags, run_name=study_name).info.run_id


def log_parent_start(client: MlflowClient, run_id: str, params: dict[str, Any],
                     tags: dict[str, Any]) -> None:
    """Study-level facts, once, when the parent run is created."""
    client.log_batch(
        run_id,
        params=[Param(k, v) for k, v in safe_mapping(params, param_value).items()],
        tags=[RunTag(k, v) for k, v in safe_mapping(tags, tag_value).items()],
        synchronous=True,
    )


def mark_parent_running(client: MlflowClient, run_id: str, budget: dict[str, Any]) -> None:
    """Record the requested budget and reopen the parent; a server that is away is not fatal."""
    try:
        client.log_batch(run_id, tags=[RunTag(f"budget.{k}", str(v)) for k, v in budget.items()],
                         synchronous=True)
        set_run_status(client, run_id, "RUNNING")
    except Exception as exc:
        warnings.warn(f"could not update the parent run {run_id}: {redact_secrets(exc)}",
                      RuntimeWarning, stacklevel=3)


def set_run_status(client: MlflowClient, run_id: str, status: str) -> None:
    end_time = None if status == "RUNNING" else int(time.time() * 1000)
    client._tracking_client.store.update_run_info(
        run_id, RunStatus.from_string(status), end_time, None
    )


def _running_best(study: optuna.Study, trials: list[FrozenTrial]) -> list[tuple[int, float]]:
    if len(study.directions) != 1:
        return []
    sign = 1.0 if study.direction == optuna.study.StudyDirection.MINIMIZE else -1.0
    best = math.inf
    history = []
    for trial in sorted(trials, key=lambda t: t.number):
        if trial.state == TrialState.COMPLETE and trial.value is not None:
            if sign * trial.value < best:
                best = sign * trial.value
            history.append((trial.number, sign * best))
    return history


def log_parent_summary(client: MlflowClient, run_id: str, study: optuna.Study,
                       figures: bool = True) -> None:
    """The parent's running ``best_value``, counts per state, ``trials.csv`` and figures.

    Only steps not yet logged are added to ``best_value``, so calling this after each
    ``optimize`` (or from several workers) never duplicates history.
    """
    trials = study.get_trials(deepcopy=False)
    now = int(time.time() * 1000)
    logged = {m.step for m in client.get_metric_history(run_id, "best_value")}
    metrics = [
        Metric("best_value", value, now, step)
        for step, value in _running_best(study, trials)
        if step not in logged
    ]
    counts = collections.Counter(t.state for t in trials)
    for state, name in [(TrialState.COMPLETE, "n_complete"), (TrialState.PRUNED, "n_pruned"),
                        (TrialState.FAIL, "n_failed")]:
        metrics.append(Metric(name, float(counts.get(state, 0)), now, 0))
    metrics.append(Metric("n_trials", float(len(trials)), now, 0))
    for i in range(0, len(metrics), MAX_METRICS_PER_BATCH):
        client.log_batch(run_id, metrics=metrics[i : i + MAX_METRICS_PER_BATCH], synchronous=True)
    if not trials:
        return
    frame = study.trials_dataframe()
    client.log_text(run_id, frame.to_csv(index=False), "trials.csv")
    if figures:
        _log_figures(client, run_id, study)


_figure_imports: threading.Thread | None = None


def warm_up_figures() -> None:
    """Import matplotlib in the background while trials run (about 0.5 s saved at the end)."""
    global _figure_imports
    if _figure_imports is None:
        def _import() -> None:
            with contextlib.suppress(Exception):
                import matplotlib

                matplotlib.use("Agg", force=False)
                import matplotlib.pyplot  # noqa: F401
                from matplotlib.figure import Figure
                import optuna.visualization.matplotlib  # noqa: F401
                import sklearn.ensemble  # noqa: F401  (fANOVA's forest, for importances)

                # The first PNG pays for fonts and the Agg backend; pay it now, off
                # pyplot's global state, which the user's objective may be using.
                figure = Figure(figsize=(1, 1))
                figure.add_subplot().plot([0, 1], label="warm-up")
                figure.savefig(io.BytesIO(), format="png")

        _figure_imports = threading.Thread(target=_import, name="omn-warm-up", daemon=True)
        _figure_imports.start()


def _log_figures(client: MlflowClient, run_id: str, study: optuna.Study) -> None:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ovm

    complete = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    plots: list[tuple[str, Callable[[], Any]]] = []
    if complete and len(study.directions) == 1:
        plots.append(("optimization_history.png", lambda: ovm.plot_optimization_history(study)))
    if len(complete) >= 2 and complete[0].params and len(study.directions) == 1:
        plots.append(("param_importances.png", lambda: ovm.plot_param_importances(study)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, make in plots:
            try:
                axes = make()
                figure = axes.figure if hasattr(axes, "figure") else axes
                figure.set_size_inches(8, 5)
                figure.tight_layout()
                client.log_figure(run_id, figure, name)
                plt.close(figure)
            except Exception as exc:  # a figure must never fail a study
                _logger.warning("could not draw %s: %s", name, exc)


@functools.cache
def _sklearn_log_model_takes_skops_types() -> bool:
    """Whether this MLflow saves scikit-learn models with skops and takes
    ``skops_trusted_types`` (3.17 does, 3.8 does not); checked once, not per fold."""
    import inspect

    import mlflow.sklearn

    if "skops_trusted_types" not in inspect.signature(mlflow.sklearn.log_model).parameters:
        return False
    try:
        import skops.io  # noqa: F401
    except ImportError:
        return False
    return True


def log_fold_run(client: MlflowClient, experiment_id: str, parent_run_id: str | None, fold: int,
                 *, metrics: dict[str, float], params: dict[str, Any], model: Any = None) -> str:
    """One cross-validation fold as a finished run ``fold-<i>`` under ``parent_run_id``."""
    tags = {ROLE_TAG: "fold", "fold": str(fold)}
    if parent_run_id:
        tags[MLFLOW_PARENT_RUN_ID] = parent_run_id
    run = client.create_run(experiment_id, tags=tags, run_name=f"fold-{fold}")
    run_id = run.info.run_id
    now = int(time.time() * 1000)
    client.log_batch(
        run_id,
        metrics=[Metric(safe_key(k), float(v), now, 0) for k, v in metrics.items()],
        params=[Param(k, v) for k, v in safe_mapping(params, param_value).items()],
        synchronous=True,
    )
    if model is not None:
        import mlflow.sklearn

        kwargs: dict[str, Any] = {}
        if _sklearn_log_model_takes_skops_types():
            # MLflow saves with skops; the types of a model we just fitted are ours to trust.
            import skops.io

            kwargs["skops_trusted_types"] = skops.io.get_untrusted_types(data=skops.io.dumps(model))
        import sklearn

        # Explicit requirements: inferring them starts a subprocess per model (seconds each).
        with active_run(run):
            mlflow.sklearn.log_model(model, name="model",
                                     pip_requirements=[f"scikit-learn=={sklearn.__version__}"],
                                     **kwargs)
    client._tracking_client.store.update_run_info(run_id, RunStatus.FINISHED, now, None)
    return run_id
