"""Zero loss: when optimize returns or raises, every trial has its complete child run (issue 5)."""

from __future__ import annotations

import mlflow
from mlflow.entities import ViewType
from mlflow.tracking import MlflowClient
import optuna
import pytest

import optuna_mlflow_nested as omn


def fast(trial: optuna.Trial) -> float:
    a = trial.suggest_float("a", 0, 1)
    b = trial.suggest_int("b", 0, 10)
    c = trial.suggest_categorical("c", ["x", "y"])
    mlflow.log_metric("own", a * 2)
    trial.set_user_attr("tag_me", c)
    return a + b


def assert_complete(study: omn.NestedStudy, uri: str, expected: int) -> None:
    client = MlflowClient(uri)
    runs = client.search_runs([study.experiment_id],
                              f"tags.mlflow.parentRunId = '{study.parent_run_id}'",
                              max_results=10_000)
    by_id = {r.info.run_id: r for r in runs}
    assert len(study.trials) == expected == len(runs)
    for trial in study.trials:
        run = by_id[study.child_run_id(trial.number)]
        assert run.info.run_name == f"trial-{trial.number}"
        assert run.info.status in ("FINISHED", "FAILED", "KILLED")
        if trial.state.name == "COMPLETE":
            assert run.info.status == "FINISHED"
            assert run.data.params == {k: str(v) for k, v in trial.params.items()}
            assert run.data.metrics["value"] == pytest.approx(trial.value)
            assert run.data.metrics["own"] == pytest.approx(2 * trial.params["a"])
            assert run.data.tags["tag_me"] == trial.params["c"]
            assert run.data.tags["state"] == "COMPLETE"
    # spare runs made ahead of time and never used are deleted, not left running
    everything = client.search_runs([study.experiment_id], run_view_type=ViewType.ALL,
                                    max_results=10_000)
    leftovers = [r for r in everything if r.info.run_id not in by_id
                 and r.info.run_id != study.parent_run_id]
    assert all(r.info.lifecycle_stage == "deleted" for r in leftovers)


@pytest.mark.parametrize("n_jobs", [1, pytest.param(4, marks=pytest.mark.slow)])  # 4: ~12 s
def test_200_fast_trials_nothing_lost(tracking_uri: str, n_jobs: int) -> None:
    study = omn.create_study(f"zero-loss-{n_jobs}", tracking_uri=tracking_uri, sampler="random")
    study.optimize(fast, n_trials=200, n_jobs=n_jobs)
    assert_complete(study, tracking_uri, 200)


def test_nothing_lost_against_a_server(mlflow_server) -> None:
    study = omn.create_study("zero-loss-server", tracking_uri=mlflow_server.uri, sampler="random")
    study.optimize(fast, n_trials=60, n_jobs=4)
    assert_complete(study, mlflow_server.uri, 60)


def test_nothing_lost_when_optimize_raises(tracking_uri: str) -> None:
    def breaks_at_50(trial: optuna.Trial) -> float:
        if trial.number == 50:
            raise ValueError("objective bug")
        return fast(trial)

    study = omn.create_study("zero-loss-raise", tracking_uri=tracking_uri, sampler="random")
    with pytest.raises(ValueError, match="objective bug"):
        study.optimize(breaks_at_50, n_trials=200)
    assert_complete(study, tracking_uri, 51)
    run = MlflowClient(tracking_uri).get_run(study.child_run_id(50))
    assert run.info.status == "FAILED"
