"""The nested-run study wrapper against real SQLite tracking stores (issue 2)."""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path
import warnings

import mlflow
from mlflow.entities import ViewType
from mlflow.tracking import MlflowClient
import numpy as np
import optuna
import pytest

import optuna_mlflow_nested as omn
from optuna_mlflow_nested import tracking


def quadratic(trial: optuna.Trial) -> float:
    x = trial.suggest_float("x", -5, 5)
    mlflow.log_metric("extra", x)
    return (x - 1) ** 2


def children(client: MlflowClient, study: omn.NestedStudy) -> list:
    return client.search_runs(
        [study.experiment_id], f"tags.mlflow.parentRunId = '{study.parent_run_id}'",
        max_results=10_000,
    )


def test_readme_flow_parent_children_and_objective_metrics(tracking_uri: str) -> None:
    study = omn.create_study("my-study", experiment_name="demo", tracking_uri=tracking_uri, seed=42)
    study.optimize(quadratic, n_trials=12, n_jobs=2)
    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("demo")
    assert experiment is not None and experiment.experiment_id == study.experiment_id
    parents = client.search_runs([study.experiment_id], "tags.`optuna.role` = 'study'")
    assert [p.info.run_id for p in parents] == [study.parent_run_id]
    assert parents[0].info.run_name == "my-study"
    runs = children(client, study)
    assert sorted(r.info.run_name for r in runs) == sorted(f"trial-{i}" for i in range(12))
    by_number = {int(r.data.tags["optuna.trial_number"]): r for r in runs}
    for trial in study.trials:
        run = by_number[trial.number]
        assert run.info.run_id == study.child_run_id(trial.number)
        assert "mlflow_run_id" not in trial.system_attrs  # trials_dataframe stays Optuna's
        # the objective's own call landed in its trial's run, in a worker thread too
        assert run.data.metrics["extra"] == pytest.approx(trial.params["x"])
        assert run.data.metrics["value"] == pytest.approx(trial.value)
        assert run.info.status == "FINISHED"
    frame = study.child_runs()
    assert len(frame) == 12 and set(frame["tags.mlflow.parentRunId"]) == {study.parent_run_id}
    assert study.best_value == min(t.value for t in study.trials)  # proxied to optuna.Study


def test_no_run_leaks_outside_the_tree(tracking_uri: str) -> None:
    study = omn.create_study("tidy", tracking_uri=tracking_uri, seed=1)
    study.optimize(quadratic, n_trials=5, n_jobs=3)
    client = MlflowClient(tracking_uri)
    active = client.search_runs([study.experiment_id], run_view_type=ViewType.ACTIVE_ONLY)
    assert len(active) == 6  # parent + 5 trials; spare runs were deleted
    assert all(r.info.status != "RUNNING" for r in active)


def test_parent_nests_under_the_callers_active_run(tracking_uri: str) -> None:
    mlflow.set_tracking_uri(tracking_uri)
    try:
        with mlflow.start_run(run_name="benchmark") as outer:
            first = omn.create_study("a", experiment_name="bench", tracking_uri=tracking_uri)
            second = omn.create_study("b", experiment_name="bench", tracking_uri=tracking_uri)
            first.optimize(quadratic, n_trials=2)
            assert mlflow.active_run().info.run_id == outer.info.run_id
        client = MlflowClient(tracking_uri)
        for study in (first, second):
            tags = client.get_run(study.parent_run_id).data.tags
            assert tags["mlflow.parentRunId"] == outer.info.run_id
        # the outer run received no trial data
        assert "value" not in client.get_run(outer.info.run_id).data.metrics
    finally:
        mlflow.set_tracking_uri(None)


def test_one_parent_across_load_paths(tmp_path: Path, tracking_uri: str) -> None:
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    first = omn.create_study("shared", tracking_uri=tracking_uri, storage=storage)
    first.optimize(quadratic, n_trials=2)
    again = omn.create_study("shared", tracking_uri=tracking_uri, storage=storage, load_if_exists=True)
    loaded = omn.load_study("shared", storage, tracking_uri=tracking_uri)
    assert first.parent_run_id == again.parent_run_id == loaded.parent_run_id
    loaded.optimize(quadratic, n_trials=3)
    client = MlflowClient(tracking_uri)
    assert len(client.search_runs([first.experiment_id], "tags.`optuna.role` = 'study'")) == 1
    assert len(children(client, first)) == 5
    with pytest.raises(optuna.exceptions.DuplicatedStudyError):
        omn.create_study("shared", tracking_uri=tracking_uri, storage=storage)


