"""How long a program takes to end after its search (the writer process's exit), and how
long ``optimize(executor=submitit...)`` waits for its job to end.

A fresh program runs a 3-trial search (a SQLite tracking file in a temporary folder, its
working directory), prints the time, and returns; this script times from that line to
the process's end.
That is the program's own interpreter finalization plus its wait for the writer
process, which draws the parent's figures, then exits (``WriterProcess.stop``). Each
round runs, in turn: the default writer process, and ``OMN_WRITER=threads`` (no writer
process to wait for; its figures are drawn inside ``optimize``). With ``--submitit``,
each round also runs a program whose 3 trials run in one job of submitit's local
executor (a fresh process, which ends when its task is done): it prints the time from
its last trial's end to ``optimize``'s return, which includes the job process's exit.
With ``--ask-tell``, each round also runs a program that only asks and tells 20 trials
(no ``optimize``), whose exit ends the parent's search (``tracking/ask_tell_end.py``):
timed the same way. With ``--also PATH``, each round also runs each with the package of another checkout
(``PATH`` put first on ``PYTHONPATH``, which the job inherits), to compare two versions
side by side. Medians over the rounds, seconds.

    python benchmarks/exit_time.py [--repeats 5] [--submitit] [--ask-tell] [--also /path/to/other/checkout]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

PROGRAM = """
import time
import optuna
import optuna_mlflow_nested as omn
optuna.logging.set_verbosity(optuna.logging.WARNING)
study = omn.create_study("exit", tracking_uri="sqlite:///mlflow.db", seed=0)
study.optimize(lambda trial: trial.suggest_float("x", -1, 1) ** 2, n_trials=3)
print(omn.__file__, time.time(), flush=True)
"""

SUBMITIT_PROGRAM = """
import time
import optuna
import submitit
import optuna_mlflow_nested as omn
optuna.logging.set_verbosity(optuna.logging.WARNING)
study = omn.create_study("exit", storage="sqlite:///optuna.db", tracking_uri="sqlite:///mlflow.db",
                         seed=0)
executor = submitit.AutoExecutor(folder="jobs", cluster="local")
executor.update_parameters(timeout_min=5)
study.optimize(lambda trial: trial.suggest_float("x", -1, 1) ** 2, n_trials=3, executor=executor,
               n_workers=1)
returned = time.time()
last = max(t.datetime_complete for t in study.trials).timestamp()  # naive local, as time()
study.wait_for_figures()
print(omn.__file__, returned - last, flush=True)
"""

ASK_TELL_PROGRAM = """
import time
import optuna
import optuna_mlflow_nested as omn
optuna.logging.set_verbosity(optuna.logging.WARNING)
study = omn.create_study("exit", tracking_uri="sqlite:///mlflow.db", seed=0)
for _ in range(20):
    trial = study.ask()
    study.tell(trial, trial.suggest_float("x", -1, 1) ** 2 + trial.suggest_float("y", -1, 1))
print(omn.__file__, time.time(), flush=True)
"""


def once(writer: str, checkout: str | None) -> tuple[float, str]:
    """Seconds from the program's last line to its end, or for ``writer="submitit"`` the
    seconds the program printed (its last trial's end to ``optimize``'s return)."""
    env = {**os.environ}
    if writer in ("process", "threads"):
        env["OMN_WRITER"] = writer
    if checkout:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [checkout, env.get("PYTHONPATH")]))
    program = {"submitit": SUBMITIT_PROGRAM, "ask-tell": ASK_TELL_PROGRAM}.get(writer, PROGRAM)
    with tempfile.TemporaryDirectory() as folder:  # the store and its artifacts
        done = subprocess.run([sys.executable, "-c", program], env=env, capture_output=True,
                              text=True, cwd=folder)
        ended = time.time()
    if done.returncode:
        raise RuntimeError(done.stderr[-3000:])
    package, printed = done.stdout.split()[-2:]
    return (float(printed) if writer == "submitit" else ended - float(printed)), package


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--also", metavar="PATH", help="another checkout to time beside this one")
    parser.add_argument("--submitit", action="store_true",
                        help="also time a search in one job of submitit's local executor")
    parser.add_argument("--ask-tell", action="store_true",
                        help="also time a program that only asks and tells 20 trials")
    args = parser.parse_args()
    checkouts = [None, args.also] if args.also else [None]
    kinds = ("process", "threads") + ("submitit",) * args.submitit + ("ask-tell",) * args.ask_tell
    configs = [(writer, checkout) for checkout in checkouts for writer in kinds]
    times: dict[tuple[str, str | None], list[float]] = {config: [] for config in configs}
    packages: dict[str | None, str] = {}
    for repeat in range(args.repeats):
        for writer, checkout in configs if repeat % 2 == 0 else configs[::-1]:
            seconds, packages[checkout] = once(writer, checkout)
            times[writer, checkout].append(seconds)
            print(f"round {repeat + 1}: {writer:7} {packages[checkout]}: {seconds:.2f} s",
                  flush=True)
    print(f"\nMedians of {args.repeats} rounds, seconds from the program's last line to its end"
          + (" (submitit: from the last trial's end to optimize's return)" if args.submitit else "")
          + ":")
    titles = {"process": "writer process (default)", "threads": "OMN_WRITER=threads",
              "submitit": "submitit job, last trial to return", "ask-tell": "ask/tell only"}
    print("| package | " + " | ".join(titles[kind] for kind in kinds) + " |")
    print("| --- |" + " --- |" * len(kinds))
    for checkout in checkouts:
        row = [statistics.median(times[writer, checkout]) for writer in kinds]
        print(f"| {packages[checkout]} | " + " | ".join(f"{value:.2f}" for value in row) + " |")


if __name__ == "__main__":
    main()
