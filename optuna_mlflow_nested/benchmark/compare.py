"""compare_samplers and compare_pruners: every arm x seed a study, nested under one
benchmark run (benchmark -> study -> trials), paired by seed in the report."""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Mapping
from collections.abc import Sequence
import dataclasses
import inspect
import math
import numbers
from pathlib import Path
import tempfile
from typing import Any
from typing import TypeVar
import warnings

import mlflow
import optuna
import pandas as pd

from optuna_mlflow_nested import _compat
from optuna_mlflow_nested import _study_setup
from optuna_mlflow_nested import tracking
from optuna_mlflow_nested.benchmark.arms import PrunerSpec
from optuna_mlflow_nested.benchmark.arms import SamplerSpec
from optuna_mlflow_nested.benchmark.arms import make_pruner
from optuna_mlflow_nested.benchmark.arms import pruner_arms
from optuna_mlflow_nested.benchmark.arms import pruner_label
from optuna_mlflow_nested.benchmark.arms import sampler_arms
from optuna_mlflow_nested.benchmark.problems import Objective
from optuna_mlflow_nested.benchmark.problems import Problem
from optuna_mlflow_nested.benchmark.report import PrunerReport
from optuna_mlflow_nested.benchmark.report import SamplerReport
from optuna_mlflow_nested.benchmark.studies import GridCovers
from optuna_mlflow_nested.benchmark.studies import end_failed
from optuna_mlflow_nested.benchmark.studies import one_study
from optuna_mlflow_nested.factories import create_study

__all__ = ["compare_samplers", "compare_pruners"]

R = TypeVar("R", bound=SamplerReport)
Finish = Callable[[optuna.Study], Mapping[str, float]]


@dataclasses.dataclass(frozen=True)
class _Setup:
    objective: Objective
    n_trials: int
    seeds: list[int]
    search_space: Mapping[str, Sequence[Any]] | None
    direction: str
    finish: Finish | None
    metric: str
    problem: str | None
    benchmark_name: str
    experiment_name: str
    trial_runs: str | int
    progress: bool


def _setup(objective: Objective | Problem, n_trials: int, seeds: Sequence[int], *, kind: str,
           search_space: Mapping[str, Sequence[Any]] | None, direction: str | None,
           finish: Finish | None, metric_name: str | None, benchmark_name: str | None,
           experiment_name: str | None, trial_runs: str | int, progress: bool) -> _Setup:
    problem = objective if isinstance(objective, Problem) else None
    if problem is not None:
        objective = problem.objective
        search_space = problem.grid if search_space is None else search_space
        finish = problem.finish if finish is None else finish
        direction = direction or problem.direction
        metric_name = metric_name or problem.metric
    if not callable(objective):
        raise TypeError(f"objective must be callable or a Problem, got {type(objective).__name__}")
    if isinstance(n_trials, bool) or not isinstance(n_trials, int) or n_trials <= 0:
        raise ValueError(f"n_trials must be a positive integer, got {n_trials!r}")
    given = list(seeds)
    if not all(isinstance(s, numbers.Integral) and not isinstance(s, bool) for s in given):
        raise ValueError(f"seeds must be a non-empty list of distinct integers, got {given!r}")
    seeds = [int(s) for s in given]
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be a non-empty list of distinct integers, got {given!r}")
    direction = direction or "minimize"
    if direction not in ("minimize", "maximize"):
        raise ValueError(f"direction must be 'minimize' or 'maximize', got {direction!r}")
    if trial_runs != "all":
        if "trial_runs" not in inspect.signature(create_study).parameters:
            raise ValueError("trial_runs needs a create_study that takes it")
        parse = getattr(_study_setup, "parse_trial_runs", None)
        if parse is not None:
            parse(trial_runs)  # a bad value fails here, before any run
    name = benchmark_name or (f"{kind}-{problem.name}" if problem else f"compare-{kind}")
    return _Setup(objective, n_trials, seeds, search_space, direction, finish,
                  metric_name or "value", problem.name if problem else None, name,
                  experiment_name or name, trial_runs, progress)


