"""CatBoost end to end: tune, early-stop, refit on train+validation, test, tag (issue 3)."""

from __future__ import annotations

from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient
import numpy as np
import optuna
import pandas as pd
import pytest

import optuna_mlflow_nested as omn
from optuna_mlflow_nested.datasets import load_diabetes
from optuna_mlflow_nested.datasets import train_val_test_split

SMALL = dict(tuning_iterations=30, max_iterations=200, early_stopping_rounds=20)


@pytest.fixture(scope="module")
def diabetes_split() -> tuple:
    return train_val_test_split(*load_diabetes(), seed=42)


def tune(split: tuple, tracking_uri: str, **kwargs) -> omn.CatBoostResult:
    X_tr, X_va, X_te, y_tr, y_va, y_te = split
    return omn.tune_catboost(X_tr, y_tr, X_va, y_va, X_te, y_te, tracking_uri=tracking_uri,
                             **{"n_trials": 3, **SMALL, **kwargs})


def test_split_is_deterministic_and_checked() -> None:
    X, y = load_diabetes()
    a = train_val_test_split(X, y, seed=3)
    b = train_val_test_split(X, y, seed=3)
    c = train_val_test_split(X, y, seed=4)
    assert all(p.index.equals(q.index) for p, q in zip(a, b))
    assert not a[0].index.equals(c[0].index)
    assert [len(p) for p in a[:3]] == [265, 88, 89]
    with pytest.raises(ValueError, match="sizes"):
        train_val_test_split(X, y, sizes=(0.5, 0.5, 0.5))
    with pytest.raises(ValueError, match="too few rows"):
        train_val_test_split(X[:5], y[:5])


def test_finish_step_logged_on_the_parent(diabetes_split: tuple, tracking_uri: str) -> None:
    result = tune(diabetes_split, tracking_uri, study_name="finish")
    X_tr, X_va, X_te, y_tr, y_va, y_te = diabetes_split
    assert result.tree_count == result.best_iteration + 1 == result.model.tree_count_
    assert result.best_params == result.study.best_params
    assert set(result.best_params) == set(omn.catboost.DEFAULT_SEARCH_SPACE)
    predicted = result.model.predict(X_te)
    assert result.test_rmse == pytest.approx(float(np.sqrt(np.mean((y_te - predicted) ** 2))))
    client = MlflowClient(tracking_uri)
    parent = client.get_run(result.parent_run_id)
    metrics = parent.data.metrics
    assert metrics["test_rmse"] == pytest.approx(result.test_rmse)
    assert {"test_mae", "test_r2", "val_rmse", "best_iteration", "tree_count"} <= set(metrics)
    assert metrics["val_rmse"] == pytest.approx(result.val_rmse_early_stopped)
    assert parent.data.tags["best_model"] == "true"
    assert parent.data.tags["final.depth"] == str(result.best_params["depth"])
    curve = client.get_metric_history(result.parent_run_id, "early_stopping_val_rmse")
    assert len(curve) >= result.tree_count and curve[0].step == 0
    artifacts = {a.path for a in client.list_artifacts(result.parent_run_id)}
    assert {"predicted_vs_actual.png", "final_params.json", "trials.csv"} <= artifacts
    mlflow.set_tracking_uri(tracking_uri)
    loaded = mlflow.pyfunc.load_model(result.model_uri)
    assert loaded.metadata.signature is not None
    np.testing.assert_allclose(np.ravel(loaded.predict(X_te.head(7))), predicted[:7])
    # the model is stored in CatBoost's native format, not pickled
    model_dir = Path(mlflow.artifacts.download_artifacts(result.model_uri))
    assert any(p.suffix == ".cb" for p in model_dir.rglob("*"))
    assert not any(p.suffix in (".pkl", ".pickle") for p in model_dir.rglob("*"))


def test_same_seed_same_result(diabetes_split: tuple, tracking_uri: str) -> None:
    first = tune(diabetes_split, tracking_uri, study_name="r1", seed=7)
    second = tune(diabetes_split, tracking_uri, study_name="r2", seed=7)
    assert first.best_params == second.best_params
    assert first.best_iteration == second.best_iteration
    assert first.test_rmse == second.test_rmse


