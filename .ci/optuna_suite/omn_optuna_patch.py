"""pytest plugin: Optuna's own tests, with Optuna's study factories replaced by this project's.

Loaded by ``.ci/optuna-suite`` as ``-p omn_optuna_patch`` (this folder on PYTHONPATH).
``optuna.create_study`` / ``optuna.load_study`` (and the same names in ``optuna.study``,
``optuna.study.study`` and in every module that imported them before this plugin was
loaded, e.g. ``optuna.testing.visualization``) become thin adapters that call
``optuna_mlflow_nested.create_study`` / ``load_study`` with Optuna's keyword arguments passed
through unchanged plus ``tracking_uri=`` a per-test SQLite MLflow store.

Per-test stores are cheap: MLflow's schema migration runs once per session, in a
subprocess, into a template file; a test's store is a copy of it, made on the first
create/load call of that test (tests that never create a study pay nothing) and deleted
after the test.

While the project's own functions run, calls to the patched names from the same thread go
to Optuna's originals: the project builds its study with ``optuna.create_study``.
"""

from __future__ import annotations

import functools
import itertools
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from typing import Any

import optuna
import optuna.study
import optuna.study.study
import pytest

_ORIG_CREATE = optuna.study.study.create_study
_ORIG_LOAD = optuna.study.study.load_study

_MODULES = (optuna, optuna.study, optuna.study.study)

_guard = threading.local()
_lock = threading.Lock()
_state: dict[str, Any] = {"root": None, "template": None, "db": None, "owns_root": False}
_counter = itertools.count()


def _quiet_logs() -> None:
    for name in ("mlflow", "alembic", "alembic.runtime.migration", "sqlalchemy"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _make_template(path: str) -> None:
    """Migrate an empty MLflow SQLite store once; in a subprocess so no engine stays open."""
    code = (
        "import logging, sys, mlflow\n"
        "logging.disable(logging.INFO)\n"
        "mlflow.MlflowClient('sqlite:///' + sys.argv[1]).search_experiments()\n"
    )
    subprocess.run([sys.executable, "-c", code, path], check=True, cwd=os.path.dirname(path))


def _tracking_uri() -> str:
    """The current test's store URI; the file is copied from the template on first use."""
    with _lock:
        db = _state["db"]
        if db is None:  # outside any test (collection time): one session-wide store
            db = _state["db"] = os.path.join(_state["root"], "session.db")
        if not os.path.exists(db):
            shutil.copyfile(_state["template"], db)
        return "sqlite:///" + db


class _Inside:
    """Marks the current thread as running this project's create/load function."""

    def __enter__(self) -> None:
        _guard.depth = getattr(_guard, "depth", 0) + 1

    def __exit__(self, *exc: object) -> None:
        _guard.depth -= 1


def _inside() -> bool:
    return getattr(_guard, "depth", 0) > 0


@functools.wraps(_ORIG_CREATE)
def create_study(
    *,
    storage: Any = None,
    sampler: Any = None,
    pruner: Any = None,
    study_name: str | None = None,
    direction: Any = None,
    load_if_exists: bool = False,
    directions: Any = None,
) -> Any:
    kwargs = dict(storage=storage, sampler=sampler, pruner=pruner, study_name=study_name,
                  direction=direction, load_if_exists=load_if_exists, directions=directions)
    if _inside():
        return _ORIG_CREATE(**kwargs)
    import optuna_mlflow_nested as omn

    with _Inside():
        return omn.create_study(tracking_uri=_tracking_uri(), **kwargs)


@functools.wraps(_ORIG_LOAD)
def load_study(
    *,
    study_name: str | None,
    storage: Any,
    sampler: Any = None,
    pruner: Any = None,
) -> Any:
    kwargs = dict(study_name=study_name, storage=storage, sampler=sampler, pruner=pruner)
    if _inside():
        return _ORIG_LOAD(**kwargs)
    import optuna_mlflow_nested as omn

    with _Inside():
        return omn.load_study(tracking_uri=_tracking_uri(), **kwargs)


def _patch_everywhere() -> int:
    """Replace the originals in Optuna's modules and in any module that imported them."""
    n = 0
    for mod in _MODULES:
        mod.create_study = create_study  # type: ignore[attr-defined]
        mod.load_study = load_study  # type: ignore[attr-defined]
        n += 2
    for name, mod in list(sys.modules.items()):
        if mod is None or name == __name__ or name.startswith("optuna_mlflow_nested"):
            continue
        for attr in ("create_study", "load_study"):
            try:
                value = mod.__dict__.get(attr)
            except Exception:
                continue
            if value is _ORIG_CREATE or value is _ORIG_LOAD:
                setattr(mod, attr, create_study if value is _ORIG_CREATE else load_study)
                n += 1
    return n


def pytest_configure(config: pytest.Config) -> None:
    _quiet_logs()
    root = os.environ.get("OMN_SUITE_TMPDIR")
    if root:
        root = os.path.join(root, f"mlflow-stores-{os.getpid()}")
        os.makedirs(root, exist_ok=True)
    else:
        root = tempfile.mkdtemp(prefix="omn-optuna-suite-")
    _state["root"] = root
    _state["owns_root"] = True
    template = os.path.join(root, "template.db")
    _make_template(template)
    _state["template"] = template
    import optuna_mlflow_nested as omn  # fail the whole run early if the package is broken

    _patch_everywhere()
    config._omn_patch_info = (  # type: ignore[attr-defined]
        f"omn patch: optuna {optuna.__version__} from {os.path.dirname(optuna.__file__)}; "
        f"optuna_mlflow_nested from {os.path.dirname(omn.__file__)}; stores under {root}"
    )


def pytest_report_header(config: pytest.Config) -> str:
    return getattr(config, "_omn_patch_info", "omn patch: not configured")


def pytest_collection_finish(session: pytest.Session) -> None:
    _patch_everywhere()  # modules imported during collection (optuna.testing.*)


@pytest.fixture(autouse=True)
def _omn_per_test_tracking_uri() -> Any:
    _quiet_logs()  # tests such as Optuna's logging tests reset handlers and levels
    db = os.path.join(_state["root"], f"t{next(_counter)}.db")
    with _lock:
        _state["db"] = db
    yield "sqlite:///" + db
    with _lock:
        _state["db"] = None
    for path in (db, db + "-journal", db + "-wal", db + "-shm", db + ".lock"):
        try:
            os.remove(path)
        except OSError:
            pass


def pytest_unconfigure(config: pytest.Config) -> None:
    for mod in _MODULES:
        mod.create_study = _ORIG_CREATE  # type: ignore[attr-defined]
        mod.load_study = _ORIG_LOAD  # type: ignore[attr-defined]
    if _state["owns_root"] and _state["root"]:
        shutil.rmtree(_state["root"], ignore_errors=True)
