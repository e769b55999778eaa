"""Logging overhead per trial: bare Optuna vs optuna-mlflow-nested vs MLflowCallback.

Side by side in one run, on a SQLite tracking store and on a local `mlflow server`
that this script starts (127.0.0.1, own process group, stopped with os.killpg).
Objective: three params, sleeps 50 ms; RandomSampler; overhead per trial =
(optimize wall time, including the final flush and parent summary, minus bare
Optuna's) / trials. Each store: a cold round (the first run of each in this process),
then warm rounds of bare, ours and MLflowCallback interleaved (median reported). The
script sets MLflow's tracking URI once before all rounds: MLflow's first
set_tracking_uri imports its tracing SDK, which MLflowCallback's rounds would pay
before their timed window (they set the URI first) and ours inside optimize.
MLflowCallback is optuna-integration's, nested under a parent run
(mlflow_kwargs={"nested": True}), the closest it comes to a tree.

Then the scaling run (SQLite, RandomSampler, an objective that returns at once, so
the whole cost is logging): overhead per trial at 100 and at 5,000 trials, and the
growth of resident memory over the 5,000 trials (bare Optuna's own growth shown too).

    python benchmarks/overhead.py            # full: 120 trials per configuration, 3 warm rounds
    python benchmarks/overhead.py --quick    # smoke run: 30 trials, 500 for scaling
    python benchmarks/overhead.py --breakdown  # the once-per-optimize steps, cold and warm
    python benchmarks/overhead.py --objectives sleep,numpy,python --writer both --floor 200
    python benchmarks/overhead.py --objectives "" --no-scaling --handoff 200   # the trial's path
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import os
from pathlib import Path
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from typing import NamedTuple
import warnings

warnings.filterwarnings("ignore")
os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"  # for the legacy callback only

import mlflow  # noqa: E402
import optuna  # noqa: E402
import requests  # noqa: E402

import optuna_mlflow_nested as omn  # noqa: E402

optuna.logging.set_verbosity(optuna.logging.WARNING)


def sleepy(trial: optuna.Trial) -> float:
    a = trial.suggest_float("a", 0, 1)
    b = trial.suggest_int("b", 0, 10)
    trial.suggest_categorical("c", ["x", "y", "z"])
    time.sleep(0.05)
    return a + b


_WORK = {"numpy": 0, "python": 0}


def _numpy_work(repeats: int) -> float:
    import numpy as np

    matrix = np.arange(3600, dtype=float).reshape(60, 60) % 7
    matrix = matrix + matrix.T
    total = 0.0
    for _ in range(repeats):
        total += float(np.linalg.eigvalsh(matrix)[0])
    return total


def _python_work(repeats: int) -> float:
    total = 0
    for i in range(repeats):
        total += (i * i) % 7
    return float(total)


def calibrate(seconds: float = 0.1) -> None:
    """A fixed amount of work per trial (~``seconds`` here, alone), not a time budget:
    CPU time would also count the writer's threads and shorten the objective. The median
    of five timings: one alone was seen 4x off on this machine (the first BLAS call)."""
    for kind, work, unit in (("numpy", _numpy_work, 10), ("python", _python_work, 100_000)):
        timings = []
        for _ in range(5):
            start = time.perf_counter()
            work(unit)
            timings.append(time.perf_counter() - start)
        _WORK[kind] = max(1, int(unit * seconds / statistics.median(timings)))


class Timed:
    """An objective that adds up the time spent inside it: the rest of a search's wall
    time is the per-trial machinery (Optuna's, and the tracking's on the trial's path
    and at the end), apart from how fast the machine ran the objective's own work."""

    def __init__(self, objective) -> None:
        self.objective = objective
        self.inside = 0.0
        self.cpu = 0.0  # the objective's thread's own CPU time in it

    def __call__(self, trial: optuna.Trial) -> float:
        start, cpu = time.perf_counter(), time.thread_time()
        try:
            return self.objective(trial)
        finally:
            self.inside += time.perf_counter() - start
            self.cpu += time.thread_time() - cpu