def test_users_global_mlflow_state_is_untouched(tmp_path: Path, tracking_uri: str) -> None:
    user_uri = f"sqlite:///{tmp_path / 'user.db'}"
    mlflow.set_tracking_uri(user_uri)
    try:
        user_experiment = mlflow.set_experiment("somewhere-else")
        with mlflow.start_run() as user_run:
            study = omn.create_study("iso", experiment_name="iso-exp", tracking_uri=tracking_uri)
            study.optimize(quadratic, n_trials=3)  # n_jobs=1 runs in this very thread
            study.optimize(quadratic, n_trials=2, n_jobs=2)
            assert mlflow.active_run().info.run_id == user_run.info.run_id
            assert mlflow.get_tracking_uri() == user_uri
            mlflow.log_metric("mine", 1.0)
        assert mlflow.get_experiment_by_name("somewhere-else").experiment_id == user_experiment.experiment_id
        user_data = MlflowClient(user_uri).get_run(user_run.info.run_id).data
        assert user_data.metrics == {"mine": 1.0}
        assert len(children(MlflowClient(tracking_uri), study)) == 5
    finally:
        mlflow.set_tracking_uri(None)


def test_child_and_parent_content(tracking_uri: str) -> None:
    long_text = "y" * 9000

    def objective(trial: optuna.Trial) -> float:
        x = trial.suggest_float("x", 0.1, 10, log=True)
        kind = trial.suggest_categorical("kind", ["a", "b"])
        trial.set_user_attr("note", long_text)
        for step in range(3):
            trial.report(x * step, step)
        if trial.number == 1:
            raise optuna.TrialPruned()
        if trial.number == 2:
            raise RuntimeError("boom in trial 2")
        return x + (kind == "b")

    study = omn.create_study(
        "content", tracking_uri=tracking_uri, sampler="random", seed=3, metric_name="loss"
    )
    study.optimize(objective, n_trials=4, catch=(RuntimeError,))
    client = MlflowClient(tracking_uri)
    runs = {int(r.data.tags["optuna.trial_number"]): r for r in children(client, study)}
    done = runs[0]
    assert set(done.data.params) == {"x", "kind"}
    assert done.data.metrics["loss"] == pytest.approx(study.trials[0].value)
    assert done.data.metrics["trial_number"] == 0
    history = client.get_metric_history(done.info.run_id, "loss_intermediate")
    assert [m.step for m in history] == [0, 1, 2]
    tags = done.data.tags
    assert tags["state"] == "COMPLETE" and "FloatDistribution" in tags["x_distribution"]
    assert tags["note"].endswith("...") and len(tags["note"]) == 8000
    trial0 = study.trials[0]
    assert done.info.end_time == int(trial0.datetime_complete.timestamp() * 1000)
    assert done.info.start_time <= int(trial0.datetime_start.timestamp() * 1000)
    assert runs[1].info.status == "KILLED" and runs[1].data.tags["state"] == "PRUNED"
    failed = runs[2]
    assert failed.info.status == "FAILED"
    artifacts = [a.path for a in client.list_artifacts(failed.info.run_id)]
    assert "traceback.txt" in artifacts
    text = Path(mlflow.artifacts.download_artifacts(
        run_id=failed.info.run_id, artifact_path="traceback.txt", tracking_uri=tracking_uri
    )).read_text()
    assert "boom in trial 2" in text
    parent = client.get_run(study.parent_run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.params["sampler"] == "RandomSampler" and parent.data.params["seed"] == "3"
    assert parent.data.params["directions"] == "MINIMIZE"
    assert "optuna_version" in parent.data.params and "mlflow_version" in parent.data.params
    assert parent.data.metrics["n_complete"] == 2
    assert parent.data.metrics["n_pruned"] == 1 and parent.data.metrics["n_failed"] == 1
    best = client.get_metric_history(study.parent_run_id, "best_value")
    assert [m.step for m in best] == [0, 3]
    assert best[-1].value == pytest.approx(study.best_value)
    assert "trials.csv" in {a.path for a in client.list_artifacts(study.parent_run_id)}
    assert study.wait_for_figures(timeout=120)  # drawn in the writer process
    parent_artifacts = {a.path for a in client.list_artifacts(study.parent_run_id)}
    assert {"optimization_history.png", "param_importances.png"} <= parent_artifacts


def test_multi_objective_metric_names(tracking_uri: str) -> None:
    study = omn.create_study("mo", tracking_uri=tracking_uri, directions=["minimize", "maximize"])
    study.optimize(lambda t: (t.suggest_float("x", 0, 1), t.suggest_float("y", 0, 1)), n_trials=3)
    named = omn.create_study("mo2", tracking_uri=tracking_uri, directions=["minimize", "maximize"],
                             metric_name=["err", "acc"])
    named.optimize(lambda t: (t.suggest_float("x", 0, 1), 0.5), n_trials=2)
    client = MlflowClient(tracking_uri)
    for each, names in ((study, ("value_0", "value_1")), (named, ("err", "acc"))):
        runs = {int(r.data.tags["optuna.trial_number"]): r for r in children(client, each)}
        assert sorted(runs) == [t.number for t in each.trials]  # a run per trial, none more
        for trial in each.trials:
            metrics = runs[trial.number].data.metrics
            assert [metrics[name] for name in names] == pytest.approx(trial.values)


def test_uris_are_logged_without_passwords(tmp_path: Path, tracking_uri: str) -> None:
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'o.db'}")
    study = omn.create_study("creds", tracking_uri=tracking_uri, storage=storage)
    tags = MlflowClient(tracking_uri).get_run(study.parent_run_id).data.tags
    assert tags["tracking_uri"] == tracking_uri and tags["storage"].startswith("sqlite:///")
    assert omn._utils.redact_uri("postgresql://bob:s3cret@db/x") == "postgresql://bob:***@db/x"
    assert "s3cret" not in omn._utils.redact_uri("https://tok:s3cret@host:5000")


