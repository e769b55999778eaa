"""The study is an optuna.Study: Optuna's own tools take it, every trial gets a run (issue 11)."""

from __future__ import annotations

import os
import warnings

import mlflow
from mlflow.tracking import MlflowClient
import optuna
from optuna.distributions import FloatDistribution
import pytest

import optuna_mlflow_nested as omn
from optuna_mlflow_nested._study_setup import UNNAMED_STUDY_EXPERIMENT


def objective(trial: optuna.Trial) -> float:
    x = trial.suggest_float("x", -1, 1)
    y = trial.suggest_float("y", 0, 1)
    return (x - 0.2) ** 2 + y


def trial_runs(uri: str, study: omn.NestedStudy) -> dict[int, object]:
    client = MlflowClient(uri)
    runs = client.search_runs([study.experiment_id],
                              f"tags.mlflow.parentRunId = '{study.parent_run_id}'")
    by_number = {int(r.data.tags["optuna.trial_number"]): r for r in runs
                 if "optuna.trial_number" in r.data.tags}
    assert len(by_number) == len(runs), "a run without a trial, or two runs for one trial"
    return by_number


def test_the_issue_lines_work(tracking_uri: str) -> None:
    study = omn.create_study("i", tracking_uri=tracking_uri, seed=0)
    study.optimize(objective, n_trials=10)
    assert isinstance(study, optuna.Study)
    importances = optuna.importance.get_param_importances(study)
    assert set(importances) == {"x", "y"}
    figure = optuna.visualization.plot_optimization_history(study)
    assert len(figure.data[0].x) == 10
    optuna.visualization.matplotlib.plot_param_importances(study)
    t = study.ask()
    t.suggest_float("x", -1, 1)
    study.tell(t, 0.5)
    assert len(study.trials) == 11
    assert len(study.child_runs()) == 11
    runs = trial_runs(tracking_uri, study)
    assert runs[10].data.metrics["value"] == 0.5
    assert runs[10].info.status == "FINISHED" and runs[10].info.run_name == "trial-10"


def test_a_study_named_empty_string_like_optuna_allows(tracking_uri: str, tmp_path) -> None:
    # Optuna accepts study_name="" (its copy_study tests use it); MLflow refuses an
    # experiment named "", so the parent goes to a fixed experiment instead.
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = omn.create_study("", storage=storage, tracking_uri=tracking_uri, seed=0)
    study.optimize(lambda t: t.suggest_float("x", -1, 1) ** 2, n_trials=2)
    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment(study.experiment_id)
    assert experiment.name == UNNAMED_STUDY_EXPERIMENT
    assert client.get_run(study.child_run_id(1)).data.tags["mlflow.parentRunId"] == study.parent_run_id
    again = omn.load_study("", storage, tracking_uri=tracking_uri)
    assert again.parent_run_id == study.parent_run_id


def test_ask_tell_records_like_optimize_and_activates_the_run(tracking_uri: str) -> None:
    study = omn.create_study("asktell", tracking_uri=tracking_uri, seed=1)
    study.optimize(objective, n_trials=1)
    trial = study.ask()
    run_id = study.child_run_id(trial.number)  # the run exists from ask
    assert MlflowClient(tracking_uri).get_run(run_id).info.status == "RUNNING"
    with study.trial_run(trial) as run:
        assert mlflow.active_run().info.run_id == run.info.run_id == run_id
        mlflow.log_metric("inside", 3.0)
        value = objective(trial)
    assert mlflow.active_run() is None
    trial.report(0.7, step=1)
    study.tell(trial, value)
    pruned = study.ask()
    pruned.suggest_float("x", -1, 1)
    study.tell(pruned, state=optuna.trial.TrialState.PRUNED)
    runs = trial_runs(tracking_uri, study)
    assert len(runs) == 3
    told, by_optimize = runs[1], runs[0]
    assert told.info.run_id == run_id
    assert told.data.metrics["inside"] == 3.0
    assert told.data.metrics["value"] == pytest.approx(value)
    assert set(told.data.params) == set(by_optimize.data.params) == {"x", "y"}
    assert set(told.data.tags) == set(by_optimize.data.tags)
    assert told.data.tags["state"] == "COMPLETE"
    history = MlflowClient(tracking_uri).get_metric_history(run_id, "value_intermediate")
    assert [(m.step, m.value) for m in history] == [(1, 0.7)]
    assert runs[2].info.status == "KILLED"
    # Nothing written twice: telling again with skip_if_finished writes nothing new.
    study.tell(trial, 99.0, skip_if_finished=True)
    assert trial_runs(tracking_uri, study)[1].data.metrics["value"] == pytest.approx(value)


