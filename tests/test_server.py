"""The wrapper against a real `mlflow server` on 127.0.0.1."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient
import optuna
import pytest

import optuna_mlflow_nested as omn


def objective(trial: optuna.Trial) -> float:
    x = trial.suggest_float("x", -3, 3)
    mlflow.log_metric("inside", x * 2)
    return x**2


def test_parallel_trials_against_a_server(mlflow_server, capsys: pytest.CaptureFixture) -> None:
    study = omn.create_study("served", experiment_name="server-exp", tracking_uri=mlflow_server.uri,
                             sampler="random", seed=0)
    study.optimize(objective, n_trials=16, n_jobs=4)
    client = MlflowClient(mlflow_server.uri)
    runs = client.search_runs([study.experiment_id],
                              f"tags.mlflow.parentRunId = '{study.parent_run_id}'")
    assert sorted(r.info.run_name for r in runs) == sorted(f"trial-{i}" for i in range(16))
    by_id = {r.info.run_id: r for r in runs}
    for trial in study.trials:
        run = by_id[study.child_run_id(trial.number)]
        assert run.info.status == "FINISHED"
        assert run.data.metrics["inside"] == pytest.approx(2 * trial.params["x"])
        assert run.data.params["x"] == str(trial.params["x"])
    parent = client.get_run(study.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.data.metrics["n_complete"] == 16
    assert "View run" not in capsys.readouterr().out


def test_a_second_optimize_replaces_the_trials_table_on_a_server(mlflow_server,
                                                                  tmp_path: Path) -> None:
    # The table goes up through the server's artifact proxy: a later optimize's table
    # replaces the earlier one there too (MLflow's log_table would append to it).
    study = omn.create_study("table-again", experiment_name="server-exp",
                             tracking_uri=mlflow_server.uri, sampler="random", seed=0)
    for _ in range(2):
        study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=3)
    # (Read directly: MLflow's load_table finds no run through a server here, even for
    # a table its own log_table wrote.)
    path = MlflowClient(mlflow_server.uri).download_artifacts(
        study.parent_run_id, "trials_table.json", str(tmp_path))
    table = json.loads(Path(path).read_text())
    numbers = [row[table["columns"].index("number")] for row in table["data"]]
    assert sorted(numbers) == list(range(6))


@pytest.mark.slow  # a CatBoost search and finish: the default suite stays under 5 minutes
def test_tune_against_a_server_says_where_its_ui_is(mlflow_server, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture) -> None:
    # The summary's last line said `mlflow ui --backend-store-uri http://user:***@...`,
    # which is no command to run for a server: its UI is already there (credentials are
    # left out of the address shown; the browser asks for them).
    from optuna_mlflow_nested.cli import main

    port = mlflow_server.uri.rsplit(":", 1)[1]
    uri = f"http://user:s3cret@127.0.0.1:{port}"
    assert main(["tune", "--trials", "1", "--tuning-iterations", "10", "--max-iterations", "20",
                 "--early-stopping-rounds", "5", "--no-progress", "--tracking-uri", uri,
                 "--storage", f"sqlite:///{tmp_path / 'optuna.db'}",
                 "--study-name", "served-tune"]) == 0
    out = capsys.readouterr().out
    assert "mlflow ui" not in out and "s3cret" not in out and "user" not in out
    assert out.strip().splitlines()[-1].startswith(f"Open it: http://127.0.0.1:{port}/#/experiments/")