@pytest.mark.parametrize("uri, shown", [
    # A token alone before the host (http): it was kept as a "user name".
    ("http://s3cret@127.0.0.1:5057/api", "http://***@127.0.0.1:5057/api"),
    # A password in the query string, which SQLAlchemy and psycopg take.
    ("postgresql://u@127.0.0.1:5432/test?password=s3cret&sslmode=off",
     "postgresql://u@127.0.0.1:5432/test?password=***&sslmode=off"),
    # A raw '/' in the password, which SQLAlchemy's URL parser takes as part of it.
    ("postgresql://u:s3cret/x@127.0.0.1:5432/test", "postgresql://u:***@127.0.0.1:5432/test"),
    ("postgresql://bob@db/x", "postgresql://bob@db/x"),  # a database user name stays
    ("sqlite:////tmp/a@b/m.db", "sqlite:////tmp/a@b/m.db"),
])
def test_secrets_in_every_uri_form_are_masked(uri: str, shown: str) -> None:
    assert omn._utils.redact_uri(uri) == shown
    assert omn._utils.redact_secrets(f"storage {uri!r} is not usable") == \
        f"storage {shown!r} is not usable"


def _run_seeded(tracking_uri: str, name: str) -> list[tuple]:
    study = omn.create_study(name, tracking_uri=tracking_uri, seed=123)
    study.optimize(lambda t: (t.suggest_float("x", -5, 5) - 1) ** 2 + np.random.rand(), n_trials=8)
    return [(t.number, t.params, t.value) for t in study.trials]


def test_same_seed_same_trials_bit_for_bit(tracking_uri: str) -> None:
    assert _run_seeded(tracking_uri, "s1") == _run_seeded(tracking_uri, "s2")


def test_parallel_seed_warns_once(tracking_uri: str) -> None:
    study = omn.create_study("w", tracking_uri=tracking_uri, seed=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        study.optimize(quadratic, n_trials=2, n_jobs=2)
        study.optimize(quadratic, n_trials=2, n_jobs=2)
    reseed = [w for w in caught if "reseeds the sampler" in str(w.message)]
    assert len(reseed) == 1


def test_seed_everything() -> None:
    omn.seed_everything(5)
    a = (np.random.rand(), __import__("random").random())
    omn.seed_everything(5)
    assert a == (np.random.rand(), __import__("random").random())
    with pytest.raises(TypeError, match="seed"):
        omn.seed_everything("5")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "name, cls",
    [("tpe", "TPESampler"), ("random", "RandomSampler"), ("qmc", "QMCSampler"),
     ("cmaes", "CmaEsSampler"), ("grid", "GridSampler")],
)
def test_samplers_by_name(tracking_uri: str, name: str, cls: str) -> None:
    study = omn.create_study(f"s-{name}", tracking_uri=tracking_uri, sampler=name, seed=0,
                             search_space={"x": [0.0, 1.0, 2.0]} if name == "grid" else None)
    assert type(study.sampler).__name__ == cls
    study.optimize(lambda t: t.suggest_float("x", 0, 2), n_trials=3)
    assert len(study.trials) == 3
    if name == "grid":
        assert sorted(t.params["x"] for t in study.trials) == [0.0, 1.0, 2.0]


