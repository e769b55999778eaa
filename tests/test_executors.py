"""optimize(executor=...): process pools, a real Dask cluster, submitit (issue 13).

Every test checks the exact budget, one run per trial under the one parent, no run left
RUNNING, and the parent's summary."""

from __future__ import annotations

import ast
from collections.abc import Callable
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures import ThreadPoolExecutor
import os
from pathlib import Path
import re
import signal
import subprocess
import sys
import threading
import time
from typing import Any

from mlflow.tracking import MlflowClient
import optuna
import pytest
from tests_support import DaskCluster
from tests_support import free_port
from tests_support import killing_a_worker_mid_trial

import optuna_mlflow_nested as omn
from optuna_mlflow_nested import _utils


def quadratic(trial: optuna.Trial) -> float:
    import mlflow

    x = trial.suggest_float("x", -2, 2)
    mlflow.log_metric("inside", x)
    return x * x


def assert_tree(study: omn.NestedStudy, expected: int) -> None:
    trials = study.trials
    assert len(trials) == expected
    assert all(t.state.is_finished() for t in trials)
    client = MlflowClient(study.tracking_uri)
    runs = client.search_runs([study.experiment_id],
                              f"tags.mlflow.parentRunId = '{study.parent_run_id}'")
    numbers = sorted(int(r.data.tags["optuna.trial_number"]) for r in runs)
    assert numbers == list(range(expected)), "one run per trial, no duplicates"
    assert "RUNNING" not in {r.info.status for r in runs}
    for run in runs:
        trial = trials[int(run.data.tags["optuna.trial_number"])]
        if trial.state.name == "COMPLETE":
            assert run.info.status == "FINISHED"
            assert run.data.metrics["inside"] == pytest.approx(trial.params["x"])
    everything = client.search_runs([study.experiment_id], run_view_type=3)
    assert "RUNNING" not in {r.info.status for r in everything}, "deleted spares must be ended"
    parent = client.get_run(study.parent_run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["n_trials"] == expected
    assert "best_trial" in parent.data.tags


def make_study(tmp_path: Path, name: str, tracking_uri: str) -> omn.NestedStudy:
    return omn.create_study(name, storage=f"sqlite:///{tmp_path / 'optuna.db'}",
                            tracking_uri=tracking_uri, sampler="random", seed=0)


def test_process_pool_runs_the_exact_budget(tmp_path: Path, tracking_uri: str) -> None:
    study = make_study(tmp_path, "pool", tracking_uri)
    study.optimize(quadratic, n_trials=3)  # the budget is the total of *this* call
    # The pool forks its workers at its first submit: no thread of ours may be using a
    # SQLite file then (README, "SQLite and fork"); the writer process's pipe reader and
    # the figure imports' warm-up use none.
    ours = {t.name for t in threading.enumerate() if t.name.startswith("omn-")}
    assert ours <= {"omn-writer-reader", "omn-warm-up"}, ours
    with ProcessPoolExecutor(2) as pool:
        study.optimize(quadratic, n_trials=13, executor=pool)
    assert_tree(study, 16)
    assert len({t.params["x"] for t in study.trials}) == 16, "workers were reseeded"


def _write_one_row(path: str) -> str:
    import sqlite3

    try:
        with sqlite3.connect(path, timeout=0.5) as connection:
            connection.execute("INSERT INTO t VALUES (2)")
        return "written"
    except sqlite3.OperationalError as exc:
        return str(exc)


@pytest.mark.parametrize("journal", ["delete", "wal"])
def test_readme_a_worker_forked_while_a_sqlite_lock_is_held_can_never_write(
        tmp_path: Path, journal: str) -> None:
    # What the README's "SQLite and fork" says, and its advice: a forkserver pool's worker
    # started at the same moment writes. Delete (rollback) journal, Optuna's SQLite
    # storage: a read is enough; WAL, as this library's MLflow store: a write.
    # (CPython's default start method on Linux is fork before 3.14.)
    import multiprocessing
    import sqlite3

    path = str(tmp_path / "x.db")
    with sqlite3.connect(path) as setup:
        setup.execute(f"PRAGMA journal_mode={journal}")
        setup.execute("CREATE TABLE t (a)")
        setup.executemany("INSERT INTO t VALUES (?)", [(i,) for i in range(10)])
    holder = sqlite3.connect(path)
    if journal == "delete":
        rows = holder.execute("SELECT * FROM t")
        rows.fetchone()  # the statement is not finished: a read lock
    else:
        holder.execute("INSERT INTO t VALUES (3)")  # an open write transaction
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("fork")) as forked, \
            ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("forkserver")) as served:
        forked.submit(os.getpid).result()  # both pools' workers start while it is held
        served.submit(os.getpid).result()
        if journal == "delete":
            rows.fetchall()
        else:
            holder.commit()
        holder.close()  # no process holds a lock now
        assert served.submit(_write_one_row, path).result() == "written"
        assert forked.submit(_write_one_row, path).result() == "database is locked"
        # Rollback journal: its failed write leaves it holding a read lock for good, so no
        # process can write while it lives.
        after = served.submit(_write_one_row, path).result()
        assert after == ("database is locked" if journal == "delete" else "written")


def test_executor_input_errors(tmp_path: Path, tracking_uri: str) -> None:
    in_memory = omn.create_study("mem", tracking_uri=tracking_uri)
    with ProcessPoolExecutor(1) as pool:
        with pytest.raises(ValueError, match="in memory"):
            in_memory.optimize(quadratic, n_trials=2, executor=pool)
        study = make_study(tmp_path, "errors", tracking_uri)
        with pytest.raises(ValueError, match=r"objective 'test_executor_input_errors\.<locals>"):
            study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2, executor=pool)
        with pytest.raises(ValueError, match="n_trials"):
            study.optimize(quadratic, executor=pool)
        with pytest.raises(ValueError, match="n_workers"):
            study.optimize(quadratic, n_trials=2, executor=pool, n_workers=0)
        with pytest.raises(ValueError, match="n_jobs=2"):  # (was ignored)
            study.optimize(quadratic, n_trials=2, executor=pool, n_jobs=2)
    assert study.trials == [] and in_memory.trials == []


