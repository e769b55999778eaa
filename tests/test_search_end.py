"""The first search of a process: what its end and start cost only the first time.

The end's reads (the parent run, its metric history, the RUNNING children, a pandas
index) compile SQLAlchemy statements and set up pandas once per process; they are made
in a background thread once the first objective runs, and the end waits for that thread.
The tests take each search's thread from ``start_end_reads`` (wrapped, not replaced).
"""

from __future__ import annotations

import os
import threading
import warnings

from mlflow.tracking import MlflowClient
import optuna
import pytest
from tests_support import busy_store

import optuna_mlflow_nested as omn
from optuna_mlflow_nested import _compat
from optuna_mlflow_nested.tracking import warm_up


@pytest.fixture
def started(monkeypatch: pytest.MonkeyPatch) -> list[threading.Thread | None]:
    """What each search's ``start_end_reads`` returned: its thread, or ``None``."""
    from optuna_mlflow_nested.tracking import parent

    returned: list[threading.Thread | None] = []

    def recorded(*args, **kwargs):
        returned.append(warm_up.start_end_reads(*args, **kwargs))
        return returned[-1]

    monkeypatch.setattr(parent, "start_end_reads", recorded)
    return returned


def objective_that_waits_for_the_reads(started: list[threading.Thread | None],
                                       seen: list[tuple[int, bool]]):
    """Each trial waits for the last search's thread; ``seen``: (trial, alive after)."""

    def objective(trial: optuna.Trial) -> float:
        x = trial.suggest_float("x", -1.0, 1.0)
        thread = started[-1] if started else None
        if thread is not None:
            thread.join(timeout=60)
        seen.append((trial.number, thread is not None and thread.is_alive()))
        return x * x

    return objective


def test_the_ends_reads_are_made_while_the_first_trial_runs_and_only_read(
        tracking_uri: str, started: list[threading.Thread | None]) -> None:
    seen: list[tuple[int, bool]] = []
    study = omn.create_study("warm", tracking_uri=tracking_uri, seed=0)
    client = MlflowClient(tracking_uri)
    n_runs = len(client.search_runs([study.experiment_id]))
    metrics_before = client.get_run(study.parent_run_id).data.metrics
    wait = objective_that_waits_for_the_reads(started, seen)

    def objective(trial: optuna.Trial) -> float:
        value = wait(trial)
        if trial.number == 0:  # the reads are done (the thread ended): they wrote nothing
            parent = client.get_run(study.parent_run_id)
            assert parent.data.metrics == metrics_before
            assert "mlflow.note.content" not in parent.data.tags
        return value

    study.optimize(objective, n_trials=3)
    assert len(started) == 1 and started[0] is not None and started[0].name == "omn-warm-up-end"
    # the first trial's wait ended it: the thread did not wait for the end of the search
    assert seen == [(0, False), (1, False), (2, False)]
    assert len(client.search_runs([study.experiment_id])) == n_runs + 3
    assert client.get_run(study.parent_run_id).data.metrics["n_complete"] == 3


def test_the_reads_are_made_once_per_store_and_process(
        tracking_uri: str, started: list[threading.Thread | None]) -> None:
    seen: list[tuple[int, bool]] = []
    first = omn.create_study("first", tracking_uri=tracking_uri, seed=0)
    first.optimize(objective_that_waits_for_the_reads(started, seen), n_trials=1)
    second = omn.create_study("second", tracking_uri=tracking_uri, seed=0)
    second.optimize(objective_that_waits_for_the_reads(started, seen), n_trials=2)
    assert [thread is not None for thread in started] == [True, False]
    assert seen == [(0, False), (0, False), (1, False)]