def test_gp_sampler_or_a_clear_error_without_pytorch(tracking_uri: str) -> None:
    try:
        import torch  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match='sampler="gp" needs PyTorch'):
            omn.create_study("gp", tracking_uri=tracking_uri, sampler="gp")
    else:
        study = omn.create_study("gp", tracking_uri=tracking_uri, sampler="gp", seed=0)
        assert type(study.sampler).__name__ == "GPSampler"


def test_sampler_object_is_used_as_is(tracking_uri: str) -> None:
    sampler = optuna.samplers.RandomSampler(seed=9)
    assert omn.create_study("obj", tracking_uri=tracking_uri, sampler=sampler).sampler is sampler


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"sampler": "bogus"}, ValueError, "sampler"),
        ({"sampler": "grid"}, ValueError, "search_space"),
        ({"direction": "minimize", "directions": ["minimize"]}, ValueError, "direction"),
        ({"direction": "sideways"}, ValueError, "direction"),
        ({"tracking_uri": "http://127.0.0.1:9"}, ValueError, "127.0.0.1:9"),
        ({"tracking_uri": "nosuchscheme://x"}, ValueError, "nosuchscheme://x"),
        ({"metric_name": 3}, TypeError, "metric_name"),
    ],
)
def test_bad_arguments_are_named(tracking_uri: str, kwargs: dict, error: type, match: str) -> None:
    kwargs = {"tracking_uri": tracking_uri, **kwargs}
    with pytest.raises(error, match=match):
        omn.create_study("bad", **kwargs)


def test_bad_optimize_arguments_fail_before_any_trial(tracking_uri: str) -> None:
    study = omn.create_study("bad-opt", tracking_uri=tracking_uri)
    with pytest.raises(TypeError, match="objective"):
        study.optimize("not callable", n_trials=1)  # type: ignore[arg-type]
    for n in (-3, 1.5):
        with pytest.raises(ValueError, match="n_trials"):
            study.optimize(quadratic, n_trials=n)  # type: ignore[arg-type]
    study.optimize(quadratic, n_trials=0)  # as in Optuna: valid, and nothing runs
    with pytest.raises(ValueError, match="timeout"):
        study.optimize(quadratic, timeout=-1)
    with pytest.raises(ValueError, match="n_jobs"):
        study.optimize(quadratic, n_trials=1, n_jobs=0)
    assert study.trials == []


def test_nan_and_inf_are_failed_trials_and_the_study_goes_on(tracking_uri: str) -> None:
    values = iter([float("nan"), float("inf"), 1.0, float("-inf"), 2.0])
    study = omn.create_study("nan", tracking_uri=tracking_uri)
    study.optimize(lambda t: t.suggest_float("x", 0, 1) * 0 + next(values), n_trials=5)
    states = [t.state.name for t in study.trials]
    assert states == ["FAIL", "FAIL", "COMPLETE", "FAIL", "COMPLETE"]
    statuses = {int(r.data.tags["optuna.trial_number"]): r.info.status
                for r in children(MlflowClient(tracking_uri), study)}
    assert statuses == {0: "FAILED", 1: "FAILED", 2: "FINISHED", 3: "FAILED", 4: "FINISHED"}


def test_names_and_values_mlflow_rejects_never_crash(tracking_uri: str) -> None:
    def objective(trial: optuna.Trial) -> float:
        a = trial.suggest_float("lr@layer[0]", 0, 1)
        b = trial.suggest_float("lr#layer(0)", 0, 1)  # collides after sanitising
        c = trial.suggest_categorical("../" + "k" * 300, ["v" * 7000, "w"])
        trial.set_user_attr("bad key!", 1)
        return a + b + len(c)

    study = omn.create_study("names", tracking_uri=tracking_uri, sampler="random", seed=0)
    study.optimize(objective, n_trials=3)
    runs = children(MlflowClient(tracking_uri), study)
    assert len(runs) == 3 and all(r.info.status == "FINISHED" for r in runs)
    params = runs[0].data.params
    assert {"lr_layer_0_", "lr_layer_0_-1"} <= set(params)
    long_key = next(k for k in params if k.startswith("__/kkk"))
    assert len(long_key) == 250
    assert all(len(v) <= 6000 for v in params.values())
    assert "bad key_" in runs[0].data.tags


