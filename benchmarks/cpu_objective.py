"""A CPU-bound objective for the benchmarks: a fixed amount of pure-Python arithmetic.

The work is a fixed number of rounds, not a time: a trial that stopped after so many
seconds of CPU would count the process's other threads (the tracking writer's, an
engine's event loop) as its own work and hide what they cost.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
import time

import optuna


def spin(rounds: int) -> float:
    """``rounds`` rounds of arithmetic (about 0.1 ms each here); returns 0.0."""
    total = 0.0
    for _ in range(rounds):
        for i in range(1000):
            total += (i % 7) * 1e-9
    return total * 0.0


def calibrate(seconds: float) -> int:
    """How many rounds of :func:`spin` take ``seconds`` of this thread's CPU here."""
    rounds, spent = 50, 0.0
    while spent < 0.3:  # long enough to time with thread_time
        rounds *= 2
        start = time.thread_time()
        spin(rounds)
        spent = time.thread_time() - start
    return max(1, round(rounds * seconds / spent))


@dataclasses.dataclass(frozen=True)
class Burn:
    """An objective doing ``rounds`` rounds of :func:`spin` per trial (picklable by
    reference: process pools, Dask and submitit send it to their workers).

    With ``log_dir``, each trial appends how long its work took (wall seconds) to a
    file per process there: what the objective itself cost, apart from the engine.
    """

    rounds: int
    log_dir: str = ""

    def __call__(self, trial: optuna.Trial) -> float:
        x = trial.suggest_float("x", -2, 2)
        start = time.perf_counter()
        spin(self.rounds)
        if self.log_dir:
            with open(Path(self.log_dir) / f"objective-{os.getpid()}.txt", "a") as log:
                log.write(f"{time.perf_counter() - start}\n")
        return x * x


def objective_seconds(log_dir: str) -> list[float]:
    """Every trial's work time that :class:`Burn` logged in ``log_dir``."""
    return [float(line) for path in Path(log_dir).glob("objective-*.txt")
            for line in path.read_text().split()]
