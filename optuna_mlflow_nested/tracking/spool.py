"""The outage spool: run records MLflow did not take, kept on disk until ``sync``.

Safe across processes: appends and claims hold a file lock (``filelock``), and a
replay first *claims* the records (moves them to a file of its own) and delivers them
outside the lock, so workers can keep appending and two ``sync`` runs never deliver
the same record. Records a replay could not deliver go back into the spool; a claim
left by a replay that died is adopted by the next one. A line torn by a writer that
died mid-append is ended before the next append (so it never swallows a record) and
set aside in ``<spool>.corrupt`` by the next replay, which goes on with the rest.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
import socket
import threading
import warnings

from filelock import FileLock

from optuna_mlflow_nested._utils import redact_secrets
from optuna_mlflow_nested._utils import redact_uri
from optuna_mlflow_nested.tracking.records import RunRecord

_logger = logging.getLogger(__name__)


def default_spool_path() -> Path:
    """``$OMN_SPOOL``, else ``optuna-mlflow-nested.spool.jsonl`` in the working folder."""
    return Path(os.environ.get("OMN_SPOOL", Path.cwd() / "optuna-mlflow-nested.spool.jsonl"))


def _write_private(path: Path, lines: list[str], mode: str) -> None:
    """Write ``lines`` (mode 0600) in one ``write``; append after an unterminated line
    (a writer died mid-append) only once that line is ended, so it joins no record."""
    flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_BINARY", 0) \
        | (os.O_APPEND if mode == "a" else os.O_TRUNC)
    fd = os.open(path, flags, 0o600)
    try:
        data = "".join(line + "\n" for line in lines).encode()
        size = os.fstat(fd).st_size
        if mode == "a" and size:
            os.lseek(fd, size - 1, os.SEEK_SET)  # (O_APPEND writes at the end whatever)
            if os.read(fd, 1) != b"\n":
                data = b"\n" + data
        while data:
            data = data[os.write(fd, data):]
    finally:
        os.close(fd)


class Spool:
    """Append-only JSON-lines file of undelivered run records, created with mode 0600."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._warned = False
        self._warned_unwritable = False

    def _file_lock(self) -> FileLock:
        return FileLock(f"{self.path}.lock")

    def append(self, record: RunRecord) -> None:
        """Keep ``record``; raises ``OSError`` if the spool cannot be written."""
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self._file_lock():
                _write_private(self.path, [record.to_json()], "a")
            if not self._warned:
                self._warned = True
                warnings.warn(
                    f"MLflow at {redact_uri(record.tracking_uri)!r} did not take some runs; "
                    f"they are kept in {self.path} (replay with `optuna-mlflow-nested sync "
                    f"--spool {self.path}`).",
                    RuntimeWarning,
                    stacklevel=2,
                )

    def _claims_of_dead_replays(self) -> list[Path]:
        """Claim files of replays on this host whose process is gone."""
        prefix = f"{self.path.name}.claimed."
        host = socket.gethostname()
        dead = []
        for claimed in self.path.parent.glob(f"{prefix}*"):
            owner, _, pid = claimed.name[len(prefix):].rpartition(".")
            # the exact host: "node1" must not adopt the claims of a live "node1.lan"
            if owner == host and pid.isdigit() and int(pid) != os.getpid() \
                    and not _alive(int(pid)):
                dead.append(claimed)
        return dead

    def warn_unwritable(self, exc: BaseException) -> None:
        """Say once (per spool object) that records are kept in memory instead."""
        with self._lock:
            if self._warned_unwritable:
                return
            self._warned_unwritable = True
        warnings.warn(
            f"cannot write the spool {self.path} ({type(exc).__name__}: "
            f"{redact_secrets(exc)}); undelivered trial runs are kept in memory and can be "
            "rebuilt from Optuna's storage with `optuna-mlflow-nested sync --study-name ... "
            "--storage ...`", RuntimeWarning, stacklevel=3)

    def claim(self) -> list[str]:
        """Take every pending record (and those of dead replays on this host) for delivery."""
        if not self.path.exists() and not self._claims_of_dead_replays():
            return []  # nothing to do (and no lock file left behind)
        mine = Path(f"{self.path}.claimed.{socket.gethostname()}.{os.getpid()}")
        with self._file_lock():
            lines: list[str] = []
            for claimed in self._claims_of_dead_replays():
                lines += claimed.read_text().splitlines()
                claimed.unlink()
            if self.path.exists():
                lines += self.path.read_text().splitlines()
                self.path.unlink()
            lines = [ln for ln in lines if ln.strip()]
            if lines:
                _write_private(mine, lines, "a")
        return lines

    def release(self, remaining: list[str]) -> None:
        """Put records that could not be delivered back; drop this process's claim."""
        mine = Path(f"{self.path}.claimed.{socket.gethostname()}.{os.getpid()}")
        with self._file_lock():
            if remaining:
                _write_private(self.path, remaining, "a")
            mine.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