def test_a_search_that_runs_no_trial_makes_no_reads_and_leaves_them_to_the_next(
        tracking_uri: str, started: list[threading.Thread | None]) -> None:
    seen: list[tuple[int, bool]] = []
    study = omn.create_study("none-yet", tracking_uri=tracking_uri, seed=0)
    study.optimize(objective_that_waits_for_the_reads(started, seen), n_trials=0)
    assert started[0] is not None and not started[0].is_alive()  # ended without its reads
    study.optimize(objective_that_waits_for_the_reads(started, seen), n_trials=1)
    assert len(started) == 2 and started[1] is not None  # the next search made them
    assert seen == [(0, False)]


def test_big_searches_make_no_reads_beside_their_trials(
        tracking_uri: str, started: list[threading.Thread | None]) -> None:
    study = omn.create_study("big", tracking_uri=tracking_uri, seed=0, trial_runs=1)
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=3)
    assert started == []


@pytest.mark.slow  # default suite under 5 min on 2 cores
def test_the_reads_succeed_on_a_database_store_and_a_server(
        tracking_uri: str, mlflow_server) -> None:
    """The thread ignores errors (the end reads again): here they must not happen."""
    for uri in (tracking_uri, mlflow_server.uri):
        study = omn.create_study("reads", tracking_uri=uri, seed=0)
        client = MlflowClient(uri)
        assert warm_up.end_reads(client, study) == 0
        run = client.create_run(study.experiment_id,
                                tags={"mlflow.parentRunId": study.parent_run_id})
        assert warm_up.end_reads(client, study) == 1
        client.set_terminated(run.info.run_id)
        assert warm_up.end_reads(client, study, store=False) == 0


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


FIGURES = {"optimization_history.png", "param_importances.png"}


def _parent_files(study: omn.NestedStudy) -> set[str]:
    assert study.wait_for_figures(timeout=120)
    return {a.path for a in MlflowClient(study.tracking_uri).list_artifacts(study.parent_run_id)}


def _asks_once_then_squares(other_worker: optuna.Study, stop_at: int | None = None):
    """An objective whose first trial makes ``other_worker`` ask a trial and leave it
    RUNNING (another worker's trial, running on); trial ``stop_at`` is a Ctrl-C."""
    def objective(trial: optuna.Trial) -> float:
        if trial.number == 0:
            other_worker.ask()
        if trial.number == stop_at:
            raise KeyboardInterrupt
        return trial.suggest_float("x", -1.0, 1.0) ** 2

    return objective


def _with_another_worker(name: str, tracking_uri: str, tmp_path, plain: bool = False):
    """A study on a SQLite storage file, another worker's handle on it (this project's,
    or plain Optuna's), and the storage URL."""
    storage = f"sqlite:///{tmp_path}/optuna.db"
    study = omn.create_study(name, storage=storage, tracking_uri=tracking_uri, seed=0)
    other = (optuna.load_study(study_name=name, storage=storage) if plain
             else omn.load_study(name, storage, tracking_uri=tracking_uri))
    return study, other, storage


def test_hand_started_workers_leave_the_figures_to_the_last_one_to_end(
        tracking_uri: str, tmp_path) -> None:
    # Workers started by hand on one study each drew the parent's figures over the whole
    # study at the end of their search: the one that ends while another's trial still
    # runs leaves them to that one, whose end draws them over more trials. (Two searches
    # in two threads here, as two processes would run them; each has its own study.)
    storage = f"sqlite:///{tmp_path}/optuna.db"
    first = omn.create_study("shared", storage=storage, tracking_uri=tracking_uri,
                             sampler="random", seed=0)
    second = omn.load_study("shared", storage, tracking_uri=tracking_uri)
    second_running, first_ended = threading.Event(), threading.Event()

    def second_objective(trial: optuna.Trial) -> float:
        second_running.set()
        assert first_ended.wait(timeout=120)  # runs until the first search has ended
        return trial.suggest_float("x", -1.0, 1.0) ** 2

    other = threading.Thread(target=second.optimize, args=(second_objective, 1))

    def first_objective(trial: optuna.Trial) -> float:
        if not other.is_alive() and not second_running.is_set():  # the other worker starts
            other.start()
            assert second_running.wait(timeout=120)
        return trial.suggest_float("x", -1.0, 1.0) ** 2

    first.optimize(first_objective, n_trials=3)
    files = _parent_files(first)
    assert "trials.csv" in files and not files & FIGURES  # the summary, without figures
    first_ended.set()
    other.join(timeout=120)
    assert not other.is_alive()
    assert FIGURES <= _parent_files(second)
    parent = MlflowClient(tracking_uri).get_run(first.parent_run_id)
    assert parent.data.metrics["n_complete"] == 4 and parent.info.status == "FINISHED"


