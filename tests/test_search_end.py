"""The first search of a process: what its end and start cost only the first time.

The end's reads (the parent run, its metric history, the RUNNING children, a pandas
index) compile SQLAlchemy statements and set up pandas once per process; they are made
in a background thread once the first objective runs, and the end waits for that thread.
"""

from __future__ import annotations

import os
import threading

from mlflow.tracking import MlflowClient
import optuna
import pytest

import optuna_mlflow_nested as omn
from optuna_mlflow_nested import _compat

WARM_UP = "omn-warm-up-end"


def warm_up_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == WARM_UP]


def objective_that_waits_for_the_warm_up(seen: list[tuple[int, int, bool]]):
    def objective(trial: optuna.Trial) -> float:
        x = trial.suggest_float("x", -1.0, 1.0)
        threads = warm_up_threads()
        for thread in threads:
            thread.join(timeout=60)
        seen.append((trial.number, len(threads), any(t.is_alive() for t in threads)))
        return x * x

    return objective


def test_the_ends_reads_are_made_while_the_first_trial_runs_and_only_read(tracking_uri: str) -> None:
    seen: list[tuple[int, int, bool]] = []
    study = omn.create_study("warm", tracking_uri=tracking_uri, seed=0)
    client = MlflowClient(tracking_uri)
    n_runs = len(client.search_runs([study.experiment_id]))
    metrics_before = client.get_run(study.parent_run_id).data.metrics

    def objective(trial: optuna.Trial) -> float:
        value = objective_that_waits_for_the_warm_up(seen)(trial)
        if trial.number == 0:  # the reads are done: they wrote nothing
            parent = client.get_run(study.parent_run_id)
            assert parent.data.metrics == metrics_before
            assert "mlflow.note.content" not in parent.data.tags
        return value

    study.optimize(objective, n_trials=3)
    # one thread, seen by the first trial and finished while it ran; none later
    assert seen[0] == (0, 1, False)
    assert [s[1] for s in seen[1:]] == [0, 0]
    assert warm_up_threads() == []
    assert len(client.search_runs([study.experiment_id])) == n_runs + 3
    assert client.get_run(study.parent_run_id).data.metrics["n_complete"] == 3


def test_the_reads_are_made_once_per_store_and_process(tracking_uri: str) -> None:
    seen: list[tuple[int, int, bool]] = []
    first = omn.create_study("first", tracking_uri=tracking_uri, seed=0)
    first.optimize(objective_that_waits_for_the_warm_up(seen), n_trials=1)
    second = omn.create_study("second", tracking_uri=tracking_uri, seed=0)
    second.optimize(objective_that_waits_for_the_warm_up(seen), n_trials=2)
    assert [s[1] for s in seen] == [1, 0, 0]


def test_a_search_that_runs_no_trial_makes_no_reads_and_leaves_them_to_the_next(
        tracking_uri: str) -> None:
    seen: list[tuple[int, int, bool]] = []
    study = omn.create_study("none-yet", tracking_uri=tracking_uri, seed=0)
    study.optimize(objective_that_waits_for_the_warm_up(seen), n_trials=0)
    assert warm_up_threads() == []  # the end ended the waiting thread without its reads
    study.optimize(objective_that_waits_for_the_warm_up(seen), n_trials=1)
    assert seen == [(0, 1, False)]


def test_big_searches_make_no_reads_beside_their_trials(tracking_uri: str) -> None:
    seen: list[tuple[int, int, bool]] = []
    study = omn.create_study("big", tracking_uri=tracking_uri, seed=0, trial_runs=1)
    study.optimize(objective_that_waits_for_the_warm_up(seen), n_trials=3)
    assert [s[1] for s in seen] == [0, 0, 0]


def test_optimize_does_not_work_out_mlflows_default_uri(tracking_uri: str,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """With no tracking URI set, ``mlflow.get_tracking_uri()`` works out MLflow's default
    (it imports MLflow's file store to look into ./mlruns); optimize only needs to know
    whether the user set one."""
    from mlflow.tracking._tracking_service import utils

    def tripwire() -> str:
        raise AssertionError("MLflow's default tracking URI was worked out")

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setattr(utils, "_get_default_tracking_uri", tripwire)
    study = omn.create_study("no-default", tracking_uri=tracking_uri, seed=0)
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)
    assert len(study.trials) == 2 and all(t.state.name == "COMPLETE" for t in study.trials)
    assert _compat.explicit_tracking_uri() is None and "MLFLOW_TRACKING_URI" not in os.environ
