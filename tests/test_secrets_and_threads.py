"""Nothing lost, nothing leaked (issue 12, items 2, 7 and 9a): an unwritable spool with a
dead server, passwords in MLflow's messages, two tracking URIs in threads of one process,
an objective that ends MLflow's run itself. Real servers, stores and threads only."""

from __future__ import annotations

import logging
from pathlib import Path
import shutil
import subprocess
import sys
import threading
import warnings

from conftest import MlflowServer
from conftest import free_port
import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
import optuna
import pytest

import optuna_mlflow_nested as omn
from optuna_mlflow_nested import tracking

SECRET = "S3CRET"


def _with_password(uri: str) -> str:
    return uri.replace("http://", f"http://u:{SECRET}@")  # the test server ignores it


def _leaks(out: str, err: str, caplog: pytest.LogCaptureFixture,
           caught: list[warnings.WarningMessage]) -> list[str]:
    """Where the password shows: stdout, stderr, log records (tracebacks too), warnings."""
    texts = {"stdout": out, "stderr": err, "log": caplog.text,
             **{f"warning {i}": str(w.message) for i, w in enumerate(caught)}}
    return [name for name, text in texts.items() if SECRET in text]


def _all_runs(uri: str) -> list:
    client = MlflowClient(uri)
    return [run for exp in client.search_experiments()
            for run in client.search_runs([exp.experiment_id], max_results=10_000)]


def _trial_runs(client: MlflowClient, study: omn.NestedStudy) -> dict[int, int]:
    counts: dict[int, int] = {}
    for run in client.search_runs([study.experiment_id], max_results=10_000):
        if run.info.run_id != study.parent_run_id and "optuna.trial_number" in run.data.tags:
            number = int(run.data.tags["optuna.trial_number"])
            counts[number] = counts.get(number, 0) + 1
    return counts


# ---------------------------------------------------------------- item 2: no crash, no leak


