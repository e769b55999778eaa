"""The checks of ``optimize(executor=...)``, made before the search touches its parent
run, and the storage the workers are given."""

from __future__ import annotations

import concurrent.futures
import inspect
from multiprocessing.reduction import ForkingPickler
from pathlib import Path
from typing import Any
import warnings

import optuna

from optuna_mlflow_nested import _compat
from optuna_mlflow_nested._study_setup import check_budget
from optuna_mlflow_nested._study_setup import check_optimize_args as _check_common
from optuna_mlflow_nested.tracking.clients import sqlite_path


def check_optimize_args(study: Any, func: Any, n_trials: Any, timeout: Any, n_jobs: Any,
                        executor: Any, n_workers: Any, callbacks: list[Any],
                        catch: tuple[Any, ...]) -> int | None:
    """Check ``optimize``'s arguments before anything runs (the parent run included).

    Returns:
        With an executor and a budget, the number of tasks to submit; else ``n_workers``.

    Raises:
        TypeError, ValueError: naming the bad argument: with ``executor``, also a
            storage or tracking URI the workers cannot share, an objective, callback,
            sampler, pruner or ``catch`` exception class that cannot be pickled (they
            travel to the workers), no ``n_trials``, or a worker count that cannot be known.
    """
    _check_common(func, n_trials, timeout, n_jobs)
    if executor is None:
        return n_workers
    _check_executor(executor, n_jobs)
    if n_trials is None:
        raise ValueError("optimize(executor=...) needs n_trials: the exact total over all workers")
    if n_trials == 0:  # nothing runs, as in Optuna
        return n_workers
    _check_shareable(study, executor)
    _check_picklable(executor, [
        (f"the objective {_name(func)!r}", func),
        *((f"callbacks[{i}] {_name(c)!r}", c) for i, c in enumerate(callbacks)),
        *((f"catch[{i}] {_name(c)!r}", c) for i, c in enumerate(catch)),
        (f"the study's sampler {type(study.sampler).__name__}", study.sampler),
        (f"the study's pruner {type(study.pruner).__name__}", study.pruner)])
    return resolve_workers(executor, n_workers)


def shared_storage(storage: optuna.storages.BaseStorage,
                   executor: Any = None) -> optuna.storages.BaseStorage | str:
    """``storage`` as the workers are to open it: a relative SQLite file as an absolute
    URL, a journal file storage with a relative path (its file's or its lock's) made
    again, of the same classes, on absolute paths (not for a thread pool's workers,
    which are this process).

    A Dask worker or a submitit job starts in a folder of its own, where a relative
    ``sqlite:///optuna.db`` or ``journal.log`` is another, empty file. (Workers reopen an
    RDB storage from its URL anyway, with heartbeats: ``executors._run_worker``.)
    """
    journal = _journal_to_remake(storage, executor)
    if journal is not None:
        backend, path, lock, lock_path = journal
        storage_class: Any = type(storage)
        with warnings.catch_warnings():  # a deprecated import path, a short grace period:
            warnings.simplefilter("ignore")  # Optuna said so when the user made them
            remade = type(lock)(str(Path(lock_path).resolve()), grace_period=lock.grace_period)
            # (the journal is read again here: once per optimize)
            return storage_class(type(backend)(str(Path(path).resolve()), lock_obj=remade))
    url = _compat.rdb_url(storage)
    if url is None or not url.startswith("sqlite"):
        return storage
    from sqlalchemy.engine import make_url

    parsed = make_url(url)  # also sqlite+pysqlite:///...; a query (?timeout=30) is kept
    if parsed.database in (None, "", ":memory:") or Path(parsed.database).is_absolute():
        return storage
    absolute = parsed.set(database=str(Path(parsed.database).resolve()))
    return absolute.render_as_string(hide_password=False)  # (SQLite URLs hold no password)


def _journal_to_remake(storage: Any, executor: Any) -> Any:
    """A journal file storage's ``(backend, path, lock, lock_path)`` when its file's or
    its lock's path is relative and workers may start elsewhere (not a thread pool's:
    they are this process), else ``None``.

    Raises:
        ValueError: it must be made again on absolute paths and cannot be: a class
            other than Optuna's, or a subclass with an ``__init__`` of its own (Optuna's
            deprecated import paths wrap the same ``__init__``).
    """
    from optuna.storages.journal import JournalFileBackend
    from optuna.storages.journal import JournalFileOpenLock
    from optuna.storages.journal import JournalFileSymlinkLock

    journal = _compat.journal_file(storage)
    if journal is None or isinstance(executor, concurrent.futures.ThreadPoolExecutor):
        return None
    backend, path, lock, lock_path = journal
    # A lock class of the user's own keeps its path to itself: only the file's counts.
    if Path(path).is_absolute() and (lock_path is None or Path(lock_path).is_absolute()):
        return None
    locks = (JournalFileOpenLock.__init__, JournalFileSymlinkLock.__init__)
    if not (inspect.unwrap(type(storage).__init__) is optuna.storages.JournalStorage.__init__
            and inspect.unwrap(type(backend).__init__) is JournalFileBackend.__init__
            and lock_path is not None and inspect.unwrap(type(lock).__init__) in locks):
        raise ValueError(
            f"optimize(executor=...) cannot share the journal file {path!r} with the lock "
            f"{type(lock).__name__}: workers started in another folder would open another "
            "file or lock there, and this storage cannot be made again on absolute paths; "
            f"give the file ({str(Path(path).resolve())!r}) and its lock absolute paths")
    return journal