def _objective_with_folds(trial: optuna.Trial) -> float:
    from sklearn.datasets import load_diabetes
    from sklearn.linear_model import Ridge

    X, y = load_diabetes(return_X_y=True)
    alpha = trial.suggest_float("alpha", 1e-3, 10, log=True)
    scores = omn.cross_validate(Ridge(alpha=alpha), X, y, cv=3, log_models=trial.number == 0)
    return float(np.mean(scores["test_score"]))


def test_three_level_tree_with_cross_validation(tracking_uri: str) -> None:
    study = omn.create_study("cv", tracking_uri=tracking_uri, direction="maximize", seed=0)
    study.optimize(_objective_with_folds, n_trials=2, n_jobs=2)
    client = MlflowClient(tracking_uri)
    for trial in study.trials:
        trial_run = study.child_run_id(trial.number)
        folds = client.search_runs([study.experiment_id], f"tags.mlflow.parentRunId = '{trial_run}'")
        assert sorted(f.info.run_name for f in folds) == ["fold-0", "fold-1", "fold-2"]
        mean = np.mean([f.data.metrics["test_score"] for f in folds])
        assert mean == pytest.approx(trial.value)
        assert all("fit_time" in f.data.metrics and "fold" in f.data.metrics for f in folds)
        has_model = [any(a.path == "model" for a in client.list_artifacts(f.info.run_id)) or
                     bool(f.outputs and f.outputs.model_outputs) for f in folds]
        assert all(has_model) == (trial.number == 0)


def test_cross_validate_returns_sklearn_dict(tracking_uri: str) -> None:
    from sklearn.datasets import load_diabetes
    from sklearn.linear_model import Ridge
    from sklearn.model_selection import cross_validate as sk_cross_validate

    X, y = load_diabetes(return_X_y=True)
    mlflow.set_tracking_uri(tracking_uri)
    try:
        with mlflow.start_run() as run:
            ours = omn.cross_validate(Ridge(), X, y, cv=4, scoring=["r2", "neg_mean_absolute_error"])
        theirs = sk_cross_validate(Ridge(), X, y, cv=4, scoring=["r2", "neg_mean_absolute_error"])
        np.testing.assert_allclose(ours["test_r2"], theirs["test_r2"])
        np.testing.assert_allclose(ours["test_neg_mean_absolute_error"],
                                   theirs["test_neg_mean_absolute_error"])
        folds = MlflowClient(tracking_uri).search_runs(
            [run.info.experiment_id], f"tags.mlflow.parentRunId = '{run.info.run_id}'")
        assert len(folds) == 4
        with pytest.raises(ValueError, match="cv"):
            omn.cross_validate(Ridge(), X, y, cv=1)
    finally:
        mlflow.set_tracking_uri(None)


def _cv_study_with_a_refused_fold(tracking_uri: str, times: int) -> tuple[omn.NestedStudy, list]:
    """A search of 2 trials whose objective cross-validates in 3 folds; the store refuses
    the creation of trial 0's run ``fold-1`` ``times`` times ("database is locked")."""
    from sklearn.datasets import load_diabetes
    from sklearn.linear_model import Ridge
    from tests_support import busy_store

    X, y = load_diabetes(return_X_y=True)
    study = omn.create_study("cv-busy", tracking_uri=tracking_uri, sampler="random", seed=0)

    def objective(trial: optuna.Trial) -> float:
        model = Ridge(alpha=trial.suggest_float("alpha", 0.1, 10))
        return -float(omn.cross_validate(model, X, y, cv=3)["test_score"].mean())

    with busy_store("runs", "'fold-1'", lambda: times) as refused:
        study.optimize(objective, n_trials=2)
    assert refused, "no write refused: the test tests nothing"
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE"]
    return study, refused


def _folds(tracking_uri: str, study: omn.NestedStudy, number: int) -> dict[str, dict]:
    client = MlflowClient(tracking_uri)
    runs = client.search_runs([study.experiment_id],
                              f"tags.mlflow.parentRunId = '{study.child_run_id(number)}'")
    return {r.info.run_name: {"status": r.info.status, **r.data.metrics} for r in runs}


