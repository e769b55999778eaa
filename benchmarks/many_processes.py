"""Many worker processes on one machine, one study, one SQLite tracking file: what the
tracking prints on stderr, the tree it leaves, and the trials/s.

Each configuration makes a fresh study (a journal storage file and a SQLite tracking file
in a temporary folder), then starts its worker processes at once, each loading the study
and running its trials, as the hand-started workers of README's recipes do. The
objective suggests two params and computes ``--units`` eigenvalue problems of a 60x60
matrix with one BLAS thread (0: it returns at once, the most writes per second; about
450 make 0.1 s here). Counted per configuration: the workers' stderr lines that hold
"Warning", "IntegrityError" or "Traceback" (the distinct warning lines are printed
after each configuration's row); then the child runs, trial numbers with more
than one run, finished trials with none, runs not FINISHED, the parent run's status;
trials/s from the first trial's start to the last one's end (with instant trials the
runs may still be waiting for their writers then); trials/s from the first trial's
start to the last worker's exit (every run written, the end of each search included);
and the CPU time of the workers and the processes they waited for (their writer
processes), start-up included, per trial.

``--workers`` and ``--writers`` take comma-separated lists and every combination runs
in every round (in reverse order every other round): ``auto`` is the library's default
(a writer process in each worker process), ``process`` and ``threads`` set
``OMN_WRITER``, ``bare`` runs plain Optuna without tracking, for reference, and
``floor`` plain Optuna with the store's own cost: a callback that makes each trial's
run with MLflow's three public calls (create_run, one log_batch with our trial runs'
params, metrics and tags, set_terminated) on the same SQLite file in WAL mode. With
``--total N`` each worker runs its share of N trials (for a speedup of more workers
against one); else each runs ``--trials``. With ``--prefill N`` the study is made with N
trials already run (by the same arm, before the clock; they are not counted, except in
the tree's checks): ``--workers 1 --trials 1 --prefill 960`` gives, in its CPU column,
what one worker process costs in all beside a study of 960 trials. With ``--also PATH``, each round also runs
the package of another checkout (``PATH`` first on ``PYTHONPATH``), to compare two
versions side by side. At the end: medians over the rounds per configuration, and each
configuration's speedup against the same package and writer with the fewest workers.

    python benchmarks/many_processes.py [--workers 8] [--writers auto] [--trials 40 | --total N]
        [--units 0] [--prefill 0] [--repeats 3] [--also /path/to/other/checkout]
"""

from __future__ import annotations

import argparse
import collections
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

#: Arms that run no study of this project: plain Optuna, with or without MLflow's calls
#: (WORKER's own test of its mode spells them out).
NO_PACKAGE = ("bare", "floor")

WORKER = """
import sys
import numpy as np
import optuna
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
optuna.logging.set_verbosity(optuna.logging.WARNING)
trials, units, mode = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
matrix = np.random.default_rng(0).random((60, 60))

def objective(trial):
    x = trial.suggest_float("x", 0, 1)
    y = trial.suggest_int("y", 0, 10)
    for _ in range(units):
        np.linalg.eigvalsh(matrix @ matrix.T)
    return x + y

storage = JournalStorage(JournalFileBackend("journal.log"))
sampler = optuna.samplers.RandomSampler()
callbacks = []
if mode in ("bare", "floor"):
    study = optuna.create_study(study_name="many", storage=storage, sampler=sampler,
                                load_if_exists=True)
    print(optuna.__file__)
if mode == "floor":  # MLflow's three public calls per trial, in the objective's process
    import sqlite3
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.tracking import MlflowClient
    from optuna_mlflow_nested.tracking.records import trial_record
    client = MlflowClient("sqlite:///mlflow.db")
    if client.get_experiment_by_name("many") is None:  # the setup: the file in WAL mode,
        client.create_experiment("many")  # as ours leaves it
        sqlite3.connect("mlflow.db").execute("PRAGMA journal_mode=WAL").close()
    experiment_id = client.get_experiment_by_name("many").experiment_id

    def floor(study, trial):  # the params, metrics and tags of our record of the trial
        record = trial_record(study, trial, tracking_uri="sqlite:///mlflow.db",
                              experiment_id=experiment_id, parent_run_id=None, run_id=None)
        run = client.create_run(experiment_id, run_name=record.run_name)
        client.log_batch(run.info.run_id, metrics=[Metric(*m) for m in record.metrics],
                         params=[Param(k, v) for k, v in record.params.items()],
                         tags=[RunTag(k, v) for k, v in record.tags.items()
                               if k != "mlflow.runName"])  # (as ours: set by create_run)
        client.set_terminated(run.info.run_id, record.status, record.end_time)

    callbacks = [floor]
elif mode != "bare":
    import optuna_mlflow_nested as omn
    study = omn.create_study("many", storage=storage, tracking_uri="sqlite:///mlflow.db",
                             sampler=sampler, load_if_exists=True)
    print(omn.__file__)
if trials:
    study.optimize(objective, n_trials=trials, callbacks=callbacks)
"""


