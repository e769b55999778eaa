"""The writer process (the default outside executor workers; OMN_WRITER=process forces
it): trial writes outside the objective's interpreter, the rate warning, and what is
promised when the objective's process is killed (issue 16)."""

from __future__ import annotations

import os
from pathlib import Path
import re
import signal
import subprocess
import sys
import textwrap
import time

from mlflow.entities import ViewType
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


def _assert_one_run_per_trial_and_none_running(study: omn.NestedStudy, tracking_uri: str,
                                               n_trials: int) -> None:
    runs = study.child_runs()
    assert runs["tags.optuna.trial_number"].notna().all(), runs[["run_id", "tags.mlflow.runName"]]
    assert sorted(int(n) for n in runs["tags.optuna.trial_number"]) == list(range(n_trials))
    client = MlflowClient(tracking_uri)
    everything = client.search_runs([study.experiment_id], run_view_type=3)
    assert "RUNNING" not in {r.info.status for r in everything}


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
    _assert_one_run_per_trial_and_none_running(study, tracking_uri, 4)


SCRIPT = textwrap.dedent("""
    import os, sys, time, optuna
    import optuna_mlflow_nested as omn

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = omn.create_study("killed", tracking_uri=sys.argv[1], storage=sys.argv[2],
                             sampler="random", seed=0)

    def objective(trial):
        if trial.number == 6:
            from optuna_mlflow_nested.tracking.writer_process import WriterProcess

            print("SIXTH", WriterProcess.get().pid, flush=True)
            time.sleep(600)  # killed here
        return trial.suggest_float("x", -1, 1) ** 2

    study.optimize(objective, n_trials=10)
""")


def _exited(pid: int) -> bool:
    """Whether process ``pid`` has ended (a zombie waiting for init to reap it counts)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (FileNotFoundError, ProcessLookupError):
        return True


@pytest.mark.slow
def test_sigkill_after_tell_loses_no_told_trial(tmp_path: Path, tracking_uri: str) -> None:
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    proc = subprocess.Popen([sys.executable, str(script), tracking_uri, storage],
                            stdout=subprocess.PIPE, text=True, start_new_session=True,
                            env={k: v for k, v in os.environ.items() if k != "OMN_WRITER"})
    writer = None
    try:
        assert proc.stdout is not None
        word, pid = proc.stdout.readline().split()
        assert word == "SIXTH"
        writer = int(pid)
        proc.send_signal(signal.SIGKILL)  # the objective's process only, not the writer
        proc.wait(timeout=30)
        deadline = time.monotonic() + 90  # it delivers, sees the pipe closed, and exits
        while not _exited(writer) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _exited(writer), "the writer process outlived its program"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        if writer is not None and not _exited(writer):
            os.killpg(writer, signal.SIGKILL)  # its own session
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


STARTING_SCRIPT = textwrap.dedent("""
    import os, signal, sys, mlflow, optuna
    import optuna_mlflow_nested as omn
    from optuna_mlflow_nested.tracking.writer_process import WriterProcess

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = omn.create_study("starting", tracking_uri=sys.argv[1], sampler="random", seed=0)
    writer = WriterProcess.get()._proc.pid
    os.kill(writer, signal.SIGSTOP)  # the writer process is still starting up

    def objective(trial):
        if trial.number == 5:
            print("READY", WriterProcess.get().ready, flush=True)
            os.kill(writer, signal.SIGCONT)
            os.kill(os.getpid(), signal.SIGKILL)
        mlflow.log_metric("inside", trial.number)
        return trial.suggest_float("x", -1, 1) ** 2

    study.optimize(objective, n_trials=10)
