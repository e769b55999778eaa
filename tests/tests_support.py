"""Small helpers the tests share (importable from test modules and their subprocesses)."""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Iterator
import contextlib
import os
from pathlib import Path
import signal
import socket
import subprocess
import sys
import threading
import time

import optuna


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def killing_a_worker_mid_trial(
        study_name: str, storage: str,
        kill: Callable[[optuna.trial.FrozenTrial], bool]) -> Iterator[list[int]]:
    """While the block runs, offer each RUNNING trial of the study to ``kill`` until it
    kills that trial's worker (returns True). Yields a list: then, that trial's number."""
    killed: list[int] = []
    done = threading.Event()

    def watch() -> None:
        watcher = optuna.load_study(study_name=study_name, storage=storage)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not done.is_set():
            for trial in watcher.get_trials(deepcopy=False,
                                            states=(optuna.trial.TrialState.RUNNING,)):
                if kill(trial):
                    killed.append(trial.number)
                    return
            done.wait(0.05)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        yield killed
    finally:
        done.set()
        watcher.join()


class DaskCluster:
    """A real `dask scheduler` and workers on 127.0.0.1, each in its own process group."""

    def __init__(self, root: Path, env: dict[str, str], worker_args: tuple[str, ...] = ()) -> None:
        self.root, self.env, self.worker_args = root, env, worker_args
        self.port = free_port()
        self.address = f"tcp://127.0.0.1:{self.port}"
        self.procs: list[subprocess.Popen[bytes]] = []
        self.scheduler = self._spawn("scheduler", ["scheduler", "--host", "127.0.0.1",
                                                   "--port", str(self.port),
                                                   "--dashboard-address", ":0"])
        self.workers: list[subprocess.Popen[bytes]] = []

    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen[bytes]:
        log = open(self.root / f"{name}-{len(self.procs)}.log", "ab")
        proc = subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_" + args[0], *args[1:]],
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                env=self.env, cwd=self.root)
        self.procs.append(proc)
        return proc

    def add_worker(self) -> subprocess.Popen[bytes]:
        worker = self._spawn("worker", ["worker", self.address, "--nthreads", "1",
                                        "--nworkers", "1", "--no-dashboard",
                                        "--host", "127.0.0.1", *self.worker_args])
        self.workers.append(worker)
        return worker

    def stop(self) -> None:
        for proc in reversed(self.procs):
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(proc.pid, sig)
                    proc.wait(timeout=10)
                    break
                except (ProcessLookupError, subprocess.TimeoutExpired):
                    continue


@contextlib.contextmanager
def busy_store(table: str, run_id: str, times: Callable[[], int],
               error: str = "database is locked") -> Iterator[list[str]]:
    """While the block runs, the SQLite driver refuses this process's writes to ``table``
    (``INSERT``/``UPDATE``) of ``run_id`` with a real ``error``: by default "database is
    locked", as after MLflow's 20 s busy timeout when another process holds the file's
    lock. It refuses ``times()`` of them (read at each write). Yields the refused
    statements. Through SQLAlchemy's public event hook; nothing is mocked."""
    import sqlite3

    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    refused: list[str] = []
    verbs = (f"INSERT INTO {table.upper()}", f"UPDATE {table.upper()}")

    def refuse(conn, cursor, statement, parameters, context, executemany):
        if (len(refused) < times() and statement.lstrip().upper().startswith(verbs)
                and run_id in str(parameters)):
            refused.append(statement)
            raise sqlite3.OperationalError(error)

    event.listen(Engine, "before_cursor_execute", refuse)
    try:
        yield refused
    finally:
        event.remove(Engine, "before_cursor_execute", refuse)
