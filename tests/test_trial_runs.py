"""trial_runs=K: big searches keep every trial in the parent's table, child runs only for
the K best and the failed trials (issue 15)."""

from __future__ import annotations

import json

import mlflow
from mlflow.tracking import MlflowClient
import optuna
import pytest

import optuna_mlflow_nested as omn


def objective(trial: optuna.Trial) -> float:
    x = trial.suggest_float("x", -3, 3)
    trial.report(x * 2, step=0)
    mlflow.log_metric("inside", x)
    if trial.number in (4, 9):
        raise RuntimeError(f"boom {trial.number}")
    return x * x


def test_top_k_runs_and_table(tracking_uri: str, tmp_path) -> None:
    study = omn.create_study("big", tracking_uri=tracking_uri, sampler="random", seed=0,
                             trial_runs="top-3", storage=f"sqlite:///{tmp_path / 'o.db'}")
    study.optimize(objective, n_trials=30, catch=(RuntimeError,))
    client = MlflowClient(tracking_uri)
    runs = client.search_runs([study.experiment_id],
                              f"tags.mlflow.parentRunId = '{study.parent_run_id}'")
    complete = sorted((t for t in study.trials if t.state.name == "COMPLETE"), key=lambda t: t.value)
    expected = {t.number for t in complete[:3]} | {4, 9}
    assert {int(r.data.tags["optuna.trial_number"]) for r in runs} == expected
    for run in runs:
        number = int(run.data.tags["optuna.trial_number"])
        trial = study.trials[number]
        assert run.info.run_name == f"trial-{number}"
        if trial.state.name == "FAIL":
            assert run.info.status == "FAILED"
            text = client.download_artifacts(run.info.run_id, "traceback.txt", str(tmp_path))
            assert f"boom {number}" in open(text).read()
        else:
            assert run.data.metrics["value"] == pytest.approx(trial.value)
            assert run.info.status == "FINISHED"
        assert study.child_run_id(number) == run.info.run_id
    # Every trial is in the parent's table, with its intermediate values.
    path = client.download_artifacts(study.parent_run_id, "trials_table.json", str(tmp_path))
    table = json.load(open(path))
    rows = [dict(zip(table["columns"], row)) for row in table["data"]]
    assert sorted(r["number"] for r in rows) == list(range(30))
    assert json.loads(rows[0]["intermediate_values"]) == {"0": pytest.approx(
        2 * study.trials[0].params["x"])}
    parent = client.get_run(study.parent_run_id)
    assert parent.data.metrics["n_trials"] == 30 and parent.data.metrics["n_failed"] == 2
    assert parent.data.tags["best_trial"] == str(complete[0].number)
    assert parent.data.metrics["best_value"] == pytest.approx(complete[0].value)
    # The objective's own mlflow calls land on the parent, never in a stray run.
    assert "inside" in parent.data.metrics
    all_runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    assert len(all_runs) == 1 + 5
    # Workers and later sessions follow the study's policy; reconcile keeps to it.
    again = omn.load_study("big", f"sqlite:///{tmp_path / 'o.db'}", tracking_uri=tracking_uri)
    assert again.trial_runs == 3
    assert again.reconcile(create_missing=True) == 0
    assert "mlflow_run_id" not in "".join(study.trials_dataframe().columns)


def test_trial_runs_values() -> None:
    with pytest.raises(ValueError, match="trial_runs"):
        omn.create_study(trial_runs="best")
    with pytest.raises(ValueError, match="trial_runs"):
        omn.create_study(trial_runs=-1)


def test_all_is_the_default_and_zero_keeps_only_failures(tracking_uri: str) -> None:
    study = omn.create_study("none", tracking_uri=tracking_uri, sampler="random", seed=1,
                             trial_runs=0)
    study.optimize(objective, n_trials=10, catch=(RuntimeError,))
    numbers = sorted(int(n) for n in study.child_runs()["tags.optuna.trial_number"])
    assert numbers == [4, 9]
    assert omn.create_study("default", tracking_uri=tracking_uri).trial_runs is None


def test_two_processes_making_the_best_trials_run_at_once_leave_one_after_sync(
        tracking_uri: str, tmp_path) -> None:
    # Under trial_runs=K every search's end makes the runs the K best trials lack. Two
    # workers ending at once each looked, found none and made one: the best trial had two
    # runs, and `sync` (which made no runs under trial_runs=K) kept both. The two ends
    # are interleaved with SQLAlchemy's public event hook: as one inserts the run, the
    # other makes its own, whole.
    import threading

    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    from optuna_mlflow_nested.cli import main as cli_main

    storage = f"sqlite:///{tmp_path / 'o.db'}"
    omn.create_study("racing-ends", tracking_uri=tracking_uri, storage=storage, trial_runs=1)
    optuna.load_study(study_name="racing-ends", storage=storage).optimize(
        lambda t: t.suggest_float("x", 0, 1), n_trials=3)  # plain Optuna: no run yet
    first, second = (omn.load_study("racing-ends", storage, tracking_uri=tracking_uri)
                     for _ in range(2))
    interleaved = threading.Event()

    def other_end_first(conn, cursor, statement, parameters, context, executemany) -> None:
        if statement.startswith("INSERT INTO runs") and not interleaved.is_set():
            interleaved.set()
            other = threading.Thread(target=second.reconcile)
            other.start()
            other.join()

    event.listen(Engine, "before_cursor_execute", other_end_first)
    try:
        first.reconcile()
    finally:
        event.remove(Engine, "before_cursor_execute", other_end_first)
    client = MlflowClient(tracking_uri)

    def runs() -> list[tuple[str, str]]:
        return sorted((r.info.run_name, r.info.run_id) for r in client.search_runs(
            [first.experiment_id], f"tags.mlflow.parentRunId = '{first.parent_run_id}'"))

    best = first.best_trial.number
    assert interleaved.is_set() and [name for name, _ in runs()] == [f"trial-{best}"] * 2
    args = ["sync", "--tracking-uri", tracking_uri, "--study-name", "racing-ends", "--storage", storage]
    assert cli_main(args) == 0
    assert runs() == [(f"trial-{best}", first.child_run_id(best))]