""")


def _run_script(tmp_path: Path, text: str, tracking_uri: str) -> subprocess.CompletedProcess[str]:
    """``text`` run as a fresh program (its own writer process, the default writer)."""
    script = tmp_path / "program.py"
    script.write_text(text)
    return subprocess.run([sys.executable, str(script), tracking_uri], capture_output=True,
                          text=True, timeout=240,
                          env={k: v for k, v in os.environ.items() if k != "OMN_WRITER"})


AHEAD_SCRIPT = textwrap.dedent("""
    import os, signal, sys, threading, mlflow, optuna
    import optuna_mlflow_nested as omn
    from optuna_mlflow_nested.tracking import tracker
    from optuna_mlflow_nested.tracking.writer_process import WriterProcess

    made_on = []
    create = tracker.TrialTracker._create_run

    def recorded(self):
        made_on.append(threading.current_thread().name)
        return create(self)

    tracker.TrialTracker._create_run = recorded
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = omn.create_study("ahead", tracking_uri=sys.argv[1], sampler="random", seed=0)
    writer = WriterProcess.get()._proc.pid
    os.kill(writer, signal.SIGSTOP)  # still starting up for the first six trials

    def objective(trial):
        if trial.number == 6:
            print("READY", WriterProcess.get().ready, flush=True)
            os.kill(writer, signal.SIGCONT)
        mlflow.log_metric("inside", trial.number)  # the trial's run is the active run
        return trial.suggest_float("x", -1, 1) ** 2

    study.optimize(objective, n_trials=12)
    print("ON_THE_TRIALS_THREAD", made_on.count(threading.current_thread().name))
    print("MADE_HERE", len(made_on))
