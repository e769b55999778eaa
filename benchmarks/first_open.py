"""A worker process's first opening of a study's stores, with and without the preload.

An executor worker's first task loads the study: it opens the Optuna storage and the
MLflow tracking store (SQLite files here, made before the runs). Each repeat starts two
fresh interpreters, in alternating order, that first import what a warm worker has
(``optuna_mlflow_nested.executors``, as ``executors.py --warm-workers`` does), then:

- **cold**: time ``load_study`` (what the task does first);
- **preloaded**: time ``worker_preload.warm_up()`` (what ``dask worker --preload
  optuna_mlflow_nested.worker_preload`` runs as the worker starts), then ``load_study``.

Medians over the repeats, in seconds of wall time (one process at a time).

    python benchmarks/first_open.py [--repeats 10]
"""

from __future__ import annotations

import argparse
from pathlib import Path
import statistics
import subprocess
import sys
import tempfile

CHILD = """
import sys, time
import optuna_mlflow_nested.executors
from optuna_mlflow_nested import load_study
preload = 0.0
if sys.argv[1] == "preloaded":
    from optuna_mlflow_nested import worker_preload
    start = time.perf_counter()
    worker_preload.warm_up()
    preload = time.perf_counter() - start
start = time.perf_counter()
load_study("first-open", storage=sys.argv[2], tracking_uri=sys.argv[3])
print(preload, time.perf_counter() - start)
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    import optuna

    import optuna_mlflow_nested as omn

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        storage, tracking = f"sqlite:///{Path(tmp) / 'o.db'}", f"sqlite:///{Path(tmp) / 'm.db'}"
        omn.create_study("first-open", storage=storage, tracking_uri=tracking)
        timings: dict[str, list[tuple[float, float]]] = {"cold": [], "preloaded": []}
        for repeat in range(args.repeats):
            for mode in ("cold", "preloaded") if repeat % 2 == 0 else ("preloaded", "cold"):
                out = subprocess.run([sys.executable, "-c", CHILD, mode, storage, tracking],
                                     capture_output=True, text=True, check=True).stdout
                preload, load = map(float, out.split()[-2:])
                timings[mode].append((preload, load))
    print(f"{args.repeats} fresh interpreters each, medians (s):")
    print("| worker | preload, as the worker starts | load_study (the first task's start) |")
    print("| --- | --- | --- |")
    for mode, pairs in timings.items():
        preload = statistics.median(p for p, _ in pairs)
        load = statistics.median(load for _, load in pairs)
        print(f"| {mode} | {preload:.3f} | {load:.3f} |")


if __name__ == "__main__":
    main()
