"""One study of a benchmark: created, run with the objective timed and checked, summed up."""

from __future__ import annotations

from collections.abc import Mapping
import math
import time
from typing import Any
import warnings

import numpy as np
import optuna
from optuna.trial import TrialState

from optuna_mlflow_nested import tracking
from optuna_mlflow_nested.benchmark.arms import PrunerSpec
from optuna_mlflow_nested.benchmark.arms import make_pruner
from optuna_mlflow_nested.benchmark.arms import pruner_label
from optuna_mlflow_nested.benchmark.problems import Objective
from optuna_mlflow_nested.factories import create_study

__all__ = ["Timed", "GridCovers", "one_study", "end_failed", "ERROR_TAG"]

#: The tag on the benchmark run that says why it FAILED.
ERROR_TAG = "benchmark.error"


class Timed:
    """The objective, timed (only the objective: not the harness's per-trial work) and
    checked to return one value."""

    def __init__(self, objective: Objective) -> None:
        self.objective = objective
        self.seconds = 0.0

    def __call__(self, trial: optuna.Trial) -> float:
        start = time.perf_counter()
        try:
            value = self.objective(trial)
        finally:
            self.seconds += time.perf_counter() - start
        if not isinstance(value, str) and np.ndim(value) > 0 and np.size(value) != 1:
            raise ValueError(f"compare_samplers and compare_pruners compare single-objective studies;"
                             f" the objective returned {np.size(value)} values")
        return value


class GridCovers:
    """Stops the benchmark after the first trial that suggests a parameter the grid lacks."""

    def __init__(self, grid: Mapping[str, Any]) -> None:
        self.grid = set(grid)

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        missing = sorted(set(trial.params) - self.grid)
        if missing:
            raise ValueError(f"the grid (search_space) does not cover the objective's parameter(s) "
                             f"{', '.join(map(repr, missing))}: the grid sampler would fail on them")


def one_study(setup: Any, uri: str, bench_run_id: str, label: str, seed: int,
               sampler: str | optuna.samplers.BaseSampler, pruner_spec: PrunerSpec, arm: str,
               callbacks: list[Any]) -> tuple[dict[str, Any], list[float]]:
    extra: dict[str, Any] = {}
    if setup.trial_runs != "all":
        extra["trial_runs"] = setup.trial_runs
    study = create_study(
        f"{setup.benchmark_name}-{label}-seed{seed}-{bench_run_id[:8]}",
        experiment_name=setup.experiment_name, tracking_uri=uri, sampler=sampler, seed=seed,
        search_space=setup.search_space if sampler == "grid" else None,
        pruner=make_pruner(pruner_spec), metric_name=setup.metric,
        direction=optuna.study.StudyDirection[setup.direction.upper()],
        tags={"benchmark.arm": arm, f"benchmark.{arm}": label, "benchmark.seed": seed,
              "benchmark.pruner": pruner_label(pruner_spec)}, **extra,
    )
    timed = Timed(setup.objective)
    wall, cpu = time.perf_counter(), time.process_time()
    study.optimize(timed, n_trials=setup.n_trials, callbacks=callbacks)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    trials = study.trials
    states = [t.state for t in trials]
    if TrialState.COMPLETE not in states:
        failed = next((t for t in trials if t.state == TrialState.FAIL), None)
        reason = failed.system_attrs.get("fail_reason", "") if failed else ""
        raise RuntimeError(
            f"no trial completed in study {study.study_name!r} ({states.count(TrialState.FAIL)} "
            f"failed, {states.count(TrialState.PRUNED)} pruned){': ' + reason if reason else ''}")
    values = [t.value if t.state == TrialState.COMPLETE and t.value is not None else math.nan
              for t in trials]
    history = _best_so_far(values, 1.0 if setup.direction == "minimize" else -1.0)
    row: dict[str, Any] = {
        arm: label, "seed": seed, "trials": len(trials),
        "pruned": states.count(TrialState.PRUNED), "failed": states.count(TrialState.FAIL),
        "steps": sum(len(t.intermediate_values) for t in trials),
        "best_value": history[-1], "trials_to_1pct": _trials_to_within(history),
        "wall_s": wall, "cpu_s": cpu, "objective_s": timed.seconds,
        "loop_efficiency": timed.seconds / wall, "parent_run_id": study.parent_run_id,
    }
    if setup.finish is not None:
        row.update(setup.finish(study))
    return row, history


def end_failed(client: Any, run_id: str, exc: BaseException) -> None:
    """The benchmark run ends FAILED (KILLED on Ctrl-C), the reason in a tag; never masks
    the original error."""
    status = "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED"
    try:
        client.set_tag(run_id, ERROR_TAG, f"{type(exc).__name__}: {exc}"[:4000])
        tracking.set_run_status(client, run_id, status)
    except Exception as again:  # the store itself failing: the original error matters more
        warnings.warn(f"could not mark benchmark run {run_id} {status}: {again}", RuntimeWarning,
                      stacklevel=3)


def _best_so_far(values: list[float], sign: float) -> list[float]:
    out, best = [], math.inf
    for value in values:
        if not math.isnan(value):
            best = min(best, sign * value)
        out.append(sign * best if best < math.inf else math.nan)
    return out


def _trials_to_within(history: list[float], pct: float = 0.01) -> int:
    final = history[-1]
    for i, value in enumerate(history):
        if abs(value - final) <= abs(final) * pct:
            return i + 1
    return len(history)
