"""The writer process (OMN_WRITER=process): trial writes outside the objective's
interpreter, and what is promised when the objective's process is killed (issue 16)."""

from __future__ import annotations

import os
from pathlib import Path
import signal
import subprocess
import sys
import textwrap
import time

from mlflow.tracking import MlflowClient
import optuna
import pytest

import optuna_mlflow_nested as omn


def test_process_writer_records_every_trial(tracking_uri: str,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMN_WRITER", "process")

    def objective(trial: optuna.Trial) -> float:
        import mlflow

        x = trial.suggest_float("x", -1, 1)
        mlflow.log_metric("inside", x)
        if trial.number == 3:
            raise optuna.TrialPruned()
        return x * x

    study = omn.create_study("proc", tracking_uri=tracking_uri, sampler="random", seed=0)
    study.optimize(objective, n_trials=12, n_jobs=2)
    study.optimize(objective, n_trials=3)  # the same writer process serves a second session
    runs = study.child_runs()
    assert sorted(int(n) for n in runs["tags.optuna.trial_number"]) == list(range(15))
    statuses = dict(zip(runs["tags.optuna.trial_number"].astype(int), runs["status"]))
    assert statuses[3] == "KILLED" and {statuses[n] for n in statuses if n != 3} == {"FINISHED"}
    assert runs["metrics.inside"].notna().all()
    client = MlflowClient(tracking_uri)
    everything = client.search_runs([study.experiment_id], run_view_type=3)
    assert "RUNNING" not in {r.info.status for r in everything}


def _quadratic(trial: optuna.Trial) -> float:
    return trial.suggest_float("x", -1, 1) ** 2


def test_process_writer_takes_back_the_run_of_a_workers_last_ask(
        tmp_path: Path, tracking_uri: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # An executor worker's last ask finds the budget spent after it took a run: the run
    # goes back to the session (and is deleted at its end), whichever writer serves it.
    from concurrent.futures import ThreadPoolExecutor

    monkeypatch.setenv("OMN_WRITER", "process")
    study = omn.create_study("proc-pool", storage=f"sqlite:///{tmp_path / 'optuna.db'}",
                             tracking_uri=tracking_uri, sampler="random", seed=0)
    with ThreadPoolExecutor(2) as pool:
        study.optimize(_quadratic, n_trials=4, executor=pool)
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 4
    runs = study.child_runs()
    assert sorted(int(n) for n in runs["tags.optuna.trial_number"]) == list(range(4))
    client = MlflowClient(tracking_uri)
    everything = client.search_runs([study.experiment_id], run_view_type=3)
    assert "RUNNING" not in {r.info.status for r in everything}


SCRIPT = textwrap.dedent("""
    import os, sys, time, optuna
    import optuna_mlflow_nested as omn

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = omn.create_study("killed", tracking_uri=sys.argv[1], storage=sys.argv[2],
                             sampler="random", seed=0)

    def objective(trial):
        if trial.number == 6:
            print("SIXTH", flush=True)
            time.sleep(600)  # killed here
        return trial.suggest_float("x", -1, 1) ** 2

    study.optimize(objective, n_trials=10)
""")


@pytest.mark.slow
def test_sigkill_after_tell_loses_no_told_trial(tmp_path: Path, tracking_uri: str) -> None:
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    proc = subprocess.Popen([sys.executable, str(script), tracking_uri, storage],
                            stdout=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, "OMN_WRITER": "process"})
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "SIXTH"
        proc.send_signal(signal.SIGKILL)  # the objective's process only, not the writer
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    told = [t for t in optuna.load_study(study_name="killed", storage=storage).trials
            if t.state.is_finished()]
    assert [t.number for t in told] == list(range(6))
    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("killed")
    deadline = time.monotonic() + 60  # the writer process drains after its parent died
    while True:
        runs = client.search_runs([experiment.experiment_id], "attributes.status = 'FINISHED'")
        finished = {r.data.tags.get("optuna.trial_number") for r in runs}
        if {str(n) for n in range(6)} <= finished or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert {str(n) for n in range(6)} <= finished
    for run in runs:
        if run.data.tags.get("optuna.role") == "trial":
            number = int(run.data.tags["optuna.trial_number"])
            assert run.data.metrics["value"] == pytest.approx(told[number].value)