def numpy_bound(trial: optuna.Trial) -> float:
    """~100 ms of small eigenvalue problems (one BLAS thread: set OPENBLAS_NUM_THREADS=1)."""
    a = trial.suggest_float("a", 0, 1)
    trial.suggest_int("b", 0, 10)
    trial.suggest_categorical("c", ["x", "y", "z"])
    return a + 0.0 * _numpy_work(_WORK["numpy"])


def python_bound(trial: optuna.Trial) -> float:
    """~100 ms of pure-Python arithmetic (holds the GIL throughout)."""
    a = trial.suggest_float("a", 0, 1)
    trial.suggest_int("b", 0, 10)
    trial.suggest_categorical("c", ["x", "y", "z"])
    return a + 0.0 * _python_work(_WORK["python"])


def instant(trial: optuna.Trial) -> float:
    return trial.suggest_float("a", 0, 1) + trial.suggest_int("b", 0, 10)


OBJECTIVES = {"sleep": sleepy, "numpy": numpy_bound, "python": python_bound, "instant": instant}


def trial_run_maker(uri: str):
    """A function that makes one trial run of the store's own work through MLflow's
    public client, one call after the other: create_run, one log_batch (3 params, 2
    metrics, the 12 tags a trial run gets), set_terminated."""
    from mlflow.entities import Metric
    from mlflow.entities import Param
    from mlflow.entities import RunTag
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    experiment = client.create_experiment(f"floor-{time.time_ns()}")
    parent = client.create_run(experiment).info.run_id
    tag_keys = ["number", "datetime_start", "datetime_complete", "state", "direction",
                "a_distribution", "b_distribution", "c_distribution", "optuna.trial_number"]
    made = itertools.count()

    def one() -> None:
        i = next(made)
        run = client.create_run(experiment, run_name="trial-pending", tags={
            "mlflow.parentRunId": parent, "optuna.study_name": "floor", "optuna.role": "trial"})
        now = int(time.time() * 1000)
        client.log_batch(run.info.run_id,
                         metrics=[Metric("trial_number", i, now, 0), Metric("value", 0.5, now, 0)],
                         params=[Param("a", "0.5"), Param("b", "3"), Param("c", "x")],
                         tags=[RunTag(k, "v") for k in tag_keys], synchronous=True)
        client.set_terminated(run.info.run_id, "FINISHED", now)

    return one


def store_floor(uri: str, n: int) -> tuple[float, float]:
    """ms per run of the store's own work for one trial run (:func:`trial_run_maker`).
    Wall time, and this process's CPU."""
    one = trial_run_maker(uri)
    one()  # the store's first-call costs are not per run
    start, cpu = time.perf_counter(), time.process_time()
    for _ in range(n):
        one()
    return (time.perf_counter() - start) / n * 1000, (time.process_time() - cpu) / n * 1000