@pytest.mark.slow
def test_unwritable_spool_and_a_killed_server_lose_and_leak_nothing(
        tmp_path: Path, capfd: pytest.CaptureFixture, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    caplog.set_level(logging.DEBUG)
    (tmp_path / "file").write_text("a regular file, not a folder")
    spool_path = tmp_path / "file" / "spool.jsonl"
    monkeypatch.setenv("OMN_SPOOL", str(spool_path))
    monkeypatch.setenv("OMN_RETRY_DEADLINE", "2")
    server = MlflowServer(tmp_path / "server").start()
    uri = _with_password(server.uri)
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    try:
        study = omn.create_study("leak", tracking_uri=uri, storage=storage, sampler="random",
                                 seed=0)

        def objective(trial: optuna.Trial) -> float:
            x = trial.suggest_float("x", 0, 1)
            if trial.number < 3:
                mlflow.log_metric("x_seen", x)
            if trial.number == 1:
                mlflow.end_run()  # MLflow prints a "View run <URI>" link here
            if trial.number == 3:
                server.stop()  # the server dies mid-study (SIGTERM, then SIGKILL, by group)
                mlflow.log_metric("after_death", x)  # MLflow's error names the URI
            return x

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            study.optimize(objective, n_trials=15, catch=(MlflowException,))  # must not raise
    finally:
        server.stop()
    out, err = capfd.readouterr()
    assert _leaks(out, err, caplog, caught) == [], "the password leaked"
    assert "Exception in thread" not in err
    naming_spool = [w for w in caught if str(spool_path) in str(w.message)]
    assert len(naming_spool) == 1, [str(w.message) for w in caught]
    assert len(study.trials) == 15
    assert study.trials[3].state == optuna.trial.TrialState.FAIL

    # The server comes back: sync rebuilds every run from Optuna's storage.
    server = MlflowServer(tmp_path / "server", port=server.port).start()
    try:
        result = subprocess.run(
            [sys.executable, "-m", "optuna_mlflow_nested", "sync", "--spool",
             str(tmp_path / "none.jsonl"), "--study-name", "leak", "--storage", storage,
             "--tracking-uri", uri], capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-2000:]
        assert SECRET not in result.stdout + result.stderr
        client = MlflowClient(server.uri)
        assert _trial_runs(client, study) == {n: 1 for n in range(15)}
        assert client.get_run(study.parent_run_id).info.status == "FINISHED"
        statuses = {r.data.tags["optuna.trial_number"]: r.info.status
                    for r in client.search_runs([study.experiment_id])
                    if "optuna.trial_number" in r.data.tags}
        assert statuses["3"] == "FAILED" and statuses["14"] == "FINISHED"
        assert "RUNNING" not in {r.info.status for r in _all_runs(server.uri)}
    finally:
        server.stop()


def test_mlflow_errors_in_an_objective_reach_neither_logs_nor_runs_with_the_password(
        tmp_path: Path, mlflow_server: MlflowServer, capfd: pytest.CaptureFixture,
        caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """MLflow's exceptions embed the whole URI; Optuna logs them and the run keeps the
    traceback. Also MLflow's "View run <URI>" line when the objective ends the run."""
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    uri = _with_password(mlflow_server.uri)
    dead = f"http://u:{SECRET}@127.0.0.1:{free_port()}"
    study = omn.create_study(f"masked-{free_port()}", tracking_uri=uri, sampler="random", seed=0)

    def objective(trial: optuna.Trial) -> float:
        if trial.number == 0:
            mlflow.end_run()
        else:
            MlflowClient(dead).get_run("0" * 32)  # raises MlflowException naming `dead`
        return 1.0

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        study.optimize(objective, n_trials=2, catch=(MlflowException,))
    out, err = capfd.readouterr()
    assert _leaks(out, err, caplog, caught) == []
    assert "u:***@127.0.0.1" in err + caplog.text  # the error is still told, masked
    client = MlflowClient(mlflow_server.uri)
    failed = client.get_run(study.child_run_id(1))
    assert failed.info.status == "FAILED"
    traceback_text = Path(client.download_artifacts(failed.info.run_id, "traceback.txt",
                                                    str(tmp_path))).read_text()
    assert "MlflowException" in traceback_text and SECRET not in traceback_text


def test_sync_against_a_dead_server_prints_no_password(
        tmp_path: Path, mlflow_server: MlflowServer, capsys: pytest.CaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    from optuna_mlflow_nested.cli import main

    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = omn.create_study(f"sync-{free_port()}", tracking_uri=mlflow_server.uri,
                             storage=storage)
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=1)
    # A study whose parent run lives on a server that is gone now.
    dead = f"http://u:{SECRET}@127.0.0.1:{free_port()}"
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    code = main(["sync", "--spool", str(tmp_path / "none.jsonl"), "--study-name",
                 study.study_name, "--storage", storage, "--tracking-uri", dead])
    out, err = capsys.readouterr()
    assert code in (1, 2) and "error" in err
    assert SECRET not in out + err


def test_errors_raised_through_the_package_mask_the_password(
        tracking_uri: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """``deliver`` (reconcile, sync) and experiment lookup let MLflow's exception out."""
    from optuna_mlflow_nested.tracking.delivery import deliver
    from optuna_mlflow_nested.tracking.records import trial_record

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    study = omn.create_study("masked", tracking_uri=tracking_uri, sampler="random", seed=0)
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=1)
    dead = f"http://u:{SECRET}@127.0.0.1:{free_port()}"
    record = trial_record(study, study.trials[0], tracking_uri=dead, experiment_id="1",
                          parent_run_id=None, run_id=None)
    client = tracking.get_client(dead)
    for call in (lambda: deliver(client, record),
                 lambda: tracking.get_or_create_experiment(client, "x")):
        with pytest.raises(MlflowException) as caught:
            call()
        assert "u:***@127.0.0.1" in str(caught.value)
        assert SECRET not in str(caught.value) + caught.value.message


# ---------------------------------------------------------------- item 7: one URI per process


def test_a_second_tracking_uri_while_a_study_optimizes_is_a_clear_error(
        tmp_path: Path, tracking_uri: str, mlflow_server: MlflowServer) -> None:
    other_uri = f"sqlite:///{tmp_path / 'other.db'}"
    shutil.copyfile(tracking_uri[len("sqlite:///"):], tmp_path / "other.db")
    first = omn.create_study(f"first-{free_port()}", tracking_uri=_with_password(mlflow_server.uri))
    second = omn.create_study("second", tracking_uri=other_uri)
    inside, release = threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def slow(trial: optuna.Trial) -> float:
        inside.set()
        assert release.wait(60)
        mlflow.log_metric("inside", 1.0)  # must still reach the first study's server
        return trial.suggest_float("x", 0, 1)

    def run_first() -> None:
        try:
            first.optimize(slow, n_trials=1)
        except BaseException as exc:  # surfaced by the assertions below
            errors.append(exc)

    thread = threading.Thread(target=run_first)
    thread.start()
    try:
        assert inside.wait(60)
        with pytest.raises(ValueError, match="separate processes") as caught:
            second.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=1)
        message = str(caught.value)
        assert "other.db" in message and f"u:***@127.0.0.1:{mlflow_server.port}" in message
        assert SECRET not in message
    finally:
        release.set()
        thread.join(60)
    assert errors == []
    client = MlflowClient(mlflow_server.uri)
    assert client.get_run(first.child_run_id(0)).data.metrics["inside"] == 1.0
    assert second.trials == [] and not second.run_ids()
    second.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=1)  # alone, it works
    assert MlflowClient(other_uri).get_run(second.child_run_id(0)).info.status == "FINISHED"
    assert mlflow.get_tracking_uri() != other_uri  # the user's setting is back


