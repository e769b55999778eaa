"""Database commits per trial in an executor worker, by storage call (issue 16).

Counts, rather than times, what a trial costs the two SQLite files: every SQLAlchemy
commit on the Optuna storage and on the MLflow tracking store during
``optimize(executor=ThreadPoolExecutor(1))`` (the worker runs in this process, so its
calls can be attributed), divided by the number of trials. Each commit is a
transaction; on SQLite, a write transaction is a sync to disk. Deterministic, so it
shows a change of one write per trial that the machine's noise hides in timings.

    python benchmarks/storage_commits.py [--trials 40]
"""

from __future__ import annotations

import argparse
import collections
from concurrent.futures import ThreadPoolExecutor
import tempfile
import traceback
import warnings

import optuna
import sqlalchemy
from sqlalchemy.engine import Engine

import optuna_mlflow_nested as omn


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--trials", type=int, default=40)
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.simplefilter("ignore")
    per_file: collections.Counter[str] = collections.Counter()
    per_call: collections.Counter[tuple[str, str]] = collections.Counter()

    def on_commit(connection: sqlalchemy.Connection) -> None:
        name = str(connection.engine.url).rsplit("/", 1)[-1]
        per_file[name] += 1
        if name == "optuna.db":
            stack = traceback.extract_stack()
            ours = [f.name for f in stack if "optuna_mlflow_nested" in f.filename]
            storage = [f.name for f in stack if "optuna/storages" in f.filename
                       and f.name not in ("_create_scoped_session", "__exit__")]
            per_call[ours[-1] if ours else "(Optuna's own thread)",
                     storage[-1] if storage else "?"] += 1

    with tempfile.TemporaryDirectory() as tmp:
        study = omn.create_study("commits", storage=f"sqlite:///{tmp}/optuna.db",
                                 tracking_uri=f"sqlite:///{tmp}/mlflow.db", sampler="random",
                                 seed=0)
        sqlalchemy.event.listen(Engine, "commit", on_commit)
        try:
            with ThreadPoolExecutor(1) as pool:
                study.optimize(lambda trial: trial.suggest_float("x", 0, 1),
                               n_trials=args.trials, executor=pool)
        finally:
            sqlalchemy.event.remove(Engine, "commit", on_commit)
    print(f"commits per trial ({args.trials} trials, one executor worker):")
    for name, count in sorted(per_file.items()):
        print(f"  {name}: {count / args.trials:.2f}")
    print("\n| caller in this project | Optuna storage call | commits per trial |")
    print("| --- | --- | --- |")
    for (caller, call), count in per_call.most_common():
        if count / args.trials >= 0.5:
            print(f"| {caller} | {call} | {count / args.trials:.2f} |")


if __name__ == "__main__":
    main()
