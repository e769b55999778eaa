"""Nothing lost, nothing leaked: the CatBoost finish, bad input, Ctrl-C (issue 12, items 3, 8, 9b)."""

from __future__ import annotations

import concurrent.futures
import contextlib
import datetime
import importlib.util
import os
from pathlib import Path
import re
import signal
import sqlite3
import subprocess
import sys
import time
from urllib.parse import urlparse

from conftest import MlflowServer
from mlflow.tracking import MlflowClient
import numpy as np
import optuna
import pandas as pd
import pytest

import optuna_mlflow_nested as omn
from optuna_mlflow_nested.catboost_checks import MAX_EXPERIMENT_NAME_LENGTH
from optuna_mlflow_nested.catboost_checks import MAX_STUDY_NAME_LENGTH
from optuna_mlflow_nested.cli import main
from optuna_mlflow_nested.datasets import load_diabetes
from optuna_mlflow_nested.datasets import train_val_test_split

FAST = dict(tuning_iterations=20, max_iterations=50, early_stopping_rounds=10)
CLI_FAST = ["--tuning-iterations", "20", "--max-iterations", "50", "--early-stopping-rounds", "10",
            "--no-progress"]
FINISH_METRICS = ("val_rmse", "tree_count", "best_iteration", "best_trial_val_rmse", "test_rmse",
                  "test_mae", "test_r2")


@pytest.fixture(scope="module")
def split() -> tuple:
    return train_val_test_split(*load_diabetes(), seed=42)


