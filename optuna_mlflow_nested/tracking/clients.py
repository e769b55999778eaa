"""MLflow clients, URIs and experiments: one cached client per tracking URI."""

from __future__ import annotations

from collections.abc import Iterable
from collections.abc import Iterator
import contextlib
import logging
import os
from pathlib import Path
import threading
from typing import Any

from filelock import FileLock
import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from optuna_mlflow_nested import _compat
from optuna_mlflow_nested._utils import masks_secrets
from optuna_mlflow_nested._utils import redact_secrets
from optuna_mlflow_nested._utils import redact_uri

_logger = logging.getLogger(__name__)

#: Experiments this project creates open in MLflow's UI as model training, not GenAI.
EXPERIMENT_KIND_TAGS = {"mlflow.experimentKind": "custom_model_development"}

_client_lock = threading.Lock()
_clients: dict[str, MlflowClient] = {}


def sqlite_path(uri: str) -> Path | None:
    """The file of a ``sqlite:///`` URI, or ``None`` for other URIs and in-memory SQLite.

    Read as SQLAlchemy reads it, the file it opens: a query (``?timeout=30``, passed to
    the driver) is not part of it, and ``%20`` is a space.
    """
    if not uri.startswith("sqlite:///"):
        return None
    from sqlalchemy.engine import make_url  # (not imported for a tracking server)

    path = make_url(uri).database
    return None if path in (None, "", ":memory:") else Path(path)


def get_client(tracking_uri: str, *, create: bool = True) -> MlflowClient:
    """A cached client whose store is opened once per process.

    For SQLite files the first open (MLflow's schema migration) runs under a file lock
    shared by every process, because concurrent migrations of one fresh file corrupt
    it ("duplicate column name").

    Raises:
        FileNotFoundError: ``create=False`` and the SQLite file is gone (the writer
            process, opening a store the calling process made and may have removed
            since: opening it would make the folder and a new store again).
    """
    db_path = sqlite_path(tracking_uri)
    if db_path is not None and not create:
        if not db_path.exists():  # also for a cached client: it would write to a removed file
            raise FileNotFoundError(f"{db_path} was removed")
        _compat.never_create_sqlite_stores()  # (removed while MLflow opens it)
    with _client_lock:
        client = _clients.get(tracking_uri)
        if client is not None:
            return client
        lock: contextlib.AbstractContextManager[object] = contextlib.nullcontext()
        if db_path is not None and create:
            db_path.parent.mkdir(parents=True, exist_ok=True)
            lock = FileLock(f"{db_path}.lock")
        with lock:
            client = MlflowClient(tracking_uri)
            _compat.open_store(client)
            if db_path is not None:
                use_wal(db_path)
        _clients[tracking_uri] = client
        return client


def use_wal(db_path: Path) -> bool:
    """Put a SQLite tracking file in write-ahead-log mode (kept by the file); True if it is.

    MLflow opens SQLite in its default rollback-journal mode, where every commit of
    the several a run write makes syncs the file and its journal, and readers block
    writers. In WAL mode a commit appends to ``<file>-wal``: a trial run's create,
    log_batch and terminate took 21 instead of 30 ms (benchmarks/RESULTS.md), and
    workers' reads no longer wait for a writer. The file
    stays an ordinary SQLite database that MLflow, its UI and ``sqlite3`` open as
    before. ``OMN_SQLITE_WAL=0`` leaves the file as it is (WAL needs a local disk, not
    a network file system). A file busy in another process keeps its mode for now.
    """
    if os.environ.get("OMN_SQLITE_WAL", "1") == "0":
        return False
    import sqlite3

    try:
        with contextlib.closing(sqlite3.connect(db_path, timeout=5)) as connection:
            mode = connection.execute("PRAGMA journal_mode=WAL").fetchone()[0]
    except sqlite3.Error as exc:
        _logger.debug("%s stays in its journal mode: %s", db_path, exc)
        return False
    return str(mode).lower() == "wal"


def absolute_uri(tracking_uri: str) -> str:
    """``sqlite:///mlflow.db`` -> ``sqlite:////abs/path/mlflow.db``.

    MLflow caches stores by URI string, so a relative SQLite URI keeps pointing at the
    first folder it was opened in after the process changes directory.
    """
    path = sqlite_path(tracking_uri)
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
        raise ValueError(f"tracking_uri {shown!r} is not usable: {redact_secrets(exc)}") from None