def test_a_study_used_only_through_ask_and_tell_gets_its_summary_when_the_process_exits(
        tracking_uri: str, tmp_path) -> None:
    # optimize ends its search with the parent's summary and status; ask/tell has no
    # end, and the parent stayed RUNNING with no summary. MLflow ends a run left active
    # by mlflow.start_run when the process exits; the study's parent now ends there too.
    import subprocess
    import sys

    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    script = f"""
import optuna_mlflow_nested as omn
study = omn.create_study("told", storage={storage!r}, tracking_uri={tracking_uri!r})
for value in (0.5, 0.25, 0.75):
    trial = study.ask()
    trial.suggest_float("x", 0, 1)
    study.tell(trial, value)
print(study.parent_run_id)
ended = omn.create_study("optimized", storage={storage!r}, tracking_uri={tracking_uri!r})
ended.tell(ended.ask(), 1.0)
ended.optimize(lambda trial: 2.0, n_trials=1)  # its end: nothing is left for the exit
print(ended.parent_run_id, ended._client.get_run(ended.parent_run_id).info.end_time)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    client = MlflowClient(tracking_uri)
    told_id, optimized_id, end_time = done.stdout.split()[-3:]
    assert client.get_run(optimized_id).info.end_time == int(end_time)
    parent = client.get_run(told_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["n_trials"] == 3 and parent.data.metrics["best_value"] == 0.25
    assert parent.data.tags["best_trial"] == "1"
    files = {a.path for a in client.list_artifacts(parent.info.run_id)}
    # Optuna's importance imports scikit-learn, whose import registers exit handlers:
    # refused once the exit has begun ("can't register atexit after shutdown").
    assert {"trials.csv", "optimization_history.png", "param_importances.png"} <= files
    assert "could not draw" not in done.stderr
    study = omn.load_study("told", storage, tracking_uri=tracking_uri)
    assert [r.info.status for r in trial_runs(tracking_uri, study).values()] == ["FINISHED"] * 3


@pytest.mark.slow  # ~10 s: the default suite stays under 5 minutes
def test_the_end_at_exit_is_the_telling_process_own_and_says_how_it_ended(
        tracking_uri: str, tmp_path) -> None:
    # A forked child inherited the parent process's told studies: its exit ended them
    # while the parent still told trials. A program that dies of an uncaught exception
    # ended its parent run FINISHED.
    import subprocess
    import sys

    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    script = f"""
import os, sys
import optuna_mlflow_nested as omn
study = omn.create_study("forked", storage={storage!r}, tracking_uri={tracking_uri!r})
study.tell(study.ask(), 1.0)
pid = os.fork()
if pid == 0:  # its own store files: SQLite connections must not cross a fork
    other = omn.create_study("child", storage="sqlite:///{tmp_path}/child.db",
                             tracking_uri="sqlite:///{tmp_path}/child-mlflow.db")
    other.tell(other.ask(), 2.0)
    sys.exit(0)
os.waitpid(pid, 0)
print(study.parent_run_id, study._client.get_run(study.parent_run_id).info.status)
raise RuntimeError("the program dies")
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 1 and "the program dies" in done.stderr
    run_id, status_after_the_childs_exit = done.stdout.split()[-2:]
    assert status_after_the_childs_exit == "RUNNING"
    parent = MlflowClient(tracking_uri).get_run(run_id)
    assert parent.info.status == "FAILED" and parent.data.metrics["n_trials"] == 1


def test_runs_the_objective_starts_with_mlflow_nested_runs_land_in_the_studys_experiment(
        tracking_uri: str) -> None:
    # mlflow.start_run(nested=True) takes MLflow's active experiment, not its parent's:
    # inside an objective such a run went to the Default experiment, under a trial run
    # of another experiment (MLflow's UI then shows it outside the study's tree).
    from optuna_mlflow_nested import _compat

    before = _compat.default_experiment_id()

    def objective(trial: optuna.Trial) -> float:
        x = trial.suggest_float("x", 0, 1)
        with mlflow.start_run(run_name="inner", nested=True):
            mlflow.log_metric("inner", x)
        # Not passed on to the objective's subprocesses: with MLFLOW_EXPERIMENT_NAME set,
        # MLflow refuses an MLFLOW_EXPERIMENT_ID of another experiment.
        assert "MLFLOW_EXPERIMENT_ID" not in os.environ
        return x

    client = MlflowClient(tracking_uri)
    for name in ("first", "second"):
        study = omn.create_study(name, tracking_uri=tracking_uri)
        study.optimize(objective, n_trials=2)
        trial = study.ask()
        with study.trial_run(trial):
            objective(trial)
        study.tell(trial, 0.5)
        inner = client.search_runs([study.experiment_id], "attributes.run_name = 'inner'")
        assert sorted(r.data.tags["mlflow.parentRunId"] for r in inner) == sorted(
            study.child_run_id(n) for n in range(3))
        assert _compat.default_experiment_id() == before  # the user's setting is back
    assert client.search_runs([before], "attributes.run_name = 'inner'") == []