""")


@pytest.mark.slow
def test_runs_of_the_first_trials_are_made_ahead_while_the_writer_process_starts(
        tmp_path: Path, tracking_uri: str) -> None:
    # While the writer process of a fresh program starts (seconds of imports, then
    # opening the store), a trial used to make its own run on its own path. A thread
    # makes them ahead now; the budget still gets exactly one run per trial.
    done = _run_script(tmp_path, AHEAD_SCRIPT, tracking_uri)
    assert done.returncode == 0, done.stderr[-3000:]
    said = dict(line.split(" ", 1) for line in done.stdout.splitlines())
    assert said["READY"] == "False"  # six trials ran before it was up
    assert said["ON_THE_TRIALS_THREAD"] == "0"
    assert 6 <= int(said["MADE_HERE"]) <= 12
    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("ahead")
    runs = client.search_runs([experiment.experiment_id], "tags.`optuna.role` = 'trial'")
    assert sorted(r.data.metrics["inside"] for r in runs) == list(range(12))
    assert sorted(r.info.run_name for r in runs) == sorted(f"trial-{n}" for n in range(12))
    assert {r.info.status for r in runs} == {"FINISHED"}
    # The parent and one run per trial, also counting deleted runs: no spare was made
    # (the writer process used to make one more as it came up, deleted at close).
    everything = client.search_runs([experiment.experiment_id], run_view_type=ViewType.ALL)
    assert len(everything) == 13


@pytest.mark.slow
def test_trials_run_while_the_writer_process_starts_and_nothing_is_lost_if_killed(
        tmp_path: Path, tracking_uri: str) -> None:
    # The first trials of a fresh process do not wait for the writer process's imports
    # (seconds): their runs are made here, their records wait in the pipe. When the
    # objective's process is killed before the writer process is up, the writer process
    # found its parent gone when it said it was ready, and died with the records unread.
    done = _run_script(tmp_path, STARTING_SCRIPT, tracking_uri)
    assert done.returncode == -signal.SIGKILL, done.stderr[-3000:]
    assert done.stdout.split() == ["READY", "False"]  # five trials ran before it was up
    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("starting")
    deadline = time.monotonic() + 120  # the writer process delivers after its parent died
    while True:
        runs = client.search_runs([experiment.experiment_id], "attributes.status = 'FINISHED'")
        if len(runs) >= 5 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert sorted(r.data.metrics["inside"] for r in runs) == [0, 1, 2, 3, 4]
    assert sorted(r.info.run_name for r in runs) == [f"trial-{n}" for n in range(5)]


@pytest.mark.slow
@pytest.mark.parametrize("writer", ["process", "threads"])
def test_trials_faster_than_the_store_are_named_at_run_time_and_nothing_is_lost(
        tracking_uri: str, monkeypatch: pytest.MonkeyPatch, writer: str) -> None:
    # An instant objective on a SQLite store: trials end far faster than the store
    # writes runs. One warning says so during the search (with both rates), once per
    # optimize; every trial still gets its run by the time optimize returns.
    monkeypatch.setenv("OMN_WRITER", writer)
    study = omn.create_study(f"fast-{writer}", tracking_uri=tracking_uri, sampler="random", seed=0)
    with pytest.warns(RuntimeWarning, match="trials end faster than the tracking store") as seen:
        # 500 (was 250, and in one CI run writer threads kept the backlog under
        # LAG_BACKLOG): trials ending 1.15x as fast as the store writes now suffice
        study.optimize(_quadratic, n_trials=500)
    lag = [w for w in seen if "trials end faster" in str(w.message)]
    assert len(lag) == 1
    assert "runs/s" in str(lag[0].message) and "mlflow server" in str(lag[0].message)
    # Both rates measured: the writer process used to report before its first write
    # ended, as "about 0.0 runs/s".
    store_rate = re.search(r"the store writes about (\d+\.\d) runs/s", str(lag[0].message))
    assert store_rate is not None and float(store_rate.group(1)) > 0
    runs = study.child_runs()
    assert sorted(int(n) for n in runs["tags.optuna.trial_number"]) == list(range(500))
    assert set(runs["status"]) == {"FINISHED"}


@pytest.mark.slow  # default suite under 5 min on 2 cores
def test_a_search_the_store_keeps_up_with_gets_no_rate_warning(
        tracking_uri: str, recwarn: pytest.WarningsRecorder) -> None:
    # More trials than the backlog that counts as falling behind (so the warning could
    # be said), each longer than a SQLite write (about 25 ms), so the writer keeps up.
    from optuna_mlflow_nested.tracking.writer import LAG_BACKLOG

    def slower_than_a_write(trial: optuna.Trial) -> float:
        time.sleep(0.06)
        return _quadratic(trial)

    study = omn.create_study("slow-enough", tracking_uri=tracking_uri, sampler="random", seed=0)
    study.optimize(slower_than_a_write, n_trials=LAG_BACKLOG + 16)
    assert not [w for w in recwarn if "trials end faster" in str(w.message)]


def test_a_writer_behind_before_its_first_write_names_no_store_rate(
        tracking_uri: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The rate warning's figures come from the writes done so far. Trials can fall
    # LAG_BACKLOG behind before the first write ends (an instant objective with the
    # writer process, or a store locked, as here): the message then said "the store
    # writes about 0.0 runs/s", a rate never measured.
    import sqlite3

    from optuna_mlflow_nested.tracking import writer as writer_module
    from optuna_mlflow_nested.tracking.delivery import RetryPolicy
    from optuna_mlflow_nested.tracking.records import RunRecord
    from optuna_mlflow_nested.tracking.spool import Spool
    from optuna_mlflow_nested.tracking.writer import LAG_BACKLOG
    from optuna_mlflow_nested.tracking.writer import Writer

    # An hour's grace while the backlog is made (no write can end: the store is locked).
    monkeypatch.setattr(writer_module, "SLOW_START_S", 3600.0)
    client = MlflowClient(tracking_uri)
    experiment_id = client.create_experiment("behind")
    writer = Writer(client, 1, Spool(tmp_path / "spool.jsonl"), RetryPolicy())
    holder = sqlite3.connect(tracking_uri.removeprefix("sqlite:///"), isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")  # the first write waits (busy timeout) for it
    try:
        for number in range(LAG_BACKLOG + 1):
            writer.put(RunRecord(
                tracking_uri=tracking_uri, experiment_id=experiment_id, parent_run_id=None,
                study_name="behind", trial_number=number, run_id=None,
                run_name=f"trial-{number}", status="FINISHED", end_time=int(time.time() * 1000),
                params={"x": str(number)}))
        # No write has ended: nothing is reported until SLOW_START_S after the start.
        early = writer.lag()
        monkeypatch.setattr(writer_module, "SLOW_START_S", 1.0)  # (5 s by default)
        deadline = time.monotonic() + 15  # the store's lock holds out 20 s (busy timeout)
        while (lag := writer.lag()) is None and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert writer.close(timeout=120)
    assert early is None
    assert lag is not None and lag.backlog >= LAG_BACKLOG and lag.store_runs_per_s is None
    assert lag.since_start_s >= writer_module.SLOW_START_S
    message = lag.message(tracking_uri)
    assert "about 0.0 runs/s" not in message
    assert "no run written yet" in message and "mlflow server" in message
    runs = client.search_runs([experiment_id], max_results=1000)
    assert sorted(int(r.data.params["x"]) for r in runs) == list(range(LAG_BACKLOG + 1))


LOCKED_SCRIPT = textwrap.dedent("""
    import sqlite3, sys, threading, time, optuna
    import optuna_mlflow_nested as omn

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    uri = sys.argv[1]
    study = omn.create_study("locked", tracking_uri=uri, sampler="random", seed=0)

    def objective(trial):
        if trial.number == 1:
            # Another process's long write: longer than MLflow's 20 s busy timeout.
            holder = sqlite3.connect(uri[len("sqlite:///"):], check_same_thread=False)
            holder.execute("BEGIN EXCLUSIVE")
            threading.Timer(25, lambda: (holder.commit(), holder.close())).start()
        return trial.suggest_float("x", -1, 1) ** 2

    study.optimize(objective, n_trials=4)
    runs = study.child_runs()
    print("RUNS", len(runs), sorted(set(runs["status"])))