def one_run(workers: int, trials: int, units: int, writer: str,
            checkout: str | None, prefill: int = 0) -> dict[str, Any]:
    from mlflow.tracking import MlflowClient
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1"}
    env.pop("OMN_WRITER", None)
    if writer in ("process", "threads"):
        env["OMN_WRITER"] = writer
    if checkout:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [checkout, env.get("PYTHONPATH")]))
    with tempfile.TemporaryDirectory() as folder:
        made = subprocess.run(  # the study, once, with ``prefill`` trials already run
            [sys.executable, "-c", WORKER, str(prefill), str(units), writer], cwd=folder,
            env=env, capture_output=True, text=True)
        if made.returncode:
            raise RuntimeError(made.stderr[-3000:])
        package = made.stdout
        # Each worker's stderr to a file: a pipe read one worker after another could fill
        # up and stall the others.
        logs = [os.path.join(folder, f"stderr-{i}.txt") for i in range(workers)]
        procs = []
        cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
        for log in logs:
            with open(log, "w") as err:
                procs.append(subprocess.Popen(
                    [sys.executable, "-c", WORKER, str(trials), str(units), writer], cwd=folder,
                    env=env, stdout=subprocess.DEVNULL, stderr=err))
        stderr = []
        for proc, log in zip(procs, logs):
            proc.wait()
            last_exit = time.time()  # waited in turn: the last exit when the loop ends
            with open(log) as err:
                text = err.read()
            if proc.returncode:
                raise RuntimeError(text[-3000:])
            stderr += text.splitlines()
        study = optuna.load_study(study_name="many", storage=JournalStorage(
            JournalFileBackend(os.path.join(folder, "journal.log"))))
        every_finished = [t for t in study.trials if t.state.is_finished()]
        finished = [t for t in every_finished if t.number >= prefill]  # the workers' trials
        cpu_after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (cpu_after.ru_utime - cpu_before.ru_utime) + (cpu_after.ru_stime - cpu_before.ru_stime)
        first_start = min(t.datetime_start for t in finished)
        span = max((max(t.datetime_complete for t in finished) - first_start).total_seconds(),
                   1e-6)
        to_exit = last_exit - first_start.timestamp()
        row: dict[str, Any] = {
            "package": "" if writer in NO_PACKAGE else os.path.dirname(package.strip()),
            "writer": writer, "workers": workers,
            "warning lines": sum("Warning" in line for line in stderr),
            "IntegrityError lines": sum("IntegrityError" in line for line in stderr),
            "Traceback lines": sum("Traceback" in line for line in stderr),
            "trials": len(finished),
            # The warnings' own lines, each once (kept out of the tables: "_")
            "_warnings": sorted({line.strip() for line in stderr if "Warning" in line}),
        }
        if writer not in NO_PACKAGE:
            client = MlflowClient(f"sqlite:///{folder}/mlflow.db")
            experiment = client.get_experiment_by_name("many")
            runs = client.search_runs([experiment.experiment_id], "tags.`optuna.role` = 'trial'",
                                      max_results=50_000)
            per_trial = collections.Counter(r.data.tags.get("optuna.trial_number") for r in runs)
            row.update({
                "child runs": len(runs),
                "duplicated": sum(n > 1 for n in per_trial.values()),
                "without a run": sum(str(t.number) not in per_trial for t in every_finished),
                "not FINISHED": sum(r.info.status != "FINISHED" for r in runs),
                "parent": client.search_runs([experiment.experiment_id],
                                             "tags.`optuna.role` = 'study'")[0].info.status,
            })
        row["trials/s"] = round(len(finished) / span, 2)
        row["trials/s to the last exit"] = round(len(finished) / to_exit, 2)
        row["CPU ms/trial"] = round(1000 * cpu / len(finished), 1)
        return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workers", default="8", help="worker processes, e.g. 1,2")
    parser.add_argument("--writers", default="auto",
                        help="auto, process, threads, bare, floor")
    parser.add_argument("--trials", type=int, default=40, help="per worker")
    parser.add_argument("--total", type=int, help="trials in all, shared by the workers")
    parser.add_argument("--units", type=int, default=0, help="eigvalsh(60x60) per trial")
    parser.add_argument("--prefill", type=int, default=0,
                        help="trials run before the workers start (not counted)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--also", metavar="PATH", help="another checkout to run beside this one")
    args = parser.parse_args()
    worker_counts = [int(n) for n in args.workers.split(",")]
    writers = args.writers.split(",")
    unknown = set(writers) - {"auto", "process", "threads", "bare", "floor"}
    if unknown:
        parser.error(f"unknown --writers {sorted(unknown)}")
    checkouts = [None, args.also] if args.also else [None]
    configs = [(c, w, n) for c in checkouts for w in writers for n in worker_counts
               if not (w in NO_PACKAGE and c is not None)]  # once: no package of ours
    rows = []
    for repeat in range(args.repeats):
        for checkout, writer, workers in configs if repeat % 2 == 0 else configs[::-1]:
            trials = args.total // workers if args.total else args.trials
            row = {"round": repeat + 1,
                   **one_run(workers, trials, args.units, writer, checkout, args.prefill)}
            print({k: v for k, v in row.items() if not k.startswith("_")}, flush=True)
            for line in row["_warnings"]:
                print(f"    stderr: {line[:300]}", flush=True)
            rows.append(row)
    keys = list(dict.fromkeys(k for row in rows for k in row if not k.startswith("_")))
    print("\n| " + " | ".join(keys) + " |")
    print("|" + " --- |" * len(keys))
    order = sorted(rows, key=lambda r: (r["package"], r["writer"], r["workers"], r["round"]))
    for row in order:
        print("| " + " | ".join(str(row.get(k, "")) for k in keys) + " |")
    columns = ["trials/s", "trials/s to the last exit", "CPU ms/trial"]
    grouped: dict[tuple[str, str, int], list[dict[str, Any]]] = collections.defaultdict(list)
    for row in order:
        grouped[row["package"], row["writer"], row["workers"]].append(row)
    medians = {config: {c: statistics.median(r[c] for r in group) for c in columns}
               for config, group in grouped.items()}
    print(f"\nMedians of {args.repeats} rounds (speedups against the same package and "
          "writer with the fewest workers):\n")
    print("| package | writer | workers | trials/s | speedup | trials/s to the last exit "
          "| speedup | CPU ms/trial |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for (package, writer, workers), median in medians.items():
        base = medians[package, writer, min(worker_counts)]
        print(f"| {package} | {writer} | {workers} | {median['trials/s']:.2f} "
              f"| {median['trials/s'] / base['trials/s']:.2f}x "
              f"| {median['trials/s to the last exit']:.2f} "
              f"| {median['trials/s to the last exit'] / base['trials/s to the last exit']:.2f}x "
              f"| {median['CPU ms/trial']:.1f} |")


if __name__ == "__main__":
    main()