def test_a_tell_after_the_search_ended_reopens_the_parent(tracking_uri: str) -> None:
    # Several processes telling one study: the first to exit ended the parent, which
    # stayed FINISHED while the others still told trials (optimize reopens it as it
    # begins). A process's first tell of a study since its last end reopens it now.
    study = omn.create_study("reopened", tracking_uri=tracking_uri)
    study.optimize(objective, n_trials=1)
    client = MlflowClient(tracking_uri)
    assert client.get_run(study.parent_run_id).info.status == "FINISHED"
    trial = study.ask()
    study.tell(trial, objective(trial))
    assert client.get_run(study.parent_run_id).info.status == "RUNNING"


def test_a_tell_reopens_the_parent_through_a_busy_store_and_prints_no_traceback(
        tracking_uri: str, capfd: pytest.CaptureFixture[str]) -> None:
    # The reopening was tried once: a locked SQLite file left the parent FINISHED while
    # trials were told, and MLflow's traceback was printed.
    from tests_support import busy_store

    study = omn.create_study("reopened", tracking_uri=tracking_uri)
    study.optimize(objective, n_trials=1)
    with busy_store("runs", study.parent_run_id, lambda: 1) as refused:
        trial = study.ask()
        study.tell(trial, objective(trial))
    assert refused, "no write refused: the test tests nothing"
    assert MlflowClient(tracking_uri).get_run(study.parent_run_id).info.status == "RUNNING"
    err = capfd.readouterr().err
    assert "Traceback" not in err, err


def test_tell_by_number_from_another_study_object(tracking_uri: str, tmp_path) -> None:
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    first = omn.create_study("two-objects", tracking_uri=tracking_uri, storage=storage)
    trial = first.ask()
    trial.suggest_float("x", 0, 1)
    second = omn.load_study("two-objects", storage, tracking_uri=tracking_uri)
    second.tell(trial.number, 0.25)
    runs = trial_runs(tracking_uri, second)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert runs[0].info.run_id == first.child_run_id(0)
    assert runs[0].data.metrics["value"] == 0.25


def test_enqueue_add_trial_and_copy(tracking_uri: str, tmp_path) -> None:
    study = omn.create_study("kinds", tracking_uri=tracking_uri, sampler="random", seed=0)
    study.enqueue_trial({"x": 0.5, "y": 0.5})
    study.add_trial(optuna.trial.create_trial(
        params={"x": 0.1, "y": 0.0},
        distributions={"x": FloatDistribution(-1, 1), "y": FloatDistribution(0, 1)},
        value=0.01))
    study.add_trials([optuna.trial.create_trial(
        params={"x": 0.3, "y": 0.1},
        distributions={"x": FloatDistribution(-1, 1), "y": FloatDistribution(0, 1)},
        state=optuna.trial.TrialState.FAIL)])
    study.optimize(objective, n_trials=2)
    assert study.trials[0].params == {"x": 0.5, "y": 0.5}
    runs = trial_runs(tracking_uri, study)
    assert sorted(runs) == [0, 1, 2, 3]
    assert runs[1].data.metrics["value"] == 0.01 and runs[1].info.status == "FINISHED"
    assert runs[2].info.status == "FAILED"
    assert runs[0].data.params["x"] == "0.5"
    # trials_dataframe is Optuna's: no column of ours
    frame = study.trials_dataframe()
    assert not [c for c in frame.columns if "mlflow" in c]
    # copy_study of our study into a plain storage
    target = f"sqlite:///{tmp_path / 'copy.db'}"
    optuna.copy_study(from_study_name="kinds", from_storage=study._storage, to_storage=target)
    copied = optuna.load_study(study_name="kinds", storage=target)
    assert len(copied.trials) == 4


