"""Throughput of optimize(executor=...) with 1 and 2 workers, per engine (issue 13).

A CPU-bound objective (pure Python: a fixed amount of work, calibrated here to take
about TRIAL_S seconds of one core) on a SQLite Optuna storage and a SQLite tracking
file; each engine is started before the clock starts, so what is timed is
`study.optimize(..., executor=...)` itself, each worker's first import of the project
included. Prints, per engine and worker count, the wall time, how long the first trial
took to start and how long optimize took to return after the last trial ended (an
engine's fixed costs), two rates (trials over the wall time; trials over the span from
the first trial's start to the last trial's end, the steady rate without those fixed
costs), the objective's own work time per trial, and the share of the workers' time
(workers x wall) spent in that work. Then the 2-vs-1 worker speedup (target >= 1.8x on
2 cores) and each engine's time against the process pool's at 2 workers (target: at
most 5 % more): on the wall time, on the steady span, and at equal work speed (from
the shares, which the machine's drifting speed cancels out of).

    python benchmarks/executors.py [--trials 24] [--trial-seconds 0.2] [--repeats 1]
        [--engines process,dask,submitit] [--warm-workers]

Engines: process (a process pool), dask (a local Dask cluster), dask-noprofile (the
same with Dask's statistical profiler off), dask-quiet (the same with
``engine_cost.QUIETER_DASK``: the profiler off and the worker's periodic event-loop
work made rarer), each of those three with ``+preload`` (its workers started with
``--preload optuna_mlflow_nested.worker_preload``, as README's recipe does), submitit
(its local executor), and bare: the process pool running bare Optuna, without tracking
(each worker loads the study and runs its share of the budget), the reference for the
others' speedup.
"""

from __future__ import annotations

import argparse
from concurrent.futures import ProcessPoolExecutor
import contextlib
import dataclasses
import datetime
import logging
import os
from pathlib import Path
import signal
import statistics
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
from cpu_objective import Burn  # noqa: E402  (module-level: process pools pickle by reference)
from cpu_objective import calibrate  # noqa: E402
from cpu_objective import objective_seconds  # noqa: E402


def _import_project() -> None:
    """What a worker's first task imports: long-lived workers pay it once, not per search."""
    import cpu_objective  # noqa: F401
    from mlflow.tracking import MlflowClient  # noqa: F401

    import optuna_mlflow_nested.executors  # noqa: F401


@contextlib.contextmanager
def engine(name: str, workers: int, folder: Path, warm: bool = False):
    if name in ("process", "bare"):  # bare: the same pool running bare Optuna
        with ProcessPoolExecutor(workers) as pool:
            list(pool.map(abs, range(workers)))  # start the processes
            yield pool, None
    elif (base := name.removesuffix("+preload")) in ("dask", "dask-noprofile", "dask-quiet"):
        import dask
        from distributed import Client
        from distributed import LocalCluster
        from engine_cost import QUIETER_DASK

        # dask-noprofile: Dask's statistical profiler (a thread in each worker sampling
        # every thread's stack every 10 ms) off, to see what it costs a CPU-bound objective.
        by_engine: dict[str, dict[str, object]] = {
            "dask": {}, "dask-quiet": QUIETER_DASK,
            "dask-noprofile": {"distributed.worker.profile.enabled": False}}
        settings = by_engine[base]
        # +preload: the workers start with the project's preload (as README's recipe
        # starts them), which pays the stores' imports before any search (a forked pool
        # inherits them from this process).
        preload = ["optuna_mlflow_nested.worker_preload"] if base != name else []
        with dask.config.set(settings), \
                LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                             dashboard_address=None, host="127.0.0.1",
                             preload=preload) as cluster, \
                Client(cluster) as client:
            client.wait_for_workers(workers)
            if warm:
                client.run(_import_project)
            yield client.get_executor(), None
    elif name == "submitit":
        import submitit

        executor = submitit.AutoExecutor(folder=folder / "submitit", cluster="local")
        executor.update_parameters(timeout_min=30)
        yield executor, workers
    else:
        raise ValueError(name)


@dataclasses.dataclass(frozen=True)
class Timing:
    wall: float  # seconds in optimize
    to_first: float  # optimize called -> the first trial started
    after_last: float  # the last trial ended -> optimize returned
    span: float  # the first trial started -> the last trial ended
    work: float  # mean seconds of the objective's own work per trial (the machine's speed)
    in_objective: float  # share of the workers' time (workers x wall) spent in that work


