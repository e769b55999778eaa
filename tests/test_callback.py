"""omn.MLflowCallback against optuna-integration's MLflowCallback, side by side (issue 4)."""

from __future__ import annotations

import threading
from typing import Any
import warnings

import mlflow
from mlflow.tracking import MlflowClient
import optuna
import pytest

import optuna_mlflow_nested as omn

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from optuna_integration.mlflow import MLflowCallback as LegacyCallback

# tags each implementation adds that the other does not, by design
OURS_ONLY = {"optuna.study_name", "optuna.trial_number"}
CONTEXT = {"mlflow.source.name", "mlflow.source.type", "mlflow.user", "mlflow.source.git.commit"}


def objective(trial: optuna.Trial) -> float:
    x = trial.suggest_float("x", -2, 2)
    trial.suggest_categorical("kind", ["a", "b"])
    trial.set_user_attr("note", "n" * 9000)
    return x**2


def run_both(tmp_path, make_kwargs, study_kwargs=None, objective_fn=objective, n_trials=3,
             optimize_kwargs=None) -> dict[str, tuple[MlflowClient, list]]:
    out = {}
    for name, cls in (("legacy", LegacyCallback), ("ours", omn.MLflowCallback)):
        uri = f"sqlite:///{tmp_path / (name + '.db')}"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            callback = cls(tracking_uri=uri, **make_kwargs(uri))
        study = optuna.create_study(study_name="side-by-side",
                                    sampler=optuna.samplers.RandomSampler(seed=0),
                                    **(study_kwargs or {}))
        study.set_user_attr("team", "ml")
        study.optimize(objective_fn, n_trials=n_trials, callbacks=[callback],
                       **(optimize_kwargs or {}))
        client = MlflowClient(uri)
        runs = []
        for experiment in client.search_experiments():
            runs += client.search_runs([experiment.experiment_id])
        out[name] = (client, sorted(runs, key=lambda r: r.data.tags.get("number", "")))
        mlflow.set_tracking_uri(None)
        mlflow.tracking.fluent._active_experiment_id = None
    return out


def comparable(run: Any) -> tuple:
    tags = {k: v for k, v in run.data.tags.items()
            if k not in OURS_ONLY | CONTEXT and not k.startswith("datetime")}
    return run.info.run_name, run.data.params, run.data.metrics, tags


def test_same_runs_as_the_legacy_callback(tmp_path) -> None:
    both = run_both(tmp_path, lambda uri: {"metric_name": "loss", "tag_study_user_attrs": True,
                                           "mlflow_kwargs": {"tags": {"owner": "me"}}})
    (legacy_client, legacy), (ours_client, ours) = both["legacy"], both["ours"]
    assert len(legacy) == len(ours) == 3
    assert [comparable(r) for r in legacy] == [comparable(r) for r in ours]
    run = ours[0]
    assert run.data.tags["note"].endswith("...") and len(run.data.tags["note"]) == 8000
    assert run.data.tags["owner"] == "me" and run.data.tags["team"] == "ml"
    assert {"datetime_start", "datetime_complete", "mlflow.user"} <= set(run.data.tags)
    exp_legacy = legacy_client.get_experiment(legacy[0].info.experiment_id).name
    exp_ours = ours_client.get_experiment(ours[0].info.experiment_id).name
    assert exp_legacy == exp_ours == "side-by-side"


def test_multi_objective_names_and_mismatch(tmp_path) -> None:
    both = run_both(tmp_path, lambda uri: {}, study_kwargs={"directions": ["minimize", "maximize"]},
                    objective_fn=lambda t: (t.suggest_float("x", 0, 1), 1.0))
    assert [comparable(r) for r in both["legacy"][1]] == [comparable(r) for r in both["ours"][1]]
    assert {"value_0", "value_1"} == set(both["ours"][1][0].data.metrics)
    assert both["ours"][1][0].data.tags["direction"] == "['MINIMIZE', 'MAXIMIZE']"

    callback = omn.MLflowCallback(tracking_uri=f"sqlite:///{tmp_path / 'x.db'}",
                                  metric_name=["only_one"])
    study = optuna.create_study(directions=["minimize", "minimize"])
    with pytest.raises(ValueError, match="2 objective values, but 1 names specified"):
        study.optimize(lambda t: (t.suggest_float("x", 0, 1), 1.0), n_trials=1, callbacks=[callback])
    with pytest.raises(TypeError, match="metric_name"):
        omn.MLflowCallback(metric_name=3)  # type: ignore[arg-type]


def test_run_name_and_existing_experiment(tmp_path) -> None:
    def kwargs(uri: str) -> dict:
        mlflow.set_tracking_uri(uri)
        experiment_id = mlflow.create_experiment("given")
        return {"create_experiment": False, "mlflow_kwargs": {"experiment_id": experiment_id,
                                                               "run_name": "custom"}}

    both = run_both(tmp_path, kwargs, n_trials=2)
    for client, runs in both.values():
        assert [r.info.run_name for r in runs] == ["custom", "custom"]
        assert {client.get_experiment(r.info.experiment_id).name for r in runs} == {"given"}


