"""Randomized faults (issue 12, "Done when"): several workers and repeated `sync` runs
against a tracking server that is SIGKILLed and restarted at random moments, workers
SIGKILLed and SIGTERMed at random; after one last `sync`, Optuna and MLflow agree.

Real components only: a real ``mlflow server`` on 127.0.0.1 (restarted on the same port
and backend store), worker processes calling :func:`optuna_mlflow_nested.create_study`
and ``optimize`` on a shared SQLite Optuna storage with heartbeats, and the
``optuna-mlflow-nested sync`` command. The tracking URI carries a password
(``http://u:<password>@...``; the server ignores basic auth) that must show nowhere.

Each fault schedule is drawn from ``random.Random(seed)``. The seeds are
``OMN_FAULT_SEEDS`` (comma-separated, default ``1,2,3``); no new schedule starts once
``OMN_FAULT_BUDGET`` seconds (default 100) are likely to be exceeded, and at least two
always run. The number of schedules and their events is printed.
"""

from __future__ import annotations

from collections import Counter
import contextlib
import dataclasses
import os
from pathlib import Path
import random
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
import warnings

from conftest import MlflowServer
from mlflow.entities import ViewType
from mlflow.tracking import MlflowClient
import optuna
from optuna.trial import TrialState
import pytest

import optuna_mlflow_nested as omn
from optuna_mlflow_nested.study import EXPERIMENT_ATTR
from optuna_mlflow_nested.study import PARENT_RUN_ATTR

SECRET = "S3CRET-chaos-q7"
GRACE = 3  # seconds without a heartbeat before a trial is stale (heartbeat every 1 s)
CHAOS_SECONDS = 14.0  # how long faults are injected per schedule
TRIALS_PER_WORKER = 15
MAX_LIVE_WORKERS = 3
STATUS_OF = {TrialState.COMPLETE: "FINISHED", TrialState.FAIL: "FAILED",
             TrialState.PRUNED: "KILLED"}

# A worker: joins the study and runs a cheap objective that also logs through MLflow's
# fluent API, as objectives do. SIGTERM (kill, a batch scheduler) is an interrupt it
# handles, as the `tune` command does: the trial fails, the runs are flushed.
WORKER = textwrap.dedent("""
    import random, signal, sys, time, warnings

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)
    try:
        import mlflow, optuna
        import optuna_mlflow_nested as omn

        storage_url, name, uri, n_trials, seed = sys.argv[1:6]
        optuna.logging.set_verbosity(optuna.logging.WARNING)

        def objective(trial):
            x = trial.suggest_float("x", -5, 5)
            n = trial.suggest_int("n", 1, 9)
            trial.suggest_categorical("kind", ["a", "b", "c"])
            try:
                mlflow.log_metric("seen", x)
            except Exception:
                pass  # the server is away: the objective goes on
            time.sleep(random.uniform(0.2, 0.5))
            trial.report(x * x, 0)
            if n == 3:
                raise optuna.TrialPruned()
            if n == 5:
                raise ValueError("n=5 fails on purpose")
            return x * x + n

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            storage = optuna.storages.RDBStorage(storage_url, heartbeat_interval=1,
                                                 grace_period=int(sys.argv[6]))
        # create_study fails fast (ValueError) while the server is unreachable: a worker
        # started during an outage retries, as a supervisor restarting it would.
        deadline = time.monotonic() + 60
        while True:
            try:
                study = omn.create_study(name, storage=storage, tracking_uri=uri,
                                         load_if_exists=True, sampler="random", seed=int(seed))
                break
            except ValueError as exc:
                if "unreachable" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        study.optimize(objective, n_trials=int(n_trials), catch=(ValueError,))
    except KeyboardInterrupt:
        print("worker: interrupted", file=sys.stderr)
        sys.exit(130)
    print("worker: done")
""")