def bare_optuna_worker(storage: str, objective: Burn, n_trials: int, seed: int) -> None:
    """Bare Optuna's way to share a study (the reference for the tracked engines): a
    process that loads the study and runs its share of the budget, no tracking."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name="bare", storage=storage,
                              sampler=optuna.samplers.RandomSampler(seed=seed))
    study.optimize(objective, n_trials=n_trials)


def run(name: str, workers: int, trials: int, objective: Burn, warm: bool = False) -> Timing:
    # A file something still writes as the folder is removed must not end the whole run.
    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as tmp:
        folder = Path(tmp)
        (folder / "work").mkdir()
        objective = dataclasses.replace(objective, log_dir=str(folder / "work"))
        storage = f"sqlite:///{folder / 'o.db'}"
        # In the folder: the store's artifact root (./mlruns) is resolved on its opening,
        # so the parent's figures land here, not in the current directory.
        with contextlib.chdir(folder):
            tracked = None if name == "bare" else omn.create_study(
                f"{name}-{workers}", storage=storage,
                tracking_uri=f"sqlite:///{folder / 'm.db'}", sampler="random", seed=0)
        study = tracked or optuna.create_study(study_name="bare", storage=storage)
        with engine(name, workers, folder, warm) as (executor, n_workers):
            called = datetime.datetime.now()  # Optuna stamps trials with naive local times
            start = time.perf_counter()
            if tracked is None:
                shares = [trials // workers + (i < trials % workers) for i in range(workers)]
                for future in [executor.submit(bare_optuna_worker, storage, objective, share, i)
                               for i, share in enumerate(shares)]:
                    future.result()
            else:
                tracked.optimize(objective, n_trials=trials, executor=executor,
                                 n_workers=n_workers)
            wall = time.perf_counter() - start
        if tracked is not None:
            # Untimed: after optimize returns, the writer process still logs the parent's
            # figures, to this folder's tracking file and artifacts, removed below.
            tracked.wait_for_figures()
        done = study.trials
        assert len(done) == trials and all(t.state.name == "COMPLETE" for t in done)
        first = min(t.datetime_start for t in done if t.datetime_start)
        last = max(t.datetime_complete for t in done if t.datetime_complete)
        to_first, to_last = (first - called).total_seconds(), (last - called).total_seconds()
        work = objective_seconds(str(folder / "work"))
        assert len(work) == trials
        return Timing(wall, to_first, wall - to_last, to_last - to_first, sum(work) / trials,
                      sum(work) / (workers * wall))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--trials", type=int, default=24)
    parser.add_argument("--trial-seconds", type=float, default=0.2)
    parser.add_argument("--engines", default="process,dask,submitit")
    parser.add_argument("--repeats", type=int, default=1,
                        help="rounds over every engine and worker count (medians reported)")
    parser.add_argument("--warm-workers", action="store_true",
                        help="Dask's workers import the project and the objective before "
                             "the clock starts (the pool's are forked with both); for the "
                             "stores' imports too, see +preload")
    args = parser.parse_args()
    # `timeout` and batch schedulers send SIGTERM: exit through the finally blocks that
    # stop the servers and clusters this script started (their own process groups).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    logging.getLogger("distributed").setLevel(logging.ERROR)
    warnings.simplefilter("ignore")
    objective = Burn(calibrate(args.trial_seconds))
    print(f"objective: {objective.rounds} rounds per trial (about {args.trial_seconds} s of "
          "one core here, calibrated before the runs)", flush=True)
    # The calling process's first optimize pays for its writer process and figures:
    # a small untimed one first, so that no configuration below pays it.
    run("process", 1, 2, Burn(1))
    engines = args.engines.split(",")
    configs = [(name, workers) for name in engines for workers in (1, 2)]
    measured: dict[tuple[str, int], list[Timing]] = {config: [] for config in configs}
    for repeat in range(args.repeats):
        # The machine's speed drifts over minutes: every round runs every configuration,
        # odd rounds in reverse order, and the tables give medians.
        for name, workers in configs if repeat % 2 == 0 else configs[::-1]:
            t = run(name, workers, args.trials, objective, args.warm_workers)
            measured[name, workers].append(t)
            print(f"round {repeat + 1}: {name:9} {workers} worker(s): wall {t.wall:6.2f} s, "
                  f"first trial after {t.to_first:5.2f} s, returned {t.after_last:5.2f} s "
                  f"after the last; {args.trials / t.wall:5.2f} trials/s, "
                  f"steady {args.trials / t.span:5.2f}; work {t.work:.3f} s a trial, "
                  f"{t.in_objective:.1%} of the workers' time", flush=True)
    runs = {config: Timing(*(statistics.median(getattr(t, field.name) for t in timings)
                             for field in dataclasses.fields(Timing)))
            for config, timings in measured.items()}
    print(f"\nMedians of {args.repeats} round(s), {args.trials} trials each:")
    print("\n| engine | workers | wall (s) | to first trial (s) | after last trial (s) "
          "| trials/s | steady trials/s | objective's work (s a trial) "
          "| workers' time in the objective |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for (name, workers), t in runs.items():
        print(f"| {name} | {workers} | {t.wall:.2f} | {t.to_first:.2f} | {t.after_last:.2f} "
              f"| {args.trials / t.wall:.2f} | {args.trials / t.span:.2f} | {t.work:.3f} "
              f"| {t.in_objective:.1%} |")
    # The work's own speed drifts with the machine (and differs between a forked and a
    # fresh interpreter): the last two columns compare the shares of the workers' time
    # spent in the objective, which that speed cancels out of.
    print("\n| engine | speedup, wall | speedup, steady | speedup, at equal work speed "
          "| 2 workers vs process pool, wall | vs process pool, at equal work speed |")
    print("| --- | --- | --- | --- | --- | --- |")
    pool = runs.get(("process", 2))
    for name in engines:
        one, two = runs[name, 1], runs[name, 2]
        wall_vs = f"{(two.wall / pool.wall - 1) * 100:+.1f} %" if pool else "n/a"
        share_vs = f"{(pool.in_objective / two.in_objective - 1) * 100:+.1f} %" if pool else "n/a"
        print(f"| {name} | {one.wall / two.wall:.2f}x | {one.span / two.span:.2f}x "
              f"| {2 * two.in_objective / one.in_objective:.2f}x | {wall_vs} | {share_vs} |")

if __name__ == "__main__":
    main()