def test_executor_input_errors_leave_a_finished_study_as_it_was(tmp_path: Path,
                                                              tracking_uri: str) -> None:
    # "a clear ValueError before anything runs": the parent run of a study that
    # finished stays FINISHED, with its tags, after a mistyped optimize(executor=...).
    study = make_study(tmp_path, "kept", tracking_uri)
    study.optimize(quadratic, n_trials=2)
    assert study.wait_for_figures(timeout=120)
    client = MlflowClient(tracking_uri)
    before = client.get_run(study.parent_run_id)
    with ProcessPoolExecutor(1) as pool:
        with pytest.raises(ValueError, match="objective"):
            study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2, executor=pool)
        with pytest.raises(ValueError, match="n_trials"):
            study.optimize(quadratic, executor=pool)
        with pytest.raises(ValueError, match="n_workers"):
            study.optimize(quadratic, n_trials=2, executor=pool, n_workers=0)
    after = client.get_run(study.parent_run_id)
    assert after.info.status == before.info.status == "FINISHED"
    assert after.info.end_time == before.info.end_time
    assert after.data.tags == before.data.tags
    assert len(study.trials) == 2


def test_what_cannot_reach_the_workers_is_named_before_anything_runs(
        tmp_path: Path, tracking_uri: str) -> None:
    # The callbacks, the sampler and the pruner travel to the workers with the
    # objective: one that cannot be pickled used to fail every task after the budget
    # was queued (its trials left WAITING) and the parent run was ended FAILED.
    class LocalSampler(optuna.samplers.RandomSampler):  # classes pickle cannot find
        pass

    class LocalPruner(optuna.pruners.NopPruner):
        pass

    class LocalError(Exception):
        pass

    cases = [
        (make_study(tmp_path, "callback", tracking_uri), {"callbacks": [lambda s, t: None]},
         r"callbacks\[0\] 'test_what_cannot_reach.*<lambda>'"),
        (omn.create_study("sampler", storage=f"sqlite:///{tmp_path / 'sampler.db'}",
                          tracking_uri=tracking_uri, sampler=LocalSampler(seed=0)), {},
         "sampler LocalSampler"),
        (omn.create_study("pruner", storage=f"sqlite:///{tmp_path / 'pruner.db'}",
                          tracking_uri=tracking_uri, pruner=LocalPruner()), {},
         "pruner LocalPruner"),
        (omn.create_study("catch", storage=f"sqlite:///{tmp_path / 'catch.db'}",
                          tracking_uri=tracking_uri), {"catch": (LocalError,)},
         r"catch\[0\] 'test_what_cannot_reach.*LocalError'"),
    ]
    client = MlflowClient(tracking_uri)
    with ProcessPoolExecutor(1) as pool:
        for study, kwargs, named in cases:
            study.optimize(quadratic, n_trials=1)  # a finished study, its parent FINISHED
            assert study.wait_for_figures(timeout=120)
            before = client.get_run(study.parent_run_id)
            with pytest.raises(ValueError, match=named):
                study.optimize(quadratic, n_trials=3, executor=pool, **kwargs)
            after = client.get_run(study.parent_run_id)
            assert after.info.status == "FINISHED"
            assert (after.info.end_time, after.data.tags) == (before.info.end_time, before.data.tags)
            assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE]