def test_search_runs_frame_matches_mlflow_search_runs(tracking_uri: str) -> None:
    study = omn.create_study("frame", tracking_uri=tracking_uri, sampler="random", seed=0)
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=3)
    mlflow.set_tracking_uri(tracking_uri)
    query = {"experiment_ids": [study.experiment_id],
             "filter_string": "tags.`optuna.role` = 'trial'",
             "order_by": ["attributes.start_time ASC"], "max_results": 2}
    expected = mlflow.search_runs(**query)
    got = tracking.clients.search_runs_frame(tracking.get_client(tracking_uri), **query)
    assert len(got) == 2
    assert sorted(got.columns) == sorted(expected.columns)
    assert got[sorted(expected.columns)].equals(expected[sorted(expected.columns)])


def test_child_runs_of_another_store_while_a_study_optimizes(tmp_path: Path,
                                                             tracking_uri: str) -> None:
    other_uri = f"sqlite:///{tmp_path / 'other.db'}"
    shutil.copyfile(tracking_uri[len("sqlite:///"):], tmp_path / "other.db")
    done = omn.create_study("done", tracking_uri=other_uri, sampler="random", seed=0)
    done.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)
    busy = omn.create_study("busy", tracking_uri=tracking_uri)

    def objective(trial: optuna.Trial) -> float:
        assert len(done.child_runs()) == 2  # reading another store needs no global switch
        mlflow.log_metric("inside", 1.0)
        return 0.0

    busy.optimize(objective, n_trials=1)
    assert list(busy.child_runs()["metrics.inside"]) == [1.0]


# ---------------------------------------------------------------- item 9a: objective ends the run


@pytest.mark.parametrize("n_jobs", [1, 2])
def test_objective_that_ends_the_run_and_logs_on_leaves_no_stray_run(
        tracking_uri: str, n_jobs: int) -> None:
    study = omn.create_study("ends", tracking_uri=tracking_uri, sampler="random", seed=0)

    def objective(trial: optuna.Trial) -> float:
        x = trial.suggest_float("x", 0, 1)
        mlflow.log_metric("before", x)
        mlflow.end_run()
        mlflow.log_metric("after", x)  # used to start a stray run in the Default experiment
        if trial.number == 1:
            raise ValueError("this trial fails after ending its run")
        return x

    study.optimize(objective, n_trials=4, n_jobs=n_jobs, catch=(ValueError,))
    runs = _all_runs(tracking_uri)
    assert {r.info.experiment_id for r in runs} == {study.experiment_id}, "a stray run"
    assert len(runs) == 5
    assert "RUNNING" not in {r.info.status for r in runs}
    client = MlflowClient(tracking_uri)
    for trial in study.trials:
        run = client.get_run(study.child_run_id(trial.number))
        assert run.data.metrics["after"] == trial.params["x"]
        expected = "FAILED" if trial.number == 1 else "FINISHED"
        assert run.info.status == expected, trial.number  # the trial's status, not end_run's
    assert mlflow.active_run() is None


def test_runs_an_objective_starts_and_leaves_active_are_ended(tracking_uri: str) -> None:
    study = omn.create_study("left", tracking_uri=tracking_uri, sampler="random", seed=0)

    def objective(trial: optuna.Trial) -> float:
        mlflow.start_run(run_name=f"inner-{trial.number}", nested=True)  # never ended
        mlflow.log_metric("inner", 1.0)
        if trial.number == 1:
            raise ValueError("fails with its inner run still active")
        return 0.0

    study.optimize(objective, n_trials=3, catch=(ValueError,))
    inner = {r.info.run_name: r for r in _all_runs(tracking_uri)
             if r.info.run_name.startswith("inner")}
    assert {name: r.info.status for name, r in inner.items()} == {
        "inner-0": "FINISHED", "inner-1": "FAILED", "inner-2": "FINISHED"}
    # each nests under its own trial's run, not under the previous trial's inner run
    assert {r.data.tags["mlflow.parentRunId"] for r in inner.values()} == set(
        study.run_ids().values())
    assert mlflow.active_run() is None


def test_a_figure_that_cannot_be_uploaded_is_reported_without_the_password(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
        capfd: pytest.CaptureFixture) -> None:
    # The parent's figures go up as artifacts; with the server gone, MLflow's error
    # (the URI, password included) was logged as it was: "could not draw ...".
    from optuna_mlflow_nested.tracking.figures import log_figures

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    study.optimize(lambda t: t.suggest_float("x", 0, 1) + t.suggest_float("y", 0, 1), n_trials=4)
    client = MlflowClient(f"http://u:{SECRET}@127.0.0.1:{free_port()}")  # nothing listens
    with caplog.at_level(logging.WARNING):
        log_figures(client, "0" * 32, study)
    said = [r.getMessage() for r in caplog.records if "could not draw" in r.getMessage()]
    assert len(said) == 2, said  # both figures were tried and reported
    out, err = capfd.readouterr()
    assert _leaks(out, err, caplog, []) == []