def compare_samplers(
    objective: Objective | Problem,
    *,
    samplers: Sequence[SamplerSpec] | Mapping[str, SamplerSpec] = ("tpe", "random", "grid"),
    n_trials: int,
    seeds: Sequence[int],
    search_space: Mapping[str, Sequence[Any]] | None = None,
    direction: str | None = None,
    experiment_name: str | None = None,
    tracking_uri: str | None = None,
    finish: Finish | None = None,
    benchmark_name: str | None = None,
    progress: bool = True,
    pruner: PrunerSpec = None,
    trial_runs: str | int = "all",
    metric_name: str | None = None,
) -> SamplerReport:
    """Run every sampler with every seed for ``n_trials`` trials and compare them, paired.

    The studies run seed by seed (every sampler on seed 0, then seed 1, ...), so that a
    problem shows on the first seed. Checked before any run: the arguments, the
    samplers (no instances, no duplicates). Checked after each trial: a single value
    was returned, and the grid covers every parameter suggested. Checked after each
    study: some trial completed. A failure ends the benchmark run FAILED, the reason
    in its ``benchmark.error`` tag, and is raised.

    Args:
        objective: any single-objective Optuna objective (the user's own), or a
            :class:`Problem` (its grid, finish, direction and metric become the defaults).
            An exception from it stops the benchmark; to fail one trial, return ``nan``.
        samplers: names (``"tpe"``, ``"random"``, ``"grid"``, ``"qmc"``, ``"cmaes"``,
            ``"gp"``) or factories ``seed -> sampler`` (e.g. ``lambda seed:
            optuna.samplers.TPESampler(seed=seed, multivariate=True)``), labelled by
            the sampler's class name; or a mapping ``label -> name or factory``.
            Sampler *instances* are refused (one instance would keep its own seed).
        n_trials: trials per study.
        seeds: one study per sampler and seed.
        search_space: the fixed grid for ``"grid"`` (``{"param": [values]}``); its size
            should equal ``n_trials`` for equal budgets (a warning says when not).
        direction: ``"minimize"`` (default) or ``"maximize"``.
        finish: optional ``(study) -> {"test_rmse": ...}`` run once per study on its
            best trial; its values become columns of ``results``.
        benchmark_name: the benchmark run's name (and the experiment's by default).
        pruner: the pruner of every study: ``None``/``"none"`` (no pruning, recorded as
            ``NopPruner``), ``"median"``, ``"hyperband"``, ``"successive-halving"``,
            ``"wilcoxon"``, a factory ``() -> pruner`` or a pruner (deep-copied per study).
        trial_runs: passed to :func:`create_study` (``"all"`` or ``K`` / ``"top-K"``).
        metric_name: the value's name in MLflow, the report and the plot.

    Returns:
        A :class:`SamplerReport`; its ``benchmark_run_id`` is the FINISHED benchmark run.

    Raises:
        TypeError: a sampler instance, or a factory that does not make a new sampler.
        ValueError: a bad argument, duplicate samplers, a multi-objective objective, a
            grid that misses a parameter of the objective.
        RuntimeError: a study in which no trial completed.

    Example:
        >>> import optuna_mlflow_nested as omn, tempfile, os
        >>> uri = "sqlite:///" + os.path.join(tempfile.mkdtemp(), "mlflow.db")
        >>> report = omn.compare_samplers(lambda t: t.suggest_float("x", -1, 1) ** 2,
        ...     samplers=("tpe", "random"), n_trials=4, seeds=[0, 1], tracking_uri=uri,
        ...     progress=False)
        >>> sorted(report.results["sampler"].unique())
        ['random', 'tpe']
    """
    setup = _setup(objective, n_trials, seeds, kind="samplers", search_space=search_space,
                   direction=direction, finish=finish, metric_name=metric_name,
                   benchmark_name=benchmark_name, experiment_name=experiment_name,
                   trial_runs=trial_runs, progress=progress)
    arms = sampler_arms(samplers, setup.seeds, setup.search_space)
    make_pruner(pruner)  # a bad pruner fails now
    _warn_unequal_budget(setup, [spec for _, spec in arms])
    return _sweep(setup, [(label, spec, pruner) for label, spec in arms], tracking_uri,
                  arm="sampler", cls=SamplerReport, params={"samplers": ",".join(label for label, _ in arms),
                                         "pruner": pruner_label(pruner)})