def wait_for(condition, timeout: float, what: str) -> None:
    """Poll a condition (never a fixed sleep): fail with ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def finish_state(client: MlflowClient, run_id: str) -> dict:
    """What a reader of the parent run sees of its finish: model, score, parameters."""
    data = client.get_run(run_id).data
    tags = {k: v for k, v in data.tags.items()
            if k.startswith("final.") or k in ("best_model", "best_model_uri")}
    return {**tags, **{k: data.metrics.get(k) for k in FINISH_METRICS}}


# ---------------------------------------------------------------- item 3: the finish step


def test_failed_finish_keeps_the_previous_finish_and_fails_the_parent(
        split: tuple, tracking_uri: str, tmp_path: Path) -> None:
    X_tr, X_va, X_te, y_tr, y_va, y_te = split
    kwargs = dict(study_name="atomic", storage=f"sqlite:///{tmp_path / 'optuna.db'}",
                  tracking_uri=tracking_uri, seed=3)
    old = omn.tune_catboost(X_tr, y_tr, X_va, y_va, X_te, y_te, n_trials=2, **kwargs, **FAST)
    client = MlflowClient(tracking_uri)
    before = finish_state(client, old.parent_run_id)
    assert before["best_model_uri"] == old.model_uri and before["best_model"] == "true"

    # The artifact location of logged models becomes unwritable (a regular file where
    # the folder was): the next log_model fails for real, the old model stays readable.
    location = client.get_logged_model(old.model_uri.split("/")[-1]).artifact_location
    models = Path(urlparse(location).path if location.startswith("file:") else location).parents[1]
    away = tmp_path / "models-away"
    models.rename(away)
    models.write_text("not a folder")
    try:
        # resume with more trials and a shorter early-stopped fit: another finish
        with pytest.raises(RuntimeError, match="finish step of study 'atomic' failed") as info:
            omn.tune_catboost(X_tr, y_tr, X_va, y_va, X_te, y_te, n_trials=3, **kwargs,
                              tuning_iterations=20, max_iterations=12, early_stopping_rounds=3)
    finally:
        models.unlink()
        away.rename(models)
    assert old.model_uri in str(info.value)  # says which finish the run still holds
    parent = client.get_run(old.parent_run_id)
    assert parent.info.status == "FAILED"
    assert parent.data.tags["finish.status"] == "failed"
    assert "finish step of study 'atomic' failed" in parent.data.tags["finish.error"]
    assert finish_state(client, old.parent_run_id) == before  # nothing half-replaced
    model = omn.load_best_model("atomic", tracking_uri=tracking_uri)
    np.testing.assert_allclose(model.predict(X_te), old.model.predict(X_te))
    assert model.tree_count_ == int(before["tree_count"])

    # the location is writable again: finishing again lands whole and clears the mark
    new = omn.tune_catboost(X_tr, y_tr, X_va, y_va, X_te, y_te, n_trials=3, **kwargs,
                            tuning_iterations=20, max_iterations=12, early_stopping_rounds=3)
    parent = client.get_run(old.parent_run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["finish.status"] == "complete" and "finish.error" not in parent.data.tags
    after = finish_state(client, old.parent_run_id)
    assert after["best_model_uri"] == new.model_uri != old.model_uri
    assert after["val_rmse"] == pytest.approx(new.val_rmse_early_stopped)
    assert after["tree_count"] == new.tree_count != old.tree_count
    model = omn.load_best_model("atomic", tracking_uri=tracking_uri)
    assert model.tree_count_ == new.tree_count


def _model_dirs(server: MlflowServer) -> set[Path]:
    return set((server.root / "artifacts").glob("*/models/*"))


def _kill(server: MlflowServer) -> None:
    """The server dies at once (SIGKILL to its process group), nothing flushed."""
    assert server.proc is not None
    os.killpg(server.proc.pid, signal.SIGKILL)
    server.proc.wait()
    server.proc = None


@pytest.mark.slow
def test_server_killed_during_the_finish_leaves_the_previous_finish(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    server = MlflowServer(tmp_path / "srv", backend_uri=f"sqlite:///{tmp_path / 'srv.db'}").start()
    restarted = MlflowServer(server.root, backend_uri=server.backend_uri, port=server.port)
    secret_uri = f"http://u:S3CRET@127.0.0.1:{server.port}"  # the server ignores the password
    args = ["tune", "--study-name", "killed", "--tracking-uri", secret_uri, "--storage",
            f"sqlite:///{tmp_path / 'optuna.db'}", "--seed", "3", "--no-progress",
            "--tuning-iterations", "20", "--early-stopping-rounds", "10"]
    env = {**os.environ, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5",
           "OMN_RETRY_DEADLINE": "2"}
    try:
        assert main([*args, "--trials", "2", "--max-iterations", "50"]) == 0
        assert "S3CRET" not in str(capsys.readouterr())
        client = MlflowClient(server.uri)
        parent_id = client.search_runs([client.get_experiment_by_name("killed").experiment_id],
                                       "tags.`optuna.role` = 'study'")[0].info.run_id
        before = finish_state(client, parent_id)
        old_models = _model_dirs(server)
        proc = subprocess.Popen([sys.executable, "-m", "optuna_mlflow_nested", *args, "--trials", "3",
                                 "--max-iterations", "12"], cwd=tmp_path, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            # the finish has begun logging its model: the server dies now
            wait_for(lambda: _model_dirs(server) - old_models or proc.poll() is not None, 180,
                     "the resumed finish to log its model")
            _kill(server)
            _, err = proc.communicate(timeout=180)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        if proc.returncode == 0:
            pytest.skip("the finish completed before the server died")
        restarted.start()
        client = MlflowClient(restarted.uri)
        assert finish_state(client, parent_id) == before  # the old finish, whole
        assert client.get_run(parent_id).data.tags.get("finish.status") != "complete"
        model = omn.load_best_model("killed", tracking_uri=restarted.uri)
        assert model.tree_count_ == int(before["tree_count"])
        assert proc.returncode == 1, err
        assert "Traceback" not in err and "S3CRET" not in err
        assert err.strip().splitlines()[-1].startswith(
            "optuna-mlflow-nested tune: error: the finish step of study 'killed' failed")
    finally:
        server.stop()
        restarted.stop()


# ---------------------------------------------------------------- item 8: bad input, early


def _varchar(db: str, table: str, column: str) -> int:
    with contextlib.closing(sqlite3.connect(db)) as con:
        types = {row[1]: row[2] for row in con.execute(f"PRAGMA table_info({table})")}
    match = re.fullmatch(r"VARCHAR\((\d+)\)", types[column])
    assert match, types[column]
    return int(match.group(1))


def test_name_limits_are_the_real_databases_limits(tracking_uri: str, tmp_path: Path) -> None:
    optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'optuna.db'}")  # Optuna's own schema
    optuna_db, mlflow_db = str(tmp_path / "optuna.db"), tracking_uri.removeprefix("sqlite:///")
    # PostgreSQL and MySQL enforce these widths: a longer name fails after the study exists.
    assert MAX_STUDY_NAME_LENGTH == min(_varchar(optuna_db, "studies", "study_name"),
                                        _varchar(mlflow_db, "runs", "name"))  # the parent run's
    assert MAX_EXPERIMENT_NAME_LENGTH == _varchar(mlflow_db, "experiments", "name")
    assert MAX_STUDY_NAME_LENGTH <= MAX_EXPERIMENT_NAME_LENGTH  # it names the experiment too


def _write_csvs(folder: Path) -> None:
    rng = np.random.default_rng(0)
    n = 60
    x, x2 = rng.normal(size=n), rng.normal(size=n)
    good = pd.DataFrame({"x": x, "x2": x2, "y": 3 * x + x2 + rng.normal(scale=0.1, size=n),
                         "z": x - x2})
    good.to_csv(folder / "good.csv", index=False)
    good.assign(y=good["y"] + 1).to_csv(folder / "other.csv", index=False)
    good.assign(y=2.5).to_csv(folder / "const.csv", index=False)
    good.assign(y=good["y"].where(good.index != 7, np.inf)).to_csv(folder / "inf_y.csv", index=False)
    good.assign(x2=good["x2"].where(good.index != 9, -np.inf)).to_csv(folder / "inf_x.csv", index=False)


def _assert_one_line(capsys: pytest.CaptureFixture, *texts: str) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("optuna-mlflow-nested tune: error: ")
    for text in texts:
        assert text in lines[0]
    return lines[0]


@pytest.mark.parametrize(
    "args, texts",
    [
        (["--data", "const.csv", "--target", "y"], ["target column 'y'", "constant"]),
        (["--data", "inf_y.csv", "--target", "y"], ["target column 'y'", "infinite"]),
        (["--data", "inf_x.csv", "--target", "y"], ["column 'x2'", "infinite"]),
        (["--timeout", "-5"], ["--timeout", "-5"]),
        (["--timeout", "nan"], ["--timeout"]),
        (["--study-name", "s" * 600], ["--study-name", "600", "250"]),
        (["--study-name", ""], ["--study-name"]),
        (["--experiment", "e" * 300], ["--experiment", "300", "256"]),
        (["--seed", "-1"], ["--seed", "-1"]),
        (["--storage", "postgresql://bob:s3cret@127.0.0.1:1/nodb"], ["storage", "bob:***@"]),
        (["--sampler", "bogus"], ["--sampler", "'bogus'"]),
        (["--seed", "4294967295"], ["--seed", "4294967295"]),  # the split's seed + 1
        (["--register", "a/b"], ["--register", "'a/b'"]),
        # named n_jobs and n_workers, Python names, and left optuna.db behind
        (["--workers", "2", "--n-jobs", "2"], ["--n-jobs", "--workers/--dask"]),
        pytest.param(["--sampler", "gp"], ["--sampler", "PyTorch"], marks=pytest.mark.skipif(
            importlib.util.find_spec("torch") is not None, reason="PyTorch is installed")),
        (["--storage", "postgresql://u:s3cret/x@127.0.0.1:1/nodb"], ["storage", "u:***@"]),
    ],
)
def test_bad_input_exits_2_before_anything_is_written(
        tmp_path: Path, capsys: pytest.CaptureFixture, args: list[str], texts: list[str]) -> None:
    _write_csvs(tmp_path)
    assert main(["tune", "--trials", "2", *args, *CLI_FAST]) == 2
    assert "s3cret" not in _assert_one_line(capsys, *texts)
    assert not (tmp_path / "optuna.db").exists()  # no Optuna study
    assert not (tmp_path / "mlflow.db").exists()  # no MLflow experiment or run


def test_a_worker_with_bad_threads_exits_2_before_anything_is_written(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    # `worker --threads 0` died of a floating point exception in CatBoost (exit 136),
    # leaving the parent, spare runs and a trial RUNNING.
    assert main(["worker", "--trials", "1", "--threads", "0", "--tuning-iterations", "20"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "--threads" in lines[0] and lines[0].startswith(
        "optuna-mlflow-nested worker: error: "), lines
    assert not (tmp_path / "optuna.db").exists() and not (tmp_path / "mlflow.db").exists()


@pytest.mark.parametrize(
    "change, match",
    [
        ({"y_train": "constant"}, r"y_train is constant"),
        ({"y_val": "nan"}, r"y_val has 1 NaN"),
        ({"y_test": "inf"}, r"y_test has 1 infinite"),
        ({"X_val": "inf"}, r"X_val column 'bmi' has 1 infinite"),
        ({"timeout": -5}, r"timeout must be a positive number"),
        ({"study_name": "s" * 600}, r"study_name is 600 characters long; at most 250"),
        ({"experiment_name": "e" * 300}, r"experiment_name is 300 characters long; at most 256"),
        ({"seed": -1}, r"seed must be"),
        # checked by optimize, after the parent run was made (it was left RUNNING)
        ({"n_jobs": 0}, r"n_jobs must be a positive integer or -1, got 0"),
        ({"executor": "threads", "n_jobs": 2}, r"n_jobs=2 with executor=\.\.\."),
        ({"executor": "threads", "n_workers": 0}, r"n_workers must be a positive integer, got 0"),
        ({"executor": "threads", "storage": None}, r"optimize\(executor=\.\.\.\) needs a storage"),
    ],
)
def test_tune_catboost_rejects_bad_input_before_anything_is_written(
        split: tuple, tracking_uri: str, tmp_path: Path, change: dict, match: str) -> None:
    X_tr, X_va, X_te, y_tr, y_va, y_te = (p.copy() for p in split)
    data = dict(X_train=X_tr, y_train=y_tr, X_val=X_va, y_val=y_va, X_test=X_te, y_test=y_te)
    kwargs: dict = dict(n_trials=2, tracking_uri=tracking_uri, study_name="bad",
                        storage=f"sqlite:///{tmp_path / 'optuna.db'}", **FAST)
    for name, how in change.items():
        if name in data and how == "constant":
            data[name] = data[name] * 0 + 1.5
        elif name == "X_val":
            data[name].iloc[4, data[name].columns.get_loc("bmi")] = np.inf
        elif name in data:
            data[name].iloc[2] = np.nan if how == "nan" else np.inf
        elif name == "executor":
            kwargs[name] = concurrent.futures.ThreadPoolExecutor(1)
        else:
            kwargs[name] = how
    with pytest.raises(ValueError, match=match):
        omn.tune_catboost(**data, **kwargs)
    assert not (tmp_path / "optuna.db").exists()
    assert [e.name for e in MlflowClient(tracking_uri).search_experiments()] == ["Default"]


def test_resume_with_other_data_target_seed_or_tree_count_is_refused(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    _write_csvs(tmp_path)
    base = ["tune", "--data", "good.csv", "--target", "y", "--seed", "5", *CLI_FAST]
    assert main([*base, "--trials", "2"]) == 0
    capsys.readouterr()
    client = MlflowClient("sqlite:///mlflow.db")
    experiment_id = client.get_experiment_by_name("catboost-tune").experiment_id

    def snapshot() -> tuple:
        runs = client.search_runs([experiment_id], max_results=1000)
        study = optuna.load_study(study_name="catboost-tune", storage="sqlite:///optuna.db")
        return (sorted((r.info.run_id, r.info.status, r.info.end_time) for r in runs),
                [(t.number, t.state) for t in study.trials])

    before = snapshot()
    for change, texts in [
        (["--seed", "6"], ["--seed", "5", "6"]),
        (["--target", "z"], ["--target", "'y'", "'z'"]),
        (["--data", "other.csv"], ["--data", "good.csv", "other.csv"]),
        # trials fit with another fixed tree count score on another scale
        (["--tuning-iterations", "30"], ["--tuning-iterations", "20", "30"]),
    ]:
        args = [*base, "--trials", "3"]
        name = change[0]
        args[args.index(name) + 1] = change[1]
        assert main(args) == 2
        _assert_one_line(capsys, *texts, "catboost-tune")
        assert snapshot() == before  # not a trial, run or status written

    # the same refusal from Python, naming the argument
    from optuna_mlflow_nested import datasets

    X_tr, X_va, X_te, y_tr, y_va, y_te = datasets.train_val_test_split(
        *datasets.load("good.csv", "y"), seed=5)
    same = dict(n_trials=3, study_name="catboost-tune", storage="sqlite:///optuna.db",
                tracking_uri="sqlite:///mlflow.db")
    with pytest.raises(ValueError, match=r"seed.*5.*7"):
        omn.tune_catboost(X_tr, y_tr, X_va, y_va, seed=7, **same, **FAST)
    with pytest.raises(ValueError, match=r"tuning_iterations=20, not tuning_iterations=30"):
        omn.tune_catboost(X_tr, y_tr, X_va, y_va, seed=5, **same,
                          **{**FAST, "tuning_iterations": 30})
    assert snapshot() == before


@pytest.mark.slow  # CatBoost fits; the default suite stays under 5 min on 2 cores
def test_a_search_stopped_before_any_trial_was_scored_may_change_its_tree_count(
        split: tuple, tracking_uri: str, tmp_path: Path) -> None:
    # Ctrl-C before any trial ended leaves only FAILED trials: none was scored with the
    # first count, so a rerun with another (a quicker one, say) goes on. The count it
    # gives is then the study's, and the first count is refused once trials were scored.
    from optuna_mlflow_nested.catboost import catboost_study
    from optuna_mlflow_nested.catboost_checks import data_fingerprint

    X_tr, X_va, _, y_tr, y_va, _ = split
    kw = dict(study_name="trees", storage=f"sqlite:///{tmp_path / 'optuna.db'}",
              tracking_uri=tracking_uri, max_iterations=50, early_stopping_rounds=10)
    first = data_fingerprint(X_tr, y_tr, X_va, y_va, seed=42, tuning_iterations=5000)
    study = catboost_study(study_name="trees", experiment_name=None, tracking_uri=tracking_uri,
                           storage=kw["storage"], sampler="tpe", seed=42, fingerprint=first)
    study.tell(study.ask(), state=optuna.trial.TrialState.FAIL)  # as an interrupt leaves it
    omn.tune_catboost(X_tr, y_tr, X_va, y_va, n_trials=2, tuning_iterations=20, **kw)
    with pytest.raises(ValueError, match=r"tuning_iterations=20, not tuning_iterations=5000"):
        omn.tune_catboost(X_tr, y_tr, X_va, y_va, n_trials=3, tuning_iterations=5000, **kw)


# ---------------------------------------------------------------- item 9b: Ctrl-C


def _running_trials(db: Path, for_seconds: float = 0.0) -> int:
    """Trials RUNNING in Optuna's SQLite file (started at least ``for_seconds`` ago),
    read-only: opening an RDBStorage here would race the CLI creating the schema."""
    if not db.exists():
        return 0
    try:
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1)) as con:
            starts = [row[0] for row in con.execute(
                "SELECT datetime_start FROM trials WHERE state = 'RUNNING'")]
    except sqlite3.Error:  # the file is there, its tables not yet
        return 0
    # Optuna writes datetime.now(), local and naive
    since = datetime.datetime.now() - datetime.timedelta(seconds=for_seconds)
    return sum(1 for start in starts if start and datetime.datetime.fromisoformat(start) <= since)


#: Python's own Ctrl-C handling, also where this process inherits SIGINT ignored: a
#: background job of a shell without job control (`./.ci/run &`) does.
_DEFAULT_CTRL_C = "import signal; signal.signal(signal.SIGINT, signal.default_int_handler)\n"


@pytest.mark.slow  # ~30 s each: the default suite stays under 5 minutes
@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_prints_one_line_and_exits_130(tmp_path: Path, stop: signal.Signals) -> None:
    # SIGTERM (kill, timeout, a batch scheduler) ended a `tune` without --workers at once
    # (exit 143, nothing said, the parent and a spare run left RUNNING). The trial it
    # interrupted counted in the budget: resuming `--trials 1` had no trial to finish
    # with and ended in a traceback.
    run_cli = _DEFAULT_CTRL_C + "import runpy; runpy.run_module('optuna_mlflow_nested', run_name='__main__')"
    proc = subprocess.Popen(
        [sys.executable, "-c", run_cli, "tune", "--trials", "1",
         "--tuning-iterations", "200000", "--no-progress"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # Ctrl-C in the middle of a trial's fit, which is what this test is about, not in
        # the instant it starts: there, Optuna's heartbeat thread could be left running
        # (fixed; tests/test_faults.py), and a Ctrl-C in the first trial's import of
        # CatBoost is lost now and then (raised inside C code that drops exceptions).
        wait_for(lambda: _running_trials(tmp_path / "optuna.db", 2.0) or proc.poll() is not None,
                 180, "a trial to run for 2 s")
        assert proc.poll() is None, proc.communicate()
        proc.send_signal(stop)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    assert err.strip().splitlines() == [
        "optuna-mlflow-nested tune: interrupted; run the same command again to resume"], err
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("catboost-tune")
    parents = client.search_runs([experiment.experiment_id], "tags.`optuna.role` = 'study'")
    assert [p.info.status for p in parents] == ["KILLED"]
    everything = client.search_runs([experiment.experiment_id], run_view_type=3)
    assert "RUNNING" not in {r.info.status for r in everything}
    resumed = subprocess.run([sys.executable, "-m", "optuna_mlflow_nested", "tune", "--trials", "1",
                              *CLI_FAST], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    study = optuna.load_study(study_name="catboost-tune", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    assert [t.state.name for t in study.trials] == ["FAIL", "COMPLETE"]  # the interrupted one again


@pytest.mark.slow
def test_sigkilled_cli_worker_is_cleaned_up_by_sync(tmp_path: Path) -> None:
    import signal
    import subprocess
    import sys
    import time

    from mlflow.tracking import MlflowClient
    import optuna

    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    beat = ["--heartbeat-interval", "1", "--grace-period", "3"]
    worker = subprocess.Popen(
        [sys.executable, "-m", "optuna_mlflow_nested", "worker", "--trials", "3",
         "--tuning-iterations", "200000", "--storage", storage, "--tracking-uri", uri, *beat],
        cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    running = []
    while time.monotonic() < deadline and not running:
        try:
            trials = optuna.load_study(study_name="catboost-tune", storage=storage).trials
        except KeyError:
            trials = []
        running = [t for t in trials if t.state.name == "RUNNING"]
        time.sleep(0.1)
    worker.send_signal(signal.SIGKILL)
    worker.wait(timeout=30)
    assert running, "the worker never started a trial"
    sync = [sys.executable, "-m", "optuna_mlflow_nested", "sync", "--study-name",
            "catboost-tune", "--storage", storage, "--tracking-uri", uri, *beat]
    deadline = time.monotonic() + 60
    while True:  # until the grace period has passed and sync failed the stale trial
        result = subprocess.run(sync, cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr[-2000:]
        state = optuna.load_study(study_name="catboost-tune", storage=storage).trials[0].state
        if state.name == "FAIL" or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert state.name == "FAIL"
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("catboost-tune")
    everything = client.search_runs([experiment.experiment_id], run_view_type=3)
    assert "RUNNING" not in {r.info.status for r in everything}, "spares and the trial ended"
    trial_runs = [r for r in everything if r.info.run_name == "trial-0"]
    assert len(trial_runs) == 1 and trial_runs[0].info.status == "FAILED"