def test_a_fold_run_waits_out_a_busy_store_and_its_trial_completes(
        tracking_uri: str, capfd: pytest.CaptureFixture[str]) -> None:
    # A fold's run was written once, in the objective: a locked SQLite file (another
    # process's long write) raised there and failed the trial.
    study, refused = _cv_study_with_a_refused_fold(tracking_uri, times=1)
    folds = _folds(tracking_uri, study, 0)
    assert sorted(folds) == ["fold-0", "fold-1", "fold-2"]
    assert {f["status"] for f in folds.values()} == {"FINISHED"}
    assert folds["fold-1"]["fold"] == 1.0 and "test_score" in folds["fold-1"]
    assert "Traceback" not in capfd.readouterr().err


def test_a_fold_run_the_store_never_takes_is_spooled_and_its_trial_completes(
        tracking_uri: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A store that keeps refusing (a server that is away) failed the trial: the search
    # lost a result to its tracking. Now the fold's run goes to the spool, and sync
    # writes it under its trial's run.
    monkeypatch.setenv("OMN_RETRY_DEADLINE", "1")
    monkeypatch.setenv("OMN_SPOOL", str(tmp_path / "spool.jsonl"))
    with pytest.warns(RuntimeWarning, match=r"did not take some runs; they are kept in .*spool"):
        study, _ = _cv_study_with_a_refused_fold(tracking_uri, times=10**6)
    for number in (0, 1):  # the folds after the one refused went to the spool at once
        assert sorted(_folds(tracking_uri, study, number)) == ["fold-0"]
    assert tracking.replay_spool(tmp_path / "spool.jsonl") == (4, 0)
    for number in (0, 1):
        folds = _folds(tracking_uri, study, number)
        assert sorted(folds) == ["fold-0", "fold-1", "fold-2"]
        assert folds["fold-1"]["status"] == "FINISHED" and folds["fold-1"]["fold"] == 1.0
        assert "test_score" in folds["fold-1"]
    assert tracking.replay_spool(tmp_path / "spool.jsonl") == (0, 0)  # the spool is empty
    assert sorted(_folds(tracking_uri, study, 0)) == ["fold-0", "fold-1", "fold-2"]


def _race_worker(args: tuple[str, str, int]) -> str:
    tracking_uri, storage, seed = args
    study = omn.create_study("race", experiment_name="race-exp", tracking_uri=tracking_uri,
                             storage=storage, load_if_exists=True, seed=seed)
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)
    return study.parent_run_id


@pytest.mark.slow  # ~15 s
def test_processes_racing_on_a_fresh_sqlite_store(tmp_path: Path) -> None:
    tracking_uri = f"sqlite:///{tmp_path / 'fresh.db'}"
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    optuna.storages.RDBStorage(storage)  # the Optuna side is not what this test races
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(4) as pool:
        parents = pool.map(_race_worker, [(tracking_uri, storage, i) for i in range(4)])
    assert len(set(parents)) == 1
    client = MlflowClient(tracking_uri)
    experiments = [e for e in client.search_experiments() if e.name == "race-exp"]
    assert len(experiments) == 1
    runs = client.search_runs([experiments[0].experiment_id], "tags.`optuna.role` = 'trial'")
    assert sorted(int(r.data.tags["optuna.trial_number"]) for r in runs) == list(range(8))


