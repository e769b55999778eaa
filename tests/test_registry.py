"""Registry promotion guarded by validation, and datasets on the parent and trial runs."""

from __future__ import annotations

import mlflow.data
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT
import numpy as np
import pytest

import optuna_mlflow_nested as omn
from optuna_mlflow_nested.cli import main
from optuna_mlflow_nested.datasets import load_diabetes
from optuna_mlflow_nested.datasets import train_val_test_split

TINY = dict(n_trials=2, tuning_iterations=20, experiment_name="reg", seed=0)


def _split(seed: int = 0) -> tuple:
    return train_val_test_split(*load_diabetes(), seed=seed)


def _tune(uri: str, study: str, split: tuple, max_iterations: int, **kw) -> omn.CatBoostResult:
    X_tr, X_va, X_te, y_tr, y_va, y_te = split
    return omn.tune_catboost(X_tr, y_tr, X_va, y_va, X_te, y_te, study_name=study,
                             max_iterations=max_iterations, tracking_uri=uri,
                             registered_model_name="house", **TINY, **kw)


def _alias(client: MlflowClient, alias: str) -> str:
    return str(client.get_model_version_by_alias("house", alias).version)


@pytest.mark.slow  # default suite under 5 min on 2 cores
def test_champion_moves_only_on_better_validation_of_same_data(tracking_uri) -> None:
    client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
    split = _split()
    first = _tune(tracking_uri, "a", split, max_iterations=10)
    assert first.model_version == "1"
    assert _alias(client, "champion") == _alias(client, "challenger") == "1"
    v1 = client.get_model_version("house", "1")
    assert v1.tags["omn.parent_run_id"] == first.parent_run_id
    assert v1.tags["omn.study"] == "a"
    assert v1.tags["omn.data_digest"] == first.study.user_attrs["omn.data"]["digest"]
    assert float(v1.tags["omn.val_rmse"]) == first.val_rmse_early_stopped
    assert float(v1.tags["omn.test_rmse"]) == first.test_rmse

    # Same best params (same seed), fewer trees: worse on validation, however it tests.
    worse = _tune(tracking_uri, "b", split, max_iterations=2)
    assert worse.val_rmse_early_stopped > first.val_rmse_early_stopped
    assert (_alias(client, "champion"), _alias(client, "challenger")) == ("1", "2")
    assert client.get_model_version("house", "2").tags["promotion"].startswith("skipped")

    better = _tune(tracking_uri, "c", split, max_iterations=50)
    assert better.val_rmse_early_stopped < first.val_rmse_early_stopped
    assert (_alias(client, "champion"), _alias(client, "challenger")) == ("3", "3")

    # Other validation data: never promoted, however good it looks.
    with pytest.warns(UserWarning, match="not promoted"):
        other = _tune(tracking_uri, "d", _split(seed=1), max_iterations=50)
    assert other.model_version == "4"
    assert (_alias(client, "champion"), _alias(client, "challenger")) == ("3", "4")
    assert (client.get_model_version("house", "4").tags["promotion"]
            == "skipped: different validation data")

    model = omn.load_best_model("reg", tracking_uri=tracking_uri, model_name="house")
    X_te = split[2]
    np.testing.assert_allclose(model.predict(X_te), better.model.predict(X_te))


def _digest(X, y) -> str:
    frame = X.reset_index(drop=True).assign(**{str(y.name): y.to_numpy()})
    return mlflow.data.from_pandas(frame, targets=str(y.name)).digest


def _contexts(run) -> dict[str, str]:
    return {{t.key: t.value for t in i.tags}[MLFLOW_DATASET_CONTEXT]: i.dataset.digest
            for i in run.inputs.dataset_inputs}