def wait_for(condition, timeout: float, what: str) -> None:
    """Poll a condition (never a fixed sleep): fail with ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


@dataclasses.dataclass
class Event:
    at: float  # seconds after the chaos starts
    kind: str  # kill_server, sigkill_worker, sigterm_worker, start_worker, sync
    pick: float  # which live worker, as a fraction of their count
    pause: float  # for kill_server: seconds before the restart begins


KINDS = ("kill_server", "sigkill_worker", "sigterm_worker", "start_worker", "sync")
WEIGHTS = (2, 2, 2, 3, 3)


def draw_schedule(rng: random.Random) -> list[Event]:
    """Events at random moments; every kind at least once."""
    events: list[Event] = []
    at = 0.0
    while True:
        at += rng.uniform(0.3, 1.8)
        if at > CHAOS_SECONDS:
            break
        events.append(Event(at, rng.choices(KINDS, WEIGHTS)[0], rng.random(), rng.uniform(0.3, 4.0)))
    for kind in KINDS:
        if kind not in {e.kind for e in events}:
            events.append(Event(rng.uniform(0.5, CHAOS_SECONDS), kind, rng.random(),
                                rng.uniform(0.3, 4.0)))
    return sorted(events, key=lambda e: e.at)


@dataclasses.dataclass
class Worker:
    proc: subprocess.Popen[bytes]
    name: str
    signalled: str | None = None


class Schedule:
    """One fault schedule: its server, workers, syncs and what happened to each."""

    def __init__(self, root: Path, seed: int) -> None:
        self.root = root
        self.seed = seed
        self.root.mkdir(parents=True)
        self.server = MlflowServer(root / "server", backend_uri=f"sqlite:///{root / 'server.db'}")
        self.uri = f"http://u:{SECRET}@127.0.0.1:{self.server.port}"  # the server ignores it
        self.storage_url = f"sqlite:///{root / 'optuna.db'}"
        self.spool = root / "spool.jsonl"
        self.study_name = f"chaos-{seed}"
        self.env = {**os.environ, "OMN_SPOOL": str(self.spool), "OMN_RETRY_DEADLINE": "2",
                    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10", "PYTHONFAULTHANDLER": "1"}
        self.workers: list[Worker] = []
        self.syncs: list[tuple[str, subprocess.Popen[bytes]]] = []
        self.log: list[str] = []
        self.started = time.monotonic()
        self._restart: threading.Thread | None = None
        self._restart_error: list[BaseException] = []
        self.server_up = False

    # the server ------------------------------------------------------------------
    def start_server(self) -> None:
        self.server.start()
        self.server_up = True

    def kill_server(self, pause: float) -> None:
        """SIGKILL the server's process group; restart it (same port, same store) later."""
        assert self.server.proc is not None
        os.killpg(self.server.proc.pid, signal.SIGKILL)
        self.server.proc.wait()
        self.server.proc = None
        self.server_up = False

        def restart() -> None:
            time.sleep(pause)  # the outage
            try:
                self.start_server()
            except BaseException as exc:  # reported by server_back()
                self._restart_error.append(exc)

        self._restart = threading.Thread(target=restart, daemon=True)
        self._restart.start()

    def server_back(self) -> None:
        """Wait for a restart under way; the server is up afterwards."""
        if self._restart is not None:
            self._restart.join(timeout=120)
            self._restart = None
        assert not self._restart_error, f"the server did not come back: {self._restart_error}"
        if not self.server_up:
            self.start_server()

    # processes -------------------------------------------------------------------
    def _popen(self, name: str, args: list[str]) -> subprocess.Popen[bytes]:
        out = open(self.root / f"{name}.out", "wb")
        err = open(self.root / f"{name}.err", "wb")
        with out, err:
            return subprocess.Popen([sys.executable, *args], cwd=self.root, env=self.env,
                                    stdout=out, stderr=err, start_new_session=True)

    def start_worker(self) -> str:
        name = f"worker-{len(self.workers)}"
        proc = self._popen(name, ["-c", WORKER, self.storage_url, self.study_name, self.uri,
                                  str(TRIALS_PER_WORKER), str(self.seed * 100 + len(self.workers)),
                                  str(GRACE)])
        self.workers.append(Worker(proc, name))
        return name

    def live_workers(self) -> list[Worker]:
        return [w for w in self.workers if w.proc.poll() is None and w.signalled is None]

    def signal_worker(self, pick: float, sig: signal.Signals) -> str | None:
        live = self.live_workers()
        if not live:
            return None
        worker = live[int(pick * len(live))]
        worker.signalled = sig.name
        with contextlib.suppress(ProcessLookupError):
            os.killpg(worker.proc.pid, sig)
        return worker.name

    def sync_args(self) -> list[str]:
        return ["-m", "optuna_mlflow_nested", "sync", "--spool", str(self.spool),
                "--tracking-uri", self.uri, "--study-name", self.study_name,
                "--storage", self.storage_url, "--heartbeat-interval", "1",
                "--grace-period", str(GRACE)]

    def start_sync(self) -> str:
        name = f"sync-{len(self.syncs)}"
        self.syncs.append((name, self._popen(name, self.sync_args())))
        return name

    def note(self, text: str) -> None:
        self.log.append(f"{time.monotonic() - self.started:5.1f}s {text}")

    # the schedule ----------------------------------------------------------------
    def run_events(self, events: list[Event]) -> None:
        chaos_start = time.monotonic()
        for event in events:
            delay = chaos_start + event.at - time.monotonic()
            if delay > 0:
                time.sleep(delay)  # the event's random moment
            if event.kind == "kill_server":
                if self.server_up:
                    self.kill_server(event.pause)
                    self.note(f"server SIGKILLed, restart in {event.pause:.1f}s")
                else:
                    self.note("server already down: no kill")
            elif event.kind in ("sigkill_worker", "sigterm_worker"):
                sig = signal.SIGKILL if event.kind == "sigkill_worker" else signal.SIGTERM
                name = self.signal_worker(event.pick, sig)
                self.note(f"{sig.name} {name}" if name else f"{sig.name}: no live worker")
            elif event.kind == "start_worker":
                if len(self.live_workers()) < MAX_LIVE_WORKERS:
                    self.note(f"started {self.start_worker()}")
                else:
                    self.note("enough workers: none started")
            else:
                self.note(f"started {self.start_sync()}")

    def wind_down(self) -> None:
        """Server up, syncs done, workers finished (or SIGKILLed after a minute)."""
        self.server_back()
        self.note("server up for the end")
        for name, proc in self.syncs:
            try:
                proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGABRT)  # faulthandler: every thread's stack
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=5)
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                raise AssertionError(f"{name} hung: {_text(self.root / f'{name}.err')[-6000:]}"
                                     "\n  " + "\n  ".join(self.log)) from None
        deadline = time.monotonic() + 60
        for worker in self.workers:
            try:
                worker.proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                worker.signalled = "SIGKILL"
                os.killpg(worker.proc.pid, signal.SIGKILL)
                worker.proc.wait()
                self.note(f"SIGKILL {worker.name} (still running at the end)")

    def stop(self) -> None:
        if self._restart is not None:
            self._restart.join(timeout=120)
        for worker in self.workers:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(worker.proc.pid, signal.SIGKILL)
        for _, proc in self.syncs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        self.server.stop()