def test_racing_experiment_creation_resolves_to_one(tracking_uri: str) -> None:
    import threading

    client = tracking.get_client(tracking_uri)
    ids: list[str] = []
    threads = [threading.Thread(target=lambda: ids.append(tracking.get_or_create_experiment(client, "same")))
               for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(ids) == 6 and len(set(ids)) == 1


def test_keyboard_interrupt_flushes_every_started_trial(tracking_uri: str) -> None:
    def objective(trial: optuna.Trial) -> float:
        x = trial.suggest_float("x", 0, 1)
        if trial.number == 3:
            raise KeyboardInterrupt
        return x

    study = omn.create_study("ctrl-c", tracking_uri=tracking_uri)
    with pytest.raises(KeyboardInterrupt):
        study.optimize(objective, n_trials=10)
    client = MlflowClient(tracking_uri)
    statuses = {r.info.run_name: r.info.status for r in children(client, study)}
    assert statuses == {"trial-0": "FINISHED", "trial-1": "FINISHED", "trial-2": "FINISHED",
                        "trial-3": "FAILED"}
    assert client.get_run(study.parent_run_id).info.status == "KILLED"


def test_plain_study_parent_summary(tracking_uri: str) -> None:
    study = omn.create_study("summary", tracking_uri=tracking_uri, sampler="random", seed=0)
    study.optimize(lambda t: (t.suggest_float("x", -2, 2) - 1) ** 2 + t.suggest_int("n", 0, 3),
                   n_trials=6)
    client = MlflowClient(tracking_uri)
    tags = client.get_run(study.parent_run_id).data.tags
    best = study.best_trial
    assert tags["best_trial"] == str(best.number)
    assert tags["best_run_id"] == study.child_run_id(best.number)
    assert tags["best.x"] == str(best.params["x"]) and tags["best.n"] == str(best.params["n"])
    note = tags["mlflow.note.content"]
    assert "`summary`" in note and "`x`" in note and "`n`" in note
    assert f"trial {best.number}" in note and "`n_trials=6`" in note
    table = {a.path for a in client.list_artifacts(study.parent_run_id)}
    assert "trials_table.json" in table
    text = Path(mlflow.artifacts.download_artifacts(
        run_id=study.parent_run_id, artifact_path="trials_table.json", tracking_uri=tracking_uri
    )).read_text()
    assert '"run_id"' in text and study.child_run_id(best.number) in text


def test_the_parents_trials_table_has_one_row_per_trial_after_every_optimize(
        tracking_uri: str) -> None:
    # MLflow's log_table appends to a table already logged: each optimize of a study
    # added the whole table again (3 optimize calls of 4 trials gave 24 rows, not 12).
    study = omn.create_study("again", tracking_uri=tracking_uri, sampler="random", seed=0)
    for _ in range(3):
        study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=4)
    client = MlflowClient(tracking_uri)
    table = client.load_table(study.experiment_id, "trials_table.json",
                              run_ids=[study.parent_run_id])
    assert sorted(table["number"]) == list(range(12))
    assert table.set_index("number")["run_id"].to_dict() == study.run_ids()
    logged = json.loads(client.get_run(study.parent_run_id).data.tags["mlflow.loggedArtifacts"])
    assert logged == [{"path": "trials_table.json", "type": "table"}]


def test_best_value_is_stepped_at_the_corners_of_the_running_best(tracking_uri: str) -> None:
    # Every step was one metric row (about 0.3 ms each on SQLite, on optimize's return
    # path); MLflow's charts join points with lines, so the corners draw the same chart.
    values = [5.0, 6.0, 3.0, 4.0, 4.0, 1.0, 2.0, 0.5, 0.7]
    study = omn.create_study("corners", tracking_uri=tracking_uri, sampler="random", seed=0)
    objective = lambda t: values[t.number] + 0 * t.suggest_float("x", 0, 1)  # noqa: E731
    study.optimize(objective, n_trials=7)
    client = MlflowClient(tracking_uri)

    def history() -> list[tuple[int, float]]:
        points = client.get_metric_history(study.parent_run_id, "best_value")
        return sorted((m.step, m.value) for m in points)

    assert history() == [(0, 5.0), (1, 5.0), (2, 3.0), (4, 3.0), (5, 1.0), (6, 1.0)]
    study.optimize(objective, n_trials=2)  # only new corners are added, none twice
    assert history() == [(0, 5.0), (1, 5.0), (2, 3.0), (4, 3.0), (5, 1.0), (6, 1.0),
                         (7, 0.5), (8, 0.5)]