def test_a_plain_optuna_workers_running_trial_does_not_hold_back_the_figures(
        tracking_uri: str, tmp_path) -> None:
    # A plain Optuna worker (or ask without tell) never draws them: not waited for.
    study, plain_worker, _ = _with_another_worker("plain", tracking_uri, tmp_path, plain=True)
    study.optimize(_asks_once_then_squares(plain_worker), n_trials=2)
    assert FIGURES <= _parent_files(study)


def test_an_interrupted_search_draws_its_figures_though_another_workers_trial_runs(
        tracking_uri: str, tmp_path) -> None:
    # A search that did not finish may leave its own trial RUNNING (a Ctrl-C outside the
    # objective): it does not wait for anyone.
    study, other_worker, _ = _with_another_worker("stopped", tracking_uri, tmp_path)
    with pytest.raises(KeyboardInterrupt):  # (trial 1 is the other worker's)
        study.optimize(_asks_once_then_squares(other_worker, stop_at=3), n_trials=5)
    assert FIGURES <= _parent_files(study)


def test_figures_left_to_a_worker_that_was_killed_are_drawn_by_sync(
        tracking_uri: str, tmp_path) -> None:
    from optuna_mlflow_nested.cli import main

    study, killed_worker, storage = _with_another_worker("killed", tracking_uri, tmp_path)
    study.optimize(_asks_once_then_squares(killed_worker), n_trials=2)
    assert not _parent_files(study) & FIGURES
    assert main(["sync", "--spool", str(tmp_path / "spool.jsonl"), "--study-name", "killed",
                 "--storage", storage, "--tracking-uri", tracking_uri]) == 0
    assert FIGURES <= _parent_files(study)


def test_a_trial_left_running_before_the_search_does_not_hold_back_its_figures(
        tracking_uri: str, tmp_path) -> None:
    # A worker that died mid-trial earlier (no heartbeats) left it RUNNING for good.
    study, dead_worker, _ = _with_another_worker("died", tracking_uri, tmp_path)
    dead_worker.ask()
    study.optimize(lambda t: t.suggest_float("x", -1.0, 1.0) ** 2, n_trials=2)
    assert FIGURES <= _parent_files(study)


def test_a_trial_running_far_longer_than_the_others_is_taken_for_a_dead_workers(
        tracking_uri: str) -> None:
    from datetime import datetime
    from datetime import timedelta

    from optuna.trial import FrozenTrial
    from optuna.trial import TrialState

    from optuna_mlflow_nested.tracking.figures import left_to_another_search

    now = datetime.now()

    def trial(started: float, ended: float | None) -> FrozenTrial:
        state = TrialState.RUNNING if ended is None else TrialState.COMPLETE
        return FrozenTrial(
            number=0, trial_id=0, state=state,
            value=None if ended is None else 1.0, values=None, params={}, distributions={},
            datetime_start=now - timedelta(seconds=started), user_attrs={}, system_attrs={},
            datetime_complete=None if ended is None else now - timedelta(seconds=ended),
            intermediate_values={})

    began = (now - timedelta(seconds=600)).timestamp()  # a search of ten minutes
    # (seconds the other trial has run, the longest finished trial, whether it waits)
    for i, (running_for, longest, waits) in enumerate([
            (30, 1, True), (90, 1, False), (90, 10, True),
            (650, 100, False),  # started before the search
            (-3600, 1, False)]):  # an hour in the future: another host's clock
        study = omn.create_study(f"window-{i}", tracking_uri=tracking_uri)
        study.add_trial(trial(300, 300 - longest))
        study.add_trial(trial(running_for, None))  # (a run: asked through this project)
        assert left_to_another_search(study, began, "FINISHED") is waits, (running_for, longest)
        assert not left_to_another_search(study, began, "KILLED")


