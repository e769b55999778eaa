"""How long a program takes to end after its search (the writer process's exit).

A fresh program runs a 3-trial search (a SQLite tracking file in a temporary folder, its
working directory), prints the time, and returns; this script times from that line to
the process's end.
That is the program's own interpreter finalization plus its wait for the writer
process, which draws the parent's figures, then exits (``WriterProcess.stop``). Each
round runs, in turn: the default writer process, and ``OMN_WRITER=threads`` (no writer
process to wait for; its figures are drawn inside ``optimize``). With ``--also PATH``,
each round also runs both with the package of another checkout (``PATH`` put first on
``PYTHONPATH``), to compare two versions side by side. Medians over the rounds, seconds.

    python benchmarks/exit_time.py [--repeats 5] [--also /path/to/other/checkout]
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


def once(writer: str, checkout: str | None) -> tuple[float, str]:
    env = {**os.environ, "OMN_WRITER": writer}
    if checkout:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [checkout, env.get("PYTHONPATH")]))
    with tempfile.TemporaryDirectory() as folder:  # the store and its artifacts
        done = subprocess.run([sys.executable, "-c", PROGRAM], env=env, capture_output=True,
                              text=True, cwd=folder)
        ended = time.time()
    if done.returncode:
        raise RuntimeError(done.stderr[-3000:])
    package, printed = done.stdout.split()[-2:]
    return ended - float(printed), package


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--also", metavar="PATH", help="another checkout to time beside this one")
    args = parser.parse_args()
    checkouts = [None, args.also] if args.also else [None]
    configs = [(writer, checkout) for checkout in checkouts for writer in ("process", "threads")]
    times: dict[tuple[str, str | None], list[float]] = {config: [] for config in configs}
    packages: dict[str | None, str] = {}
    for repeat in range(args.repeats):
        for writer, checkout in configs if repeat % 2 == 0 else configs[::-1]:
            seconds, packages[checkout] = once(writer, checkout)
            times[writer, checkout].append(seconds)
            print(f"round {repeat + 1}: {writer:7} {packages[checkout]}: {seconds:.2f} s",
                  flush=True)
    print(f"\nMedians of {args.repeats} rounds, seconds from the program's last line to its end:")
    print("| package | writer process (default) | OMN_WRITER=threads |")
    print("| --- | --- | --- |")
    for checkout in checkouts:
        row = [statistics.median(times[writer, checkout]) for writer in ("process", "threads")]
        print(f"| {packages[checkout]} | {row[0]:.2f} | {row[1]:.2f} |")


if __name__ == "__main__":
    main()
