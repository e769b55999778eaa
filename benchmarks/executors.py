"""Throughput of optimize(executor=...) with 1 and 2 workers, per engine (issue 13).

A CPU-bound objective (pure Python, ~TRIAL_S seconds) on a SQLite Optuna storage and a
SQLite tracking file; each engine is started and warmed before the clock starts, so
what is timed is `study.optimize(..., executor=...)` itself. Prints trials/s, the
2-vs-1 worker speedup per engine (target >= 1.8x on 2 cores) and each engine's wall
time against the process pool's at 2 workers (target: at most 5 % more).

    python benchmarks/executors.py [--trials 24] [--trial-seconds 0.2] [--engines process,dask,submitit]
"""

from __future__ import annotations

import argparse
from concurrent.futures import ProcessPoolExecutor
import contextlib
import logging
import os
from pathlib import Path
import signal
import sys
import tempfile
import time
import warnings

import optuna

import optuna_mlflow_nested as omn

HERE = str(Path(__file__).resolve().parent)
sys.path.insert(0, HERE)
# Worker processes that engines start (Dask, submitit) must import the objective too.
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [HERE, os.environ.get("PYTHONPATH")]))
from cpu_objective import burn  # noqa: E402  (module-level: process pools pickle by reference)


@contextlib.contextmanager
def engine(name: str, workers: int, folder: Path):
    if name == "process":
        with ProcessPoolExecutor(workers) as pool:
            list(pool.map(abs, range(workers)))  # start the processes
            yield pool, None
    elif name == "dask":
        from distributed import Client
        from distributed import LocalCluster

        with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                          dashboard_address=None, host="127.0.0.1") as cluster, \
                Client(cluster) as client:
            client.wait_for_workers(workers)
            yield client.get_executor(), None
    elif name == "submitit":
        import submitit

        executor = submitit.AutoExecutor(folder=folder / "submitit", cluster="local")
        executor.update_parameters(timeout_min=30)
        yield executor, workers
    else:
        raise ValueError(name)


def run(name: str, workers: int, trials: int, trial_s: float) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        study = omn.create_study(f"{name}-{workers}", storage=f"sqlite:///{folder / 'o.db'}",
                                 tracking_uri=f"sqlite:///{folder / 'm.db'}", sampler="random",
                                 seed=0)
        study.set_user_attr("trial_seconds", trial_s)
        with engine(name, workers, folder) as (executor, n_workers):
            start = time.perf_counter()
            study.optimize(burn, n_trials=trials, executor=executor, n_workers=n_workers)
            wall = time.perf_counter() - start
        assert len(study.trials) == trials
        return wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--trials", type=int, default=24)
    parser.add_argument("--trial-seconds", type=float, default=0.2)
    parser.add_argument("--engines", default="process,dask,submitit")
    args = parser.parse_args()
    # `timeout` and batch schedulers send SIGTERM: exit through the finally blocks that
    # stop the servers and clusters this script started (their own process groups).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    logging.getLogger("distributed").setLevel(logging.ERROR)
    warnings.simplefilter("ignore")
    walls: dict[tuple[str, int], float] = {}
    for name in args.engines.split(","):
        for workers in (1, 2):
            walls[name, workers] = run(name, workers, args.trials, args.trial_seconds)
            print(f"{name:9} {workers} worker(s): {walls[name, workers]:6.2f} s, "
                  f"{args.trials / walls[name, workers]:5.2f} trials/s", flush=True)
    print("\n| engine | 1 worker (trials/s) | 2 workers (trials/s) | speedup "
          "| 2-worker wall vs process pool |")
    print("| --- | --- | --- | --- | --- |")
    for name in args.engines.split(","):
        one, two = walls[name, 1], walls[name, 2]
        versus = walls[name, 2] / walls["process", 2] if ("process", 2) in walls else float("nan")
        print(f"| {name} | {args.trials / one:.2f} | {args.trials / two:.2f} | {one / two:.2f}x | "
              f"{(versus - 1) * 100:+.1f} % |")


if __name__ == "__main__":
    main()