def _text(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def _heartbeat_trials(db: Path) -> set[int]:
    with contextlib.closing(sqlite3.connect(db)) as con:
        return {row[0] for row in con.execute("SELECT trial_id FROM trial_heartbeats")}


def _wait_out_the_grace_period(schedule: Schedule, storage: optuna.storages.RDBStorage,
                               study_id: int) -> None:
    """Every RUNNING trial of a dead worker stale, every spare run older than the grace
    period: what the final `sync` needs to fail them and delete them (Optuna and `sync`
    compare with the clock, so this waits for time to pass)."""
    db = schedule.root / "optuna.db"

    def trials_stale() -> bool:
        running = {t._trial_id for t in storage.get_all_trials(study_id, deepcopy=False,
                                                                states=(TrialState.RUNNING,))}
        # a trial with no heartbeat yet is never stale: the assertions report it
        return running & _heartbeat_trials(db) <= set(storage._get_stale_trial_ids(study_id))

    wait_for(trials_stale, 30, "the heartbeats of dead workers' trials to go stale")
    client = MlflowClient(schedule.server.uri)
    experiment = client.get_experiment_by_name(schedule.study_name)
    assert experiment is not None
    pending = client.search_runs([experiment.experiment_id], "attributes.status = 'RUNNING'",
                                 max_results=10_000)
    newest = max((r.info.start_time for r in pending), default=0)
    wait_for(lambda: time.time() * 1000 - newest > (GRACE + 1) * 1000, 30,
             "spare runs to be older than the grace period")


def _run_story(run) -> str:
    """Enough of a run to tell which process made it: a pool's spare (started before its
    trial, with the executor session's tags), a writer's or a sync's (started at the
    trial's start, named at once), and when it ended."""
    info = run.info
    tags = sorted(k for k in run.data.tags if k.startswith("omn."))
    return (f"{info.run_id[:8]} {info.run_name} {info.status} start={info.start_time} "
            f"end={info.end_time} trial_start={run.data.tags.get('datetime_start')} {tags}")


def _check_end_state(schedule: Schedule) -> dict[str, int]:
    """One run per finished trial, with its params, value and state; nothing RUNNING."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study = optuna.load_study(study_name=schedule.study_name, storage=schedule.storage_url)
    trials = study.get_trials(deepcopy=False)
    states = Counter(t.state.name for t in trials)
    with_beat = _heartbeat_trials(schedule.root / "optuna.db")
    # A worker SIGKILLed between Optuna creating a trial and its first heartbeat (one
    # storage write apart) leaves a RUNNING trial that Optuna's fail_stale_trials never
    # fails. Such a trial may have no run; one with a heartbeat is never left RUNNING.
    stuck = [t for t in trials if not t.state.is_finished()]
    beating = [t.number for t in stuck if t._trial_id in with_beat]
    assert not beating, f"trials with a heartbeat left unfinished: {beating}"
    if stuck:
        states["RUNNING, killed before its first heartbeat"] = states.pop("RUNNING")
    trials = [t for t in trials if t.state.is_finished()]
    attrs = study._storage.get_study_system_attrs(study._study_id)
    parent_id, experiment_id = attrs[PARENT_RUN_ATTR], attrs[EXPERIMENT_ATTR]
    client = MlflowClient(schedule.server.uri)
    children = client.search_runs([experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'",
                                  max_results=10_000)
    by_number: dict[int, list] = {}
    unnumbered = []
    for run in children:
        number = run.data.tags.get("optuna.trial_number")
        if number is None:
            unnumbered.append((run.info.run_name, run.info.status))
        else:
            by_number.setdefault(int(number), []).append(run)
    assert not unnumbered, f"child runs that belong to no trial: {unnumbered}"
    counts = {n: len(runs) for n, runs in by_number.items()}
    assert counts == {t.number: 1 for t in trials}, (
        "trials without exactly one child run (number: runs): "
        f"{ {n: c for n, c in counts.items() if c != 1} }, without any: "
        f"{sorted({t.number for t in trials} - set(counts))}, runs of no trial: "
        f"{sorted(set(counts) - {t.number for t in trials})}; the doubled runs (what made "
        "each): " + "; ".join(_run_story(r) for runs in by_number.values() if len(runs) > 1
                              for r in runs))
    wrong = []
    for trial in trials:
        run = by_number[trial.number][0]
        expected_params = {k: str(v) for k, v in trial.params.items()}
        problems = []
        if run.data.params != expected_params:
            problems.append(f"params {run.data.params} != {expected_params}")
        if run.info.status != STATUS_OF[trial.state]:
            problems.append(f"status {run.info.status} for {trial.state.name}")
        if run.data.tags.get("state") != trial.state.name:
            problems.append(f"state tag {run.data.tags.get('state')}")
        # COMPLETE: the objective's value; PRUNED: Optuna keeps the last reported one
        if run.data.metrics.get("value") != trial.value:
            problems.append(f"value {run.data.metrics.get('value')} != {trial.value}")
        if run.info.run_name != f"trial-{trial.number}":
            problems.append(f"run name {run.info.run_name}")
        if problems:
            wrong.append((trial.number, problems))
    assert not wrong, f"child runs that do not match their trial: {wrong}"
    everything = [r for exp in client.search_experiments(view_type=ViewType.ALL)
                  for r in client.search_runs([exp.experiment_id], run_view_type=ViewType.ALL,
                                              max_results=10_000)]
    running = [(r.info.run_name, r.info.experiment_id, r.info.lifecycle_stage)
               for r in everything if r.info.status == "RUNNING"]
    assert not running, f"runs left RUNNING (name, experiment, lifecycle): {running}"
    assert client.get_run(parent_id).info.status in ("FINISHED", "KILLED", "FAILED")
    return dict(states)


def _leaks(root: Path) -> list[str]:
    """Files under the schedule's folder that contain the password: worker and sync
    output, spool and its claims, Optuna's and the server's stores, artifacts."""
    return [str(p.relative_to(root)) for p in sorted(root.rglob("*"))
            if p.is_file() and SECRET.encode() in p.read_bytes()]


def run_schedule(root: Path, seed: int, capfd: pytest.CaptureFixture) -> str:
    rng = random.Random(seed)
    events = draw_schedule(rng)
    initial_workers = 2
    schedule = Schedule(root, seed)
    try:
        schedule.start_server()
        schedule.note("server up")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            storage = optuna.storages.RDBStorage(schedule.storage_url, heartbeat_interval=1,
                                                 grace_period=GRACE)
        # The study and its parent run exist before the workers join it.
        omn.create_study(schedule.study_name, storage=storage, tracking_uri=schedule.uri,
                         sampler="random", seed=seed)
        for _ in range(initial_workers):
            schedule.note(f"started {schedule.start_worker()}")
        schedule.run_events(events)
        schedule.wind_down()
        story = "\n  ".join(schedule.log)

        for worker in schedule.workers:
            code, err = worker.proc.returncode, _text(root / f"{worker.name}.err")
            assert "Exception in thread" not in err, f"{worker.name}: {err[-3000:]}\n  {story}"
            if worker.signalled is None:  # server outages alone must not stop a worker
                assert code == 0, f"{worker.name} exited {code}: {err[-3000:]}\n  {story}"
            elif worker.signalled == "SIGTERM":
                assert code in (130, -signal.SIGTERM, 0), f"{worker.name} exited {code}: {err[-3000:]}"
        for name, proc in schedule.syncs:
            err = _text(root / f"{name}.err")
            # 1: the server went away during the sync; 2: it was unreachable when the study
            # was loaded (the check every create_study/load_study makes)
            assert proc.returncode in (0, 1, 2), f"{name} exited {proc.returncode}: {err[-3000:]}"
            assert "Traceback" not in err, f"{name}: {err[-3000:]}\n  {story}"

        study_id = storage.get_study_id_from_name(schedule.study_name)
        _wait_out_the_grace_period(schedule, storage, study_id)
        final = subprocess.run([sys.executable, *schedule.sync_args()], cwd=root,
                               env=schedule.env, capture_output=True, text=True, timeout=300)
        (root / "final-sync.out").write_text(final.stdout)
        (root / "final-sync.err").write_text(final.stderr)
        assert final.returncode == 0, f"final sync: {final.stdout}{final.stderr[-3000:]}\n  {story}"
        assert "0 still pending" in final.stdout, final.stdout
        try:
            states = _check_end_state(schedule)
        except AssertionError as exc:
            raise AssertionError(f"seed {seed}: {exc}\n  {story}") from None
        out, err = capfd.readouterr()
        assert SECRET not in out + err, "the password reached this process's output"
        schedule.stop()
        leaks = _leaks(root)
        assert not leaks, f"seed {seed}: the password is in {leaks}"
        signals = Counter(w.signalled for w in schedule.workers if w.signalled)
        return (f"seed {seed}: {len(events)} events ({dict(Counter(e.kind for e in events))}), "
                f"{len(schedule.workers)} workers ({dict(signals)}), {len(schedule.syncs)} syncs, "
                f"trials {states}, {time.monotonic() - schedule.started:.0f}s")
    finally:
        schedule.stop()


@pytest.mark.slow  # about 30-40 s per schedule on two cores
def test_random_faults_end_with_one_run_per_trial_nothing_running_nothing_leaked(
        tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    seeds = [int(s) for s in os.environ.get("OMN_FAULT_SEEDS", "1,2,3").split(",") if s.strip()]
    budget = float(os.environ.get("OMN_FAULT_BUDGET", "100"))
    started = time.monotonic()
    reports: list[str] = []
    longest = 0.0
    for seed in seeds:
        elapsed = time.monotonic() - started
        if len(reports) >= 2 and elapsed + longest > budget:
            break
        began = time.monotonic()
        reports.append(run_schedule(tmp_path / f"seed-{seed}", seed, capfd))
        longest = max(longest, time.monotonic() - began)
    with capfd.disabled():
        print(f"\nrandom faults: {len(reports)} fault schedule(s) in "
              f"{time.monotonic() - started:.0f}s")
        for line in reports:
            print(f"  {line}")
    assert reports
