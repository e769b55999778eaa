"""What an engine costs a CPU-bound task by itself, without this project's tracking.

The same fixed work (``cpu_objective.spin``, calibrated to about 0.5 s) runs as 16 tasks
on 2 workers: a process pool, then a local Dask cluster (scheduler in this process,
worker processes with one thread each). Per task it measures the wall time and the
thread's CPU time inside the task. For Dask it also measures the CPU its worker
processes used beside the tasks (event loops, heartbeats, monitors) and the CPU of this
process (the scheduler). ``benchmarks/executors.py`` found a trial's own work slower
under Dask than in the pool. This script separates Dask's own cost from what the
tracking adds.

Dask is run twice a round: with its default settings, and with :data:`QUIETER_DASK`,
which makes the periodic work of its worker processes' event loops rarer (each wake-up
takes the GIL from the task's thread).

    python benchmarks/engine_cost.py [--rounds-of 2] [--tasks 16]
"""

from __future__ import annotations

import argparse
from concurrent.futures import Executor
from concurrent.futures import ProcessPoolExecutor
import os
from pathlib import Path
import statistics
import sys
import time

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpu_objective import calibrate
from cpu_objective import spin

#: Dask settings for long CPU-bound tasks: the event loop's health tick (default every
#: 20 ms), the memory monitor (100 ms) and the system monitor (500 ms) each wake the
#: worker's event loop, which then takes the GIL from the task; the statistical profiler
#: samples every thread's stack every 10 ms. Set in a real cluster's environment as
#: ``DASK_DISTRIBUTED__ADMIN__TICK__INTERVAL=1s`` and so on.
QUIETER_DASK = {
    "distributed.admin.tick.interval": "1s",
    "distributed.worker.memory.monitor-interval": "1s",
    "distributed.admin.system-monitor.interval": "2s",
    "distributed.worker.profile.enabled": False,
}


def task(rounds: int, key: object) -> tuple[float, float, int]:
    """Wall and thread-CPU seconds of ``rounds`` of work, and the worker's pid.

    ``key`` makes every task distinct (Dask would run identical calls once).
    """
    wall, cpu = time.perf_counter(), time.thread_time()
    spin(rounds)
    return time.perf_counter() - wall, time.thread_time() - cpu, os.getpid()


def run(executor: Executor, rounds: int, n: int) -> list[tuple[float, float, int]]:
    futures = [executor.submit(task, rounds, (time.time_ns(), k)) for k in range(n)]
    return [f.result() for f in futures]


def cpu_seconds(pids: set[int]) -> float:
    total = 0.0
    for pid in pids:
        times = psutil.Process(pid).cpu_times()
        total += times.user + times.system
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds-of", type=int, default=2,
                        help="rounds of every engine, the order reversed every other round")
    parser.add_argument("--tasks", type=int, default=16)
    args = parser.parse_args()
    rounds = calibrate(0.5)
    me = psutil.Process()
    print("| round | engine | task wall, median (s) | task CPU, median (s) | all tasks (s) "
          "| engine CPU beside the tasks (s) |")
    print("| --- | --- | --- | --- | --- | --- |")
    engines: list[tuple[str, dict[str, object] | None]] = [
        ("process pool", None), ("Dask", {}), ("Dask, quieter settings", QUIETER_DASK)]
    batches: dict[str, list[float]] = {label: [] for label, _ in engines}
    for i in range(args.rounds_of):
        for label, settings in engines if i % 2 == 0 else engines[::-1]:  # drift evens out
            if settings is None:
                batches[label].append(pool_round(rounds, args.tasks, i))
            else:
                batches[label].append(dask_round(label, settings, rounds, args.tasks, i, me))
    print("\n| engine | all tasks, median of rounds (s) | against the process pool in the "
          "same round (median; each round) |")
    print("| --- | --- | --- |")
    for label, _ in engines:
        ratios = [b / p - 1 for b, p in zip(batches[label], batches["process pool"])]
        print(f"| {label} | {statistics.median(batches[label]):.2f} "
              f"| {statistics.median(ratios):+.1%} ({', '.join(f'{r:+.1%}' for r in ratios)}) |")


def pool_round(rounds: int, tasks: int, i: int) -> float:
    with ProcessPoolExecutor(2) as pool:
        run(pool, rounds, 2)
        start = time.perf_counter()
        done = run(pool, rounds, tasks)
        wall = time.perf_counter() - start
    print(f"| {i + 1} | process pool | {statistics.median(r[0] for r in done):.3f} "
          f"| {statistics.median(r[1] for r in done):.3f} | {wall:.2f} | not measured |",
          flush=True)
    return wall


def dask_round(label: str, settings: dict[str, object], rounds: int, tasks: int, i: int,
               me: psutil.Process) -> float:
    import dask
    from distributed import Client
    from distributed import LocalCluster

    with dask.config.set(settings), \
            LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                         dashboard_address=None, host="127.0.0.1") as cluster, \
            Client(cluster) as client:
        client.wait_for_workers(2)
        executor = client.get_executor()
        workers = {r[2] for r in run(executor, rounds, 8)}
        before_workers, before_me = cpu_seconds(workers), cpu_seconds({me.pid})
        start = time.perf_counter()
        done = run(executor, rounds, tasks)
        wall = time.perf_counter() - start
        in_tasks = sum(r[1] for r in done)
        beside = cpu_seconds(workers) - before_workers - in_tasks
        scheduler = cpu_seconds({me.pid}) - before_me
    print(f"| {i + 1} | {label} | {statistics.median(r[0] for r in done):.3f} "
          f"| {statistics.median(r[1] for r in done):.3f} | {wall:.2f} "
          f"| workers {beside:.2f}, scheduler {scheduler:.2f} |", flush=True)
    return wall


if __name__ == "__main__":
    main()