@pytest.mark.parametrize("writer", ["process", pytest.param("threads", marks=pytest.mark.slow)])
def test_a_search_with_a_known_budget_makes_no_spare_run_to_delete(
        tracking_uri: str, writer: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # The run pool made runs ahead past the budget, then ended and deleted them when
    # optimize returned (two store calls each, on its return path): 9 trials, 13 runs.
    monkeypatch.setenv("OMN_WRITER", writer)
    from optuna_mlflow_nested.tracking.writer_process import WriterProcess

    if writer == "process":  # started: runs made while it starts are counted
        assert WriterProcess.get().wait_ready()
    study = omn.create_study("budget", tracking_uri=tracking_uri)
    study.optimize(quadratic, n_trials=6)
    study.optimize(quadratic, n_trials=3, n_jobs=2)
    everything = MlflowClient(tracking_uri).search_runs(
        [study.experiment_id], f"tags.mlflow.parentRunId = '{study.parent_run_id}'",
        run_view_type=ViewType.ALL)
    assert sorted(r.info.run_name for r in everything) == sorted(f"trial-{i}" for i in range(9))
    assert {r.info.lifecycle_stage for r in everything} == {"active"}


@pytest.mark.parametrize("writer", ["process", "threads"])
def test_the_parent_gets_its_summary_and_figures_with_either_writer(
        tracking_uri: str, writer: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # With the writer process, the summary is written while it delivers the last
    # records; writer threads must still get the figures drawn in this process (a
    # review found them missing when the summary was written early there too).
    monkeypatch.setenv("OMN_WRITER", writer)
    study = omn.create_study("figures", tracking_uri=tracking_uri, sampler="random", seed=0)
    study.optimize(lambda t: t.suggest_float("x", 0, 1) + t.suggest_int("n", 0, 3), n_trials=6)
    client = MlflowClient(tracking_uri)
    parent = client.get_run(study.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.data.metrics["n_complete"] == 6
    assert parent.data.tags["best_trial"] == str(study.best_trial.number)
    assert study.wait_for_figures(timeout=120)
    artifacts = {a.path for a in client.list_artifacts(study.parent_run_id)}
    assert {"trials.csv", "trials_table.json", "optimization_history.png",
            "param_importances.png"} <= artifacts


def test_the_parents_metrics_and_tags_go_in_batches_within_mlflows_limits(
        tracking_uri: str) -> None:
    from mlflow.entities import Metric
    from mlflow.entities import RunTag

    from optuna_mlflow_nested.tracking.parent import log_in_batches

    client = MlflowClient(tracking_uri)
    run_id = client.create_run(client.create_experiment("batches")).info.run_id
    log_in_batches(client, run_id, [Metric("m", float(i), 0, i) for i in range(1500)],
                   [RunTag(f"t{i}", str(i)) for i in range(150)])
    assert len(client.get_metric_history(run_id, "m")) == 1500
    assert {f"t{i}" for i in range(150)} <= set(client.get_run(run_id).data.tags)


def test_multi_objective_parent_shows_the_pareto_front(tracking_uri: str) -> None:
    study = omn.create_study("front", tracking_uri=tracking_uri, sampler="random", seed=0,
                             directions=["minimize", "minimize"])
    study.optimize(lambda t: (t.suggest_float("x", 0, 1), 1 - t.suggest_float("y", 0, 1) ** 2),
                   n_trials=8)
    tags = MlflowClient(tracking_uri).get_run(study.parent_run_id).data.tags
    front = sorted(t.number for t in study.best_trials)
    assert tags["pareto_trials"] == ",".join(map(str, front))
    assert "best_trial" not in tags
    assert "Pareto front: " in tags["mlflow.note.content"]


def test_experiment_kind_only_on_experiments_this_project_creates(tracking_uri: str) -> None:
    client = MlflowClient(tracking_uri)
    omn.create_study("kind", tracking_uri=tracking_uri, experiment_name="made-here")
    made = client.get_experiment_by_name("made-here")
    assert made.tags["mlflow.experimentKind"] == "custom_model_development"
    theirs = client.create_experiment("theirs", tags={"mlflow.experimentKind": "genai_development"})
    plain = client.create_experiment("plain")
    omn.create_study("kind2", tracking_uri=tracking_uri, experiment_name="theirs")
    omn.create_study("kind3", tracking_uri=tracking_uri, experiment_name="plain")
    assert client.get_experiment(theirs).tags["mlflow.experimentKind"] == "genai_development"
    assert "mlflow.experimentKind" not in client.get_experiment(plain).tags


def test_a_trial_with_a_thousand_steps_goes_in_batches_mlflow_accepts() -> None:
    # 1000 metrics and a trial's tags in one log_batch are over MLflow's 1000 entities:
    # MLflow refused the batch and the record went up one item at a time.
    from mlflow.entities import Metric
    from mlflow.entities import Param
    from mlflow.entities import RunTag
    from mlflow.utils.validation import MAX_ENTITIES_PER_BATCH
    from mlflow.utils.validation import MAX_PARAMS_TAGS_PER_BATCH

    from optuna_mlflow_nested.tracking.delivery import batches

    metrics = [Metric("value_intermediate", float(i), 0, i) for i in range(1000)]
    params = [Param(f"p{i}", "1") for i in range(3)]
    tags = [RunTag(f"t{i}", "v") for i in range(12)]
    out = list(batches(metrics, params, tags))
    assert all(len(m) + len(p) + len(t) <= MAX_ENTITIES_PER_BATCH for m, p, t in out)
    assert all(len(p) + len(t) <= MAX_PARAMS_TAGS_PER_BATCH for _, p, t in out)
    assert [x for m, _, _ in out for x in m] == metrics
    assert [x for _, p, _ in out for x in p] == params and [x for _, _, t in out for x in t] == tags