""")


@pytest.mark.slow
@pytest.mark.parametrize("writer", ["process", "threads"])
def test_a_store_write_that_was_retried_and_landed_prints_no_traceback(
        tmp_path: Path, tracking_uri: str, writer: str) -> None:
    # SQLite refuses a write while another connection holds its lock ("database is
    # locked" after MLflow's busy timeout); the writer retries it and it lands. MLflow
    # logs each failed attempt with its traceback: on stderr, that reads as data lost.
    script = tmp_path / "locked.py"
    script.write_text(LOCKED_SCRIPT)
    done = subprocess.run([sys.executable, str(script), tracking_uri], capture_output=True,
                          text=True, timeout=240, env={**os.environ, "OMN_WRITER": writer})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "RUNS 4 ['FINISHED']" in done.stdout
    assert "Traceback" not in done.stderr, done.stderr[-3000:]


@pytest.mark.slow
def test_no_spare_run_outlives_a_session_that_closes_right_after_its_last_trial(
        tracking_uri: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # The writer process pushes a new spare run as soon as a trial takes one; when the
    # search ends at once, that push races with the session's close. The parent listed
    # the spare runs it held before the new one arrived: it was never deleted and
    # stayed RUNNING as a child run without a trial.
    monkeypatch.setenv("OMN_WRITER", "process")
    study = omn.create_study("short", tracking_uri=tracking_uri, sampler="random", seed=0)
    for _ in range(10):
        study.optimize(_quadratic, n_trials=1)
    _assert_one_run_per_trial_and_none_running(study, tracking_uri, 10)


FIGURES_SCRIPT = textwrap.dedent("""
    import os, signal, sys, optuna
    import optuna_mlflow_nested as omn
    from optuna_mlflow_nested.tracking.writer_process import WriterProcess

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = omn.create_study("figs", tracking_uri=sys.argv[1], sampler="random", seed=0)
    study.optimize(lambda t: t.suggest_float("x", -1, 1) ** 2 + t.suggest_float("y", 0, 1),
                   n_trials=8)
    print("PARENT", study.parent_run_id)
    print("WRITER", WriterProcess.get()._proc.pid)
    print("MATPLOTLIB", "matplotlib" in sys.modules, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)  # right after optimize returned
