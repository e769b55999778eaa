"""Small helpers the tests share (importable from test modules and their subprocesses)."""

from __future__ import annotations

import os
from pathlib import Path
import signal
import socket
import subprocess
import sys


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class DaskCluster:
    """A real `dask scheduler` and workers on 127.0.0.1, each in its own process group."""

    def __init__(self, root: Path, env: dict[str, str]) -> None:
        self.root, self.env = root, env
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
                                        "--host", "127.0.0.1"])
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
