"""Trials per minute: one worker process against two, on one shared study.

Each configuration gets a fresh scratch folder (SQLite Optuna storage and tracking
store) and runs `optuna-mlflow-nested worker --threads 1` processes (CatBoost with
thread_count=1) that share one study, with the same time window (`--timeout`). Throughput is
taken from the trials' own timestamps in Optuna's storage (first start to last
completion), so process start-up is left out. Loop efficiency is the time spent in
trials divided by that span times the number of workers (one core each).

    python benchmarks/throughput.py [--seconds 30] [--data friedman1]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

import optuna


def run(workers: int, seconds: float, data: str, iterations: int) -> tuple[float, float, int, float, float]:
    folder = tempfile.mkdtemp(prefix=f"omn-throughput-{workers}-")
    storage = f"sqlite:///{folder}/optuna.db"
    common = ["--data", data, "--storage", storage, "--tracking-uri", f"sqlite:///{folder}/mlflow.db",
              "--study-name", "throughput", "--tuning-iterations", str(iterations),
              "--sampler", "random", "--threads", "1"]
    # Create the study (and the tracking store) once, so workers only race on trials.
    # cwd: MLflow puts a SQLite store's artifacts in ./mlruns, which belongs in the scratch folder.
    subprocess.run([sys.executable, "-m", "optuna_mlflow_nested", "worker", "--trials", "1",
                    *common], check=True, capture_output=True, cwd=folder)
    start = time.perf_counter()
    # Every worker runs for the same time window, so no worker idles at the end.
    procs = [subprocess.Popen([sys.executable, "-m", "optuna_mlflow_nested", "worker", "--trials",
                               "100000", "--timeout", str(seconds), *common],
                              stdout=subprocess.DEVNULL, cwd=folder)
             for _ in range(workers)]
    if any(p.wait() != 0 for p in procs):
        sys.exit("a worker failed")
    wall = time.perf_counter() - start
    study = optuna.load_study(study_name="throughput", storage=storage)
    measured = [t for t in study.trials if t.number > 0]  # trial 0 was the set-up trial
    first = min(t.datetime_start for t in measured)
    last = max(t.datetime_complete for t in measured)
    per_minute = len(measured) / (last - first).total_seconds() * 60
    busy = sum((t.datetime_complete - t.datetime_start).total_seconds() for t in measured)
    # Loop efficiency: objective time / (wall x cores in use), one core per worker.
    efficiency = busy / ((last - first).total_seconds() * workers)
    shutil.rmtree(folder, ignore_errors=True)
    return per_minute, wall, len(measured), busy / len(measured), efficiency


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=30.0, help="window per configuration")
    parser.add_argument("--data", default="friedman1")
    parser.add_argument("--tuning-iterations", type=int, default=300)
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    one = run(1, args.seconds, args.data, args.tuning_iterations)
    two = run(2, args.seconds, args.data, args.tuning_iterations)
    print(f"cores: {os.cpu_count()}  data: {args.data}  window: {args.seconds:.0f} s  "
          f"tuning iterations: {args.tuning_iterations}")
    print("| workers | trials in the window | trials/min | mean trial (s) | loop efficiency |")
    print("| --- | --- | --- | --- | --- |")
    for workers, (rate, _, n, mean_trial, efficiency) in ((1, one), (2, two)):
        print(f"| {workers} | {n} | {rate:.1f} | {mean_trial:.3f} | {efficiency:.1%} |")
    print(f"speed-up, 2 workers against 1: {two[0] / one[0]:.2f}x (target: at least 1.7x)")


if __name__ == "__main__":
    main()