@pytest.mark.parametrize("table", ["metrics", "runs"])
def test_the_parents_start_and_end_wait_out_a_busy_store_and_print_no_traceback(
        tracking_uri: str, table: str, capfd: pytest.CaptureFixture[str]) -> None:
    # SQLite refuses a write while another process holds its lock ("database is locked"
    # after MLflow's 20 s busy timeout). The parent's writes at a search's start and end
    # were tried once: the parent was left without its summary, or RUNNING, or FINISHED
    # through the next search, with MLflow's traceback printed. Here a real "database
    # is locked", raised by the SQLite driver for the parent's first write to ``table``
    # in each search (metrics: the summary; runs: its reopening, then its status).
    study = omn.create_study("busy", tracking_uri=tracking_uri, sampler="random", seed=0)
    searches = 1
    with warnings.catch_warnings(record=True) as caught, busy_store(
            table, study.parent_run_id, lambda: searches) as refused:
        warnings.simplefilter("always")
        for searches in (1, 2):
            study.optimize(lambda t: t.suggest_float("x", -1, 1) ** 2, n_trials=3)
            assert len(refused) == searches, "no write refused: the test tests nothing"
            parent = MlflowClient(tracking_uri).get_run(study.parent_run_id)
            assert parent.info.status == "FINISHED"
            assert parent.data.metrics["n_trials"] == 3 * searches
    assert not [str(w.message) for w in caught if "parent run" in str(w.message)]
    err = capfd.readouterr().err
    assert "Traceback" not in err and "could not update the parent run" not in err, err


def test_a_store_that_refuses_for_good_is_not_waited_for(tracking_uri: str,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    # MLflow gives every SQL OperationalError the code of a busy store: a read-only file
    # was waited for until OMN_RETRY_DEADLINE, at the search's start and again at its end.
    monkeypatch.setenv("OMN_RETRY_DEADLINE", "20")
    study = omn.create_study("read-only", tracking_uri=tracking_uri, sampler="random", seed=0)
    with busy_store("metrics", study.parent_run_id, lambda: 10**6,
                    error="attempt to write a readonly database") as refused, pytest.warns(
            RuntimeWarning, match=r"could not update the parent run (?s:.*)readonly"):
        study.optimize(lambda t: t.suggest_float("x", -1, 1) ** 2, n_trials=2)
    assert len(refused) == 1, "tried again"


def test_a_summary_written_again_after_a_busy_store_adds_no_metric_rows(
        tracking_uri: str) -> None:
    # MLflow commits a batch's metrics and its tags in separate transactions: when the
    # tags were refused, the summary was written again with a new timestamp, and its
    # counts (n_trials, n_complete, ...) got a second row each in their history.
    study = omn.create_study("busy-tags", tracking_uri=tracking_uri, sampler="random", seed=0)
    ending = False

    def objective(trial: optuna.Trial) -> float:
        nonlocal ending
        ending = trial.number == 2  # the parent's next tag write is the summary's
        return trial.suggest_float("x", -1, 1) ** 2

    with busy_store("tags", study.parent_run_id, lambda: int(ending)) as refused:
        study.optimize(objective, n_trials=3)
    assert refused, "no write refused: the test tests nothing"
    client = MlflowClient(tracking_uri)
    for name in ("n_trials", "n_complete"):
        assert [m.value for m in client.get_metric_history(study.parent_run_id, name)] == [3.0]