def resolve_tracking_uri(tracking_uri: str | None) -> str:
    """The URI to use (MLflow's current one when ``None``), checked and made absolute."""
    uri = tracking_uri if tracking_uri is not None else mlflow.get_tracking_uri()
    check_tracking_uri(uri)
    return absolute_uri(uri)


@masks_secrets
def get_or_create_experiment(client: MlflowClient, name: str) -> str:
    """The id of experiment ``name``, created if missing; racing creators agree.

    A created experiment is tagged to open in the UI as model training; an existing
    experiment's tags are left alone.
    """
    for _ in range(5):
        experiment = client.get_experiment_by_name(name)
        if experiment is not None:
            if experiment.lifecycle_stage == "deleted":
                client.restore_experiment(experiment.experiment_id)
            return str(experiment.experiment_id)
        try:
            return str(client.create_experiment(name, tags=EXPERIMENT_KIND_TAGS))
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS" and "already exists" not in str(exc):
                raise
        except Exception as exc:  # SQLAlchemy IntegrityError under a race
            if "unique" not in str(exc).lower():
                raise
    raise RuntimeError(f"could not create or find MLflow experiment {name!r}")


_uri_lock = threading.Lock()
_uri_users: dict[str, int] = {}
_uri_saved: tuple[str | None, str | None] | None = None
_experiment_saved: tuple[str | None, str | None] | None = None


def _refuse_another_uri(tracking_uri: str) -> None:
    others = [uri for uri in _uri_users if uri != tracking_uri]
    if others:
        raise ValueError(
            f"tracking URI {redact_uri(tracking_uri)!r} cannot be used while a study in this "
            f"process is using tracking URI {redact_uri(others[0])!r}: MLflow keeps one "
            "tracking URI per process, so mlflow.log_* calls inside the other study's "
            "objective would land in the wrong store. Run the two studies in separate "
            "processes (or one after the other), or give them the same tracking URI.")


def check_tracking_uri_free(tracking_uri: str) -> None:
    """Raise ``ValueError`` if another tracking URI is in use in this process right now."""
    with _uri_lock:
        _refuse_another_uri(tracking_uri)


@contextlib.contextmanager
def global_tracking_uri(tracking_uri: str, experiment_id: str | None = None) -> Iterator[None]:
    """Point MLflow's fluent API at ``tracking_uri`` (and ``experiment_id``, the active
    experiment, which ``mlflow.start_run(nested=True)`` takes) and restore the user's
    setting after.

    Re-entrant across threads (parallel trials each enter it): the first entry saves
    the user's setting, the last exit restores it. The first experiment given stays
    active until then (MLflow has one active experiment per process).

    Raises:
        ValueError: another tracking URI is in use in this process (another study is
            optimizing): MLflow's fluent API has one tracking URI per process.
    """
    global _uri_saved, _experiment_saved
    with _uri_lock:
        _refuse_another_uri(tracking_uri)
        if not _uri_users:
            _uri_saved = (_compat.explicit_tracking_uri(), os.environ.get("MLFLOW_TRACKING_URI"))
        if experiment_id is not None and _experiment_saved is None:
            _experiment_saved = _compat.active_experiment()
            # Not MLFLOW_EXPERIMENT_ID: the objective's subprocesses keep the user's.
            _compat.set_active_experiment((experiment_id, _experiment_saved[1]))
        _uri_users[tracking_uri] = _uri_users.get(tracking_uri, 0) + 1
        # Not mlflow.get_tracking_uri(): with none set it works out MLflow's default
        # (importing its file store to look into ./mlruns: about 3 ms, once).
        if (_compat.explicit_tracking_uri() or os.environ.get("MLFLOW_TRACKING_URI")) != tracking_uri:
            mlflow.set_tracking_uri(tracking_uri)
    try:
        yield
    finally:
        with _uri_lock:
            _uri_users[tracking_uri] -= 1
            if not _uri_users[tracking_uri]:
                del _uri_users[tracking_uri]
            if not _uri_users and _experiment_saved is not None:
                _compat.set_active_experiment(_experiment_saved)
                _experiment_saved = None
            if not _uri_users and _uri_saved is not None:
                previous, previous_env = _uri_saved
                _uri_saved = None
                if _compat.explicit_tracking_uri() != previous:
                    mlflow.set_tracking_uri(previous)  # type: ignore[arg-type]  # None unsets
                if previous_env is None:
                    os.environ.pop("MLFLOW_TRACKING_URI", None)
                else:
                    os.environ["MLFLOW_TRACKING_URI"] = previous_env