_replays_lock = threading.Lock()
_replays: dict[str, threading.Lock] = {}


def _replay_lock(path: Path) -> threading.Lock:
    """One replay of a spool at a time in this process (a claim file is per process)."""
    with _replays_lock:
        return _replays.setdefault(str(path.resolve()), threading.Lock())


def _set_aside(spool: Path, lines: list[str]) -> None:
    """Keep lines that are not records (torn by a dying writer) out of the way, not lost."""
    if not lines:
        return
    corrupt = Path(f"{spool}.corrupt")
    _write_private(corrupt, lines, "a")
    _logger.warning("%d line(s) of %s are not run records (a writer died while appending?); "
                    "moved to %s", len(lines), spool, corrupt)


def replay_spool(path: str | os.PathLike[str], tracking_uri: str | None = None) -> tuple[int, int]:
    """Deliver every record of a spool file; keep the ones that still fail.

    ``tracking_uri`` overrides the (credential-free) URI kept in each record.
    Idempotent: replaying twice writes nothing new; safe beside appending workers and
    other replays. Once a tracking server fails to take a record for a reason worth
    retrying (it is away), its other records are kept without trying them. Lines that
    are not records go to ``<spool>.corrupt``. Returns (delivered, remaining).
    """
    from optuna_mlflow_nested.tracking.clients import get_client
    from optuna_mlflow_nested.tracking.delivery import deliver
    from optuna_mlflow_nested.tracking.delivery import is_retryable

    spool = Spool(path)
    with _replay_lock(spool.path):
        lines = spool.claim()
        remaining: list[str] = []
        corrupt: list[str] = []
        away: set[str] = set()
        done = 0
        delivered = 0
        try:
            for line in lines:
                try:
                    record = RunRecord.from_json(line)
                except (ValueError, TypeError, KeyError):
                    corrupt.append(line)
                    done += 1
                    continue
                if tracking_uri is not None:
                    record.tracking_uri = tracking_uri
                if record.tracking_uri in away:
                    remaining.append(line)
                    done += 1
                    continue
                try:
                    deliver(get_client(record.tracking_uri), record)
                    delivered += 1
                except Exception as exc:
                    _logger.warning("replay of %s failed: %s", record.run_name,
                                    redact_secrets(exc))
                    remaining.append(line)
                    if is_retryable(exc):
                        away.add(record.tracking_uri)
                done += 1
        except BaseException:
            remaining += lines[done:]
            raise
        finally:
            try:
                _set_aside(spool.path, corrupt)
            except OSError:
                remaining += corrupt  # better pending for ever than lost
            spool.release(remaining)
        if away:
            _logger.warning("MLflow at %s is away: %d record(s) kept in %s for the next sync",
                            ", ".join(sorted(str(redact_uri(u)) for u in away)),
                            len(remaining), spool.path)
    return delivered, len(remaining)


def sync_lock(*key: str) -> FileLock:
    """A lock that `sync` runs of the same ``key`` (spool path, or storage and study) share.

    Replays are safe together on their own (claims); what needs it is reconciling one
    study from two processes at once, which would give a trial two runs. The lock file
    lives in the temporary folder (one host), named by a hash of the key: no secrets in
    its name, no file left beside the user's data.
    """
    import hashlib
    import tempfile

    digest = hashlib.sha256("\0".join(key).encode()).hexdigest()[:24]
    return FileLock(str(Path(tempfile.gettempdir()) / f"optuna-mlflow-nested-sync-{digest}.lock"))
