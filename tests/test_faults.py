"""Many workers, one study; faults survived, nothing lost (issue 6)."""

from __future__ import annotations

import datetime
import multiprocessing
import os
from pathlib import Path
import signal
import stat
import subprocess
import sys
import textwrap
import threading
import time
import warnings

from conftest import MlflowServer
import mlflow
from mlflow.tracking import MlflowClient
import optuna
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
import pytest

import optuna_mlflow_nested as omn
from optuna_mlflow_nested.cli import main as cli_main


def plain(trial: optuna.Trial) -> float:
    return trial.suggest_float("x", 0, 1) ** 2


def trial_runs(client: MlflowClient, study: omn.NestedStudy) -> list:
    return client.search_runs(
        [study.experiment_id],
        f"tags.mlflow.parentRunId = '{study.parent_run_id}' and tags.`optuna.role` = 'trial'",
        max_results=10_000,
    )


def wait_for(condition, timeout: float, what: str) -> None:
    """Poll a condition (never a fixed sleep): fail with ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    delay = 0.05
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(delay)
        delay = min(delay * 2, 0.5)


# ---------------------------------------------------------------- bad configuration


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"storage": "not-a-url"}, "storage 'not-a-url'"),
        ({"storage": "postgresql://bob:s3cret@127.0.0.1:1/nodb"}, r"storage 'postgresql://bob:\*\*\*@"),
        ({"tracking_uri": "htp://127.0.0.1:5000"}, "htp://127.0.0.1:5000"),
        ({"tracking_uri": "http://127.0.0.1:1"}, "unreachable"),
    ],
)
def test_bad_configuration_fails_before_any_trial(tracking_uri: str, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match) as info:
        omn.create_study("cfg", **{"tracking_uri": tracking_uri, **kwargs})
    assert "s3cret" not in str(info.value)


# ---------------------------------------------------------------- workers on one machine


def _journal_worker(args: tuple[str, str, int]) -> str:
    journal, tracking_uri, n = args
    storage = JournalStorage(JournalFileBackend(journal))
    study = omn.create_study("journal", tracking_uri=tracking_uri, storage=storage,
                             load_if_exists=True, sampler="random")
    study.optimize(plain, n_trials=n)
    return study.parent_run_id


@pytest.mark.slow  # 14-16 s: processes started in turn
def test_processes_share_a_journal_file_study(tmp_path: Path, tracking_uri: str) -> None:
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(3) as pool:
        parents = pool.map(_journal_worker, [(str(tmp_path / "j.log"), tracking_uri, 4)] * 3)
    assert len(set(parents)) == 1
    study = omn.load_study("journal", JournalStorage(JournalFileBackend(str(tmp_path / "j.log"))),
                           tracking_uri=tracking_uri)
    runs = trial_runs(MlflowClient(tracking_uri), study)
    assert len(study.trials) == 12
    assert sorted(r.info.run_name for r in runs) == sorted(f"trial-{i}" for i in range(12))
    assert {r.info.status for r in runs} == {"FINISHED"}


# ---------------------------------------------------------------- a worker killed mid-trial

_KILLED_WORKER = textwrap.dedent(
    """
    import sys, threading, optuna, optuna_mlflow_nested as omn
    storage_url, tracking_uri, marker = sys.argv[1:4]
    storage = optuna.storages.RDBStorage(storage_url, heartbeat_interval=1, grace_period=2)
    study = omn.create_study("hb", tracking_uri=tracking_uri, storage=storage, load_if_exists=True)
    def objective(trial):
        x = trial.suggest_float("x", 0, 1)
        if trial.number == 1:
            open(marker, "w").close()
            threading.Event().wait()   # hangs until SIGKILL
        return x
    study.optimize(objective, n_trials=5)
    """
)


@pytest.mark.slow  # ~12 s: the default suite stays under 5 minutes
def test_worker_killed_mid_trial_its_run_fails_when_noticed(tmp_path: Path, tracking_uri: str) -> None:
    storage_url = f"sqlite:///{tmp_path / 'optuna.db'}"
    marker = tmp_path / "in-trial-1"
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_WORKER, storage_url, tracking_uri, str(marker)],
                            start_new_session=True)
    try:
        wait_for(marker.exists, 120, "the worker to enter trial 1")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    storage = optuna.storages.RDBStorage(storage_url, heartbeat_interval=1, grace_period=2)
    study_id = storage.get_study_id_from_name("hb")
    wait_for(lambda: storage._get_stale_trial_ids(study_id), 30, "trial 1's heartbeat to go stale")

    resumed = omn.load_study("hb", storage, tracking_uri=tracking_uri)
    killed_run = resumed.child_run_id(1)
    resumed.optimize(plain, n_trials=2)   # Optuna fails the stale trial; we fail its run

    states = {t.number: t.state.name for t in resumed.trials}
    assert states == {0: "COMPLETE", 1: "FAIL", 2: "COMPLETE", 3: "COMPLETE"}
    client = MlflowClient(tracking_uri)
    assert client.get_run(killed_run).info.status == "FAILED"
    runs = {r.info.run_name: r.info.status for r in trial_runs(client, resumed)
            if r.info.run_name != "trial-pending"}
    assert runs == {"trial-0": "FINISHED", "trial-1": "FAILED", "trial-2": "FINISHED",
                    "trial-3": "FINISHED"}


# ---------------------------------------------------------------- Ctrl-C as a heartbeat starts

_CTRL_C_AS_A_HEARTBEAT_STARTS = textwrap.dedent(
    """
    import sys, optuna, optuna_mlflow_nested as omn
    from optuna.storages._heartbeat import HeartbeatThread
    storage_url, tracking_uri = sys.argv[1:3]
    storage = optuna.storages.RDBStorage(storage_url, heartbeat_interval=1, grace_period=2)
    study = omn.create_study("hb-ctrl-c", tracking_uri=tracking_uri, storage=storage)
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=1)

    def ctrl_c_as_it_returns(frame, event, arg):
        if event == "return":   # the heartbeat thread runs; Optuna's with block not entered
            sys.settrace(None)
            raise KeyboardInterrupt   # as a SIGINT in that instant would
        return ctrl_c_as_it_returns

    sys.settrace(lambda frame, event, arg:
                 ctrl_c_as_it_returns if frame.f_code is HeartbeatThread.start.__code__ else None)
    try:
        study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=3)
    except KeyboardInterrupt:
        print("interrupted", flush=True)
    """
)


@pytest.mark.slow  # ~11 s, a process of its own: the default suite stays under 5 minutes
def test_ctrl_c_as_optuna_starts_a_heartbeat_thread_still_lets_the_process_exit(
        tmp_path: Path, tracking_uri: str) -> None:
    # A KeyboardInterrupt inside HeartbeatThread.start (Thread.start waits for the
    # thread) skips the with block's exit, which stops the non-daemon thread: the
    # interpreter then waited for it forever at exit (a CI hang of the Ctrl-C test).
    storage_url = f"sqlite:///{tmp_path / 'optuna.db'}"
    proc = subprocess.Popen([sys.executable, "-c", _CTRL_C_AS_A_HEARTBEAT_STARTS, storage_url,
                             tracking_uri], stdout=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"the interrupted process did not exit (printed {out!r})")
    assert (proc.returncode, out) == (0, "interrupted\n")
    study = omn.load_study("hb-ctrl-c", storage_url, tracking_uri=tracking_uri)
    client = MlflowClient(tracking_uri)
    assert client.get_run(study.parent_run_id).info.status == "KILLED"
    # Optuna leaves the trial RUNNING (its heartbeat goes stale: the next search fails
    # it); its run is not left RUNNING
    assert [t.state.name for t in study.trials] == ["COMPLETE", "RUNNING"]
    assert {r.info.run_name: r.info.status for r in trial_runs(client, study)} == {
        "trial-0": "FINISHED", "trial-1": "FAILED"}


# ---------------------------------------------------------------- the tracking server away


def _restartable_server(tmp_path: Path) -> MlflowServer:
    return MlflowServer(tmp_path / "srv", backend_uri=f"sqlite:///{tmp_path / 'srv.db'}").start()


@pytest.mark.slow  # a real server stopped and restarted, or many processes
def test_server_killed_and_restarted_nothing_lost(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMN_RETRY_DEADLINE", "120")
    server = _restartable_server(tmp_path)
    restarted = MlflowServer(server.root, backend_uri=server.backend_uri, port=server.port)
    try:
        study = omn.create_study("flaky", tracking_uri=server.uri, sampler="random", seed=0)

        def objective(trial: optuna.Trial) -> float:
            if trial.number == 3:
                server.stop()
            if trial.number == 6:
                restarted.start()
            return plain(trial)

        study.optimize(objective, n_trials=10)
        client = MlflowClient(server.uri)
        runs = trial_runs(client, study)
        names = sorted(r.info.run_name for r in runs)
        assert names == sorted(f"trial-{i}" for i in range(10))  # each once: no duplicates
        assert {r.info.status for r in runs} == {"FINISHED"}
        for run in runs:
            trial = study.trials[int(run.data.tags["optuna.trial_number"])]
            assert run.data.params["x"] == str(trial.params["x"])
            assert run.data.metrics["value"] == pytest.approx(trial.value)
        assert not Path(os.environ["OMN_SPOOL"]).exists()
    finally:
        server.stop()
        restarted.stop()


@pytest.mark.slow  # a real server stopped and restarted
def test_objective_logging_in_a_trial_begun_without_a_run_leaves_no_stray_run(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Issue 12: a trial that began while the server was away has no run to make active;
    # when the server is back mid-objective, the objective's mlflow.log_metric started a
    # run of its own in the default experiment that stayed RUNNING and stayed active in
    # the thread, so the next run-less trials logged into it too.
    monkeypatch.setenv("OMN_RETRY_DEADLINE", "120")
    server = _restartable_server(tmp_path)
    restarted = MlflowServer(server.root, backend_uri=server.backend_uri, port=server.port)
    logged_without_a_run: list[int] = []
    try:
        study = omn.create_study("runless", tracking_uri=server.uri, sampler="random", seed=0)

        def objective(trial: optuna.Trial) -> float:
            if trial.number == 2:
                server.stop()
            elif trial.number > 2 and mlflow.active_run() is None and not logged_without_a_run:
                restarted.start()  # back while this trial runs without a run
                mlflow.log_metric("seen", 1.0)
                logged_without_a_run.append(trial.number)
            return plain(trial)

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            study.optimize(objective, n_trials=12)
        assert logged_without_a_run, "no trial began without a run: the test proves nothing"
        assert mlflow.active_run() is None  # nothing left active in this thread
        client = MlflowClient(server.uri)
        running = [(r.info.run_name, r.info.experiment_id)
                   for e in client.search_experiments()
                   for r in client.search_runs([e.experiment_id])
                   if r.info.status == "RUNNING"]
        assert running == []
        runs = trial_runs(client, study)
        assert sorted(r.info.run_name for r in runs) == sorted(f"trial-{i}" for i in range(12))
        assert {r.info.status for r in runs} == {"FINISHED"}
        said = [str(w.message) for w in caught if "had no MLflow run" in str(w.message)]
        assert len(said) == 1 and f"trial {logged_without_a_run[0]} " in said[0], said
    finally:
        server.stop()
        restarted.stop()


@pytest.mark.slow  # a real server stopped and restarted, or many processes
def test_server_never_returns_spool_then_sync(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMN_RETRY_DEADLINE", "3")
    server = _restartable_server(tmp_path)
    uri = f"http://alice:s3cret@127.0.0.1:{server.port}"
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    spool = Path(os.environ["OMN_SPOOL"])
    restarted = MlflowServer(server.root, backend_uri=server.backend_uri, port=server.port)
    try:
        study = omn.create_study("gone", tracking_uri=uri, storage=storage, sampler="random", seed=0)

        def objective(trial: optuna.Trial) -> float:
            if trial.number == 2:
                server.stop()
            return plain(trial)

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            study.optimize(objective, n_trials=6)
        assert len(study.trials) == 6 and all(t.state.name == "COMPLETE" for t in study.trials)
        spool_warnings = [w for w in caught if str(spool) in str(w.message)]
        assert len(spool_warnings) == 1
        assert stat.S_IMODE(spool.stat().st_mode) == 0o600
        assert spool.read_text().count("\n") >= 3
        assert "s3cret" not in spool.read_text()
        assert all("s3cret" not in str(w.message) for w in caught)

        restarted.start()
        args = ["sync", "--spool", str(spool), "--tracking-uri", uri, "--study-name", "gone",
                "--storage", storage]
        assert cli_main(args) == 0
        assert cli_main(args) == 0  # idempotent
        client = MlflowClient(uri)
        runs = trial_runs(client, study)
        assert sorted(r.info.run_name for r in runs) == sorted(f"trial-{i}" for i in range(6))
        assert {r.info.status for r in runs} == {"FINISHED"}
        assert not spool.exists()
        assert client.get_run(study.parent_run_id).data.metrics["n_complete"] == 6
    finally:
        server.stop()
        restarted.stop()


def test_sync_reconciles_trials_run_without_tracking(tmp_path: Path, tracking_uri: str) -> None:
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = omn.create_study("adopt", tracking_uri=tracking_uri, storage=storage, sampler="random")
    study.optimize(plain, n_trials=2)
    bare = optuna.load_study(study_name="adopt", storage=storage)
    bare.optimize(plain, n_trials=3)  # plain Optuna: no child runs
    args = ["sync", "--tracking-uri", tracking_uri, "--study-name", "adopt", "--storage", storage]
    assert cli_main(args) == 0
    assert cli_main(args) == 0
    runs = trial_runs(MlflowClient(tracking_uri), study)
    assert sorted(r.info.run_name for r in runs) == [f"trial-{i}" for i in range(5)]


# ---------------------------------------------------------------- many machines


def _pg_worker(args: tuple[str, str, int, object]) -> str:
    storage, tracking_uri, n, barrier = args
    barrier.wait()  # released together, the workers race create_study
    study = omn.create_study("pg-race", experiment_name="pg-exp", tracking_uri=tracking_uri,
                             storage=storage, load_if_exists=True, sampler="random")
    study.optimize(plain, n_trials=n)
    return study.parent_run_id


@pytest.mark.slow  # a real server stopped and restarted, or many processes
@pytest.mark.postgres
def test_many_workers_on_postgres_and_a_server(tmp_path: Path, postgres_url: str) -> None:
    import psycopg2

    admin = psycopg2.connect(postgres_url)
    admin.autocommit = True
    backend = postgres_url.rsplit("/", 1)[0] + "/" + postgres_url.rsplit("/", 1)[1] + "_mlflow"
    admin.cursor().execute(f"CREATE DATABASE {backend.rsplit('/', 1)[1]}")
    server = MlflowServer(tmp_path / "pgsrv", backend_uri=backend.replace("postgresql://", "postgresql+psycopg2://"))
    try:
        server.start()
        storage = postgres_url.replace("postgresql://", "postgresql+psycopg2://")
        optuna.storages.RDBStorage(storage)  # schema first; the race under test is the study
        ctx = multiprocessing.get_context("spawn")
        with ctx.Manager() as manager, ctx.Pool(3) as pool:
            barrier = manager.Barrier(3)
            parents = pool.map(_pg_worker, [(storage, server.uri, 4, barrier)] * 3)
        assert len(set(parents)) == 1
        study = omn.load_study("pg-race", storage, tracking_uri=server.uri)
        client = MlflowClient(server.uri)
        parents_in_mlflow = client.search_runs([study.experiment_id], "tags.`optuna.role` = 'study'")
        assert [p.info.run_id for p in parents_in_mlflow] == [study.parent_run_id]
        runs = trial_runs(client, study)
        assert len(study.trials) == 12
        assert sorted(r.info.run_name for r in runs) == sorted(f"trial-{i}" for i in range(12))
    finally:
        server.stop()
        admin.cursor().execute(f"DROP DATABASE IF EXISTS {backend.rsplit('/', 1)[1]} WITH (FORCE)")
        admin.close()


def test_reconcile_beside_a_live_trial_keeps_its_run(tmp_path: Path, tracking_uri: str) -> None:
    # `sync` reconciles with orphan_age = the grace period while workers run: a trial
    # asked but not told yet still holds its `trial-pending` run, which is no spare.
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = omn.create_study("live", storage=storage, tracking_uri=tracking_uri)
    trial = study.ask()
    x = trial.suggest_float("x", 0, 1)
    run_id = study.child_run_id(trial.number)
    omn.load_study("live", storage, tracking_uri=tracking_uri).reconcile(orphan_age=0)
    study.tell(trial, x)
    run = MlflowClient(tracking_uri).get_run(run_id)
    assert run.info.lifecycle_stage == "active"
    assert run.info.status == "FINISHED" and run.data.params == {"x": str(x)}


@pytest.mark.parametrize("owner_ends_it", [True, False])
def test_reconcile_racing_the_trials_own_writer_mends_quietly(
        tmp_path: Path, tracking_uri: str, owner_ends_it: bool) -> None:
    # Seen with 8 worker processes on one SQLite tracking file: a worker's end-of-search
    # reconcile wrote the run of another worker's trial just told, while that worker's
    # writer wrote it too. MLflow checks a run's params, then inserts them: the two
    # interleaved, and the reconcile failed with an IntegrityError ("UNIQUE constraint
    # failed: params.key, params.run_uuid", SQL on stderr in a "could not update the
    # parent run" warning), and the steps after it (the parent's figures and status)
    # were skipped. The interleaving is made here with SQLAlchemy's public event hook:
    # just before the reconcile's INSERT INTO params runs, the owner writes the run's
    # params, and (owner_ends_it) the rest of the run, which it ends; else the run stays
    # RUNNING (the owner is still writing) and the reconcile writes it again.
    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    from optuna_mlflow_nested.tracking.delivery import deliver
    from optuna_mlflow_nested.tracking.records import trial_record

    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    owner = omn.create_study("race", storage=storage, tracking_uri=tracking_uri)
    trial = owner.ask()
    x = trial.suggest_float("x", 0, 1)
    run_id = owner.child_run_id(trial.number)
    optuna.load_study(study_name="race", storage=storage).tell(trial.number, x)  # not yet written
    told = optuna.load_study(study_name="race", storage=storage).trials[0]
    record = trial_record(owner, told, tracking_uri=tracking_uri, experiment_id=owner.experiment_id,
                          parent_run_id=owner.parent_run_id, run_id=run_id)
    raced: list[BaseException | None] = []
    started = threading.Event()

    def owner_writes(client: MlflowClient) -> None:
        try:
            if owner_ends_it:
                deliver(client, record)
            else:
                client.log_batch(run_id, params=[mlflow.entities.Param("x", str(x))])
            raced.append(None)
        except BaseException as exc:  # asserted below
            raced.append(exc)

    def owner_writes_first(conn, cursor, statement, parameters, context, executemany) -> None:
        if (statement.startswith("INSERT INTO params") and run_id in str(parameters)
                and not started.is_set()):  # (the owner's own insert comes here too)
            started.set()
            writer = threading.Thread(target=owner_writes, args=(MlflowClient(tracking_uri),))
            writer.start()
            writer.join()

    other = omn.load_study("race", storage, tracking_uri=tracking_uri)
    event.listen(Engine, "before_cursor_execute", owner_writes_first)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            written = other.reconcile()
    finally:
        event.remove(Engine, "before_cursor_execute", owner_writes_first)
    assert raced == [None]  # the owner wrote first, unhindered
    assert written == (0 if owner_ends_it else 1)  # left to the owner, or written again
    run = MlflowClient(tracking_uri).get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.params == {"x": str(x)}
    assert run.data.metrics["value"] == x


def test_a_spare_run_a_sync_deleted_is_restored_for_the_trial_that_takes_it(
        tmp_path: Path, tracking_uri: str) -> None:
    # A sync (orphan age = its grace period) cannot tell a live worker's spare runs,
    # not yet taken by a trial, from those a dead worker left: it deleted them, and the
    # next trial's record then failed on a deleted run ("must be in the 'active' state").
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = omn.create_study("spares", storage=storage, tracking_uri=tracking_uri,
                             sampler="random", seed=0)
    client = MlflowClient(tracking_uri)

    def pending() -> list:
        return client.search_runs([study.experiment_id],
                                  "attributes.run_name = 'trial-pending' and "
                                  "attributes.status = 'RUNNING'")

    swept: list[str] = []

    def objective(trial: optuna.Trial) -> float:
        if trial.number == 1:
            wait_for(lambda: len(pending()) >= 2, 30, "a spare run beside this trial's")
            spares = {r.info.run_id for r in pending()} - {study.child_run_id(1)}
            assert spares, "no spare run in the pool: the test proves nothing"
            omn.load_study("spares", storage, tracking_uri=tracking_uri).reconcile(orphan_age=0)
            swept.extend(spares)
        return plain(trial)

    study.optimize(objective, n_trials=4)
    runs = trial_runs(client, study)
    assert sorted(r.info.run_name for r in runs) == [f"trial-{i}" for i in range(4)]
    assert {r.info.status for r in runs} == {"FINISHED"}
    assert {r.info.lifecycle_stage for r in runs} == {"active"}
    for run in runs:
        trial = study.trials[int(run.data.tags["optuna.trial_number"])]
        assert run.data.params["x"] == str(trial.params["x"])
    assert swept and set(swept) & {r.info.run_id for r in runs}  # a swept spare was taken


@pytest.mark.parametrize("status", ["KILLED", "FAILED"])
def test_sync_keeps_an_ended_parents_status(tmp_path: Path, tracking_uri: str, status: str) -> None:
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = omn.create_study("ended", tracking_uri=tracking_uri, storage=storage, sampler="random")
    study.optimize(plain, n_trials=2)
    client = MlflowClient(tracking_uri)
    client.set_terminated(study.parent_run_id, status)  # e.g. interrupted, or a failed finish
    args = ["sync", "--tracking-uri", tracking_uri, "--study-name", "ended", "--storage", storage]
    assert cli_main(args) == 0
    assert client.get_run(study.parent_run_id).info.status == status


def test_sync_leaves_the_parent_of_a_live_search_running(tmp_path: Path, tracking_uri: str) -> None:
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = omn.create_study("going", tracking_uri=tracking_uri, storage=storage, sampler="random")
    study.optimize(plain, n_trials=1)
    client = MlflowClient(tracking_uri)
    client.update_run(study.parent_run_id, "RUNNING")  # another worker joined and runs a trial
    trial = study.ask()
    args = ["sync", "--tracking-uri", tracking_uri, "--study-name", "going", "--storage", storage,
            "--heartbeat-interval", "0"]
    assert cli_main(args) == 0
    assert client.get_run(study.parent_run_id).info.status == "RUNNING"
    study.tell(trial, plain(trial))


def test_sync_ends_the_parent_when_its_only_running_trial_never_had_a_heartbeat(
        tmp_path: Path, tracking_uri: str) -> None:
    # A worker killed between Optuna making its trial and the trial's first heartbeat
    # (one storage write apart) leaves a RUNNING trial that fail_stale_trials never
    # fails: `sync` took it for a live search and left the parent RUNNING for good
    # (tests/test_random_faults.py, seed 17). Made here by a plain Optuna ask, which
    # records no heartbeat.
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = omn.create_study("silent", tracking_uri=tracking_uri, storage=storage, sampler="random")
    study.optimize(plain, n_trials=1)
    client = MlflowClient(tracking_uri)
    client.update_run(study.parent_run_id, "RUNNING")  # the killed worker's search had begun
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        beating = optuna.storages.RDBStorage(storage, heartbeat_interval=1, grace_period=2)
        warnings.filterwarnings("ignore", "Heartbeat of storage is supposed", UserWarning)
        orphan = optuna.load_study(study_name="silent", storage=beating).ask()
    args = ["sync", "--tracking-uri", tracking_uri, "--study-name", "silent", "--storage", storage,
            "--heartbeat-interval", "1"]
    # younger than the grace period, it may be a live worker's about to record its first
    assert cli_main([*args, "--grace-period", "600"]) == 0
    assert client.get_run(study.parent_run_id).info.status == "RUNNING"
    began = study.trials[orphan.number].datetime_start
    wait_for(lambda: (datetime.datetime.now() - began).total_seconds() > 2.5, 30,
             "the trial to be older than the grace period")
    assert cli_main([*args, "--grace-period", "2"]) == 0
    assert client.get_run(study.parent_run_id).info.status == "FINISHED"
    assert study.trials[orphan.number].state == optuna.trial.TrialState.RUNNING  # Optuna's


# ---------------------------------------------------------------- one run per trial


@pytest.mark.parametrize("raced, flaky", [(False, False), (True, False), (True, True)])
def test_sync_writes_a_trial_into_its_own_run_when_that_run_is_not_written_yet(
        tmp_path: Path, tracking_uri: str, monkeypatch: pytest.MonkeyPatch, raced: bool,
        flaky: bool) -> None:
    # A trial's run that is not RUNNING and not written yet: the objective ended it
    # (mlflow.end_run()), and its worker died after the tell, before its record was
    # written. `sync` made the trial a second run beside it, and left the trial's own
    # (named trial-pending, holding what the objective logged) as it was. (raced: a
    # sync racing the worker had already made that second run; flaky: the store fails
    # the sync's first write once, which must not pass for "its writer wrote it".)
    from optuna_mlflow_nested.tracking.delivery import deliver
    from optuna_mlflow_nested.tracking.records import trial_record

    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = omn.create_study("own-run", storage=storage, tracking_uri=tracking_uri)
    trial = study.ask()
    x = trial.suggest_float("x", 0, 1)
    with study.trial_run(trial):
        mlflow.log_metric("seen", 1.5)
        mlflow.end_run()
    run_id = study.child_run_id(trial.number)
    optuna.load_study(study_name="own-run", storage=storage).tell(trial.number, x)  # unwritten
    client = MlflowClient(tracking_uri)
    if raced:
        other = deliver(client, trial_record(study, study.trials[0], tracking_uri=tracking_uri,
                                             experiment_id=study.experiment_id,
                                             parent_run_id=study.parent_run_id, run_id=None),
                        lookup=False)
    args = ["sync", "--tracking-uri", tracking_uri, "--study-name", "own-run", "--storage", storage]
    if flaky:
        failures = _fail_first_log_batch(monkeypatch)
    assert cli_main(args) == 0
    if flaky:
        assert failures == [1]
    if raced:
        assert client.get_run(other).info.lifecycle_stage == "deleted"
    assert study.child_run_id(trial.number) == run_id
    runs = trial_runs(client, study)
    assert [(r.info.run_id, r.info.run_name) for r in runs] == [(run_id, "trial-0")]
    assert runs[0].data.metrics == {"seen": 1.5, "value": x, "trial_number": 0}
    assert runs[0].data.params == {"x": str(x)} and runs[0].info.status == "FINISHED"


def _fail_first_log_batch(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The store fails the next log_batch once, as a locked SQLite file or a 503 does
    (a retryable error); returns the list the failure is counted in."""
    from mlflow.exceptions import MlflowException

    real, failures = MlflowClient.log_batch, []

    def log_batch(self, *args, **kwargs):
        if not failures:
            failures.append(1)
            raise MlflowException("database is locked", error_code="TEMPORARILY_UNAVAILABLE")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(MlflowClient, "log_batch", log_batch)
    return failures