#: MLflow's HTTP retry settings while this project writes: ~3 s of retries per call.
SHORT_HTTP_RETRIES = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
                      "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                      "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}


@contextlib.contextmanager
def short_http_retries(tracking_uri: str) -> Iterator[None]:
    """MLflow's REST client retries a dead server for ~4 minutes per call by default.

    While a tracker runs, and unless the user set them, cap that at ~3 s so that our
    own backoff (``OMN_RETRY_DEADLINE``), offline mode and spool take over. With
    credentials in the URI, MLflow's "View run" links (which print them) are off too.
    """
    if not tracking_uri.startswith(("http://", "https://")):
        yield
        return
    # urllib3 logs every retry as a WARNING: keep the user's output clean.
    urllib3_logger = logging.getLogger("urllib3.connectionpool")
    previous_level = urllib3_logger.level
    urllib3_logger.setLevel(logging.ERROR)
    defaults = dict(SHORT_HTTP_RETRIES)
    if redact_uri(tracking_uri) != tracking_uri:
        # MLflow prints "View run ... at: <tracking URI>/#/..." (password included) when
        # a run ends through its API, e.g. an objective calling mlflow.end_run().
        defaults["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
    added = [k for k in defaults if k not in os.environ]
    for key in added:
        os.environ[key] = defaults[key]
    try:
        yield
    finally:
        urllib3_logger.setLevel(previous_level)
        for key in added:
            os.environ.pop(key, None)


@masks_secrets
def set_run_status(client: MlflowClient, run_id: str, status: str) -> None:
    """End (or, with ``"RUNNING"``, reopen) a run without MLflow's 'View run' round trip."""
    import time

    end_time = None if status == "RUNNING" else int(time.time() * 1000)
    _compat.update_run_info(client, run_id, status, end_time)


def discard_runs(client: MlflowClient, run_ids: Iterable[str]) -> int:
    """End (KILLED) and delete runs no trial keeps (spare runs no trial got, a trial's
    extra runs), as far as the server allows; returns how many were deleted.

    Ended first: a deleted run must not stay RUNNING. A server that is away leaves them
    to ``sync``, which deletes spare runs older than its grace period and extra runs.
    """
    deleted = 0
    for run_id in run_ids:
        with contextlib.suppress(Exception):
            set_run_status(client, run_id, "KILLED")
            client.delete_run(run_id)
            deleted += 1
    return deleted


@masks_secrets
def search_runs_frame(client: MlflowClient, experiment_ids: list[str], filter_string: str = "",
                      order_by: list[str] | None = None, max_results: int = 100_000) -> Any:
    """``mlflow.search_runs(...)``'s DataFrame, read through ``client``'s own store.

    ``mlflow.search_runs`` has no tracking URI argument: it reads MLflow's process-wide
    one, which a study optimizing in another thread may hold with another URI. Same
    columns: run_id, experiment_id, status, artifact_uri, start_time, end_time (UTC),
    then ``metrics.*``, ``params.*``, ``tags.*``.
    """
    import pandas as pd

    runs: list[Any] = []
    token = None
    while len(runs) < max_results:
        page = client.search_runs(experiment_ids, filter_string,
                                  max_results=min(10_000, max_results - len(runs)),
                                  order_by=order_by, page_token=token)
        runs += page
        token = page.token
        if not token:
            break
    columns: dict[str, list[Any]] = {k: [] for k in ("run_id", "experiment_id", "status",
                                                     "artifact_uri", "start_time", "end_time")}
    extra: dict[str, dict[str, list[Any]]] = {"metrics": {}, "params": {}, "tags": {}}
    for i, run in enumerate(runs):
        info = run.info
        for key in ("run_id", "experiment_id", "status", "artifact_uri"):
            columns[key].append(getattr(info, key))
        columns["start_time"].append(pd.to_datetime(info.start_time, unit="ms", utc=True))
        columns["end_time"].append(pd.to_datetime(info.end_time, unit="ms", utc=True))
        for kind, values in (("metrics", run.data.metrics), ("params", run.data.params),
                             ("tags", run.data.tags)):
            null = float("nan") if kind == "metrics" else None
            for key, column in extra[kind].items():
                column.append(values.get(key, null))
            for key in values.keys() - extra[kind].keys():
                extra[kind][key] = [null] * i + [values[key]]
    for kind, kind_columns in extra.items():
        columns.update({f"{kind}.{key}": column for key, column in kind_columns.items()})
    return pd.DataFrame(columns)
