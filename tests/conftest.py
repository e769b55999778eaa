"""Shared fixtures: real SQLite tracking stores, a real `mlflow server`, PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
import os
from pathlib import Path
import signal
import socket
import subprocess
import sys
import time
import uuid

import optuna
import pytest

optuna.logging.set_verbosity(optuna.logging.WARNING)
os.environ.setdefault("MPLBACKEND", "Agg")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def _migrated_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One empty, fully migrated MLflow SQLite file (migrating costs ~2 s per file)."""
    from mlflow.tracking import MlflowClient

    path = tmp_path_factory.mktemp("template") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def tracking_uri(tmp_path: Path, _migrated_store: Path) -> str:
    """A fresh SQLite tracking store in a temporary folder (a copy of a migrated empty one)."""
    import shutil

    target = tmp_path / "mlflow.db"
    shutil.copyfile(_migrated_store, target)
    return f"sqlite:///{target}"


@pytest.fixture(autouse=True)
def _isolated_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test runs in its own folder: stray mlflow.db, mlruns/ or spools stay there."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OMN_SPOOL", str(tmp_path / "spool.jsonl"))


@pytest.fixture(autouse=True)
def _reset_mlflow_globals() -> Iterator[None]:
    """MLflow keeps the tracking URI and active experiment in process globals."""
    yield
    import mlflow
    from mlflow.tracking import fluent

    while mlflow.active_run() is not None:
        mlflow.end_run()
    fluent._active_experiment_id = None
    os.environ.pop("MLFLOW_EXPERIMENT_ID", None)
    mlflow.set_tracking_uri(None)


class MlflowServer:
    """A real `mlflow server` bound to 127.0.0.1, in its own process group."""

    def __init__(self, root: Path, backend_uri: str | None = None, port: int | None = None) -> None:
        self.root = root
        self.port = port or free_port()
        self.backend_uri = backend_uri or f"sqlite:///{root / 'server.db'}"
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 90.0) -> MlflowServer:
        self.root.mkdir(parents=True, exist_ok=True)
        log = open(self.root / f"server-{self.port}.log", "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1",
             "--port", str(self.port), "--workers", "1",
             "--backend-store-uri", self.backend_uri,
             "--artifacts-destination", str(self.root / "artifacts")],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            # The GenAI job runner spawns a dozen huey consumers that tracking never needs.
            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        )
        import requests

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                log = (self.root / f"server-{self.port}.log").read_text()
                raise RuntimeError(f"mlflow server exited: {log[-2000:]}")
            try:
                if requests.get(self.uri + "/health", timeout=1).status_code == 200:
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError("mlflow server did not become healthy")

    def stop(self) -> None:
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=10)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc = None


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    """One real tracking server for the whole session."""
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server")).start()
    try:
        yield server
    finally:
        server.stop()


def _postgres_available() -> bool:
    try:
        import psycopg2

        psycopg2.connect(host="127.0.0.1", port=5432, dbname="test", user=_pg_user(),
                         connect_timeout=3).close()
        return True
    except Exception:
        return False


def _pg_user() -> str:
    return os.environ.get("OMN_PG_USER", "postgres")


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh PostgreSQL database on 127.0.0.1:5432, dropped afterwards."""
    if not _postgres_available():
        pytest.skip("PostgreSQL is not reachable on 127.0.0.1:5432 (trust auth, database 'test')")
    import psycopg2

    name = f"omn_{uuid.uuid4().hex[:12]}"
    admin = psycopg2.connect(host="127.0.0.1", port=5432, dbname="test", user=_pg_user())
    admin.autocommit = True
    admin.cursor().execute(f"CREATE DATABASE {name}")
    try:
        yield f"postgresql://{_pg_user()}@127.0.0.1:5432/{name}"
    finally:
        admin.cursor().execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        admin.close()