def test_parallel_trials_do_not_crash(diabetes_split: tuple, tracking_uri: str) -> None:
    result = tune(diabetes_split, tracking_uri, study_name="par", n_trials=6, n_jobs=2, seed=1)
    assert len(result.study.trials) == 6
    assert all(t.state.name == "COMPLETE" for t in result.study.trials)
    assert len(result.study.child_runs()) == 6


def test_pandas_categorical_columns(tracking_uri: str) -> None:
    rng = np.random.default_rng(0)
    n = 300
    frame = pd.DataFrame({"x": rng.normal(size=n),
                          "city": pd.Categorical(rng.choice(["north", "south", "east"], size=n))})
    y = frame["x"] * 2 + frame["city"].map({"north": 5.0, "south": -5.0, "east": 0.0}).astype(float)
    split = train_val_test_split(frame, y + rng.normal(scale=0.1, size=n), seed=0)
    result = tune(split, tracking_uri, study_name="cats")
    assert result.model.get_cat_feature_indices() == [1]
    assert result.test_rmse < 3.0  # the categorical column was used
    mlflow.set_tracking_uri(tracking_uri)
    signature = mlflow.models.get_model_info(result.model_uri).signature
    types = {c.name: str(c.type) for c in signature.inputs.inputs}
    assert types["city"].lower().endswith("string")


class _PruneOddTrials(optuna.pruners.BasePruner):
    """A deterministic real pruner: prunes every odd-numbered trial once it reports."""

    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        return trial.number % 2 == 1


def test_pruning_ends_trials_killed(diabetes_split: tuple, tracking_uri: str) -> None:
    result = tune(diabetes_split, tracking_uri, study_name="prune", n_trials=4, pruning=True,
                  pruner=_PruneOddTrials())
    states = [t.state.name for t in result.study.trials]
    assert states == ["COMPLETE", "PRUNED", "COMPLETE", "PRUNED"]
    assert len(result.study.trials[0].intermediate_values) >= 3
    runs = result.study.child_runs()
    status = dict(zip(runs["tags.mlflow.runName"], runs["status"]))
    assert status == {"trial-0": "FINISHED", "trial-1": "KILLED", "trial-2": "FINISHED",
                      "trial-3": "KILLED"}


def test_load_best_model_chooses_by_validation(diabetes_split: tuple, tracking_uri: str) -> None:
    a = tune(diabetes_split, tracking_uri, study_name="a", experiment_name="shared", seed=1)
    b = tune(diabetes_split, tracking_uri, study_name="b", experiment_name="shared", seed=2)
    client = MlflowClient(tracking_uri)
    # make a's validation better and its test worse than b's
    client.log_metric(a.parent_run_id, "val_rmse", 1.0)
    client.log_metric(a.parent_run_id, "test_rmse", 999.0)
    client.log_metric(b.parent_run_id, "val_rmse", 2.0)
    client.log_metric(b.parent_run_id, "test_rmse", 0.5)
    X_te = diabetes_split[2]
    model = omn.load_best_model("shared", tracking_uri=tracking_uri)
    np.testing.assert_allclose(model.predict(X_te), a.model.predict(X_te))
    with pytest.raises(ValueError, match="no MLflow experiment"):
        omn.load_best_model("missing", tracking_uri=tracking_uri)


def test_bad_arguments(diabetes_split: tuple, tracking_uri: str) -> None:
    with pytest.raises(ValueError, match="n_trials"):
        tune(diabetes_split, tracking_uri, n_trials=0)
    with pytest.raises(ValueError, match="search_space"):
        tune(diabetes_split, tracking_uri, search_space={"depth": 3})


def test_the_finish_waits_out_a_busy_store(diabetes_split: tuple, tracking_uri: str,
                                           capfd: pytest.CaptureFixture[str]) -> None:
    # The finish step's writes were tried once: a locked SQLite file (another process's
    # long write) failed the finish, `tune` exited 1 and MLflow's traceback was printed.
    from tests_support import busy_store

    with busy_store("tags", "finish.status", lambda: 1) as refused:
        result = tune(diabetes_split, tracking_uri, n_trials=2)
    assert refused, "no write refused: the test tests nothing"
    parent = MlflowClient(tracking_uri).get_run(result.parent_run_id)
    assert parent.data.tags["finish.status"] == "complete"
    assert parent.data.tags["best_model"] == "true" and parent.info.status == "FINISHED"
    assert "Traceback" not in capfd.readouterr().err