def writer_cpu_ms(uri: str, n: int) -> float:
    """CPU time (ms) the writer process spends per trial, between the search's first and
    last quarter (a steady state: not its start, nor the figures drawn at the end), with
    the 50 ms sleeping objective, so that it keeps up."""
    from engine_cost import cpu_seconds

    from optuna_mlflow_nested.tracking.writer_process import WriterProcess

    if n < 4:  # too few trials for a window
        return float("nan")
    marks: dict[int, tuple[int, float]] = {}
    first, last = n // 4, n - n // 4

    def mark(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if trial.number in (first, last):
            pid = WriterProcess.get().pid
            marks[trial.number] = (pid, cpu_seconds({pid}))

    study = omn.create_study(f"cpu-{time.time_ns()}", experiment_name="overhead",
                             tracking_uri=uri, sampler="random", seed=0)
    study.optimize(sleepy, n_trials=n, callbacks=[mark])
    study.wait_for_figures()
    if marks[first][0] != marks[last][0]:  # the writer process was started anew between
        return float("nan")
    return (marks[last][1] - marks[first][1]) / (last - first) * 1000


def bare(objective, n: int) -> float:
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    start = time.perf_counter()
    study.optimize(objective, n_trials=n)
    return time.perf_counter() - start


def ours(objective, n: int, uri: str) -> float:
    study = omn.create_study(f"ours-{time.time_ns()}", experiment_name="overhead",
                             tracking_uri=uri, sampler="random", seed=0)
    start = time.perf_counter()
    study.optimize(objective, n_trials=n)
    elapsed = time.perf_counter() - start
    # Untimed: the figures drawn after optimize returns must not run during the next
    # configuration (MLflowCallback's, say) and slow it instead.
    study.wait_for_figures()
    return elapsed


def legacy(objective, n: int, uri: str) -> float:
    from optuna_integration.mlflow import MLflowCallback

    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("overhead-legacy")
    callback = MLflowCallback(tracking_uri=uri, create_experiment=False,
                              mlflow_kwargs={"nested": True})
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    with mlflow.start_run(run_name=f"legacy-{time.time_ns()}"):
        start = time.perf_counter()
        study.optimize(objective, n_trials=n, callbacks=[callback])
        elapsed = time.perf_counter() - start
    mlflow.set_tracking_uri(None)
    return elapsed


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Server:
    def __init__(self, root: Path) -> None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port",
             str(self.port), "--workers", "1", "--backend-store-uri", f"sqlite:///{root}/server.db",
             "--artifacts-destination", str(root / "artifacts")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if requests.get(self.uri + "/health", timeout=1).ok:
                    return
            except requests.RequestException:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError("mlflow server did not start")

    def stop(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self.proc.pid, sig)
                self.proc.wait(timeout=10)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass


def trial_path_ms(uri: str | None, n: int) -> tuple[float, float]:
    """Mean and median ms between one objective call's end and the next one's start
    (Optuna's tell and ask plus, with ``uri``, this project's per-trial work: the
    hand-off of the record and the next spare run), with the 50 ms sleeping objective,
    warm. The mean counts a rare long gap (a stall of the store) that the median does
    not."""
    ends: list[float] = []
    gaps: list[float] = []

    def timed(trial: optuna.Trial) -> float:
        if ends:
            gaps.append(time.perf_counter() - ends[-1])
        try:
            return sleepy(trial)
        finally:
            ends.append(time.perf_counter())

    if uri is None:
        bare(timed, n)
    else:
        ours(timed, n, uri)
    return statistics.mean(gaps) * 1000, statistics.median(gaps) * 1000


class Row(NamedTuple):
    store: str
    ours_ms: float
    legacy_ms: float
    cold_ours_ms: float
    cold_legacy_ms: float
    ours_outside_ms: float  # warm medians, outside the objective (see Timed)
    legacy_outside_ms: float
    ours_slower_ms: float  # the objective's own time per trial, over bare Optuna's
    legacy_slower_ms: float
    objective_ms: float  # bare Optuna's objective, per trial (median)


def _values(values: list[float]) -> str:
    return ", ".join(f"{v:.2f}" for v in values)


def side_by_side(label: str, uri: str, n: int, repeats: int, sleepy=sleepy) -> Row:
    """Cold: the first run of each in this process (imports, caches, a fresh store).
    Warm: then ``repeats`` rounds of bare, ours and MLflowCallback, each round in the
    next of the six orders (a multiple of 6 gives each run each place, and each
    predecessor, equally often), so that machine noise hits all three alike; the
    medians are reported. ``sleepy``: the objective (sleeping by default).

    Besides the overhead on the wall time, each warm round splits it (see
    :class:`Timed`): outside the objective, and the objective's own time over bare
    Optuna's in the same round (the work slowed by what runs beside it, or by the
    machine's speed drifting between the runs: on a noisy machine the wall-time
    overhead of a CPU-bound objective moves by several ms a trial from round to round).
    """
    base = (bare(sleepy, n) + bare(sleepy, n)) / 2 / n * 1000
    cold_ours = ours(sleepy, n, uri) / n * 1000 - base
    cold_legacy = legacy(sleepy, n, uri) / n * 1000 - base
    warm: dict[str, list[float]] = {}

    def run(call) -> tuple[float, float, float]:
        timed = Timed(sleepy)
        elapsed = call(timed)
        return (elapsed - timed.inside) / n * 1000, timed.inside / n * 1000, timed.cpu / n * 1000

    calls = {"bare": lambda f: bare(f, n), "ours": lambda f: ours(f, n, uri),
             "legacy": lambda f: legacy(f, n, uri)}
    orders = list(itertools.permutations(calls))
    for i in range(repeats):
        # Each round in the next of the six orders: neither a run's place in its round
        # nor which run came just before it may favour one of the three.
        timings = {name: run(calls[name]) for name in orders[i % len(orders)]}
        base_outside, base_inside, base_cpu = timings["bare"]
        warm.setdefault("objective", []).append(base_inside)
        for name in ("ours", "legacy"):
            outside, inside, cpu = timings[name]
            warm.setdefault(name, []).append(outside + inside - base_outside - base_inside)
            warm.setdefault(f"{name} outside", []).append(outside - base_outside)
            warm.setdefault(f"{name} slower", []).append(inside - base_inside)
            # Of that: more CPU for the same work, and more time off the CPU (waiting
            # for the GIL or a core) than bare's objective.
            warm.setdefault(f"{name} cpu", []).append(cpu - base_cpu)
            warm.setdefault(f"{name} off", []).append((inside - cpu) - (base_inside - base_cpu))
    med = {k: statistics.median(v) for k, v in warm.items()}
    row = Row(label, med["ours"], med["legacy"], cold_ours, cold_legacy, med["ours outside"],
              med["legacy outside"], med["ours slower"], med["legacy slower"], med["objective"])
    print(f"  {label}: cold ours +{cold_ours:.2f} ms, MLflowCallback +{cold_legacy:.2f} ms; "
          f"warm (median of {repeats}) ours +{row.ours_ms:.2f} ms [{_values(warm['ours'])}], "
          f"MLflowCallback +{row.legacy_ms:.2f} ms [{_values(warm['legacy'])}]; outside the "
          f"objective ours [{_values(warm['ours outside'])}], MLflowCallback "
          f"[{_values(warm['legacy outside'])}]; the objective's own time over bare's: ours "
          f"[{_values(warm['ours slower'])}], MLflowCallback [{_values(warm['legacy slower'])}] "
          f"(of which its thread's CPU time: ours [{_values(warm['ours cpu'])}], MLflowCallback "
          f"[{_values(warm['legacy cpu'])}]; off the CPU: ours [{_values(warm['ours off'])}], "
          f"MLflowCallback [{_values(warm['legacy off'])}]); "
          f"bare's objective [{_values(warm['objective'])}] ms a trial", flush=True)
    return row


def breakdown(uri: str, n: int) -> None:
    """Where ours spends its time once per optimize (SQLite): each end-of-optimize step
    timed by wrapping it, for the first (cold) and a second (warm) search."""
    from optuna_mlflow_nested import study as study_module
    from optuna_mlflow_nested import tracking
    from optuna_mlflow_nested.tracking import figures
    from optuna_mlflow_nested.tracking import parent

    spent: dict[str, float] = {}

    def timed(owner: object, name: str, label: str) -> None:
        inner = getattr(owner, name)

        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                spent[label] = spent.get(label, 0.0) + time.perf_counter() - start

        setattr(owner, name, wrapper)

    from optuna_mlflow_nested.tracking import writer_process

    steps = [(tracking.TrialTracker, "stop", "flush the writer, delete spare runs (the "
              "summary is written meanwhile)"),
             (study_module, "reconcile_study", "reconcile"),
             (parent, "log_parent_summary", "parent summary (with writer threads: and figures)"),
             (figures, "log_figures", "the two figures, drawn here"),
             (writer_process.WriterProcess, "reply", "waits for the writer process (its close; "
                                                     "the figures drawn there are not waited for)"),
             (parent, "set_run_status", "parent status (also its reopening at the start)"),
             (parent.SearchEnd, "write_summary", "the summary during the flush"),
             (parent.SearchEnd, "finish", "after the flush, in all")]
    for owner, name, label in steps:
        timed(owner, name, label)
    # ours() waits for the figures after its timing: that wait is no step of optimize.
    waiting = study_module.NestedStudy.wait_for_figures

    def untimed(*args, **kwargs):
        before = dict(spent)
        try:
            return waiting(*args, **kwargs)
        finally:
            spent.clear()
            spent.update(before)

    study_module.NestedStudy.wait_for_figures = untimed
    print(f"\nBreakdown (SQLite, {n} trials of the 50 ms objective):")
    print("| search | overhead (ms/trial) | " + " | ".join(s[2] for s in steps) + " |")
    print("| --- " * (len(steps) + 2) + "|")
    for label in ("cold (first)", "warm (second)"):
        spent.clear()
        base = bare(sleepy, n) / n * 1000
        overhead = ours(sleepy, n, uri) / n * 1000 - base
        cells = [f"{spent.get(step[2], 0.0) * 1000:.0f} ms" for step in steps]
        print(f"| {label} | {overhead:.2f} | " + " | ".join(cells) + " |")


def per_store(folder: Path, columns: list[str], row, wal_row: bool = False) -> None:
    """A table with a row per tracking store (SQLite, a local server): ``row(uri)``'s cells.

    ``wal_row``: also a SQLite file put in WAL mode before the row runs (this project
    does that when it opens a file; a plain MlflowClient leaves MLflow's rollback journal).
    """
    from mlflow.tracking import MlflowClient

    from optuna_mlflow_nested.tracking.clients import use_wal

    print("\n| tracking store | " + " | ".join(columns) + " |")
    print("| --- " * (len(columns) + 1) + "|")
    server = Server(folder / "server")
    stores = [("SQLite", f"sqlite:///{folder}/store.db")]
    if wal_row:
        wal = folder / "wal.db"
        MlflowClient(f"sqlite:///{wal}").search_experiments()  # created and migrated
        use_wal(wal)
        stores.append(("SQLite, file in WAL mode first", f"sqlite:///{wal}"))
    try:
        for store, uri in [*stores, ("mlflow server", server.uri)]:
            print(f"| {store} | " + " | ".join(f"{c:.3f}" for c in row(uri)) + " |", flush=True)
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--trials", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=3, help="warm rounds per store")
    parser.add_argument("--objectives", default="sleep",
                        help="comma-separated: sleep (50 ms), numpy, python (~100 ms of work), instant")
    parser.add_argument("--writer", default="threads",
                        help="this project's writer: threads, process, or both")
    parser.add_argument("--no-scaling", action="store_true", help="skip the instant-objective run")
    parser.add_argument("--handoff", type=int, default=0, metavar="N",
                        help="also the per-trial time on the trial's path, N trials per store")
    parser.add_argument("--floor", type=int, default=0, metavar="N",
                        help="also N instant trials per store against the store's own per-run cost")
    parser.add_argument("--breakdown", action="store_true",
                        help="only time the once-per-optimize steps (run it in a fresh process)")
    args = parser.parse_args()
    # `timeout` and batch schedulers send SIGTERM: exit through the finally blocks that
    # stop the servers and clusters this script started (their own process groups).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    n = args.trials or (30 if args.quick else 120)
    small, large = (100, 500) if args.quick else (100, 5000)
    root = Path(tempfile.mkdtemp(prefix="omn-overhead-"))
    os.chdir(root)  # MLflow puts a SQLite store's artifacts in ./mlruns: keep them here
    # MLflow's first set_tracking_uri in a process imports its tracing SDK (about 13 ms,
    # RESULTS). MLflowCallback's rounds set the URI before their timed window, ours
    # inside optimize: pay that import once here, before both (and the breakdown).
    mlflow.set_tracking_uri(f"sqlite:///{root}/unused.db")
    mlflow.set_tracking_uri(None)
    if args.breakdown:
        bare(sleepy, n)  # Optuna's own first-run costs are not ours
        breakdown(f"sqlite:///{root}/breakdown.db", n)
        return
    print(f"{datetime.date.today()}  cores: {os.cpu_count()}  trials per configuration: {n}")

    calibrate()
    writers = ["threads", "process"] if args.writer == "both" else [args.writer]
    callers_writer = os.environ.get("OMN_WRITER")  # for the tables after the rounds
    server = Server(root / "server")
    rows = []
    try:
        for kind in [k for k in args.objectives.split(",") if k]:
            for writer in writers:
                os.environ["OMN_WRITER"] = writer
                for store, uri in (("SQLite", f"sqlite:///{root}/sqlite-{kind}-{writer}.db"),
                                   ("mlflow server", server.uri)):
                    row = side_by_side(f"{store}, {kind}, writer {writer}", uri, n, args.repeats,
                                       OBJECTIVES[kind])
                    rows.append(row)
    finally:
        server.stop()
        os.environ.pop("OMN_WRITER", None)
        if callers_writer is not None:
            os.environ["OMN_WRITER"] = callers_writer

    print("\n| tracking store, objective, writer | run | ours (ms/trial) | MLflowCallback (ms/trial) "
          "| ratio (target <= 0.10) |")
    print("| --- | --- | --- | --- | --- |")
    for row in rows:
        print(f"| {row.store} | cold (first) | {row.cold_ours_ms:.2f} | {row.cold_legacy_ms:.2f} | "
              f"{row.cold_ours_ms / row.cold_legacy_ms:.3f} |")
        print(f"| {row.store} | warm (median) | {row.ours_ms:.2f} | {row.legacy_ms:.2f} | "
              f"{row.ours_ms / row.legacy_ms:.3f} |")
    print("\nThe warm rounds split (medians, ms a trial): outside the objective, and the "
          "objective's own time over bare Optuna's in the same round")
    print("| tracking store, objective, writer | bare's objective | outside: ours | outside: "
          "MLflowCallback | ratio | objective slower: ours | objective slower: MLflowCallback |")
    print("| --- " * 7 + "|")
    for row in rows:
        print(f"| {row.store} | {row.objective_ms:.1f} | {row.ours_outside_ms:.2f} | "
              f"{row.legacy_outside_ms:.2f} | {row.ours_outside_ms / row.legacy_outside_ms:.3f} | "
              f"{row.ours_slower_ms:+.2f} | {row.legacy_slower_ms:+.2f} |")
    if args.handoff:
        def handoff_row(uri: str) -> list[float]:
            ours(sleepy, 5, uri)  # warm
            base, path = trial_path_ms(None, args.handoff), trial_path_ms(uri, args.handoff)
            return [base[0], path[0], path[0] - base[0], base[1], path[1], path[1] - base[1]]

        per_store(root / "handoff", ["between trials, bare Optuna (ms, mean)",
                                     "between trials, ours (ms, mean)",
                                     "on the trial's path (ms/trial, mean)",
                                     "bare Optuna (median)", "ours (median)",
                                     "on the trial's path (median)"], handoff_row)
    if args.floor:
        from optuna_mlflow_nested.tracking.process_session import uses_writer_process

        # CPU: what a trial's run costs the cores beside the objective (on a server, the
        # client's side only). The writer process's column needs one: with threads
        # (OMN_WRITER as the caller set it), their CPU is the calling process's.
        process_writer = uses_writer_process()

        def floor_row(uri: str) -> list[float]:
            floor, floor_cpu = store_floor(uri, args.floor)
            ours(instant, 5, uri)  # warm
            per_trial = (ours(instant, args.floor, uri) - bare(instant, args.floor)) / args.floor * 1000
            cpu = writer_cpu_ms(uri, args.floor) if process_writer else float("nan")
            return [per_trial, floor, per_trial / floor, cpu, floor_cpu]

        per_store(root / "floor", ["instant objective, ours (ms/trial over bare Optuna)",
                                   "the store's own create + log_batch + terminate (ms/run)",
                                   "ratio", "writer process CPU (ms/trial, 50 ms objective)",
                                   "the store's own, CPU in the calling process (ms/run)"],
                  floor_row, wal_row=True)
    if args.no_scaling:
        return

    uri = f"sqlite:///{root}/scaling.db"
    ours(instant, 5, uri)  # warm the store and the imports
    per_trial = {}
    rss_growth = {}
    for count in (small, large):
        base = bare(instant, count)
        rss_before = rss_mb()
        elapsed = ours(instant, count, uri)
        rss_growth[count] = rss_mb() - rss_before
        per_trial[count] = (elapsed - base) / count * 1000
    rss_before = rss_mb()
    bare(instant, large)
    bare_growth = rss_mb() - rss_before
    print("\n| trials | overhead (ms/trial) | RSS growth during optimize (MB) |")
    print("| --- | --- | --- |")
    for count in (small, large):
        print(f"| {count} | {per_trial[count]:.2f} | {rss_growth[count]:.1f} |")
    print(f"\nflat cost: {large} vs {small} trials = {per_trial[large] / per_trial[small]:.2f}x "
          f"(target <= 1.5); RSS growth over {large} trials {rss_growth[large]:.1f} MB "
          f"(target < 50; bare Optuna alone grows {bare_growth:.1f} MB)")


if __name__ == "__main__":
    main()