def mark_trial(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    study.set_user_attr(f"called-{trial.number}", True)


def test_callbacks_given_as_a_generator_reach_the_workers(tmp_path: Path,
                                                          tracking_uri: str) -> None:
    # Optuna takes any iterable of callbacks: the pickling check must not spend it.
    study = make_study(tmp_path, "generator", tracking_uri)
    with ProcessPoolExecutor(2) as pool:
        study.optimize(quadratic, n_trials=4, executor=pool,
                       callbacks=(callback for callback in [mark_trial]))
    assert_tree(study, 4)
    assert sorted(study.user_attrs) == [f"called-{n}" for n in range(4)]


def stop_after_the_second_trial(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    if trial.number >= 1:
        study.stop()


@pytest.mark.slow  # ~10 s: the default suite stays under 5 minutes
def test_a_worker_stopped_by_study_stop_says_what_is_left_of_the_budget(
        tmp_path: Path, tracking_uri: str) -> None:
    # study.stop() in a callback stops the worker that calls it (Optuna's rule for its
    # optimize). The call returned quietly with the rest of its budget still queued.
    study = make_study(tmp_path, "stopped", tracking_uri)
    with ProcessPoolExecutor(1) as pool:
        with pytest.warns(RuntimeWarning, match=r"2 trial\(s\) of this call's budget .*study\.stop"):
            study.optimize(quadratic, n_trials=4, executor=pool,
                           callbacks=[stop_after_the_second_trial])
    states = [t.state.name for t in study.trials]
    assert states == ["COMPLETE", "COMPLETE", "WAITING", "WAITING"]
    with ProcessPoolExecutor(1) as pool:  # the next call runs them first, within its budget
        study.optimize(quadratic, n_trials=2, executor=pool)
    assert_tree(study, 4)
    # The GridSampler stops the study once its grid is done: the warning says so.
    grid = omn.create_study("grid", storage=f"sqlite:///{tmp_path / 'grid.db'}",
                            tracking_uri=tracking_uri, sampler="grid",
                            search_space={"x": [-1.0, 0.0, 1.0]})
    with ProcessPoolExecutor(1) as pool:
        with pytest.warns(RuntimeWarning, match=r"3 trial\(s\) .*GridSampler"):
            grid.optimize(quadratic, n_trials=6, executor=pool)


class TwoArgumentError(Exception):
    # Pickles as TwoArgumentError(message): unpickling it calls __init__ with one argument.
    def __init__(self, what: str, value: float) -> None:
        super().__init__(f"{what}: {value}")


def fails_from_the_third_trial(trial: optuna.Trial) -> float:
    x = quadratic(trial)
    if trial.number >= 2:
        raise TwoArgumentError("too far", x)
    return x


def test_an_objective_error_that_does_not_unpickle_reaches_the_caller(
        tmp_path: Path, tracking_uri: str) -> None:
    # Without an executor Optuna re-raises the objective's error. A process pool sends
    # a worker's error back pickled; one that does not unpickle broke the pool
    # (BrokenProcessPool: "terminated abruptly"), which hid the error and its traceback.
    study = make_study(tmp_path, "unpickled", tracking_uri)
    with ProcessPoolExecutor(1) as pool:
        with pytest.raises(RuntimeError, match=r"TwoArgumentError: too far: ") as raised:
            study.optimize(fails_from_the_third_trial, n_trials=4, executor=pool)
        assert pool.submit(int, "3").result() == 3, "the pool still works"
    assert "in fails_from_the_third_trial" in str(raised.value), "the worker's traceback"
    states = [t.state.name for t in study.trials]
    assert states[:3] == ["COMPLETE", "COMPLETE", "FAIL"]
    client = MlflowClient(tracking_uri)
    runs = client.search_runs([study.experiment_id],
                              f"tags.mlflow.parentRunId = '{study.parent_run_id}'")
    assert {int(r.data.tags["optuna.trial_number"]): r.info.status for r in runs} == {
        0: "FINISHED", 1: "FINISHED", 2: "FAILED"}
    assert client.get_run(study.parent_run_id).info.status == "FAILED"


def test_an_error_that_cloudpickle_sends_keeps_its_type() -> None:
    # Dask and submitit send a task's error with cloudpickle, which takes a class defined
    # in __main__ or in a function by value: such errors reached the caller as a
    # RuntimeError, and the user's `except LocalError` missed them.
    class LocalError(Exception):
        pass

    error = LocalError("kept")
    assert _utils.error_that_travels(error) is error


def test_a_relative_sqlite_storage_reaches_workers_started_in_another_folder(
        tmp_path: Path, tracking_uri: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # A Dask worker or a submitit job starts in its own folder: a relative
    # sqlite:///optuna.db there is another, empty file.
    here, elsewhere = tmp_path / "here", tmp_path / "elsewhere"
    here.mkdir()
    elsewhere.mkdir()
    monkeypatch.chdir(here)
    study = omn.create_study("relative", storage="sqlite:///optuna.db",
                             tracking_uri=tracking_uri, sampler="random", seed=0)
    with ProcessPoolExecutor(2, initializer=os.chdir, initargs=(str(elsewhere),)) as pool:
        study.optimize(quadratic, n_trials=6, executor=pool)
    assert_tree(study, 6)
    assert not (elsewhere / "optuna.db").exists()


@pytest.mark.parametrize("lock", ["symlink", "open"])
def test_a_relative_journal_file_reaches_workers_started_in_another_folder(
        tmp_path: Path, tracking_uri: str, monkeypatch: pytest.MonkeyPatch, lock: str) -> None:
    # As a relative SQLite file: Optuna's journal file backend keeps the path as given,
    # so a worker in another folder opened another, empty journal there (and its lock).
    from optuna.storages.journal import JournalFileBackend
    from optuna.storages.journal import JournalFileOpenLock
    from optuna.storages.journal import JournalFileSymlinkLock

    here, elsewhere = tmp_path / "here", tmp_path / "elsewhere"
    here.mkdir()
    elsewhere.mkdir()
    monkeypatch.chdir(here)
    lock_class = JournalFileSymlinkLock if lock == "symlink" else JournalFileOpenLock
    storage = optuna.storages.JournalStorage(JournalFileBackend(
        "journal.log", lock_obj=lock_class("journal.log", grace_period=12)))
    study = omn.create_study("relative-journal", storage=storage, tracking_uri=tracking_uri,
                             sampler="random", seed=0)
    with ProcessPoolExecutor(2, initializer=os.chdir, initargs=(str(elsewhere),)) as pool:
        study.optimize(quadratic, n_trials=6, executor=pool)
    assert_tree(study, 6)
    assert list(elsewhere.iterdir()) == []
    reloaded = optuna.load_study(study_name="relative-journal", storage=optuna.storages.JournalStorage(
        JournalFileBackend(str(here / "journal.log"))))
    assert len(reloaded.trials) == 6


@pytest.mark.slow  # a tracking server
@pytest.mark.postgres
def test_process_pool_on_postgres_and_a_tracking_server(postgres_url: str,
                                                        mlflow_server: Any) -> None:
    # The recipes' storage and tracking for many machines, on one.
    storage = postgres_url.replace("postgresql://", "postgresql+psycopg2://")
    study = omn.create_study("pool-pg-server", experiment_name="pool-pg-server",
                             storage=storage, tracking_uri=mlflow_server.uri,
                             sampler="random", seed=0)
    with ProcessPoolExecutor(2) as pool:
        study.optimize(quadratic, n_trials=8, executor=pool)
    assert_tree(study, 8)


def test_shared_storage_makes_relative_sqlite_and_journal_paths_absolute(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import warnings

    from optuna.storages.journal import JournalFileBackend
    from optuna.storages.journal import JournalFileOpenLock
    from optuna.storages.journal import JournalFileSymlinkLock

    from optuna_mlflow_nested import _compat
    from optuna_mlflow_nested._executor_checks import shared_storage

    monkeypatch.chdir(tmp_path)
    relative = optuna.storages.RDBStorage("sqlite+pysqlite:///rel.db?timeout=30")
    assert shared_storage(relative) == f"sqlite+pysqlite:///{tmp_path / 'rel.db'}?timeout=30"
    absolute = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'abs.db'}")
    assert shared_storage(absolute) is absolute

    def journal(path: str, lock: object) -> optuna.storages.JournalStorage:
        return optuna.storages.JournalStorage(JournalFileBackend(path, lock_obj=lock))

    both_absolute = journal(str(tmp_path / "a.log"), JournalFileOpenLock(str(tmp_path / "a.log")))
    assert shared_storage(both_absolute) is both_absolute
    # The lock keeps its own path (other processes lock that file), made absolute.
    relative_journal = journal("j.log", JournalFileOpenLock("other", grace_period=12))
    remade = shared_storage(relative_journal)
    _, path, lock, lock_path = _compat.journal_file(remade)
    assert (path, type(lock), lock.grace_period, lock_path) == (
        str(tmp_path / "j.log"), JournalFileOpenLock, 12, str(tmp_path / "other"))
    with ThreadPoolExecutor(1) as threads:  # its workers are this process: as given
        assert shared_storage(relative_journal, threads) is relative_journal
    relative_lock = journal(str(tmp_path / "b.log"), JournalFileSymlinkLock("b.log", grace_period=None))
    _, path, lock, lock_path = _compat.journal_file(shared_storage(relative_lock))
    assert (path, type(lock), lock.grace_period, lock_path) == (
        str(tmp_path / "b.log"), JournalFileSymlinkLock, None, str(tmp_path / "b.log"))
    with warnings.catch_warnings(record=True) as seen:  # said once, when the user made it
        warnings.simplefilter("always")
        short = journal("c.log", JournalFileOpenLock("c.log", grace_period=2))
        assert len(seen) == 1
        _, _, lock, _ = _compat.journal_file(shared_storage(short))
    assert lock.grace_period == 2 and len(seen) == 1


class TeamLock(optuna.storages.journal.JournalFileOpenLock):
    """A journal file lock with an ``__init__`` of its own (module level: picklable)."""

    def __init__(self, filepath: str, team: str) -> None:
        super().__init__(filepath)
        self.team = team


def test_a_relative_journal_file_with_a_lock_of_its_own_is_a_clear_error(
        tmp_path: Path, tracking_uri: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # A lock class this project cannot rebuild for the absolute path: named, before
    # anything runs (no trial queued).
    from optuna.storages.journal import JournalFileBackend

    monkeypatch.chdir(tmp_path)
    storage = optuna.storages.JournalStorage(JournalFileBackend(
        "journal.log", lock_obj=TeamLock("journal.log", "a")))
    study = omn.create_study("own-lock", storage=storage, tracking_uri=tracking_uri)
    named = r"journal file .journal\.log. with the lock TeamLock"
    with ProcessPoolExecutor(2) as pool, pytest.raises(ValueError, match=named):
        study.optimize(quadratic, n_trials=4, executor=pool)
    assert study.trials == []
    with ThreadPoolExecutor(2) as threads:  # its workers are this process: it works
        study.optimize(quadratic, n_trials=4, executor=threads)
    assert_tree(study, 4)


def sleepy(trial: optuna.Trial) -> float:
    time.sleep(0.2)
    return trial.suggest_float("x", -2, 2) ** 2


@pytest.mark.slow  # default suite under 5 min on 2 cores
def test_timeout_leaves_queued_trials_that_the_next_call_counts_in_its_budget(
        tmp_path: Path, tracking_uri: str) -> None:
    study = make_study(tmp_path, "timeout", tracking_uri)
    study.enqueue_trial({"x": 1.5})  # the user's queued trial: first, in the budget (Optuna)
    with ProcessPoolExecutor(2) as pool:
        study.optimize(sleepy, n_trials=40, timeout=1.0, executor=pool)
        done = [t for t in study.trials if t.state.is_finished()]
        waiting = study.get_trials(states=(optuna.trial.TrialState.WAITING,))
        assert len(done) < 40 and len(done) + len(waiting) == 40  # the queued one counts
        assert "RUNNING" not in {t.state.name for t in study.trials}
        # The next call runs exactly its n_trials, the oldest queued first.
        study.optimize(quadratic, n_trials=3, executor=pool)
    finished = {t.number for t in study.trials if t.state.is_finished()}
    assert finished == {t.number for t in done} | {t.number for t in waiting[:3]}
    assert len(study.get_trials(states=(optuna.trial.TrialState.WAITING,))) == len(waiting) - 3
    assert study.trials[0].params == {"x": 1.5}  # the enqueued trial ran, in one call or the other
    parent = MlflowClient(tracking_uri).get_run(study.parent_run_id)
    assert parent.info.status == "FINISHED"


README = (Path(__file__).resolve().parents[1] / "README.md").read_text()
#: The README's Dask recipe for CPU-bound trials (the workers' event loops wake up
#: less), as written there: the variables set before its `dask worker` command.
QUIETER_DASK_ENV = dict(re.findall(r"^\s*(DASK_DISTRIBUTED__\w+)=(\S+) \\$", README, flags=re.M))
#: Its `dask worker` command's preload, as written there (none: the Dask test fails).
_PRELOAD = re.search(r"^\s*dask worker tcp://HEAD:8786 .*?(--preload \S+)", README, flags=re.M)
README_PRELOAD = tuple(_PRELOAD.group(1).split()) if _PRELOAD else ()

#: What opening an Optuna database storage and an MLflow database store imports the
#: first time in a process.
STORE_IMPORTS = ("sqlalchemy", "alembic", "mako", "optuna.storages._rdb",
                 "mlflow.store.tracking.sqlalchemy_store")


@pytest.mark.slow  # default suite under 5 min on 2 cores
@pytest.mark.parametrize("preloaded", [True, False])
def test_worker_preload_leaves_a_first_task_none_of_the_stores_imports(
        tmp_path: Path, tracking_uri: str, preloaded: bool) -> None:
    # A fresh worker process (a Dask worker, a spawned pool process) runs its first task:
    # load the study, one trial. With the preload, that imports none of the stores' modules.
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    make_study(tmp_path, "preload", tracking_uri)
    code = "\n".join([
        "import sys",
        "import optuna_mlflow_nested as omn",
        "from optuna_mlflow_nested import worker_preload",
        "worker_preload.dask_setup(None)" if preloaded else "",
        "before = set(sys.modules)",
        f"study = omn.load_study('preload', storage={storage!r}, tracking_uri={tracking_uri!r})",
        "study.optimize(lambda t: t.suggest_float('x', 0, 1), n_trials=1)",
        "print(sorted(set(sys.modules) - before))"])
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=tmp_path, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    new_modules = ast.literal_eval(done.stdout.strip().splitlines()[-1])
    imported = [m for m in new_modules if m.startswith(STORE_IMPORTS)]
    if preloaded:
        assert imported == []
    else:  # what the preload is for
        assert "mlflow.store.tracking.sqlalchemy_store" in imported
        assert any(m.startswith("optuna.storages._rdb") for m in imported)


@pytest.fixture
def dask_cluster(tmp_path: Path) -> Iterator[DaskCluster]:
    pytest.importorskip("distributed")
    env = {**os.environ, "OMN_HEARTBEAT_INTERVAL": "1", "OMN_GRACE_PERIOD": "3",
           "DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES": "5", **QUIETER_DASK_ENV}
    cluster = DaskCluster(tmp_path, env, worker_args=README_PRELOAD)
    cluster.add_worker()
    cluster.add_worker()
    try:
        yield cluster
    finally:
        cluster.stop()


def _client(cluster: DaskCluster) -> object:
    from distributed import Client

    client = Client(cluster.address, timeout=60)
    client.wait_for_workers(len(cluster.workers), timeout=90)
    return client


@pytest.mark.slow  # ~11 s: the default suite stays under 5 minutes
def test_dask_cluster_runs_the_exact_budget(tmp_path: Path, tracking_uri: str,
                                            dask_cluster: DaskCluster) -> None:
    study = make_study(tmp_path, "dask", tracking_uri)

    def objective(trial: optuna.Trial) -> float:  # sent by value (cloudpickle)
        import os
        import time

        import mlflow

        trial.set_user_attr("pid", os.getpid())
        x = trial.suggest_float("x", -2, 2)
        mlflow.log_metric("inside", x)
        time.sleep(0.1)
        return x * x

    def worker_settings() -> list[object]:  # sent by value too
        import dask

        return [dask.config.get(key) for key in (
            "distributed.admin.tick.interval", "distributed.worker.memory.monitor-interval",
            "distributed.admin.system-monitor.interval", "distributed.worker.profile.enabled")]

    def stores_imported() -> bool:  # before any task: by the recipe's preload
        import sys

        return "mlflow.store.tracking.sqlalchemy_store" in sys.modules

    with _client(dask_cluster) as client:
        preloaded = client.run(stores_imported)
        study.optimize(objective, n_trials=30, executor=client.get_executor())
        seen = client.run(worker_settings)
    assert README_PRELOAD and list(preloaded.values()) == [True] * 2, "the recipe's preload"
    assert list(seen.values()) == [["1s", "1s", "2s", False]] * 2, "the recipe reaches workers"
    assert_tree(study, 30)
    # One task per worker: Dask gives equal calls one key (one task) unless told apart.
    assert len({t.user_attrs["pid"] for t in study.trials}) == 2, "both Dask workers ran trials"


def slow_objective_telling_its_process() -> Callable[[optuna.Trial], float]:
    """An objective of 0.3 s that records its process and process group in the trial,
    defined here so that cloudpickle sends it by value (workers cannot import tests)."""

    def objective(trial: optuna.Trial) -> float:
        import os
        import time

        import mlflow

        trial.set_user_attr("pid", os.getpid())
        trial.set_user_attr("pgid", os.getpgid(0))
        x = trial.suggest_float("x", -2, 2)
        mlflow.log_metric("inside", x)
        time.sleep(0.3)
        return x * x

    return objective


@pytest.mark.slow
def test_dask_worker_killed_mid_trial(tmp_path: Path, tracking_uri: str,
                                      dask_cluster: DaskCluster,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMN_HEARTBEAT_INTERVAL", "1")
    monkeypatch.setenv("OMN_GRACE_PERIOD", "3")
    study = make_study(tmp_path, "dask-kill", tracking_uri)
    groups = {w.pid for w in dask_cluster.workers}

    objective = slow_objective_telling_its_process()

    def kill_its_group(trial: optuna.trial.FrozenTrial) -> bool:
        # The first worker seen running a trial is SIGKILLed (whole process group).
        group = trial.user_attrs.get("pgid")
        if group not in groups:
            return False
        os.killpg(group, signal.SIGKILL)
        return True

    with killing_a_worker_mid_trial("dask-kill", f"sqlite:///{tmp_path / 'optuna.db'}",
                                    kill_its_group) as killed, _client(dask_cluster) as client:
        study.optimize(objective, n_trials=30, executor=client.get_executor(), n_workers=2)
    assert killed, "no worker was seen running a trial"
    assert_tree(study, 30)
    lost = study.trials[killed[0]]
    assert lost.state.name == "FAIL"
    run = MlflowClient(tracking_uri).get_run(study.child_run_id(lost.number))
    assert run.info.status == "FAILED"


@pytest.mark.slow
def test_submitit_local_executor(tmp_path: Path, tracking_uri: str) -> None:
    submitit = pytest.importorskip("submitit")
    study = make_study(tmp_path, "submitit", tracking_uri)
    executor = submitit.AutoExecutor(folder=tmp_path / "submitit", cluster="local")
    executor.update_parameters(timeout_min=5)

    def objective(trial: optuna.Trial) -> float:
        import mlflow

        x = trial.suggest_float("x", -2, 2)
        mlflow.log_metric("inside", x)
        return x * x

    with pytest.raises(ValueError, match="n_workers is required"):
        study.optimize(objective, n_trials=6, executor=executor)
    study.optimize(objective, n_trials=6, executor=executor, n_workers=2)
    assert_tree(study, 6)


def objective_watching_its_jobs_exit(folder: Path) -> Callable[[optuna.Trial], float]:
    class FinalizedAtExit:  # local: cloudpickle sends it by value to the job
        """Cyclic garbage whose finalizer leaves a file (a user's object with ``__del__``)."""

        def __init__(self) -> None:
            self.cycle = self

        def __del__(self) -> None:
            (folder / "finalized").write_text("finalized")

    def objective(trial: optuna.Trial) -> float:
        import atexit
        import gc

        import mlflow

        if trial.number == 0:
            # Registered before the project's own exit step, so it runs after it (LIFO).
            atexit.register(lambda: (folder / "frozen").write_text(str(gc.get_freeze_count())))
            gc.disable()  # only a collection at the exit can finalize this garbage
            FinalizedAtExit()
        x = trial.suggest_float("x", -2, 2)
        mlflow.log_metric("inside", x)
        return x * x

    return objective


@pytest.mark.slow
def test_a_submitit_job_skips_the_final_collections_but_finalizes_garbage(
        tmp_path: Path, tracking_uri: str) -> None:
    # optimize waits for each job's process to exit; the interpreter's last full
    # collections over MLflow's and SQLAlchemy's objects took most of that. The job
    # leaves the objects still alive out of them (gc.freeze, after one collection that
    # finalizes what is already garbage, as the exit would have).
    submitit = pytest.importorskip("submitit")
    study = make_study(tmp_path, "submitit-exit", tracking_uri)
    executor = submitit.AutoExecutor(folder=tmp_path / "submitit", cluster="local")
    executor.update_parameters(timeout_min=5)
    study.optimize(objective_watching_its_jobs_exit(tmp_path), n_trials=2, executor=executor,
                   n_workers=1)
    assert_tree(study, 2)
    assert int((tmp_path / "frozen").read_text()) > 0, "the job's objects were left to the exit"
    # Without the collection before the freeze, this garbage would be frozen unfinalized.
    assert (tmp_path / "finalized").read_text() == "finalized"
    with ThreadPoolExecutor(1) as threads:  # its worker is this process: left as it is
        study.optimize(quadratic, n_trials=1, executor=threads)
    assert not _utils._quick_exit_registered


@pytest.mark.slow
def test_submitit_job_killed_mid_trial(tmp_path: Path, tracking_uri: str,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    # The other job runs the rest of the budget; the lost job's trial is failed, its
    # run FAILED, and optimize returns (with a warning naming the lost job).
    submitit = pytest.importorskip("submitit")
    monkeypatch.setenv("OMN_HEARTBEAT_INTERVAL", "1")
    monkeypatch.setenv("OMN_GRACE_PERIOD", "3")
    study = make_study(tmp_path, "submitit-kill", tracking_uri)
    executor = submitit.AutoExecutor(folder=tmp_path / "submitit", cluster="local")
    executor.update_parameters(timeout_min=5)

    objective = slow_objective_telling_its_process()

    def kill_its_job(trial: optuna.trial.FrozenTrial) -> bool:
        pid = trial.user_attrs.get("pid")
        if pid is None:
            return False
        os.kill(pid, signal.SIGKILL)
        return True

    with killing_a_worker_mid_trial("submitit-kill", f"sqlite:///{tmp_path / 'optuna.db'}",
                                    kill_its_job) as killed, \
            pytest.warns(RuntimeWarning, match=r"1 worker task\(s\) .* were lost \(Job \d+"):
        study.optimize(objective, n_trials=30, executor=executor, n_workers=2)
    assert killed, "no job was seen running a trial"
    assert_tree(study, 30)
    lost = study.trials[killed[0]]
    assert lost.state.name == "FAIL"
    assert MlflowClient(tracking_uri).get_run(study.child_run_id(lost.number)).info.status == "FAILED"


@pytest.mark.slow
def test_grpc_storage_proxy_as_the_shared_storage(tmp_path: Path, tracking_uri: str) -> None:
    pytest.importorskip("grpc")
    if not hasattr(optuna.storages, "GrpcStorageProxy"):
        pytest.skip(f"Optuna {optuna.__version__} has no gRPC storage proxy (4.2 and newer)")
    port = free_port()
    # Behind the proxy a journal file: its claims of a queued trial are atomic (SQLite
    # behind the proxy can let two workers claim the same trial).
    code = ("import optuna; from optuna.storages.journal import JournalFileBackend; "
            "optuna.storages.run_grpc_proxy_server(optuna.storages.JournalStorage("
            f"JournalFileBackend('{tmp_path / 'proxied.log'}')), host='127.0.0.1', port={port})")
    log = open(tmp_path / "proxy.log", "ab")
    proxy = subprocess.Popen([sys.executable, "-c", code], stdout=log, stderr=subprocess.STDOUT,
                             start_new_session=True)
    try:
        from optuna.storages import GrpcStorageProxy

        storage = GrpcStorageProxy(host="127.0.0.1", port=port)
        storage.wait_server_ready(timeout=60)  # (the proxy's start: its imports, the bind)
        study = omn.create_study("grpc", storage=storage, tracking_uri=tracking_uri,
                                 sampler="random", seed=0)
        with ProcessPoolExecutor(2) as pool:
            study.optimize(quadratic, n_trials=8, executor=pool)
        assert_tree(study, 8)
    finally:
        os.killpg(proxy.pid, signal.SIGKILL)
        proxy.wait(timeout=10)


class DiesOnClaimingTrialTwo(optuna.samplers.RandomSampler):
    """A real sampler whose worker process dies the moment it claims trial 2: after the
    trial is RUNNING, before its first heartbeat (a pool terminating a worker there)."""

    def before_trial(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if trial.number == 2 and os.environ.get("OMN_TEST_PARENT_PID") != str(os.getpid()):
            os._exit(1)
        super().before_trial(study, trial)


@pytest.mark.slow
def test_process_pool_worker_killed_before_its_trials_first_heartbeat(
        tmp_path: Path, tracking_uri: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # fail_stale_trials never fails a RUNNING trial that has no heartbeat: optimize does,
    # once every task has ended and the grace period is over, and gives it a FAILED run.
    from concurrent.futures.process import BrokenProcessPool

    monkeypatch.setenv("OMN_HEARTBEAT_INTERVAL", "1")
    monkeypatch.setenv("OMN_GRACE_PERIOD", "2")
    monkeypatch.setenv("OMN_TEST_PARENT_PID", str(os.getpid()))
    study = omn.create_study("pool-claim-kill", storage=f"sqlite:///{tmp_path / 'optuna.db'}",
                             tracking_uri=tracking_uri, sampler=DiesOnClaimingTrialTwo(seed=0))
    with ProcessPoolExecutor(2) as pool, pytest.raises(BrokenProcessPool):
        study.optimize(quadratic, n_trials=6, executor=pool)
    assert study.trials[2].state.name == "FAIL"
    client = MlflowClient(tracking_uri)
    assert client.get_run(study.child_run_id(2)).info.status == "FAILED"
    waiting = study.get_trials(states=(optuna.trial.TrialState.WAITING,))
    with ProcessPoolExecutor(2) as pool:
        study.optimize(quadratic, n_trials=len(waiting), executor=pool)
    assert_tree(study, 6)


def slow_with_pid(trial: optuna.Trial) -> float:
    import mlflow

    trial.set_user_attr("pid", os.getpid())
    x = trial.suggest_float("x", -2, 2)
    mlflow.log_metric("inside", x)
    time.sleep(0.3)
    return x * x


@pytest.mark.slow
def test_process_pool_worker_killed_mid_trial(tmp_path: Path, tracking_uri: str,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    # A process pool whose worker is SIGKILLed is broken for good (concurrent.futures):
    # optimize cleans up, then says so; the rest of the budget waits in the study and
    # the next optimize with a working pool runs exactly that.
    from concurrent.futures.process import BrokenProcessPool

    monkeypatch.setenv("OMN_HEARTBEAT_INTERVAL", "1")
    monkeypatch.setenv("OMN_GRACE_PERIOD", "3")
    study = make_study(tmp_path, "pool-kill", tracking_uri)
    def kill_its_process(trial: optuna.trial.FrozenTrial) -> bool:
        if trial.number < 2 or "pid" not in trial.user_attrs:
            return False
        os.kill(trial.user_attrs["pid"], signal.SIGKILL)
        return True

    with ProcessPoolExecutor(2) as pool:
        # Fork the workers before the watcher thread reads optuna.db: a worker forked while
        # a thread of this process held a SQLite read lock inherits SQLite's in-process
        # record of it and can never commit ('database is locked' at its first claim).
        pool.submit(os.getpid).result()
        with killing_a_worker_mid_trial("pool-kill", f"sqlite:///{tmp_path / 'optuna.db'}",
                                        kill_its_process) as killed, \
                pytest.raises(BrokenProcessPool, match=r"trials? .*queued"):
            study.optimize(slow_with_pid, n_trials=12, executor=pool)
    assert killed, "no worker was seen running a trial"
    assert study.trials[killed[0]].state.name == "FAIL"
    client = MlflowClient(tracking_uri)
    assert client.get_run(study.child_run_id(killed[0])).info.status == "FAILED"
    everything = client.search_runs([study.experiment_id], run_view_type=3)
    assert "RUNNING" not in {r.info.status for r in everything}
    assert client.get_run(study.parent_run_id).info.status == "FAILED"
    waiting = study.get_trials(states=(optuna.trial.TrialState.WAITING,))
    assert waiting, "the rest of the budget is still queued"
    with ProcessPoolExecutor(2) as pool:
        study.optimize(slow_with_pid, n_trials=len(waiting), executor=pool)
    assert_tree(study, 12)


@pytest.mark.slow  # ~10 s: the default suite stays under 5 minutes
def test_a_workers_claim_does_not_read_the_whole_queued_budget(tmp_path: Path,
                                                              tracking_uri: str) -> None:
    """Each claim took the first WAITING trial through Optuna's ask path, which reads every
    unfinished trial of the study: O(budget) rows per trial, O(budget²) per optimize
    (`python benchmarks/claim_cost.py`: 31 ms a claim at 200 queued trials, 120 ms at
    1,000, against 4-7 ms by id)."""

    from optuna.storages._rdb import models
    import sqlalchemy

    loaded = 0

    def count(target: object, context: object) -> None:
        nonlocal loaded
        loaded += 1

    def trial_rows_loaded(n_trials: int) -> int:
        nonlocal loaded
        study = omn.create_study(f"claims-{n_trials}",
                                 storage=f"sqlite:///{tmp_path / 'optuna.db'}",
                                 tracking_uri=tracking_uri, sampler="random", seed=0)
        loaded = 0
        sqlalchemy.event.listen(models.TrialModel, "load", count)
        try:
            with ThreadPoolExecutor(1) as pool:
                study.optimize(lambda trial: trial.suggest_float("x", 0, 1), n_trials=n_trials,
                               executor=pool)
        finally:
            sqlalchemy.event.remove(models.TrialModel, "load", count)
        assert len(study.trials) == n_trials
        return loaded

    small, large = trial_rows_loaded(10), trial_rows_loaded(60)
    # Linear in the budget: 6x the trials may load about 6x the rows, not 36x (the old
    # claim: 165 and 2,490 rows).
    assert large < 9 * small, (small, large)


def test_a_trial_outside_the_budget_still_running_is_not_waited_for(
        tmp_path: Path, tracking_uri: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # optimize waited out the whole grace period (and more) whenever any trial of the
    # study was RUNNING, also one asked by hand and not told yet, whatever the timeout.
    monkeypatch.setenv("OMN_GRACE_PERIOD", "60")  # the old wait: 60 + 2 x 5 + 5 s
    study = make_study(tmp_path, "elsewhere", tracking_uri)
    asked = optuna.load_study(study_name="elsewhere", storage=study._storage).ask()
    done = threading.Event()

    def search() -> None:
        with ThreadPoolExecutor(1) as threads:
            study.optimize(quadratic, n_trials=2, executor=threads)
        done.set()

    threading.Thread(target=search, daemon=True).start()
    assert done.wait(timeout=45), "optimize waited for a trial that is not its own"
    states = {t.number: t.state.name for t in study.trials}
    assert states == {asked.number: "RUNNING", 1: "COMPLETE", 2: "COMPLETE"}


def test_workers_keep_the_heartbeat_settings_of_the_users_storage(
        tmp_path: Path, tracking_uri: str) -> None:
    # Workers reopened an RDB storage with 5 s / 20 s heartbeats and no failed-trial
    # callback, whatever the user's storage said; a user's processes with longer
    # heartbeats then had their live trials failed by the workers' shorter grace.
    # (Optuna 4.9 renamed the callback and its argument; the project supports 4.0.)
    new_names = hasattr(optuna.storages, "RetryHeartbeatStaleTrialCallback")
    retry = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback"
                    if new_names else "RetryFailedTrialCallback")
    argument = "heartbeat_stale_trial_callback" if new_names else "failed_trial_callback"
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    with pytest.warns(optuna.exceptions.ExperimentalWarning):
        storage = optuna.storages.RDBStorage(url, heartbeat_interval=7, grace_period=30,
                                             **{argument: retry(max_retry=2)})
    study = omn.create_study("beats", storage=storage, tracking_uri=tracking_uri)
    seen: list[tuple[Any, Any, str]] = []

    def objective(trial: optuna.Trial) -> float:
        backend = getattr(trial.study._storage, "_backend", trial.study._storage)
        seen.append((backend.heartbeat_interval, backend.grace_period,
                     type(getattr(backend, argument)).__name__))
        return trial.suggest_float("x", 0, 1)

    with ThreadPoolExecutor(1) as threads:  # (a thread's objective can tell this test)
        study.optimize(objective, n_trials=2, executor=threads)
    assert seen == [(7, 30, retry.__name__)] * 2


def test_two_executor_calls_at_once_each_run_their_own_budget(
        tmp_path: Path, tracking_uri: str) -> None:
    # The second call counted the first one's queued trials as its own budget, and both
    # calls' workers took from one queue: 12 trials asked, 7 run.
    first = make_study(tmp_path, "twice", tracking_uri)
    second = omn.load_study("twice", first._storage, tracking_uri=tracking_uri)
    second_queued = threading.Event()

    def held_until_the_second_call_has_queued(trial: optuna.Trial) -> float:
        if trial.number == 0:  # the first call's first trial: the second call starts now
            starter.start()
            assert second_queued.wait(timeout=60)
        return quadratic(trial)

    def second_call() -> None:
        def objective(trial: optuna.Trial) -> float:
            second_queued.set()  # its budget is queued once its first trial runs
            return quadratic(trial)

        with ThreadPoolExecutor(1) as threads:
            second.optimize(objective, n_trials=6, executor=threads)

    starter = threading.Thread(target=second_call)
    with ThreadPoolExecutor(1) as threads:
        first.optimize(held_until_the_second_call_has_queued, n_trials=6, executor=threads)
    starter.join(timeout=120)
    assert not starter.is_alive()
    assert_tree(first, 12)
    # Leases are released: a later call's budget may take leftovers again.
    attrs = first._storage.get_study_system_attrs(first._study_id)
    leases = {k: v for k, v in attrs.items() if k.startswith("omn.queue:")}
    assert len(leases) == 2 and set(leases.values()) == {None}


def test_queue_leases_order_calls_that_start_together_and_expire_with_their_call(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from optuna_mlflow_nested import _queue_leases
    from optuna_mlflow_nested._queue_leases import QueueLease

    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    earlier, later = QueueLease(study, "a"), QueueLease(study, "b")
    assert earlier.held_by_others() == set()  # the later call, still queueing, is not waited for
    found: list[set[int]] = []
    waiter = threading.Thread(target=lambda: found.append(later.held_by_others()))
    looked, original = [], study._storage.get_study_system_attrs
    polled = threading.Event()

    def watched(study_id: int) -> dict[str, Any]:
        if threading.current_thread() is waiter:
            looked.append(1)
            if len(looked) >= 3:  # three looks at the others' leases: it is waiting
                polled.set()
        return original(study_id)

    monkeypatch.setattr(study._storage, "get_study_system_attrs", watched)
    waiter.start()
    assert polled.wait(timeout=60)  # it waits for the earlier call's numbers
    earlier.hold([3, 4, 5, 9])
    waiter.join(timeout=60)
    assert found == [{3, 4, 5, 9}]
    later.hold([10, 11])
    assert earlier.held_by_others() == {10, 11}
    assert earlier.held_by_others(earlier_only=True) == set()
    monkeypatch.setattr(_queue_leases, "LEASE_S", 0.0)  # as if the later call died long ago
    assert earlier.held_by_others() == set()
    monkeypatch.setattr(_queue_leases, "LEASE_S", 120.0)
    later.release()
    assert earlier.held_by_others() == set()


def test_a_call_that_counted_a_later_calls_new_trials_keeps_them_and_the_later_requeues(
        tmp_path: Path) -> None:
    # The earlier call read the study before the later one's mark was written, so it
    # does not wait for it: it can count the later call's new, not yet held, trials.
    from optuna_mlflow_nested import _compat
    from optuna_mlflow_nested._queue_leases import QueueLease

    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    earlier, later = QueueLease(study, "a"), QueueLease(study, "b")
    laters_new = _compat.add_waiting_trials(study, 3)  # not held yet
    assert earlier.held_by_others() == set()
    counted = study.get_trials(states=(optuna.trial.TrialState.WAITING,))
    assert [t.number for t in earlier.hold_settled(study, counted)] == [0, 1, 2]
    assert [t.number for t in later.hold_settled(study, laters_new)] == [3, 4, 5]
    assert len(study.get_trials(states=(optuna.trial.TrialState.WAITING,))) == 6
