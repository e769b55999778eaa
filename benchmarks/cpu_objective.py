"""A CPU-bound objective for the benchmarks: pure Python arithmetic for a fixed time."""

from __future__ import annotations

import time

import optuna


def burn(trial: optuna.Trial) -> float:
    """Spin the CPU for the study's ``trial_seconds`` user attribute (default 0.1 s)."""
    x = trial.suggest_float("x", -2, 2)
    seconds = float(trial.study.user_attrs.get("trial_seconds", 0.1))
    end = time.process_time() + seconds
    total = 0.0
    while time.process_time() < end:
        for i in range(1000):
            total += (i % 7) * 1e-9
    return x * x + total * 0.0