def test_sync_keeps_a_trials_written_run_not_an_empty_one(tmp_path: Path, tracking_uri: str) -> None:
    # Of two runs of a trial that is no run's own (none in the mapping), the one kept
    # was "ended first, lowest id": an ended run never written (a delivery cut short
    # after the run was made, then KILLED by a sync that died before deleting it) could
    # be kept, and the trial's written run deleted.
    from mlflow.exceptions import MlflowException

    from optuna_mlflow_nested.tracking.clients import set_run_status
    from optuna_mlflow_nested.tracking.delivery import deliver
    from optuna_mlflow_nested.tracking.records import trial_record

    class DiesAfterCreate(MlflowClient):
        def log_batch(self, *args, **kwargs):
            raise MlflowException("connection refused", error_code="TEMPORARILY_UNAVAILABLE")

    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = omn.create_study("empty", storage=storage, tracking_uri=tracking_uri, trial_runs=0)
    study.optimize(plain, n_trials=1)  # no run
    client = MlflowClient(tracking_uri)

    def record():
        return trial_record(study, study.trials[0], tracking_uri=tracking_uri,
                            experiment_id=study.experiment_id, parent_run_id=study.parent_run_id,
                            run_id=None)

    while True:  # the empty run's id must sort first for the old rule to pick it
        cut_short = record()
        with pytest.raises(MlflowException):
            deliver(DiesAfterCreate(tracking_uri), cut_short)
        written = deliver(client, record(), lookup=False)
        if cut_short.run_id < written:
            break
        for run_id in (cut_short.run_id, written):
            client.delete_run(run_id)
    set_run_status(client, cut_short.run_id, "KILLED")
    study.reconcile(create_missing=True)
    assert [r.info.run_id for r in trial_runs(client, study)] == [written]
    assert client.get_run(cut_short.run_id).info.lifecycle_stage == "deleted"
    assert study.child_run_id(0) == written


