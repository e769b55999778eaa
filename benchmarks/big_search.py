"""10,000 trials of an instant objective: bare Optuna against this project with
``trial_runs=K`` (issue 15: within 2x of bare Optuna's wall time), side by side.

RandomSampler, Optuna storage in memory for both; this project tracks to a SQLite file
and to a local `mlflow server`. Each measurement times `study.optimize` (the parent
summary and the K child runs included), interleaved with bare Optuna, REPEATS times;
the table shows medians and the ratio.

    python benchmarks/big_search.py [--trials 10000] [--keep 10] [--repeats 3] [--no-server]
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import warnings

import optuna

import optuna_mlflow_nested as omn


def objective(trial: optuna.Trial) -> float:
    return trial.suggest_float("x", -1, 1) ** 2 + trial.suggest_float("y", -1, 1) ** 2


def bare(n: int) -> float:
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    start = time.perf_counter()
    study.optimize(objective, n_trials=n)
    return time.perf_counter() - start


def ours(n: int, keep: int, uri: str, label: str) -> float:
    study = omn.create_study(f"{label}-{time.monotonic_ns()}", experiment_name="big-search",
                             tracking_uri=uri, sampler="random", seed=0, trial_runs=keep)
    start = time.perf_counter()
    study.optimize(objective, n_trials=n)
    wall = time.perf_counter() - start
    assert len(study.child_runs()) == keep
    return wall


def start_server(root: Path) -> tuple[subprocess.Popen[bytes], str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1", "--backend-store-uri", f"sqlite:///{root / 'server.db'}",
         "--artifacts-destination", str(root / "artifacts")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    import requests

    uri = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            if requests.get(uri + "/health", timeout=1).status_code == 200:
                return proc, uri
        except requests.RequestException:
            time.sleep(0.2)
    raise RuntimeError("mlflow server did not start")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--trials", type=int, default=10_000)
    parser.add_argument("--keep", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-server", action="store_true")
    args = parser.parse_args()
    # `timeout` and batch schedulers send SIGTERM: exit through the finally blocks that
    # stop the servers and clusters this script started (their own process groups).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.simplefilter("ignore")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        stores = {"SQLite": f"sqlite:///{root / 'mlflow.db'}"}
        server = None
        if not args.no_server:
            server, stores["server"] = start_server(root)
        try:
            for uri in stores.values():  # warm: store created, client cached, imports done
                ours(200, args.keep, uri, "warm")
            bare(200)
            times: dict[str, list[float]] = {"bare": [], **{k: [] for k in stores}}
            for _ in range(args.repeats):
                times["bare"].append(bare(args.trials))
                for label, uri in stores.items():
                    times[label].append(ours(args.trials, args.keep, uri, label))
        finally:
            if server is not None:
                os.killpg(server.pid, signal.SIGKILL)
    base = statistics.median(times["bare"])
    print(f"{args.trials} trials, RandomSampler, trial_runs={args.keep}, median of {args.repeats}")
    print("| run | wall (s) | ratio to bare Optuna |")
    print("| --- | --- | --- |")
    print(f"| bare Optuna | {base:.2f} | 1.00 |")
    for label in stores:
        wall = statistics.median(times[label])
        print(f"| this project, {label} | {wall:.2f} | {wall / base:.2f} |")


if __name__ == "__main__":
    main()
