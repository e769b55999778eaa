"""Each private MLflow/Optuna touch in _compat, checked against the installed versions.

If a supported MLflow or Optuna release changes what _compat relies on, one of these
fails (and says which touch broke)."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
import sqlite3
import subprocess
import sys
import textwrap
import threading
from typing import Any
import warnings

import mlflow
from mlflow.tracking import MlflowClient
import optuna
from optuna.distributions import FloatDistribution
from optuna.trial import FrozenTrial
import pytest

from optuna_mlflow_nested import _compat


def test_active_run_is_mlflows_active_run_and_thread_local(tracking_uri: str) -> None:
    mlflow.set_tracking_uri(tracking_uri)
    client = MlflowClient(tracking_uri)
    run = client.create_run("0")
    seen_elsewhere = []
    with _compat.active_run(run):
        assert mlflow.active_run().info.run_id == run.info.run_id
        mlflow.log_metric("m", 1.0)
        thread = threading.Thread(target=lambda: seen_elsewhere.append(mlflow.active_run()))
        thread.start()
        thread.join()
        ids = _compat.active_run_ids_of_all_threads()
        assert ids[threading.get_ident()] == [run.info.run_id]
    assert mlflow.active_run() is None
    assert seen_elsewhere == [None]
    assert client.get_run(run.info.run_id).data.metrics == {"m": 1.0}


def test_default_experiment_and_explicit_uri(tracking_uri: str) -> None:
    mlflow.set_tracking_uri(None)
    assert _compat.explicit_tracking_uri() is None
    mlflow.set_tracking_uri(tracking_uri)
    assert _compat.explicit_tracking_uri() == tracking_uri
    experiment_id = mlflow.create_experiment("chosen")
    mlflow.set_experiment("chosen")
    assert _compat.default_experiment_id() == experiment_id
    # What set_experiment set is read and set back, as the study's objective needs.
    saved = _compat.active_experiment()
    assert saved == (experiment_id, experiment_id)  # its choice, and its env for subprocesses
    other = mlflow.create_experiment("other")
    _compat.set_active_experiment((other, other))
    with mlflow.start_run() as run:
        pass
    assert run.info.experiment_id == other
    _compat.set_active_experiment(saved)
    assert _compat.default_experiment_id() == experiment_id
    _compat.set_active_experiment((None, None))
    assert _compat.default_experiment_id() == "0" and "MLFLOW_EXPERIMENT_ID" not in os.environ


def test_open_store_and_update_run_info(tracking_uri: str, capsys: pytest.CaptureFixture) -> None:
    client = MlflowClient(tracking_uri)
    assert _compat.open_store(client) is not None
    run = client.create_run("0", run_name="before")
    _compat.update_run_info(client, run.info.run_id, "KILLED", 1234, "after")
    info = client.get_run(run.info.run_id).info
    assert (info.status, info.end_time, info.run_name) == ("KILLED", 1234, "after")
    assert "View run" not in capsys.readouterr().out


def test_study_storage_attrs_add_trial_and_trial_attr() -> None:
    study = optuna.create_study()
    storage, study_id = _compat.study_storage(study)
    storage.set_study_system_attr(study_id, "k", "v")
    assert storage.get_study_system_attrs(study_id)["k"] == "v"
    added = _compat.add_trial(study, optuna.trial.create_trial(
        params={"x": 0.5}, distributions={"x": FloatDistribution(0, 1)}, value=1.0))
    assert added.number == 0 and study.trials[0].value == 1.0
    with pytest.raises(ValueError, match="2 values"):
        _compat.add_trial(study, optuna.trial.create_trial(values=[1.0, 2.0]))
    with pytest.raises(ValueError):  # FrozenTrial._validate: COMPLETE without a value
        bad = optuna.trial.create_trial(value=1.0)
        bad.value = None
        _compat.add_trial(study, bad)
    trial = study.ask()
    _compat.set_trial_system_attr(trial, "run", "r1")
    assert study.trials[-1].system_attrs["run"] == "r1"


def test_claim_trial_takes_only_a_queued_trial_once() -> None:
    study = optuna.create_study()
    study.enqueue_trial({"x": 0.25})
    queued = _compat.trial_id(study.trials[0])
    claimed = _compat.claim_trial(study, queued)
    assert claimed is not None and claimed.suggest_float("x", 0, 1) == 0.25
    assert study.trials[0].state == optuna.trial.TrialState.RUNNING
    assert _compat.claim_trial(study, queued) is None, "taken already"
    study.tell(claimed, 1.0)
    assert _compat.claim_trial(study, queued) is None, "finished"
    assert len(study.trials) == 1, "a claim never creates a trial"


def test_rdb_url_and_executor_worker_count(tmp_path) -> None:
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures import ThreadPoolExecutor

    url = f"sqlite:///{tmp_path / 'o.db'}"
    assert _compat.rdb_url(optuna.storages.get_storage(url)) == url
    assert _compat.rdb_url(optuna.storages.RDBStorage(url)) == url
    assert _compat.rdb_url(optuna.storages.InMemoryStorage()) is None
    # The RDB storage behind Optuna's cache: executor workers take its heartbeat settings.
    cached = optuna.storages.get_storage(url)
    assert isinstance(_compat.rdb_storage(cached), optuna.storages.RDBStorage)
    assert _compat.rdb_storage(cached) is not cached
    assert _compat.rdb_storage(optuna.storages.InMemoryStorage()) is None
    with ThreadPoolExecutor(3) as threads, ProcessPoolExecutor(2) as processes:
        assert _compat.executor_worker_count(threads) == 3
        assert _compat.executor_worker_count(processes) == 2
    assert _compat.executor_worker_count(object()) is None


def test_journal_file_gives_the_paths_and_lock_as_given(tmp_path, monkeypatch) -> None:
    from optuna.storages.journal import JournalFileBackend
    from optuna.storages.journal import JournalFileOpenLock
    from optuna.storages.journal import JournalFileSymlinkLock

    class Unknown:  # a lock of the user's own: its path is its own business
        def acquire(self) -> bool:
            return True

        def release(self) -> None:
            pass

    monkeypatch.chdir(tmp_path)
    for lock, lock_path in [(JournalFileOpenLock("other"), "other"),
                            (JournalFileSymlinkLock("j.log"), "j.log"), (Unknown(), None)]:
        backend = JournalFileBackend("j.log", lock_obj=lock)
        found = _compat.journal_file(optuna.storages.JournalStorage(backend))
        assert found == (backend, "j.log", lock, lock_path)
    assert _compat.journal_file(optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'o.db'}")) is None


def test_trial_active_run_survives_end_run_and_ends_runs_left_active(tracking_uri: str) -> None:
    mlflow.set_tracking_uri(tracking_uri)
    client = MlflowClient(tracking_uri)
    run = client.create_run("0")
    with _compat.trial_active_run(run, client):
        mlflow.end_run()  # ends the run and pops one of its two entries
        assert mlflow.active_run().info.run_id == run.info.run_id
        mlflow.log_metric("after", 1.0)  # still the trial's run, no new one
        inner = mlflow.start_run(nested=True)  # left active by the objective
    assert mlflow.active_run() is None
    assert client.get_run(run.info.run_id).data.metrics == {"after": 1.0}
    assert client.get_run(inner.info.run_id).info.status == "FINISHED"
    assert len(client.search_runs(["0"])) == 2


def test_trial_active_run_without_a_run_ends_the_runs_mlflow_calls_started(
        tracking_uri: str) -> None:
    mlflow.set_tracking_uri(tracking_uri)
    client = MlflowClient(tracking_uri)
    with pytest.raises(ValueError), _compat.trial_active_run(None, client) as ended:
        mlflow.log_metric("seen", 1.0)  # no active run: MLflow starts one
        stray = mlflow.active_run().info.run_id
        raise ValueError("the objective failed")
    assert mlflow.active_run() is None
    assert ended == [stray]
    assert client.get_run(stray).info.status == "FAILED"


def test_record_first_heartbeat_only_on_storages_that_keep_them(tmp_path: Path) -> None:
    db = tmp_path / "optuna.db"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        beating = optuna.storages.RDBStorage(f"sqlite:///{db}", heartbeat_interval=60,
                                             grace_period=120)
    study = optuna.create_study(storage=beating)
    trial = study.ask()

    def heartbeats() -> list[int]:
        with contextlib.closing(sqlite3.connect(db)) as con:
            return [row[0] for row in con.execute("SELECT trial_id FROM trial_heartbeats")]

    assert heartbeats() == []  # Optuna's ask records none
    _compat.record_first_heartbeat(study, trial)
    assert heartbeats() == [trial._trial_id]
    plain = optuna.create_study()  # in memory: no heartbeats, nothing to do
    _compat.record_first_heartbeat(plain, plain.ask())


def test_running_trials_without_heartbeat_are_the_ones_fail_stale_trials_skips(
        tmp_path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        beating = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'optuna.db'}",
                                             heartbeat_interval=60, grace_period=120)
    study = optuna.create_study(storage=beating)
    silent, beaten, done = study.ask(), study.ask(), study.ask()
    beating.record_heartbeat(beaten._trial_id)
    study.tell(done, 1.0)
    assert _compat.running_trials_without_heartbeat(study) == {silent.number}
    cached = optuna.load_study(study_name=study.study_name, storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    assert _compat.running_trials_without_heartbeat(cached) == set()  # no heartbeats: none
    plain = optuna.create_study()
    plain.ask()
    assert _compat.running_trials_without_heartbeat(plain) == set()


def test_stop_heartbeats_left_running_stops_only_the_studys_own(tmp_path: Path) -> None:
    from optuna.storages._heartbeat import get_heartbeat_thread

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'optuna.db'}",
                                             heartbeat_interval=60, grace_period=120)
    # Two studies on one RDBStorage object: each Study wraps it in a cache of its own,
    # which is what the heartbeat thread is given.
    mine, other = (optuna.create_study(storage=storage, study_name=name)
                   for name in ("mine", "other"))
    beats = [get_heartbeat_thread(study.ask()._trial_id, study._storage) for study in (mine, other)]
    try:
        for beat in beats:
            beat.start()  # as Optuna's with block does, without its exit
        _compat.stop_heartbeats_left_running(mine)
        mine_beat, other_beat = beats
        assert mine_beat._stop_event.is_set()  # type: ignore[attr-defined]
        assert not other_beat._stop_event.is_set()  # type: ignore[attr-defined]
        mine_beat._thread.join(timeout=30)  # type: ignore[attr-defined]
        assert not mine_beat._thread.is_alive()  # type: ignore[attr-defined]
    finally:  # a failure must not leave non-daemon threads that keep pytest from exiting
        for beat in beats:
            if getattr(beat, "_thread", None) is not None:
                beat.join()


def test_quiet_retried_store_errors_drops_mlflows_traceback_only_in_retrying_threads(
        tracking_uri: str, capfd: pytest.CaptureFixture[str]) -> None:
    # MLflow's SQL session maker still logs an OperationalError with its traceback
    # under this logger name; the filter drops it in the writer's threads only.
    import logging

    from mlflow.store.db import utils as db_utils

    assert db_utils._logger.name == _compat._SQL_SESSION_LOGGER
    _compat.quiet_retried_store_errors()
    _compat.quiet_retried_store_errors()  # idempotent: one filter
    logger = logging.getLogger(_compat._SQL_SESSION_LOGGER)
    assert sum(f is _compat._quiet_filter for f in logger.filters) == 1

    store = MlflowClient(tracking_uri)._tracking_client.store
    path = tracking_uri[len("sqlite:///"):]

    def locked_write() -> None:
        holder = sqlite3.connect(path)
        holder.execute("BEGIN EXCLUSIVE")
        try:
            with pytest.raises(Exception, match="locked"), \
                    store.ManagedSessionMaker(read_only=False) as session:
                session.execute(sqlalchemy.text("PRAGMA busy_timeout = 1"))
                session.execute(sqlalchemy.text("UPDATE experiments SET name = name"))
        finally:
            holder.rollback()
            holder.close()

    import sqlalchemy

    def retried_here() -> None:
        with _compat.retried_store_call():  # a call whose failure this project handles
            with _compat.retried_store_call():
                pass  # one inside another: the outer one still holds after it
            locked_write()
        locked_write()  # and only inside it

    said = []
    for name, target in (("omn-writer-0", locked_write), ("user-thread", locked_write),
                         ("user-thread", retried_here)):
        thread = threading.Thread(target=target, name=name)
        thread.start()
        thread.join()
        said.append(capfd.readouterr().err)
    assert "Traceback" not in said[0]
    assert "Traceback" in said[1] and "locked" in said[1]
    assert said[2].count("Traceback") == said[1].count("Traceback")  # the second write's


@pytest.mark.parametrize("kind", ["sqlite", "journal", "memory"])
def test_add_waiting_trials_adds_them_in_number_order_read_back_at_once(
        tmp_path: Path, kind: str) -> None:
    import sqlalchemy
    from sqlalchemy.engine import Engine

    storage: str | optuna.storages.BaseStorage | None = {
        "sqlite": f"sqlite:///{tmp_path / 'optuna.db'}",
        "journal": optuna.storages.JournalStorage(
            optuna.storages.journal.JournalFileBackend(str(tmp_path / "journal.log"))),
        "memory": None}[kind]
    study = optuna.create_study(storage=storage)
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)
    commits = 0

    def count(connection: sqlalchemy.Connection) -> None:
        nonlocal commits
        commits += 1

    sqlalchemy.event.listen(Engine, "commit", count)
    try:
        added = _compat.add_waiting_trials(study, 30)
    finally:
        sqlalchemy.event.remove(Engine, "commit", count)
    assert [t.number for t in added] == list(range(2, 32))
    assert {t.state for t in added} == {optuna.trial.TrialState.WAITING}
    assert [_compat.trial_id(t) for t in added] == [
        _compat.trial_id(t) for t in study.get_trials(states=(optuna.trial.TrialState.WAITING,))]
    if kind == "sqlite":  # the writes in one transaction, then one read (not 30 writes)
        assert commits == 2, commits
    assert _compat.add_waiting_trials(study, 0) == []


def _writes_to(study: optuna.Study, n: int) -> tuple[list[FrozenTrial], int]:
    """``add_waiting_trials(study, n)`` and how many transactions wrote trials."""
    import sqlalchemy
    from sqlalchemy.engine import Engine

    writes = 0
    wrote = threading.local()

    def insert(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement.lstrip().upper().startswith("INSERT INTO TRIALS"):
            wrote.pending = True

    def commit(connection: sqlalchemy.Connection) -> None:
        nonlocal writes
        writes += getattr(wrote, "pending", False)
        wrote.pending = False

    sqlalchemy.event.listen(Engine, "before_cursor_execute", insert)
    sqlalchemy.event.listen(Engine, "commit", commit)
    try:
        return _compat.add_waiting_trials(study, n), writes
    finally:
        sqlalchemy.event.remove(Engine, "before_cursor_execute", insert)
        sqlalchemy.event.remove(Engine, "commit", commit)


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_add_waiting_trials_writes_a_chunk_per_transaction_numbered_as_optuna_does(
        tmp_path: Path, backend: str, request: pytest.FixtureRequest,
        monkeypatch: pytest.MonkeyPatch) -> None:
    # Optuna adds a trial per transaction (on SQLite, a sync to disk each): a budget of
    # thousands took seconds to queue. On RDB storages the budget goes in chunks.
    from optuna_mlflow_nested._compat import trials

    url = (f"sqlite:///{tmp_path / 'optuna.db'}" if backend == "sqlite"
           else request.getfixturevalue("postgres_url"))
    study = optuna.create_study(storage=url, study_name="chunks")
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=3)
    monkeypatch.setattr(trials, "CHUNK", 8)
    added, writes = _writes_to(study, 30)
    assert writes == 4, writes  # 8 + 8 + 8 + 6
    assert [t.number for t in added] == list(range(3, 33))
    assert {t.state for t in added} == {optuna.trial.TrialState.WAITING}
    assert [t.number for t in optuna.load_study(study_name="chunks", storage=url).trials] \
        == list(range(33))
    # Optuna's ask takes the queued trials in number order; its own next trial follows.
    assert [study.ask().number, study.ask().number] == [3, 4]
    study.add_trial(optuna.trial.create_trial(value=1.0))
    assert study.trials[-1].number == 33


@pytest.mark.parametrize("committed", [False, True])
def test_add_waiting_trials_whose_commit_raises_adds_each_chunk_once(
        tmp_path: Path, committed: bool) -> None:
    # Optuna retries a failed write; a commit that went through and then raised (a link
    # lost as the server answered) must not add the chunk a second time.
    failures: list[bool] = []

    class LinkLostOnce(sqlite3.Connection):
        def commit(self) -> None:
            if failures == [False]:  # armed, not failed yet
                failures[0] = True
                if committed:
                    super().commit()
                raise sqlite3.OperationalError("link lost")
            super().commit()

    study = optuna.create_study(storage=optuna.storages.RDBStorage(
        f"sqlite:///{tmp_path / 'optuna.db'}",
        engine_kwargs={"connect_args": {"factory": LinkLostOnce}}))
    failures.append(False)
    added = _compat.add_waiting_trials(study, 12)
    assert failures == [True]
    assert [t.number for t in added] == list(range(12))
    assert len(study.trials) == 12


def test_add_waiting_trials_from_two_processes_at_once_numbers_each_trial_once(
        tmp_path: Path) -> None:
    # The two processes take turns: each starts its chunk k+1 only once the other's chunk
    # k is in (files as a barrier), so their chunks interleave in the study.
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    optuna.create_study(storage=url, study_name="both")
    code = textwrap.dedent(f"""
        import json, pathlib, sys, time
        import optuna
        from optuna_mlflow_nested._compat import trials
        me, other = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
        prepare = optuna.storages.RDBStorage._get_prepared_new_trial
        started = 0

        def taking_turns(self, *args, **kwargs):
            global started
            (me / str(started)).touch()  # my chunks before this one are committed
            deadline = time.monotonic() + 60
            while not ((other / str(started)).exists() or (other / "done").exists()):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the other process's chunk {{started}} never came")
                time.sleep(0.01)
            started += 1
            return prepare(self, *args, **kwargs)

        optuna.storages.RDBStorage._get_prepared_new_trial = taking_turns
        trials.CHUNK = 7
        study = optuna.load_study(study_name="both", storage={url!r})
        added = trials.add_waiting_trials(study, 60)
        (me / "done").touch()
        print(json.dumps([t.number for t in added]))
    """)
    folders = [tmp_path / "a", tmp_path / "b"]
    for folder in folders:
        folder.mkdir()
    adders = [subprocess.Popen([sys.executable, "-c", code, str(me), str(other)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
              for me, other in (folders, folders[::-1])]
    numbers = []
    for adder in adders:
        out, err = adder.communicate(timeout=120)
        assert adder.returncode == 0, err
        numbers.append(json.loads(out))
    for own in numbers:
        assert len(own) == 60 and own == sorted(own)
        assert own[-1] - own[0] > 59, "the two processes' chunks did not interleave"
    assert sorted(numbers[0] + numbers[1]) == list(range(120))
    trials = optuna.load_study(study_name="both", storage=url).trials
    assert [t.number for t in sorted(trials, key=_compat.trial_id)] == list(range(120))


def test_add_waiting_trials_reads_a_trial_another_worker_took_meanwhile_on_its_own(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(storage=url, study_name="budget")
    other = optuna.load_study(study_name="budget", storage=url)  # another worker's handle
    taken: list[int] = []

    def read_after_the_other_took_one(*args: Any, **kwargs: Any) -> list[FrozenTrial]:
        if not taken:  # between the writes and the one read: the other's ask pops one
            taken.append(other.ask().number)
        return optuna.Study.get_trials(study, *args, **kwargs)

    monkeypatch.setattr(study, "get_trials", read_after_the_other_took_one)
    added = _compat.add_waiting_trials(study, 5)
    assert taken == [0]
    assert [t.number for t in added] == [0, 1, 2, 3, 4]
    assert [t.state.name for t in added] == ["RUNNING"] + ["WAITING"] * 4


def _in_fresh_interpreter(code: str, timeout: float) -> subprocess.CompletedProcess[str]:
    """``code`` run by a new Python (the patch tested is process-wide, as in the writer
    process), which must exit with 0."""
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr
    return done


def _skip_without_store_open_hooks() -> None:
    from mlflow.store.db import utils

    if not all(hasattr(utils, name) for name in (
            "_make_parent_dirs_if_sqlite", "create_sqlalchemy_engine_with_retry")):
        pytest.skip("this MLflow has no hook: only the check before the open applies")


def test_never_create_sqlite_stores_refuses_a_missing_file_and_opens_an_existing_one(
        tmp_path: Path) -> None:
    _skip_without_store_open_hooks()
    existing = f"sqlite:///{tmp_path / 'here' / 'mlflow.db'}"
    MlflowClient(existing).search_experiments()  # made by "the calling process"
    removed = tmp_path / "removed"
    done = _in_fresh_interpreter(f"""
        from mlflow.tracking import MlflowClient
        from optuna_mlflow_nested import _compat
        _compat.never_create_sqlite_stores()
        _compat.never_create_sqlite_stores()  # twice: still one check
        MlflowClient({existing!r}).search_experiments()
        try:
            MlflowClient("sqlite:///{removed / 'mlflow.db'}").search_experiments()
        except FileNotFoundError as exc:
            print("refused:", exc)
    """, timeout=300)
    assert f"refused: {removed / 'mlflow.db'} was removed" in done.stdout
    assert not removed.exists()


def test_never_create_sqlite_stores_gives_up_at_once_on_a_folder_removed_mid_open(
        tmp_path: Path) -> None:
    # The writer process drawing figures as the user's temporary folder is removed: the
    # file is there at the check, gone as SQLite opens it. MLflow would retry the open
    # for about 100 s, warning each time, and the user's process waits for it at exit.
    _skip_without_store_open_hooks()
    folder = tmp_path / "store"
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    MlflowClient(uri).search_experiments()  # made by "the calling process"
    done = _in_fresh_interpreter(f"""
        import shutil
        import sqlalchemy
        from sqlalchemy.engine import Engine
        from mlflow.tracking import MlflowClient
        from optuna_mlflow_nested import _compat

        def remove_folder(*args):  # SQLAlchemy's own hook, as its first connect begins
            shutil.rmtree({str(folder)!r}, ignore_errors=True)

        sqlalchemy.event.listen(Engine, "do_connect", remove_folder)
        _compat.never_create_sqlite_stores()
        try:
            MlflowClient({uri!r}).search_experiments()
        except FileNotFoundError as exc:
            print("refused:", exc)
    """, timeout=90)  # under MLflow's 100 s of retries
    assert f"refused: {folder / 'mlflow.db'} was removed" in done.stdout
    assert "will be retried" not in done.stderr
    assert not folder.exists()