def test_sync_leaves_one_run_of_a_trial_that_a_race_gave_two(tmp_path: Path, tracking_uri: str) -> None:
    # A sync that reconciles while workers run can give a trial a run of its own beside
    # the one the trial's writer makes at the same moment (a trial begun while the
    # server was away has no run; each side looks, finds none and creates one). Made
    # here as the sync made it; the next sync keeps the trial's own run (the one Optuna's
    # storage names) and deletes the other.
    from optuna_mlflow_nested.tracking.delivery import deliver
    from optuna_mlflow_nested.tracking.records import trial_record

    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = omn.create_study("raced", storage=storage, tracking_uri=tracking_uri, sampler="random")
    study.optimize(plain, n_trials=2)
    own = study.child_run_id(1)
    client = MlflowClient(tracking_uri)
    extra = deliver(client, trial_record(study, study.trials[1], tracking_uri=tracking_uri,
                                         experiment_id=study.experiment_id,
                                         parent_run_id=study.parent_run_id, run_id=None),
                    lookup=False)
    assert sorted(r.info.run_name for r in trial_runs(client, study)) == ["trial-0", "trial-1", "trial-1"]
    args = ["sync", "--tracking-uri", tracking_uri, "--study-name", "raced", "--storage", storage]
    assert cli_main(args) == 0
    runs = sorted((r.info.run_name, r.info.run_id) for r in trial_runs(client, study))
    assert runs == [("trial-0", study.child_run_id(0)), ("trial-1", own)]
    assert client.get_run(extra).info.lifecycle_stage == "deleted"
    assert cli_main(args) == 0  # nothing left to mend: the same runs
    assert sorted((r.info.run_name, r.info.run_id) for r in trial_runs(client, study)) == runs


