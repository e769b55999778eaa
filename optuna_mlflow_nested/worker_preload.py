"""An executor worker's once-per-process costs, paid as the worker starts.

A worker's first task opens the study's Optuna storage and its MLflow tracking store.
The first such opening in a process imports and sets up SQLAlchemy, Alembic and both
projects' table mappings: about 0.86 s here (``benchmarks/first_open.py``), spent
before the worker's first trial of a fresh cluster's first search. A process pool forked
from the calling process inherits all of it; a Dask worker, or a pool whose processes
are spawned, does not. Dask's ``--preload`` of this module (which calls
:func:`dask_setup`), or :func:`warm_up` in any other long-lived worker process, pays it
before any search. Importing the module alone does nothing.

Usage:
    Dask (``dask_setup`` runs as each worker starts, before it joins the scheduler)::

        dask worker tcp://HEAD:8786 --nthreads 1 --preload optuna_mlflow_nested.worker_preload

    A ``LocalCluster``: ``LocalCluster(..., preload=["optuna_mlflow_nested.worker_preload"])``.

It costs a worker as much at its start, and memory for modules it may not need (the
MLflow store's, with an ``mlflow server`` as tracking; Optuna's database storage's, with a
journal file or the gRPC proxy).
"""

from __future__ import annotations

from typing import Any


def warm_up() -> None:
    """Import and set up what a worker's first task needs to open the study's stores.

    Nothing is opened or written: Optuna's database storage is made once in memory
    (its tables mapped, Alembic loaded), and MLflow's database store's module imported,
    with SQLAlchemy's mappings configured.

    Example:
        >>> from optuna_mlflow_nested.worker_preload import warm_up
        >>> warm_up()
        >>> import sys
        >>> "mlflow.store.tracking.sqlalchemy_store" in sys.modules
        True
    """
    import mlflow.store.tracking.sqlalchemy_store  # noqa: F401
    import optuna
    import sqlalchemy.orm

    import optuna_mlflow_nested.executors  # what a task runs
    import optuna_mlflow_nested.factories  # noqa: F401

    optuna.storages.RDBStorage("sqlite://").engine.dispose()  # in memory: nothing on disk
    sqlalchemy.orm.configure_mappers()


def dask_setup(worker: Any) -> None:
    """Dask's preload hook, called as a worker starts (``--preload`` this module)."""
    warm_up()