""")


def _wait_until_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
            # An orphan whose new parent does not reap it stays a zombie: gone too.
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                return True
        except (ProcessLookupError, FileNotFoundError):
            return True
        time.sleep(0.1)
    return False


@pytest.mark.slow
def test_the_writer_process_draws_the_parents_figures(tmp_path: Path, tracking_uri: str) -> None:
    # Matplotlib never loads in the objective's process: its import and the drawing
    # (the slowest part of the parent's summary) happen in the writer process, which
    # optimize does not wait for. They land even when the objective's process is killed
    # right after optimize returns: the writer process finishes them, then exits.
    done = _run_script(tmp_path, FIGURES_SCRIPT, tracking_uri)
    assert done.returncode == -signal.SIGKILL, done.stderr[-3000:]
    said = dict(line.split(" ", 1) for line in done.stdout.splitlines())
    assert said["MATPLOTLIB"] == "False", done.stdout
    assert _wait_until_gone(int(said["WRITER"]), 120)
    names = {a.path for a in MlflowClient(tracking_uri).list_artifacts(said["PARENT"])}
    assert {"optimization_history.png", "param_importances.png", "trials.csv"} <= names
    assert "could not draw" not in done.stderr


ENDING_SCRIPT = textwrap.dedent("""
    import sys, optuna
    import optuna_mlflow_nested as omn
    from optuna_mlflow_nested.tracking.writer_process import WriterProcess

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = omn.create_study("ends", tracking_uri=sys.argv[1], sampler="random", seed=0)
    study.optimize(lambda t: t.suggest_float("x", -1, 1) ** 2, n_trials=4)
    print("PARENT", study.parent_run_id)
    print("WRITER", WriterProcess.get()._proc.pid, flush=True)