def test_nan_values_are_not_metrics_and_states(tmp_path) -> None:
    values = iter([float("nan"), 1.0])
    callback = omn.MLflowCallback(tracking_uri=f"sqlite:///{tmp_path / 'm.db'}")

    def pruned_or_failed(trial: optuna.Trial) -> float:
        trial.suggest_float("x", 0, 1)
        if trial.number == 2:
            raise optuna.TrialPruned()
        if trial.number == 3:
            raise RuntimeError("boom")
        return next(values)

    study = optuna.create_study(study_name="states")
    study.optimize(pruned_or_failed, n_trials=4, callbacks=[callback], catch=(RuntimeError,))
    client = MlflowClient(f"sqlite:///{tmp_path / 'm.db'}")
    runs = {r.info.run_name: r for r in client.search_runs(
        [client.get_experiment_by_name("states").experiment_id])}
    assert "value" not in runs["0"].data.metrics and runs["0"].info.status == "FAILED"
    assert runs["1"].data.metrics["value"] == 1.0 and runs["1"].info.status == "FINISHED"
    assert runs["2"].info.status == "KILLED" and runs["2"].data.tags["state"] == "PRUNED"
    assert runs["3"].info.status == "FAILED"


def test_active_run_without_nesting_raises_like_mlflow(tmp_path) -> None:
    uri = f"sqlite:///{tmp_path / 'a.db'}"
    mlflow.set_tracking_uri(uri)
    messages = []
    for cls in (LegacyCallback, omn.MLflowCallback):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            callback = cls(tracking_uri=uri)
        with mlflow.start_run() as active:
            study = optuna.create_study()
            with pytest.raises(Exception, match="is already active") as info:
                study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=1, callbacks=[callback])
            messages.append(str(info.value).replace(active.info.run_id, "<run id>"))
    assert messages[0] == messages[1]
    assert messages[0].startswith("Run with UUID <run id> is already active.")


def test_nested_trials_stay_under_the_callers_run_with_threads(tmp_path) -> None:
    uri = f"sqlite:///{tmp_path / 'n.db'}"
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("nest")
    callback = omn.MLflowCallback(tracking_uri=uri, create_experiment=False,
                                  mlflow_kwargs={"nested": True})
    with mlflow.start_run() as parent:
        study = optuna.create_study()
        study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=8, n_jobs=4,
                       callbacks=[callback])
    client = MlflowClient(uri)
    runs = [r for r in client.search_runs([parent.info.experiment_id])
            if r.info.run_id != parent.info.run_id]
    assert len(runs) == 8
    assert {r.data.tags.get("mlflow.parentRunId") for r in runs} == {parent.info.run_id}


def test_parent_run_id_kwarg_is_honoured(tmp_path) -> None:
    uri = f"sqlite:///{tmp_path / 'p.db'}"
    client = MlflowClient(uri)
    experiment_id = client.create_experiment("explicit")
    holder = client.create_run(experiment_id).info.run_id
    callback = omn.MLflowCallback(tracking_uri=uri, create_experiment=False,
                                  mlflow_kwargs={"parent_run_id": holder, "experiment_id": experiment_id})
    optuna.create_study().optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=3,
                                   callbacks=[callback], n_jobs=2)
    runs = client.search_runs([experiment_id], f"tags.mlflow.parentRunId = '{holder}'")
    assert len(runs) == 3


def test_track_in_mlflow_runs_trials_in_parallel_inside_their_runs(tmp_path) -> None:
    uri = f"sqlite:///{tmp_path / 't.db'}"
    callback = omn.MLflowCallback(tracking_uri=uri, metric_name="score")
    barrier = threading.Barrier(4, timeout=60)

    @callback.track_in_mlflow()
    def tracked(trial: optuna.Trial) -> float:
        """The objective's docstring."""
        x = trial.suggest_float("x", 0, 1)
        mlflow.log_metric("inside", x)
        barrier.wait()  # only returns if four objectives are running at once
        return x

    assert tracked.__name__ == "tracked" and tracked.__doc__ == "The objective's docstring."
    study = optuna.create_study(study_name="parallel")
    study.optimize(tracked, n_trials=4, n_jobs=4, callbacks=[callback])
    assert all(t.state.name == "COMPLETE" for t in study.trials)
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("parallel").experiment_id])
    assert len(runs) == 4
    for run in runs:
        trial = study.trials[int(run.data.tags["number"])]
        assert trial.system_attrs["mlflow_run_id"] == run.info.run_id
        assert run.data.metrics["inside"] == pytest.approx(trial.params["x"])
        assert run.data.metrics["score"] == pytest.approx(trial.value)
        assert run.info.status == "FINISHED"


def test_no_deprecation_warning() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        omn.MLflowCallback()
    assert not [w for w in caught if issubclass(w.category, FutureWarning | DeprecationWarning)]


def test_file_store_error_passes_through(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    uri = (tmp_path / "mlruns").as_uri()
    outcomes: list[BaseException | None] = []
    for cls in (LegacyCallback, omn.MLflowCallback):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            callback = cls(tracking_uri=uri)
        try:
            optuna.create_study(study_name=f"f{len(outcomes)}").optimize(
                lambda t: t.suggest_float("x", 0, 1), n_trials=1, callbacks=[callback])
            outcomes.append(None)
        except Exception as error:
            outcomes.append(error)
    legacy, ours = outcomes
    # Recent MLflow refuses file stores (3.8 still accepted them): either way, exactly
    # what the legacy callback does.
    assert type(legacy) is type(ours)
    assert str(legacy) == str(ours)
    # And what MLflow itself does with that URI, so an MLflow that refuses is seen to refuse.
    try:
        MlflowClient((tmp_path / "probe").as_uri()).search_experiments()
        refused = False
    except Exception:
        refused = True
    assert (ours is not None) == refused
