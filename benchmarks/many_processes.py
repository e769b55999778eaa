"""Many worker processes on one machine, one study, one SQLite tracking file: what the
tracking prints on stderr, and the tree it leaves.

Each round makes a fresh study (a journal storage file and a SQLite tracking file in a
temporary folder), then starts ``--workers`` Python processes at once, each loading the
study and running ``--trials`` trials with its own writer process (the default), as the
hand-started workers of README's recipes do. The objective suggests two params and
computes ``--units`` eigenvalue problems of a 60x60 matrix (0: it returns at once,
the most writes per second). Counted per round: the workers' stderr lines that hold
"Warning", "IntegrityError" or "Traceback"; then the child runs, trial numbers with
more than one run, finished trials with none, runs not FINISHED, the parent run's
status; and trials/s from the
first trial's start to the last one's end. With ``--also PATH``, each round also runs
the package of another checkout (``PATH`` first on ``PYTHONPATH``), to compare two
versions side by side.

    python benchmarks/many_processes.py [--workers 8] [--trials 40] [--units 0]
        [--repeats 3] [--also /path/to/other/checkout]
"""

from __future__ import annotations

import argparse
import collections
import os
import subprocess
import sys
import tempfile

WORKER = """
import sys
import numpy as np
import optuna
import optuna_mlflow_nested as omn
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
optuna.logging.set_verbosity(optuna.logging.WARNING)
units = int(sys.argv[2])
matrix = np.random.default_rng(0).random((60, 60))

def objective(trial):
    x = trial.suggest_float("x", 0, 1)
    y = trial.suggest_int("y", 0, 10)
    for _ in range(units):
        np.linalg.eigvalsh(matrix @ matrix.T)
    return x + y

storage = JournalStorage(JournalFileBackend("journal.log"))
study = omn.create_study("many", storage=storage, tracking_uri="sqlite:///mlflow.db",
                         sampler="random", load_if_exists=True)
if int(sys.argv[1]):
    study.optimize(objective, n_trials=int(sys.argv[1]))
print(omn.__file__)
"""


def one_round(workers: int, trials: int, units: int, checkout: str | None) -> dict[str, object]:
    from mlflow.tracking import MlflowClient
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1"}
    if checkout:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [checkout, env.get("PYTHONPATH")]))
    with tempfile.TemporaryDirectory() as folder:
        def start(n: int) -> subprocess.Popen[str]:
            return subprocess.Popen([sys.executable, "-c", WORKER, str(n), str(units)], cwd=folder,
                                    env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

        made = start(0)  # the study and the tracking file, once
        package, err = made.communicate()
        if made.returncode:
            raise RuntimeError(err[-3000:])
        procs = [start(trials) for _ in range(workers)]
        stderr = []
        for proc in procs:
            _, err = proc.communicate()
            if proc.returncode:
                raise RuntimeError(err[-3000:])
            stderr += err.splitlines()
        study = optuna.load_study(study_name="many", storage=JournalStorage(
            JournalFileBackend(os.path.join(folder, "journal.log"))))
        client = MlflowClient(f"sqlite:///{folder}/mlflow.db")
        experiment = client.get_experiment_by_name("many")
        runs = client.search_runs([experiment.experiment_id], "tags.`optuna.role` = 'trial'",
                                  max_results=50_000)
        per_trial = collections.Counter(r.data.tags.get("optuna.trial_number") for r in runs)
        finished = [t for t in study.trials if t.state.is_finished()]
        span = (max(t.datetime_complete for t in finished)
                - min(t.datetime_start for t in finished)).total_seconds()
        return {
            "package": os.path.dirname(package.strip()),
            "warning lines": sum("Warning" in line for line in stderr),
            "IntegrityError lines": sum("IntegrityError" in line for line in stderr),
            "Traceback lines": sum("Traceback" in line for line in stderr),
            "trials": len(finished),
            "child runs": len(runs),
            "duplicated": sum(n > 1 for n in per_trial.values()),
            "without a run": sum(str(t.number) not in per_trial for t in finished),
            "not FINISHED": sum(r.info.status != "FINISHED" for r in runs),
            "parent": client.search_runs([experiment.experiment_id],
                                         "tags.`optuna.role` = 'study'")[0].info.status,
            "trials/s": round(len(finished) / span, 1),
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--trials", type=int, default=40, help="per worker")
    parser.add_argument("--units", type=int, default=0, help="eigvalsh(60x60) per trial")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--also", metavar="PATH", help="another checkout to run beside this one")
    args = parser.parse_args()
    checkouts = [None, args.also] if args.also else [None]
    rows = []
    for repeat in range(args.repeats):
        for checkout in checkouts if repeat % 2 == 0 else checkouts[::-1]:
            row = {"round": repeat + 1, **one_round(args.workers, args.trials, args.units, checkout)}
            print(row, flush=True)
            rows.append(row)
    keys = list(rows[0])
    print("\n| " + " | ".join(keys) + " |")
    print("|" + " --- |" * len(keys))
    for row in sorted(rows, key=lambda r: (str(r["package"]), r["round"])):
        print("| " + " | ".join(str(row[k]) for k in keys) + " |")


if __name__ == "__main__":
    main()
