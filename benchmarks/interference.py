"""What work in another process costs a CPU-bound objective on this machine (issue 16).

In ``benchmarks/overhead.py`` the numpy-bound objective's own work ran about 1 ms a
trial slower during our searches than during bare Optuna's; with the writer process,
the MLflow work runs on the other core while the objective computes. This script asks
whether such work slows an objective that shares nothing with it but the machine. It
times the same fixed work as overhead.py's objectives (``_numpy_work`` with one BLAS
thread, ``_python_work``; each calibrated to about 0.1 s) in this process, which has no
other thread, in three conditions alternated round by round:

- **alone**;
- **MLflow writing**: a second process makes one trial run every ``--period`` seconds
  through MLflow's public client (create_run, one log_batch, set_terminated: overhead.py's
  floor) on a SQLite file in WAL mode, as the writer process does for 0.1 s trials;
- **spinning**: a second process spins pure Python for the same CPU time per period
  as the MLflow process used in the round before, and sleeps the rest.

Each condition reports the median time of a unit of work, its difference from alone,
and the second process's CPU per period (``psutil``).

    OPENBLAS_NUM_THREADS=1 python benchmarks/interference.py [--rounds 4] [--units 20]
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
import statistics
import subprocess
import sys
import tempfile
import time

import psutil

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))


def _background(kind: str, period: float, spin_ms: float, uri: str) -> None:
    """The second process: after printing ``ready``, one unit of its work per period
    until stdin closes (checked between periods)."""
    import selectors

    work = None
    if kind == "mlflow":
        import mlflow
        from overhead import store_floor_client

        mlflow.set_tracking_uri(uri)
        work = store_floor_client(uri)
        work()  # the store's first-call costs
    else:
        def work() -> None:
            end = time.process_time() + spin_ms / 1000
            while time.process_time() < end:
                pass
    print("ready", flush=True)
    selector = selectors.DefaultSelector()
    selector.register(sys.stdin, selectors.EVENT_READ)
    next_start = time.monotonic()
    while True:
        work()
        next_start += period
        if selector.select(timeout=max(0.0, next_start - time.monotonic())):
            return  # stdin closed: stop


def _time_units(work, repeats: int, units: int) -> list[float]:
    timings = []
    for _ in range(units):
        start = time.perf_counter()
        work(repeats)
        timings.append((time.perf_counter() - start) * 1000)
    return timings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--units", type=int, default=20, help="units of work a condition")
    parser.add_argument("--period", type=float, default=0.1)
    parser.add_argument("--background", choices=("mlflow", "spin"), help=argparse.SUPPRESS)
    parser.add_argument("--spin-ms", type=float, default=0.0, help=argparse.SUPPRESS)
    parser.add_argument("--uri", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.background:
        _background(args.background, args.period, args.spin_ms, args.uri)
        return

    import overhead

    overhead.calibrate(0.1)
    kinds = {"numpy": overhead._numpy_work, "python": overhead._python_work}
    results: dict[tuple[str, str], list[float]] = {}
    background_cpu: dict[str, list[float]] = {"mlflow": [], "spin": []}
    spin_ms = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        uri = f"sqlite:///{tmp}/mlflow.db"
        from mlflow.tracking import MlflowClient

        from optuna_mlflow_nested.tracking.clients import use_wal

        MlflowClient(uri).search_experiments()  # created and migrated
        use_wal(Path(tmp) / "mlflow.db")
        for round_ in range(args.rounds):
            order = ["alone", "mlflow", "spin"]
            if round_ % 2:
                order.reverse()
            if not spin_ms:  # the spinner needs the MLflow process's CPU first
                order.remove("spin")
                order.insert(order.index("mlflow") + 1, "spin")
            for condition in order:
                proc = None
                if condition != "alone":
                    proc = subprocess.Popen(
                        [sys.executable, __file__, "--background", condition,
                         "--period", str(args.period), "--spin-ms", str(spin_ms),
                         "--uri", uri],
                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
                    assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
                    cpu_before = overhead_cpu(proc.pid)
                    wall_before = time.monotonic()
                for kind, work in kinds.items():
                    results.setdefault((condition, kind), []).extend(
                        _time_units(work, overhead._WORK[kind], args.units))
                if proc is not None:
                    periods = (time.monotonic() - wall_before) / args.period
                    cpu = (overhead_cpu(proc.pid) - cpu_before) / periods * 1000
                    background_cpu[condition].append(cpu)
                    assert proc.stdin is not None
                    proc.stdin.close()
                    proc.wait(timeout=60)
                    if condition == "mlflow":
                        spin_ms = cpu
            print(f"round {round_ + 1}: " + ", ".join(
                f"{c} {statistics.median(results[c, 'numpy'][-args.units:]):.1f}"
                for c in order) + " ms a numpy unit", file=sys.stderr, flush=True)

    print(f"`OPENBLAS_NUM_THREADS={os.environ['OPENBLAS_NUM_THREADS']} python "
          f"benchmarks/interference.py --rounds {args.rounds} --units {args.units} "
          f"--period {args.period}`\n")
    print("| objective's work | condition | ms a unit, median | over alone (ms) "
          "| over alone, round by round (ms) | other process's CPU (ms a period, median) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for kind in kinds:
        alone = statistics.median(results["alone", kind])
        for condition in ("alone", "mlflow", "spin"):
            median = statistics.median(results[condition, kind])
            cpu = (f"{statistics.median(background_cpu[condition]):.1f}"
                   if background_cpu.get(condition) else "")
            label = {"alone": "alone", "mlflow": "MLflow writing trial runs",
                     "spin": "pure Python spinning"}[condition]
            by_round = ", ".join(
                f"{_round_median(results[condition, kind], i, args.units) - alone_i:+.1f}"
                for i, alone_i in enumerate(
                    _round_median(results["alone", kind], i, args.units)
                    for i in range(args.rounds)))
            print(f"| {kind} | {label} | {median:.2f} | {median - alone:+.2f} | {by_round} "
                  f"| {cpu} |")


def _round_median(timings: list[float], round_: int, units: int) -> float:
    return statistics.median(timings[round_ * units:(round_ + 1) * units])


def overhead_cpu(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


if __name__ == "__main__":
    main()