@pytest.mark.parametrize("lookup", [True, False])
def test_a_run_whose_creation_lost_its_answer_is_the_run_the_retry_writes(
        tmp_path: Path, tracking_uri: str, lookup: bool) -> None:
    # The server committed a trial's new run and died before it answered (SIGKILLed
    # mid-request). The retried delivery looked the trial's run up by its tags, which a
    # new run got only from the next call: it found none and made a second run, and the
    # first stayed RUNNING, named trial-0 with no trial number. (The lost answer is made
    # by a client that raises once after MLflow's create_run returned.)
    from mlflow.exceptions import MlflowException

    from optuna_mlflow_nested.tracking.delivery import RetryPolicy
    from optuna_mlflow_nested.tracking.delivery import deliver
    from optuna_mlflow_nested.tracking.records import trial_record
    from optuna_mlflow_nested.tracking.spool import Spool
    from optuna_mlflow_nested.tracking.writer import Writer

    class AnswerLostOnce(MlflowClient):
        def __init__(self, uri: str) -> None:
            super().__init__(uri)
            self.created: list[str] = []

        def create_run(self, *args, **kwargs):
            run = super().create_run(*args, **kwargs)
            self.created.append(run.info.run_id)
            if len(self.created) == 1:
                raise MlflowException("connection reset by peer", error_code="TEMPORARILY_UNAVAILABLE")
            return run

    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = omn.create_study("lost-answer", storage=storage, tracking_uri=tracking_uri,
                             sampler="random", trial_runs=0)  # no trial gets a run
    study.optimize(plain, n_trials=1)
    record = trial_record(study, study.trials[0], tracking_uri=tracking_uri,
                          experiment_id=study.experiment_id, parent_run_id=study.parent_run_id,
                          run_id=None)
    client = AnswerLostOnce(tracking_uri)
    if lookup:
        RetryPolicy(deadline=30, first_delay=0.01).call(lambda: deliver(client, record))
    else:  # the writer of a run known to be missing (trial_runs=K's best, a sync's new run)
        writer = Writer(client, 0, Spool(tmp_path / "spool.jsonl"), RetryPolicy(30, 0.01))
        writer.write(record, lookup=False)
        assert not writer.unsaved and not (tmp_path / "spool.jsonl").exists()
    runs = MlflowClient(tracking_uri).search_runs(  # every child of the parent
        [study.experiment_id], f"tags.mlflow.parentRunId = '{study.parent_run_id}'")
    assert [(r.info.run_id, r.info.run_name, r.info.status) for r in runs] == [
        (client.created[0], "trial-0", "FINISHED")]
    assert runs[0].data.tags["optuna.trial_number"] == "0"