def check_before_study(*, n_trials: Any, timeout: Any, n_jobs: Any, executor: Any,
                       n_workers: Any, storage: Any) -> None:
    """The checks of :func:`check_optimize_args` that need no study, for a caller that
    makes the study (and its parent run) before it calls ``optimize``
    (``tune_catboost``): a bad argument is named before anything is written.
    ``storage`` as given to ``create_study`` (``None``: in memory)."""
    check_budget(n_trials, timeout, n_jobs)
    if executor is None:
        return
    _check_executor(executor, n_jobs)
    if storage is None or isinstance(storage, optuna.storages.InMemoryStorage):
        raise ValueError(_IN_MEMORY)
    if n_workers is not None:  # (a Dask cluster's workers may still be joining)
        resolve_workers(executor, n_workers)


def _check_executor(executor: Any, n_jobs: Any) -> None:
    if not hasattr(executor, "submit"):
        raise TypeError(f"executor must have a submit() method, got {type(executor).__name__}")
    if n_jobs != 1:  # (it was ignored: each task runs its trials one at a time)
        raise ValueError(f"n_jobs={n_jobs!r} with executor=...: the executor's workers run "
                         "the trials in parallel; use n_workers for how many")


_IN_MEMORY = ("optimize(executor=...) needs a storage the workers share (an RDB URL such as "
              "sqlite:////abs/path/optuna.db or postgresql://..., a journal file, or Optuna's "
              "gRPC proxy); this study is in memory")


def _check_shareable(study: Any, executor: Any) -> None:
    storage, _ = _compat.study_storage(study)
    if isinstance(storage, optuna.storages.InMemoryStorage):
        raise ValueError(_IN_MEMORY)
    _journal_to_remake(storage, executor)  # raises if workers elsewhere cannot share it
    url = _compat.rdb_url(storage) or ""
    if url.startswith("sqlite") and (":memory:" in url or url.rstrip("/") == "sqlite:"):
        raise ValueError(f"optimize(executor=...) cannot share the in-memory SQLite storage {url!r}")
    if sqlite_path(study.tracking_uri) is None and study.tracking_uri.startswith("sqlite"):
        raise ValueError("optimize(executor=...) cannot share an in-memory SQLite tracking URI")


def _name(func: Any) -> str:
    return getattr(func, "__qualname__", type(func).__name__)


def _check_picklable(executor: Any, sent: list[tuple[str, Any]]) -> None:
    """Each ``(what, value)`` of ``sent`` as the executor will pickle it, the first that
    fails named (before the budget is queued: a failure there failed every task)."""
    if isinstance(executor, concurrent.futures.ThreadPoolExecutor):
        return  # in process
    if isinstance(executor, concurrent.futures.ProcessPoolExecutor):
        dumps = ForkingPickler.dumps  # the pool's own pickler
    else:
        import cloudpickle

        dumps = cloudpickle.dumps
    for what, value in sent:
        try:
            dumps(value)
        except Exception as exc:
            raise ValueError(
                f"{what} cannot be sent to the executor's workers ({type(exc).__name__}: "
                f"{exc}); define it at module level (process pools pickle functions and "
                "classes by reference) and keep unpicklable state out of it") from None


def resolve_workers(executor: Any, n_workers: int | None) -> int:
    if n_workers is None:
        n_workers = _compat.executor_worker_count(executor)
        if n_workers is None:
            dask = type(executor).__module__.startswith("distributed")
            raise ValueError(
                "n_workers is required: " + (
                    "no Dask worker is connected to the client yet (client.wait_for_workers(n) "
                    "first, or pass n_workers=n)" if dask else
                    f"the worker count of {type(executor).__name__} cannot be known"))
    if isinstance(n_workers, bool) or not isinstance(n_workers, int) or n_workers <= 0:
        raise ValueError(f"n_workers must be a positive integer, got {n_workers!r}")
    return n_workers
