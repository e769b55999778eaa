"""The command line's engines: the shared storage with heartbeats, and the executor
that ``tune --workers`` / ``tune --dask`` run trials on."""

from __future__ import annotations

import argparse
from collections.abc import Iterator
import contextlib
import re
from typing import Any
from typing import NoReturn


class UsageError(Exception):
    """Bad input from the command line: one line on stderr, exit code 2."""


class CommandParser(argparse.ArgumentParser):
    """Its usage errors are one line on stderr and exit code 2, as the command's own
    checks' are (argparse printed the whole usage first); ``--help`` shows the usage."""

    def error(self, message: str) -> NoReturn:
        # A command's unknown options reach the top parser, whose --help lists commands.
        command = " COMMAND" if " " not in self.prog and "unrecognized" in message else ""
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog}{command} --help)\n")


#: The library's Python names that its errors use, as the flags that give them.
_FLAGS = {"tracking_uri": "--tracking-uri", "optimize(executor=...)": "--workers/--dask"}
#: As a word of the message's prose: not inside a path, a URI or a quoted value.
_PYTHON_NAME = re.compile(r"(?<!\S)(" + "|".join(map(re.escape, _FLAGS)) + r")(?= )")


def in_flags(message: str) -> str:
    """A library error's ``message`` for the command line: the Python arguments it names
    as their flags (the command's checks are the library's; a user of the command never
    wrote ``tracking_uri``)."""
    return _PYTHON_NAME.sub(lambda match: _FLAGS[match.group(1)], message)


def add_heartbeat_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--heartbeat-interval", type=int, default=5,
                        help="seconds between a running trial's heartbeats on an RDB storage "
                        "(0: off); a trial silent for --grace-period is failed")
    parser.add_argument("--grace-period", type=int, default=20,
                        help="seconds without a heartbeat after which a trial (and its run) "
                        "is failed, and a dead worker's spare runs are deleted by sync")


def storage_from(args: argparse.Namespace) -> Any:
    """``--storage``, with heartbeats on for RDB URLs (a killed worker's trial is failed)."""
    import warnings

    import optuna

    url = args.storage
    if not args.heartbeat_interval or not url.startswith(("sqlite", "postgresql", "mysql")):
        return url
    if args.heartbeat_interval < 0 or args.grace_period <= args.heartbeat_interval:
        raise UsageError("--heartbeat-interval must be positive and below --grace-period")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        try:
            return optuna.storages.RDBStorage(url, heartbeat_interval=args.heartbeat_interval,
                                              grace_period=args.grace_period)
        except Exception as exc:
            from optuna_mlflow_nested._utils import redact_secrets
            from optuna_mlflow_nested._utils import redact_uri

            raise UsageError(f"--storage {redact_uri(url)!r} is not usable: "
                             f"{redact_secrets(str(exc).splitlines()[0])}") from None


@contextlib.contextmanager
def executor_from(args: argparse.Namespace) -> Iterator[Any]:
    """``--workers N``: a process pool; ``--dask ADDRESS``: that Dask cluster; else none.

    SIGTERM (``kill``, ``timeout``, a batch scheduler) becomes an interrupt that reaches
    the pool's workers too, so each fails or finishes its trial and flushes its runs.
    """
    if args.dask:
        try:
            from distributed import Client
        except ImportError:
            raise UsageError("--dask needs Dask: pip install 'optuna-mlflow-nested[dask]'") from None
        try:
            client = Client(args.dask, timeout=30)
        except OSError as exc:
            raise UsageError(f"--dask {args.dask}: no Dask scheduler there ({exc})") from None
        with client:
            yield client.get_executor()
        return
    if args.workers == 1:
        yield None
        return
    from concurrent.futures import ProcessPoolExecutor
    import multiprocessing
    import os
    import signal

    def interrupt(signum: int, frame: Any) -> None:
        for child in multiprocessing.active_children():
            with contextlib.suppress(ProcessLookupError):
                os.kill(child.pid or 0, signal.SIGINT)
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    from optuna_mlflow_nested.executors import worker_initializer

    pool = ProcessPoolExecutor(args.workers, initializer=worker_initializer)
    try:
        yield pool
    except KeyboardInterrupt:
        for child in multiprocessing.active_children():
            with contextlib.suppress(ProcessLookupError):
                os.kill(child.pid or 0, signal.SIGINT)
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        signal.signal(signal.SIGTERM, previous)