def compare_pruners(
    objective: Objective | Problem,
    *,
    pruners: Sequence[PrunerSpec] | Mapping[str, PrunerSpec] = ("none", "median", "hyperband"),
    sampler: SamplerSpec = "tpe",
    n_trials: int,
    seeds: Sequence[int],
    search_space: Mapping[str, Sequence[Any]] | None = None,
    direction: str | None = None,
    experiment_name: str | None = None,
    tracking_uri: str | None = None,
    finish: Finish | None = None,
    benchmark_name: str | None = None,
    progress: bool = True,
    trial_runs: str | int = "all",
    metric_name: str | None = None,
) -> PrunerReport:
    """Run every pruner with every seed, the same sampler, and compare them paired:
    CPU time (and objective steps) saved against best value lost, relative to the
    first pruner (by default ``"none"``: no pruning).

    The objective must report intermediate values and ask ``trial.should_prune()``
    (as the ``-cv`` CatBoost problems and the synthetic problems with ``steps > 1`` do);
    otherwise no pruner can do anything. Arguments, checks and failures as in
    :func:`compare_samplers`.

    Args:
        objective: an Optuna objective or a :class:`Problem`.
        pruners: pruner names, factories ``() -> pruner`` or pruners (deep-copied per
            study), or a mapping ``label -> pruner``; the first is the baseline.
        sampler: the one sampler, by name or factory ``seed -> sampler``.
        n_trials: trials per study.
        seeds: one study per pruner and seed; the sampler gets the seed.

    Returns:
        A :class:`PrunerReport` (see :meth:`PrunerReport.savings`).

    Raises:
        TypeError: a sampler instance.
        ValueError: a bad argument or pruner, fewer than two pruners, duplicates.
        RuntimeError: a study in which no trial completed.

    Example:
        >>> import optuna_mlflow_nested as omn, tempfile, os
        >>> from optuna_mlflow_nested.benchmark import compare_pruners, synthetic_problem
        >>> uri = "sqlite:///" + os.path.join(tempfile.mkdtemp(), "mlflow.db")
        >>> report = compare_pruners(synthetic_problem("sphere-2d", steps=3, noise=0.1),
        ...     pruners=("none", "median"), n_trials=8, seeds=[0], tracking_uri=uri,
        ...     progress=False)
        >>> list(report.savings()["pruner"])
        ['median']
    """
    setup = _setup(objective, n_trials, seeds, kind="pruners", search_space=search_space,
                   direction=direction, finish=finish, metric_name=metric_name,
                   benchmark_name=benchmark_name, experiment_name=experiment_name,
                   trial_runs=trial_runs, progress=progress)
    (sampler_name, sampler_spec), = sampler_arms([sampler], setup.seeds, setup.search_space)
    arms = pruner_arms(pruners)
    _warn_unequal_budget(setup, [sampler_spec])
    return _sweep(setup, [(label, sampler_spec, spec) for label, spec in arms], tracking_uri,
                  arm="pruner", cls=PrunerReport, params={"samplers": sampler_name,
                                        "pruners": ",".join(label for label, _ in arms)})


def _warn_unequal_budget(setup: _Setup, specs: Sequence[SamplerSpec]) -> None:
    if "grid" in specs and setup.search_space:
        size = math.prod(len(v) for v in setup.search_space.values())
        if size != setup.n_trials:
            warnings.warn(f"the grid has {size} points but the budget is {setup.n_trials} trials: "
                          "budgets are not equal", UserWarning, stacklevel=3)


def _sweep(setup: _Setup, arms: list[tuple[str, SamplerSpec, PrunerSpec]], tracking_uri: str | None,
           *, arm: str, params: dict[str, str], cls: type[R]) -> R:
    uri = tracking.absolute_uri(tracking_uri or mlflow.get_tracking_uri())
    tracking.check_tracking_uri(uri)
    client = tracking.get_client(uri)
    experiment_id = tracking.get_or_create_experiment(client, setup.experiment_name)
    bench = client.create_run(experiment_id, run_name=setup.benchmark_name,
                              tags={tracking.ROLE_TAG: "benchmark"})
    run_id = bench.info.run_id
    try:
        client.log_batch(run_id, params=[mlflow.entities.Param(k, str(v)) for k, v in {
            **params, "n_trials": setup.n_trials, "seeds": ",".join(map(str, setup.seeds)),
            "direction": setup.direction, "trial_runs": setup.trial_runs, "metric": setup.metric,
            "problem": setup.problem}.items()], synchronous=True)
        rows: list[dict[str, Any]] = []
        histories: dict[tuple[str, int], list[float]] = {}
        grid_check = [GridCovers(setup.search_space)] if setup.search_space and any(
            spec == "grid" for _, spec, _ in arms) else []
        made: dict[str, list[optuna.samplers.BaseSampler]] = {label: [] for label, _, _ in arms}
        with tracking.global_tracking_uri(uri), _compat.active_run(bench):
            for seed in setup.seeds:
                for label, sampler_spec, pruner_spec in arms:
                    if isinstance(sampler_spec, str):
                        sampler: str | optuna.samplers.BaseSampler = sampler_spec
                    else:
                        sampler = sampler_spec(seed)
                        if any(sampler is other for other in made[label]):
                            raise TypeError(f"the sampler factory of {label!r} returned the same "
                                            "instance for two seeds: build a new sampler per seed")
                        made[label].append(sampler)
                    row, history = one_study(setup, uri, run_id, label, seed, sampler, pruner_spec,
                                              arm, grid_check)
                    rows.append(row)
                    histories[(label, seed)] = history
                    if setup.progress:
                        print(f"[{len(rows)}/{len(arms) * len(setup.seeds)}] {label} seed {seed}: "
                              f"best {history[-1]:.5g} ({row['wall_s']:.1f} s)", flush=True)
        report = cls(pd.DataFrame(rows), histories, setup.direction, setup.n_trials, run_id,
                     metric=setup.metric, problem=setup.problem, arm=arm)
        client.log_text(run_id, report.to_markdown(), "report.md")
        client.log_text(run_id, report.results.to_csv(index=False), "results.csv")
        client.log_text(run_id, report.summary(), "summary.txt")
        with tempfile.TemporaryDirectory() as folder:
            client.log_artifact(run_id, str(report.plot(Path(folder) / "best_so_far.png")))
    except BaseException as exc:
        end_failed(client, run_id, exc)
        raise
    tracking.set_run_status(client, run_id, "FINISHED")
    return report
