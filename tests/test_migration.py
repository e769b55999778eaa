"""Joining and adopting studies as a user moving from plain Optuna would: a plain study,
a copy, another tracking store, names MLflow cannot take as they are."""

from __future__ import annotations

from pathlib import Path
import shutil
import warnings

from mlflow.tracking import MlflowClient
import optuna
import pytest

import optuna_mlflow_nested as omn
from optuna_mlflow_nested import _study_setup


def quadratic(trial: optuna.Trial) -> float:
    return trial.suggest_float("x", -1, 1) ** 2


def child_numbers(uri: str, study: omn.NestedStudy) -> list[int]:
    runs = MlflowClient(uri).search_runs(
        [study.experiment_id], f"tags.mlflow.parentRunId = '{study.parent_run_id}'")
    return sorted(int(r.data.tags["optuna.trial_number"]) for r in runs)


def test_create_study_load_if_exists_adopts_a_plain_optuna_study_at_once(
        tmp_path: Path, tracking_uri: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # It waited the whole wait for a parent run meant for a study another process of
    # this project is still creating (120 s), warned, then made one.
    monkeypatch.setattr(_study_setup, "_PARENT_WAIT_SECONDS", 3.0)
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    plain = optuna.create_study(study_name="plain", storage=storage)
    plain.optimize(quadratic, n_trials=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        study = omn.create_study("plain", storage=storage, tracking_uri=tracking_uri,
                                 load_if_exists=True)
    assert MlflowClient(tracking_uri).get_run(study.parent_run_id).data.tags["optuna.role"] \
        == "study"
    study.optimize(quadratic, n_trials=2)
    assert child_numbers(tracking_uri, study) == [3, 4]
    study.reconcile(create_missing=True)  # README: the earlier trials' runs, on request
    assert child_numbers(tracking_uri, study) == [0, 1, 2, 3, 4]


def test_a_project_study_still_being_created_is_waited_for(
        tmp_path: Path, tracking_uri: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # No parent run yet, no trial, but its creator's mark: a joiner waits for the parent
    # its creator makes meanwhile, rather than adopting the study with one of its own.
    import threading

    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'optuna.db'}")
    plain = optuna.create_study(study_name="racing", storage=storage)
    storage.set_study_system_attr(plain._study_id, _study_setup.TRIAL_RUNS_ATTR, "all")
    waiting = threading.Event()
    wait_for_parent = _study_setup._wait_for_parent

    def seen_waiting(study: optuna.Study) -> dict:
        waiting.set()
        return wait_for_parent(study)

    monkeypatch.setattr(_study_setup, "_wait_for_parent", seen_waiting)
    joined: list[omn.NestedStudy] = []
    joiner = threading.Thread(target=lambda: joined.append(omn.create_study(
        "racing", storage=storage, tracking_uri=tracking_uri, load_if_exists=True)))
    joiner.start()
    assert waiting.wait(timeout=60)
    # The creator's part, done by hand while the joiner waits.
    client = MlflowClient(tracking_uri)
    experiment_id = client.create_experiment("racing")
    run_id = client.create_run(experiment_id, tags={"optuna.role": "study",
                                                    "optuna.study_name": "racing"}).info.run_id
    storage.set_study_system_attr(plain._study_id, _study_setup.EXPERIMENT_ATTR, experiment_id)
    storage.set_study_system_attr(plain._study_id, _study_setup.PARENT_RUN_ATTR, run_id)
    joiner.join(timeout=60)
    assert [s.parent_run_id for s in joined] == [run_id]


@pytest.mark.parametrize("copied", [False, True])
def test_workers_adopting_one_plain_study_at_once_share_one_parent_run(
        tmp_path: Path, tracking_uri: str, copied: bool) -> None:
    # Every worker that loaded a plain study (or a copy) at the same moment saw no parent
    # run of its own, made one and wrote its id: the last id written won, and the others
    # filed their trials' runs under parents nobody else used.
    import threading

    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    if copied:
        omn.create_study("orig", storage=storage, tracking_uri=tracking_uri)
        optuna.copy_study(from_study_name="orig", from_storage=storage, to_storage=storage,
                          to_study_name="plain")
    else:
        optuna.create_study(study_name="plain", storage=storage)
    optuna.load_study(study_name="plain", storage=storage).optimize(quadratic, n_trials=2)
    together = threading.Barrier(4)
    studies: list[omn.NestedStudy] = []

    def adopt() -> None:
        together.wait(timeout=60)
        study = omn.load_study("plain", storage, tracking_uri=tracking_uri)
        study.optimize(quadratic, n_trials=1)
        studies.append(study)

    workers = [threading.Thread(target=adopt) for _ in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
    assert len(studies) == 4
    assert len({s.parent_run_id for s in studies}) == 1
    stored = omn.load_study("plain", storage, tracking_uri=tracking_uri).parent_run_id
    assert studies[0].parent_run_id == stored
    client = MlflowClient(tracking_uri)
    parents = client.search_runs([studies[0].experiment_id], "tags.`optuna.role` = 'study' "
                                 "and tags.`optuna.study_name` = 'plain'", run_view_type=3)
    assert [p.info.run_id for p in parents] == [stored]
    assert child_numbers(tracking_uri, studies[0]) == [2, 3, 4, 5]


def test_a_copied_study_gets_a_parent_run_of_its_own(
        tmp_path: Path, tracking_uri: str) -> None:
    # optuna.copy_study copies the study's system attributes: the copy found the
    # original's parent run there and wrote its trials into the original's tree.
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    original = omn.create_study("orig", storage=storage, tracking_uri=tracking_uri)
    original.optimize(quadratic, n_trials=3)
    optuna.copy_study(from_study_name="orig", from_storage=storage, to_storage=storage,
                      to_study_name="copy")
    copy = omn.load_study("copy", storage, tracking_uri=tracking_uri)
    assert copy.parent_run_id != original.parent_run_id
    copy.optimize(quadratic, n_trials=2)
    assert child_numbers(tracking_uri, original) == [0, 1, 2]
    assert child_numbers(tracking_uri, copy) == [3, 4]
    parent = MlflowClient(tracking_uri).get_run(copy.parent_run_id)
    assert parent.data.tags["optuna.study_name"] == "copy"
    # The copy's parent is now the one its storage names, for everyone who joins it.
    assert omn.load_study("copy", storage, tracking_uri=tracking_uri).parent_run_id \
        == copy.parent_run_id


def test_a_study_loaded_against_another_tracking_store_is_refused(
        tmp_path: Path, tracking_uri: str, _migrated_store: Path) -> None:
    # Its parent run is not in that store: every trial's run was rejected there (no
    # experiment of that id) or landed in an unrelated experiment, and nothing said so.
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = omn.create_study("elsewhere", storage=storage, tracking_uri=tracking_uri)
    other = tmp_path / "other.db"
    shutil.copyfile(_migrated_store, other)  # another, empty store
    other_uri = f"sqlite:///{other}"
    # An experiment of the same id there: the runs would have landed in it.
    assert MlflowClient(other_uri).create_experiment("unrelated") == study.experiment_id
    with pytest.raises(ValueError, match=r"other\.db") as raised:
        omn.load_study("elsewhere", storage, tracking_uri=other_uri)
    assert "elsewhere" in str(raised.value) and study.parent_run_id in str(raised.value)
    with pytest.raises(ValueError, match="parent run"):
        omn.create_study("elsewhere", storage=storage, tracking_uri=other_uri,
                         load_if_exists=True)
    assert MlflowClient(other_uri).search_runs([study.experiment_id]) == []


@pytest.mark.parametrize("metric_name", [["only_one"], ["a", "b", "c"]])
def test_metric_names_that_do_not_match_the_directions_are_refused_up_front(
        tmp_path: Path, tracking_uri: str, metric_name: list[str]) -> None:
    # They were taken, then the first trial's record raised: the trial was complete in
    # Optuna with no run, and the parent and a spare run stayed RUNNING.
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    with pytest.raises(ValueError, match="metric_name"):
        omn.create_study("mo", storage=storage, tracking_uri=tracking_uri,
                         directions=["minimize", "minimize"], metric_name=metric_name)
    assert optuna.get_all_study_names(storage) == []
    omn.create_study("mo", storage=storage, tracking_uri=tracking_uri,
                     directions=["minimize", "minimize"])
    with pytest.raises(ValueError, match="metric_name"):
        omn.load_study("mo", storage, tracking_uri=tracking_uri, metric_name=metric_name)
    with pytest.raises(ValueError, match="metric_name"):
        omn.create_study("mo", storage=storage, tracking_uri=tracking_uri,
                         load_if_exists=True, metric_name=metric_name)
    # load_if_exists without directions, the study new: one objective, refused, not kept.
    with pytest.raises(ValueError, match="metric_name"):
        omn.create_study("new", storage=storage, tracking_uri=tracking_uri,
                         load_if_exists=True, metric_name=["a", "b"])
    assert optuna.get_all_study_names(storage) == ["mo"]


@pytest.mark.parametrize("metric_name", ["trial_number", ["a", "a"], ["a@b", "a_b"]])
def test_metric_names_that_would_share_a_key_are_refused_up_front(
        tmp_path: Path, tracking_uri: str, metric_name: str | list[str]) -> None:
    # Each child run logs the trial's number as "trial_number", and MLflow keys replace
    # '@' by '_': these names were taken, and one value silently overwrote another.
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    directions = ["minimize"] * (1 if isinstance(metric_name, str) else 2)
    with pytest.raises(ValueError, match=r"metric_name .*same MLflow key"):
        omn.create_study("clash", storage=storage, tracking_uri=tracking_uri,
                         directions=directions, metric_name=metric_name)
    assert optuna.get_all_study_names(storage) == []
    omn.create_study("clash", storage=storage, tracking_uri=tracking_uri, directions=directions)
    with pytest.raises(ValueError, match=r"metric_name .*same MLflow key"):
        omn.load_study("clash", storage, tracking_uri=tracking_uri, metric_name=metric_name)


def test_a_long_metric_names_intermediate_values_keep_their_suffix_within_mlflows_limit(
        tracking_uri: str) -> None:
    # "<name>_intermediate" went past MLflow's 250 characters: every intermediate value
    # was refused (then retried alone, then named in omn.rejected).
    name = "m" * 245

    def reporting(trial: optuna.Trial) -> float:
        for step in range(3):
            trial.report(float(step), step)
        return 1.0

    study = omn.create_study("long", tracking_uri=tracking_uri, metric_name=name)
    study.optimize(reporting, n_trials=1)
    run = MlflowClient(tracking_uri).get_run(study.child_run_id(0))
    intermediate = [k for k in run.data.metrics if k.endswith("_intermediate")]
    assert len(intermediate) == 1 and len(intermediate[0]) <= 250
    assert intermediate[0].startswith("m" * 200)
    history = MlflowClient(tracking_uri).get_metric_history(run.info.run_id, intermediate[0])
    assert sorted((m.step, m.value) for m in history) == [(0, 0.0), (1, 1.0), (2, 2.0)]
    assert run.data.metrics[name] == 1.0


def test_two_threads_optimizing_one_study_object_leave_each_others_trials_and_parent_alone(
        tracking_uri: str) -> None:
    # Optuna lets two threads run optimize on one study object (its own tests do). The
    # first search to end closed the other's running trial as failed: its run FAILED
    # while Optuna had the trial COMPLETE.
    import threading

    study = omn.create_study("shared", tracking_uri=tracking_uri)
    inside, other_ended = threading.Event(), threading.Event()

    def outlasts_the_other_search(trial: optuna.Trial) -> float:
        inside.set()
        assert other_ended.wait(timeout=60)
        return quadratic(trial)

    first = threading.Thread(target=lambda: study.optimize(outlasts_the_other_search,
                                                           n_trials=1))
    first.start()
    assert inside.wait(timeout=60)
    study.optimize(quadratic, n_trials=2)  # begins and ends while the first one's trial runs
    # Each search ended the parent too: the first to end set it FINISHED while the
    # other's trial still ran. It stays RUNNING until the last search of the object ends.
    client = MlflowClient(tracking_uri)
    assert client.get_run(study.parent_run_id).info.status == "RUNNING"
    other_ended.set()
    first.join(timeout=60)
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 3
    runs = client.search_runs(
        [study.experiment_id], f"tags.mlflow.parentRunId = '{study.parent_run_id}'")
    assert sorted(r.info.status for r in runs) == ["FINISHED"] * 3
    assert sorted(int(r.data.tags["optuna.trial_number"]) for r in runs) == [0, 1, 2]
    parent = client.get_run(study.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.data.metrics["n_complete"] == 3


def test_colliding_param_names_land_under_the_same_keys_whatever_the_suggest_order(
        tracking_uri: str) -> None:
    # "lr@1" and "lr_1" both become "lr_1" in MLflow: the one suggested second got
    # "lr_1-1", so one MLflow column held one param in some trials, the other in others.
    study = omn.create_study("collide", tracking_uri=tracking_uri)

    def objective(trial: optuna.Trial) -> float:
        names = ["lr@1", "lr_1"] if trial.number % 2 == 0 else ["lr_1", "lr@1"]
        values = {name: trial.suggest_float(name, 0, 1) for name in names}
        return values["lr_1"]

    study.optimize(objective, n_trials=4)
    client = MlflowClient(tracking_uri)
    for trial in study.trials:
        params = client.get_run(study.child_run_id(trial.number)).data.params
        assert float(params["lr_1"]) == trial.params["lr_1"]  # the name MLflow takes as is
        assert float(params["lr_1-1"]) == trial.params["lr@1"]