def test_datasets_on_parent_once_and_on_every_trial(tracking_uri, tmp_path) -> None:
    X_tr, X_va, X_te, y_tr, y_va, y_te = _split()
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    kw = dict(n_trials=2, tuning_iterations=20, max_iterations=20, tracking_uri=tracking_uri,
              study_name="ds", storage=storage)
    result = omn.tune_catboost(X_tr, y_tr, X_va, y_va, X_te, y_te, **kw)
    omn.tune_catboost(X_tr, y_tr, X_va, y_va, X_te, y_te, **kw)  # resumed: finishes again
    client = MlflowClient(tracking_uri)
    parent = client.get_run(result.parent_run_id)
    assert len(parent.inputs.dataset_inputs) == 3
    assert _contexts(parent) == {"training": _digest(X_tr, y_tr),
                                 "validation": _digest(X_va, y_va),
                                 "testing": _digest(X_te, y_te)}
    trials = client.search_runs([parent.info.experiment_id],
                                f"tags.`mlflow.parentRunId` = '{result.parent_run_id}'")
    assert len(trials) == 2
    for run in trials:
        assert _contexts(run) == {"training": _digest(X_tr, y_tr)}


def test_cli_tune_register(tmp_path, capsys) -> None:
    # Not MLflow's default store (./mlflow.db, this test's folder): MLflow's SQL registry
    # resolves the logged model's models:/ URI through the global tracking URI, and
    # registering into any other store failed after the whole search ("Logged model with
    # ID ... not found"), leaving a stray ./mlflow.db.
    tracking_uri = f"sqlite:///{tmp_path / 'elsewhere.db'}"
    assert main(["tune", "--trials", "1", "--tuning-iterations", "10", "--max-iterations", "20",
                 "--tracking-uri", tracking_uri, "--storage", f"sqlite:///{tmp_path / 'o.db'}",
                 "--no-progress", "--register", "cli-model"]) == 0
    client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
    assert str(client.get_model_version_by_alias("cli-model", "champion").version) == "1"
    assert "cli-model" in capsys.readouterr().out
    assert not (tmp_path / "mlflow.db").exists()


def test_cli_tune_refuses_a_model_name_mlflow_refuses_before_the_search(
        tracking_uri, tmp_path, capsys) -> None:
    # It was refused by MLflow after the whole search and finish, with a traceback.
    assert main(["tune", "--trials", "1", "--tuning-iterations", "10", "--max-iterations", "20",
                 "--tracking-uri", tracking_uri, "--storage", f"sqlite:///{tmp_path / 'o.db'}",
                 "--no-progress", "--register", "a/b"]) == 2
    err = capsys.readouterr().err
    assert "--register" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert MlflowClient(tracking_uri).search_runs(["0", "1"]) == []
    X_tr, X_va, X_te, y_tr, y_va, y_te = _split()
    with pytest.raises(ValueError, match="registered_model_name"):
        omn.tune_catboost(X_tr, y_tr, X_va, y_va, X_te, y_te, tracking_uri=tracking_uri,
                          registered_model_name="a:b", **TINY)
    assert MlflowClient(tracking_uri).search_runs(["0", "1"]) == []


def test_record_inputs_survive_the_spool() -> None:
    from optuna_mlflow_nested.data_inputs import describe
    from optuna_mlflow_nested.tracking.records import RunRecord

    X_tr, _, _, y_tr, _, _ = _split()
    record = RunRecord(tracking_uri="sqlite:///m.db", experiment_id="0", parent_run_id=None,
                       study_name="s", trial_number=0, run_id=None, run_name="trial-0",
                       status="FINISHED", end_time=0, inputs=[describe(X_tr, y_tr, "train")])
    assert RunRecord.from_json(record.to_json()) == record
    assert RunRecord.from_json(record.to_json()).inputs[0]["digest"] == _digest(X_tr, y_tr)


def test_parent_description_says_how_to_load_the_model(tracking_uri) -> None:
    result = _tune(tracking_uri, "described", _split(), max_iterations=10)
    tags = MlflowClient(tracking_uri).get_run(result.parent_run_id).data.tags
    note = tags["mlflow.note.content"]
    assert tags["registered_model_version"] == f"house/{result.model_version}"
    assert result.model_uri in note and "mlflow.pyfunc.load_model" in note
    assert "models:/house@champion" in note
    assert "`n_trials=2`" in note
    np.testing.assert_allclose(result.load_model().predict(_split()[2]),
                               result.model.predict(_split()[2]))
