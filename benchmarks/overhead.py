"""Logging overhead per trial: bare Optuna vs optuna-mlflow-nested vs MLflowCallback.

Side by side in one run, on a SQLite tracking store and on a local `mlflow server`
that this script starts (127.0.0.1, own process group, stopped with os.killpg).
Objective: three params, sleeps 50 ms; RandomSampler; overhead per trial =
(optimize wall time, including the final flush and parent summary, minus bare
Optuna's) / trials. MLflowCallback is optuna-integration's, nested under a parent
run (mlflow_kwargs={"nested": True}), the closest it comes to a tree.

Then the scaling run (SQLite, RandomSampler, an objective that returns at once, so
the whole cost is logging): overhead per trial at 100 and at 5,000 trials, and the
growth of resident memory over the 5,000 trials (bare Optuna's own growth shown too).

    python benchmarks/overhead.py            # full: 120 trials per configuration
    python benchmarks/overhead.py --quick    # smoke run: 30 trials, 500 for scaling
"""

from __future__ import annotations

import argparse
import datetime
import os
from pathlib import Path
import signal
import socket
import subprocess
import sys
import tempfile
import time
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


def instant(trial: optuna.Trial) -> float:
    return trial.suggest_float("a", 0, 1) + trial.suggest_int("b", 0, 10)


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
    return time.perf_counter() - start


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


def side_by_side(label: str, uri: str, n: int) -> tuple[str, float, float]:
    base = (bare(sleepy, n) + bare(sleepy, n)) / 2 / n * 1000
    ours_ms = ours(sleepy, n, uri) / n * 1000 - base
    legacy_ms = legacy(sleepy, n, uri) / n * 1000 - base
    print(f"  {label}: bare {base:.1f} ms/trial, ours +{ours_ms:.2f} ms, "
          f"MLflowCallback +{legacy_ms:.2f} ms", flush=True)
    return label, ours_ms, legacy_ms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--trials", type=int, default=None)
    args = parser.parse_args()
    n = args.trials or (30 if args.quick else 120)
    small, large = (100, 500) if args.quick else (100, 5000)
    root = Path(tempfile.mkdtemp(prefix="omn-overhead-"))
    print(f"{datetime.date.today()}  cores: {os.cpu_count()}  trials per configuration: {n}")

    rows = [side_by_side("SQLite", f"sqlite:///{root}/sqlite.db", n)]
    server = Server(root / "server")
    try:
        rows.append(side_by_side("mlflow server", server.uri, n))
    finally:
        server.stop()

    print("\n| tracking store | ours (ms/trial) | MLflowCallback (ms/trial) | ratio (target <= 0.20) |")
    print("| --- | --- | --- | --- |")
    for label, ours_ms, legacy_ms in rows:
        print(f"| {label} | {ours_ms:.2f} | {legacy_ms:.2f} | {ours_ms / legacy_ms:.3f} |")

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
    print(f"\n| trials | overhead (ms/trial) | RSS growth during optimize (MB) |")
    print("| --- | --- | --- |")
    for count in (small, large):
        print(f"| {count} | {per_trial[count]:.2f} | {rss_growth[count]:.1f} |")
    print(f"\nflat cost: {large} vs {small} trials = {per_trial[large] / per_trial[small]:.2f}x "
          f"(target <= 1.5); RSS growth over {large} trials {rss_growth[large]:.1f} MB "
          f"(target < 50; bare Optuna alone grows {bare_growth:.1f} MB)")


if __name__ == "__main__":
    main()