def test_optuna_callbacks_and_options(tracking_uri: str) -> None:
    from optuna.study import MaxTrialsCallback

    study = omn.create_study("callbacks", tracking_uri=tracking_uri, sampler="random", seed=0)
    study.optimize(objective, n_trials=50, gc_after_trial=True,
                   callbacks=[MaxTrialsCallback(3)])
    assert len(study.trials) == 3

    def stop_at_two(s: optuna.Study, t: optuna.trial.FrozenTrial) -> None:
        if t.number >= 4:
            s.stop()

    study.optimize(objective, n_trials=50, callbacks=[stop_at_two])
    assert len(study.trials) == 5
    assert sorted(trial_runs(tracking_uri, study)) == list(range(5))


def test_load_study_without_name_and_pickling(tracking_uri: str, tmp_path) -> None:
    import pickle

    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    created = omn.create_study("only-one", tracking_uri=tracking_uri, storage=storage)
    loaded = omn.load_study(None, storage, tracking_uri=tracking_uri)
    assert loaded.study_name == "only-one" and loaded.parent_run_id == created.parent_run_id
    revived = pickle.loads(pickle.dumps(loaded))
    revived.optimize(objective, n_trials=2)
    assert sorted(trial_runs(tracking_uri, revived)) == [0, 1]


def test_nested_optimize_is_refused_without_harm(tracking_uri: str) -> None:
    study = omn.create_study("nested", tracking_uri=tracking_uri)
    errors = []

    def inner(trial: optuna.Trial) -> float:
        try:
            study.optimize(objective, n_trials=1)
        except RuntimeError as exc:
            errors.append(str(exc))
        return objective(trial)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        study.optimize(inner, n_trials=2)
    assert len(errors) == 2 and "Nested" in errors[0]
    runs = trial_runs(tracking_uri, study)
    assert sorted(runs) == [0, 1] and {r.info.status for r in runs.values()} == {"FINISHED"}


def test_resuming_a_seeded_study_does_not_repeat_its_trials(tracking_uri: str, tmp_path) -> None:
    storage = f"sqlite:///{tmp_path / 'o.db'}"
    first = omn.create_study("resume", tracking_uri=tracking_uri, storage=storage, seed=0)
    first.optimize(objective, n_trials=3)
    again = omn.create_study("resume", tracking_uri=tracking_uri, storage=storage, seed=0,
                             load_if_exists=True)
    again.optimize(objective, n_trials=3)
    xs = [t.params["x"] for t in again.trials]
    assert len(set(xs)) == 6, xs
    # and resuming is itself reproducible
    loaded = omn.load_study("resume", storage, tracking_uri=tracking_uri, seed=0)
    assert type(loaded.sampler).__name__ == "TPESampler"


def test_cross_validate_reports_on_the_study_scale_and_prunes(tracking_uri: str) -> None:
    from sklearn.datasets import load_diabetes
    from sklearn.linear_model import Ridge

    X, y = load_diabetes(return_X_y=True)

    def objective(trial: optuna.Trial) -> float:
        alpha = trial.suggest_float("alpha", 1e-3, 10, log=True)
        scores = omn.cross_validate(Ridge(alpha=alpha), X, y, cv=4, prune=True,
                                    scoring="neg_root_mean_squared_error")
        return -float(scores["test_score"].mean())

    study = omn.create_study("cv-prune", tracking_uri=tracking_uri, sampler="random", seed=0,
                             pruner=optuna.pruners.ThresholdPruner(upper=57.0))
    study.optimize(objective, n_trials=10)
    for trial in study.trials:
        # minimising RMSE: the reported values are RMSE-like (positive), like the objective
        assert all(v > 0 for v in trial.intermediate_values.values())
        if trial.state.name == "COMPLETE":
            assert trial.intermediate_values[3] == pytest.approx(trial.value)
    pruned = [t for t in study.trials if t.state.name == "PRUNED"]
    assert pruned and all(len(t.intermediate_values) == 1 for t in pruned)


def test_load_study_adopts_a_plain_study_into_the_experiment_asked(tracking_uri: str, tmp_path) -> None:
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    optuna.create_study(study_name="plain", storage=storage).optimize(
        lambda t: t.suggest_float("x", 0, 1), n_trials=2)
    study = omn.load_study("plain", storage, tracking_uri=tracking_uri,
                           experiment_name="adopted", tags={"team": "search"})
    client = MlflowClient(tracking_uri)
    parent = client.get_run(study.parent_run_id)
    assert client.get_experiment(parent.info.experiment_id).name == "adopted"
    assert parent.data.tags["team"] == "search"
    again = omn.load_study("plain", storage, tracking_uri=tracking_uri, experiment_name="other")
    assert again.parent_run_id == study.parent_run_id  # a parent run is kept, with its experiment