""")


@pytest.mark.slow  # default suite under 5 min on 2 cores
def test_a_program_that_ends_leaves_its_sqlite_store_closed(tmp_path: Path,
                                                            tracking_uri: str) -> None:
    # The writer process skips its interpreter's last garbage collections at exit (most
    # of a second the program waits for), after closing its database connections: the
    # store is left as a closed SQLite file, its WAL checkpointed and removed, so the
    # .db file alone holds every run (as a copy of it would).
    done = _run_script(tmp_path, ENDING_SCRIPT, tracking_uri)
    assert done.returncode == 0, done.stderr[-3000:]
    said = dict(line.split(" ", 1) for line in done.stdout.splitlines())
    assert _wait_until_gone(int(said["WRITER"]), 30)  # the program waited for its end
    database = Path(tracking_uri.removeprefix("sqlite:///"))
    assert sorted(p.name for p in database.parent.glob(database.name + "-*")) == []
    client = MlflowClient(tracking_uri)
    names = {a.path for a in client.list_artifacts(said["PARENT"])}
    assert {"optimization_history.png", "param_importances.png"} <= names
    runs = client.search_runs([client.get_run(said["PARENT"]).info.experiment_id],
                              f"tags.mlflow.parentRunId = '{said['PARENT']}'")
    assert len(runs) == 4


_WRITERS_SEEN: list[bool] = []


def _note_writer(trial: optuna.Trial) -> float:
    from optuna_mlflow_nested.tracking.process_session import uses_writer_process

    _WRITERS_SEEN.append(uses_writer_process())
    return trial.suggest_float("x", -1, 1) ** 2


@pytest.mark.slow
def test_executor_workers_write_from_threads_and_the_caller_from_the_writer_process(
        tmp_path: Path, tracking_uri: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # One worker per core: a writer process each would add a busy process per core
    # (benchmarks/RESULTS.md), so by default only the calling process has one.
    from concurrent.futures import ThreadPoolExecutor

    from optuna_mlflow_nested.tracking.process_session import uses_writer_process

    monkeypatch.delenv("OMN_WRITER", raising=False)
    _WRITERS_SEEN.clear()
    study = omn.create_study("auto", storage=f"sqlite:///{tmp_path / 'optuna.db'}",
                             tracking_uri=tracking_uri, sampler="random", seed=0)
    study.optimize(_note_writer, n_trials=2)
    with ThreadPoolExecutor(2) as pool:
        study.optimize(_note_writer, n_trials=4, executor=pool)
    assert _WRITERS_SEEN == [True] * 2 + [False] * 4
    assert uses_writer_process()  # the worker's setting ended with its task
    monkeypatch.setenv("OMN_WRITER", "process")
    _WRITERS_SEEN.clear()
    with ThreadPoolExecutor(2) as pool:
        study.optimize(_note_writer, n_trials=2, executor=pool)
    assert _WRITERS_SEEN == [True] * 2
    assert sorted(int(n) for n in study.child_runs()["tags.optuna.trial_number"]) == list(range(8))


def test_figures_of_a_store_removed_after_optimize_are_dropped_at_once(
        tmp_path: Path, tracking_uri: str) -> None:
    # A program that runs its search in a temporary folder removes the folder as soon
    # as optimize returns, while the writer process may still be about to draw the
    # parent's figures. Opening the removed SQLite file made MLflow retry for about
    # 100 s (the program waiting at exit for its writer process) and then create the
    # folder again, with an empty store in it.
    from optuna_mlflow_nested.tracking.figures import trials_snapshot
    from optuna_mlflow_nested.tracking.writer_process import WriterProcess

    study = omn.create_study("removed", tracking_uri=tracking_uri, sampler="random", seed=0)
    study.optimize(lambda t: t.suggest_float("x", -1, 1) ** 2, n_trials=3)
    process = WriterProcess.get()
    assert process.wait_ready()
    removed = tmp_path / "removed"
    token = process.submit("figures", f"sqlite:///{removed / 'mlflow.db'}", study.parent_run_id,
                           trials_snapshot(study))
    assert process.reply(token, timeout=30) is True  # nothing left to draw on
    assert not removed.exists()


def test_a_sqlite_uri_with_a_query_names_its_file_without_the_query(
        tmp_path: Path, tracking_uri: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # "?timeout=30" is not part of the file's name. With it, opening the store made an
    # empty "mlflow.db?timeout=30" beside the store (and its lock), put that file in WAL
    # mode instead, and the figures were dropped if that file was not there.
    monkeypatch.setenv("OMN_WRITER", "process")
    uri = f"{tracking_uri}?timeout=30"
    study = omn.create_study("query", tracking_uri=uri, sampler="random", seed=0)
    study.optimize(lambda t: t.suggest_float("x", -1, 1) ** 2, n_trials=3)
    assert study.wait_for_figures(timeout=120)
    names = {a.path for a in MlflowClient(uri).list_artifacts(study.parent_run_id)}
    assert {"optimization_history.png", "param_importances.png"} <= names
    assert not [p.name for p in tmp_path.iterdir() if "?" in p.name]


@pytest.mark.slow  # 3-5 s each: the default suite under 5 min on 2 cores
@pytest.mark.parametrize(("when", "n_jobs"), [("mid-search", 1), ("mid-search", 2),
                                              ("after the last hand-off", 1),
                                              ("stopped early", 1)])
def test_a_writer_process_killed_mid_search_loses_no_trial(
        tracking_uri: str, monkeypatch: pytest.MonkeyPatch, when: str, n_jobs: int) -> None:
    # The writer process is SIGKILLed (the OOM killer, a `pkill python`): mid-search, the
    # first trial to hand it a record used to raise BrokenPipeError out of optimize,
    # leaving the study short of its budget and runs RUNNING; after the last hand-off,
    # optimize's close raised it. Now the search goes on writing from threads; what the
    # writer process held (records, spare runs) is rebuilt from Optuna's storage or deleted.
    # Stopped early (study.stop()), the budget left spare runs for close to delete.
    import mlflow

    from optuna_mlflow_nested.tracking.writer_process import WriterProcess

    def kill_the_writer_process() -> None:
        writer = WriterProcess.get()._proc
        writer.send_signal(signal.SIGKILL)
        writer.wait()

    client = MlflowClient(tracking_uri)
    spares_at_the_kill: list[int] = []

    def spare_runs() -> int:  # made ahead, no trial's yet
        pending = client.search_runs([study.experiment_id], "attributes.run_name = "
                                     "'trial-pending' and attributes.status = 'RUNNING'")
        taken = set(study.run_ids().values())
        return len([r for r in pending if r.info.run_id not in taken])

    def wait_for_spares() -> None:
        # One spare at most is pushed to this process: two or more means the writer
        # process dies with spares it made and had not pushed yet.
        deadline = time.monotonic() + 60
        while spare_runs() < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        spares_at_the_kill.append(spare_runs())

    def objective(trial: optuna.Trial) -> float:
        x = trial.suggest_float("x", -1, 1)
        mlflow.log_metric("inside", x)
        if trial.number == 5 and when == "mid-search":
            if n_jobs == 1:  # (two threads of instant trials take every spare at once)
                wait_for_spares()
            kill_the_writer_process()
        return x * x

    def after_the_last(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if trial.number == 15 and when == "after the last hand-off":
            kill_the_writer_process()  # its record was handed off before this callback
        if trial.number == 5 and when == "stopped early":
            wait_for_spares()
            kill_the_writer_process()  # only optimize's close finds it dead
            study.stop()

    monkeypatch.setenv("OMN_WRITER", "process")
    # A writer process that is up: the runs come from its pool (some made, not pushed yet).
    omn.create_study("warm-up", tracking_uri=tracking_uri).optimize(_quadratic, n_trials=2)
    study = omn.create_study(f"writer-killed-{when[:3]}-{n_jobs}", tracking_uri=tracking_uri,
                             sampler="random", seed=0)
    with pytest.warns(RuntimeWarning, match="writer process .*died") as seen:
        study.optimize(objective, n_trials=16, n_jobs=n_jobs, callbacks=[after_the_last])
    assert len([w for w in seen if "died" in str(w.message)]) == 1
    if n_jobs == 1 and when != "after the last hand-off":
        assert spares_at_the_kill == [2]
    n_trials = 6 if when == "stopped early" else 16
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * n_trials
    runs = study.child_runs()
    assert runs["tags.optuna.trial_number"].notna().all(), "a spare run was left"
    numbers = [int(n) for n in runs["tags.optuna.trial_number"]]
    assert sorted(numbers) == list(range(n_trials))
    assert set(runs["status"]) == {"FINISHED"}
    xs = [study.trials[n].params["x"] for n in numbers]
    assert runs["metrics.inside"].tolist() == pytest.approx(xs)
    assert runs["params.x"].astype(float).tolist() == pytest.approx(xs)
    assert runs["metrics.value"].tolist() == pytest.approx([x * x for x in xs])
    client = MlflowClient(tracking_uri)
    everything = client.search_runs([study.experiment_id], run_view_type=ViewType.ALL)
    assert "RUNNING" not in {r.info.status for r in everything}
    assert client.get_run(study.parent_run_id).info.status == "FINISHED"


def test_a_writer_process_that_dies_as_the_search_begins_leaves_the_search_to_threads(
        tracking_uri: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # The writer process can die between WriterProcess.get(), which found it alive, and
    # the session's "open" message (SIGKILLed in that window here): optimize used to
    # raise out of its start, the parent run FAILED and no trial ran.
    from optuna_mlflow_nested.tracking.writer_process import WriterProcess

    real_get = WriterProcess.get.__func__  # type: ignore[attr-defined]
    killed: list[int] = []

    def get_then_killed(cls: type[WriterProcess]) -> WriterProcess:
        process = real_get(cls)
        if armed:
            process._proc.send_signal(signal.SIGKILL)
            process._proc.wait()
            killed.append(process.pid)
        return process

    monkeypatch.setenv("OMN_WRITER", "process")
    armed = False  # not while create_study starts the writer process ahead
    monkeypatch.setattr(WriterProcess, "get", classmethod(get_then_killed))
    study = omn.create_study("writer-dies-at-start", tracking_uri=tracking_uri,
                             sampler="random", seed=0)
    armed = True
    with pytest.warns(RuntimeWarning, match="writer process .*died") as seen:
        study.optimize(_quadratic, n_trials=6)
    armed = False
    assert killed and len([w for w in seen if "died" in str(w.message)]) == 1
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 6
    _assert_one_run_per_trial_and_none_running(study, tracking_uri, 6)
    assert set(study.child_runs()["status"]) == {"FINISHED"}
    client = MlflowClient(tracking_uri)
    assert client.get_run(study.parent_run_id).info.status == "FINISHED"
    # The next search has a writer process again.
    study.optimize(_quadratic, n_trials=2)
    assert WriterProcess.get().alive() and WriterProcess.get().pid not in killed
    _assert_one_run_per_trial_and_none_running(study, tracking_uri, 8)


def test_a_run_given_back_counts_in_the_budget_the_threads_take_over(
        tracking_uri: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # If the writer process dies, the threads' run pool is sized by ProcessSession's
    # budget_left. A run a failed ask gave back was counted as handed out, so the
    # threads made one run fewer than the budget needed (and a trial made its own).
    from optuna_mlflow_nested.tracking.process_session import ProcessSession
    from optuna_mlflow_nested.tracking.tracker import TrialTracker

    monkeypatch.setenv("OMN_WRITER", "process")
    study = omn.create_study("given-back", tracking_uri=tracking_uri)
    tracker = TrialTracker(tracking_uri=tracking_uri, experiment_id=study.experiment_id,
                           parent_run_id=study.parent_run_id, study_name="given-back")
    tracker.start(n_jobs=1, n_trials=3)
    try:
        session = tracker._pool
        assert isinstance(session, ProcessSession)
        run = tracker.take_run()
        assert run is not None and session.budget_left == 2
        tracker.give_back(run)
        assert session.budget_left == 3
        assert tracker.take_run() is run and session.budget_left == 2
    finally:
        tracker.stop()


def test_a_store_removed_before_the_writer_process_opened_it_is_not_made_again(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A study made in a temporary folder removed soon after (a script, a benchmark
    # round): a fresh writer process read the study's "prepare" only after the folder was
    # gone, and opening the store made the folder and a new, migrated mlflow.db again,
    # left behind after the program ended.
    import shutil

    from optuna_mlflow_nested.tracking.writer_process import WriterProcess

    monkeypatch.setenv("OMN_WRITER", "process")
    old = WriterProcess.get()._proc
    old.kill()  # the next study starts a fresh (cold) writer process and prepares it
    old.wait()
    folder = tmp_path / "removed-soon"
    omn.create_study("removed-soon", tracking_uri=f"sqlite:///{folder / 'mlflow.db'}")
    process = WriterProcess.get()
    assert process.pid != old.pid and not process.ready  # the prepare waits in its pipe
    shutil.rmtree(folder)
    # Answered after every message sent before it, the prepare included.
    assert process.request("flush", "no-such-session", timeout=120) is True
    assert not folder.exists()


def test_figures_of_a_store_the_writer_process_has_open_are_dropped_once_it_is_removed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # As above, for the usual case: the writer process opened the store for the search
    # (its client is cached), and the folder is removed right after optimize returned.
    import shutil

    from optuna_mlflow_nested.tracking.figures import trials_snapshot
    from optuna_mlflow_nested.tracking.writer_process import WriterProcess

    monkeypatch.setenv("OMN_WRITER", "process")
    folder = tmp_path / "removed-after"
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    study = omn.create_study("removed-after", tracking_uri=uri, sampler="random", seed=0)
    study.optimize(lambda t: t.suggest_float("x", -1, 1) ** 2, n_trials=3)
    assert study.wait_for_figures(timeout=120)
    other = MlflowClient(uri).create_run(study.experiment_id).info  # figures not drawn yet
    shutil.rmtree(folder)
    process = WriterProcess.get()
    token = process.submit("figures", uri, other.run_id, trials_snapshot(study))
    assert process.reply(token, timeout=30) is True  # nothing left to draw on
    assert not folder.exists()
    # Drawn anyway, through the connection still open on the removed file, they were
    # logged where the store keeps artifacts (here, under the working directory).
    assert not [p for p in Path.cwd().rglob("*.png") if other.run_id in str(p)]


def test_a_sqlite_uri_names_the_file_sqlalchemy_opens() -> None:
    # A percent-encoded path ("a%20b") is the folder "a b" to SQLAlchemy: the writer
    # process looked for "a%20b", found no file, and refused to open the store.
    from optuna_mlflow_nested.tracking.clients import sqlite_path

    assert sqlite_path("sqlite:////tmp/a%20b/mlflow.db?timeout=30") == Path("/tmp/a b/mlflow.db")
    assert sqlite_path("sqlite:///mlflow.db") == Path("mlflow.db")
    assert sqlite_path("sqlite:///:memory:") is None and sqlite_path("sqlite://") is None
    assert sqlite_path("http://127.0.0.1:5000") is None
