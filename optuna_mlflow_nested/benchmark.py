"""compare_samplers: TPE against random and grid search (and others) on equal budgets.

Every sampler x seed study is a parent run nested under one benchmark run
(benchmark -> study -> trials), tagged with sampler and seed; every sampler gets the
same seeds and the same number of trials. The report compares samplers per seed
(paired), so that the text never claims a win the numbers do not support.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Mapping
from collections.abc import Sequence
import dataclasses
import itertools
import math
import os
from pathlib import Path
import time
from typing import Any
import warnings

import mlflow
import numpy as np
import optuna
from optuna.trial import TrialState
import pandas as pd

from optuna_mlflow_nested import tracking
from optuna_mlflow_nested.study import create_study

__all__ = ["SamplerReport", "compare_samplers", "Problem", "catboost_problem"]

Objective = Callable[[optuna.Trial], float]


@dataclasses.dataclass(frozen=True)
class SamplerReport:
    """The results of :func:`compare_samplers`.

    ``results`` has one row per sampler and seed; ``histories`` the best-so-far value
    after each trial for each (sampler, seed).
    """

    results: pd.DataFrame
    histories: Mapping[tuple[str, int], list[float]]
    direction: str
    n_trials: int
    benchmark_run_id: str | None = None

    def _sign(self) -> float:
        return 1.0 if self.direction == "minimize" else -1.0

    def summary_table(self) -> pd.DataFrame:
        """Per sampler: median and interquartile range of each result column."""
        columns = [c for c in ("best_value", "test_rmse", "trials_to_1pct", "wall_s", "cpu_s",
                               "loop_efficiency") if c in self.results and self.results[c].notna().any()]
        rows = []
        for sampler, group in self.results.groupby("sampler", sort=False):
            row: dict[str, Any] = {"sampler": sampler, "seeds": len(group)}
            for column in columns:
                values = group[column].astype(float)
                row[f"{column} median"] = float(values.median())
                row[f"{column} IQR"] = float(values.quantile(0.75) - values.quantile(0.25))
            rows.append(row)
        return pd.DataFrame(rows)

    def comparisons(self, column: str = "best_value") -> pd.DataFrame:
        """Each pair of samplers, paired by seed: median difference, wins, and a two-sided
        Wilcoxon signed-rank p-value (``nan`` when every difference is zero)."""
        from scipy.stats import wilcoxon

        wide = self.results.pivot(index="seed", columns="sampler", values=column)
        rows = []
        for a, b in itertools.combinations(list(dict.fromkeys(self.results["sampler"])), 2):
            pair = wide[[a, b]].dropna()
            diff = (pair[a] - pair[b]).to_numpy() * self._sign()  # < 0: a better
            if len(diff) == 0:
                continue
            if np.allclose(diff, 0):
                p_value = float("nan")
            else:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    p_value = float(wilcoxon(diff, zero_method="zsplit").pvalue)
            rows.append({"a": a, "b": b, "pairs": len(diff),
                         "median diff (a-b)": float(np.median(pair[a] - pair[b])),
                         "a better": int(np.sum(diff < 0)), "b better": int(np.sum(diff > 0)),
                         "p (Wilcoxon)": p_value})
        return pd.DataFrame(rows)

    def summary(self, alpha: float = 0.05, column: str = "best_value") -> str:
        """Plain-text reading: a win is claimed only where the paired test supports it."""
        lines = [f"{self.n_trials} trials per study, {self.results['seed'].nunique()} seeds, "
                 f"{self.direction} {column}."]
        table = self.summary_table()
        for _, row in table.iterrows():
            lines.append(f"- {row['sampler']}: median {row[f'{column} median']:.4g} "
                         f"(IQR {row[f'{column} IQR']:.3g})")
        for _, row in self.comparisons(column).iterrows():
            p = row["p (Wilcoxon)"]
            if not math.isnan(p) and p < alpha and row["a better"] != row["b better"]:
                winner, loser = ((row["a"], row["b"]) if row["a better"] > row["b better"]
                                 else (row["b"], row["a"]))
                lines.append(f"- {winner} beat {loser} on {max(row['a better'], row['b better'])}"
                             f" of {row['pairs']} seeds (Wilcoxon p={p:.3f}).")
            else:
                shown = "n/a" if math.isnan(p) else f"{p:.3f}"
                lines.append(f"- {row['a']} vs {row['b']}: no significant difference "
                             f"({row['a better']}-{row['b better']} over {row['pairs']} seeds, "
                             f"p={shown}; with {row['pairs']} seeds the smallest possible p is "
                             f"{2 / 2 ** row['pairs']:.3f}).")
        return "\n".join(lines)

    def to_markdown(self) -> str:
        """The per-run table, the per-sampler table and the paired comparisons."""
        return "\n\n".join([
            _markdown(self.results.drop(columns=["parent_run_id"], errors="ignore")),
            _markdown(self.summary_table()),
            _markdown(self.comparisons()),
        ])

    def plot(self, path: str | os.PathLike[str]) -> Path:
        """Best-so-far against trial number: median and interquartile band per sampler."""
        import matplotlib

        matplotlib.use("Agg", force=False)
        from matplotlib.figure import Figure

        figure = Figure(figsize=(7, 4.5))
        axes = figure.add_subplot()
        for sampler in dict.fromkeys(self.results["sampler"]):
            curves = [h for (s, _), h in self.histories.items() if s == sampler]
            length = max(len(c) for c in curves)
            padded = np.array([c + [c[-1]] * (length - len(c)) for c in curves])
            x = np.arange(1, length + 1)
            median = np.median(padded, axis=0)
            line, = axes.plot(x, median, label=f"{sampler} (median)")
            axes.fill_between(x, np.quantile(padded, 0.25, axis=0),
                              np.quantile(padded, 0.75, axis=0), alpha=0.2, color=line.get_color())
        axes.set_xlabel("trial")
        axes.set_ylabel("best value so far")
        axes.set_title(f"best-so-far, median and IQR over {self.results['seed'].nunique()} seeds")
        axes.legend()
        figure.tight_layout()
        path = Path(path)
        figure.savefig(path, dpi=110)
        return path


def _markdown(frame: pd.DataFrame) -> str:
    def cell(value: Any) -> str:
        if isinstance(value, float):
            return "nan" if math.isnan(value) else f"{value:.4g}"
        return str(value)

    header = "| " + " | ".join(map(str, frame.columns)) + " |"
    rule = "| " + " | ".join("---" for _ in frame.columns) + " |"
    body = ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([header, rule, *body])


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


def compare_samplers(
    objective: Objective,
    *,
    samplers: Sequence[str | optuna.samplers.BaseSampler] = ("tpe", "random", "grid"),
    n_trials: int,
    seeds: Sequence[int],
    search_space: Mapping[str, Sequence[Any]] | None = None,
    direction: str = "minimize",
    experiment_name: str | None = None,
    tracking_uri: str | None = None,
    finish: Callable[[optuna.Study], Mapping[str, float]] | None = None,
    benchmark_name: str = "compare-samplers",
    progress: bool = True,
) -> SamplerReport:
    """Run every sampler with every seed for ``n_trials`` trials and compare them.

    Args:
        objective: any Optuna objective (the user's own).
        samplers: names (``"tpe"``, ``"random"``, ``"grid"``, ``"qmc"``, ``"cmaes"``,
            ``"gp"``) or sampler factories ``(seed) -> sampler``.
        search_space: the fixed grid for ``"grid"`` (``{"param": [values]}``); its size
            should equal ``n_trials`` for equal budgets (a warning says when not).
        finish: optional ``(study) -> {"test_rmse": ...}`` run once per study on its
            best trial; its values become columns of ``results``.

    Example:
        >>> import optuna_mlflow_nested as omn, tempfile, os
        >>> uri = "sqlite:///" + os.path.join(tempfile.mkdtemp(), "mlflow.db")
        >>> report = omn.compare_samplers(lambda t: t.suggest_float("x", -1, 1) ** 2,
        ...     samplers=("tpe", "random"), n_trials=4, seeds=[0, 1], tracking_uri=uri,
        ...     progress=False)
        >>> sorted(report.results["sampler"].unique())
        ['random', 'tpe']
    """
    if not callable(objective):
        raise TypeError(f"objective must be callable, got {type(objective).__name__}")
    if isinstance(n_trials, bool) or not isinstance(n_trials, int) or n_trials <= 0:
        raise ValueError(f"n_trials must be a positive integer, got {n_trials!r}")
    seeds = list(seeds)
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be a non-empty list of distinct integers, got {seeds!r}")
    if direction not in ("minimize", "maximize"):
        raise ValueError(f"direction must be 'minimize' or 'maximize', got {direction!r}")
    names = [s if isinstance(s, str) else type(s).__name__ for s in samplers]
    if "grid" in names:
        if not search_space:
            raise ValueError('sampler "grid" needs search_space={"param": [values, ...]}')
        size = math.prod(len(v) for v in search_space.values())
        if size != n_trials:
            warnings.warn(f"the grid has {size} points but the budget is {n_trials} trials: "
                          "budgets are not equal", UserWarning, stacklevel=2)
    uri = tracking.absolute_uri(tracking_uri or mlflow.get_tracking_uri())
    tracking.check_tracking_uri(uri)
    client = tracking.get_client(uri)
    experiment_id = tracking.get_or_create_experiment(client, experiment_name or benchmark_name)
    bench = client.create_run(experiment_id, run_name=benchmark_name,
                              tags={tracking.ROLE_TAG: "benchmark"})
    client.log_batch(bench.info.run_id, params=[
        mlflow.entities.Param("samplers", ",".join(names)),
        mlflow.entities.Param("n_trials", str(n_trials)),
        mlflow.entities.Param("seeds", ",".join(map(str, seeds))),
        mlflow.entities.Param("direction", direction)], synchronous=True)
    rows: list[dict[str, Any]] = []
    histories: dict[tuple[str, int], list[float]] = {}
    sign = 1.0 if direction == "minimize" else -1.0
    total = len(samplers) * len(seeds)
    done = 0
    with tracking.global_tracking_uri(uri), tracking.active_run(bench):
        for sampler, name in zip(samplers, names):
            for seed in seeds:
                study = create_study(
                    f"{benchmark_name}-{name}-seed{seed}-{bench.info.run_id[:8]}",
                    experiment_name=experiment_name or benchmark_name, tracking_uri=uri,
                    sampler=sampler if isinstance(sampler, str) else sampler, seed=seed,
                    search_space=search_space if name == "grid" else None, direction=direction,
                    tags={"benchmark.sampler": name, "benchmark.seed": seed},
                )
                wall, cpu = time.perf_counter(), time.process_time()
                study.optimize(objective, n_trials=n_trials)
                wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
                trials = study.trials
                values = [t.value if t.state == TrialState.COMPLETE else math.nan for t in trials]
                history = _best_so_far(values, sign)
                objective_s = sum((t.datetime_complete - t.datetime_start).total_seconds()
                                  for t in trials if t.datetime_complete and t.datetime_start)
                row: dict[str, Any] = {
                    "sampler": name, "seed": seed, "trials": len(trials),
                    "best_value": history[-1], "trials_to_1pct": _trials_to_within(history),
                    "wall_s": wall, "cpu_s": cpu, "loop_efficiency": objective_s / wall,
                    "parent_run_id": study.parent_run_id,
                }
                if finish is not None:
                    row.update(finish(study.study))
                rows.append(row)
                histories[(name, seed)] = history
                done += 1
                if progress:
                    print(f"[{done}/{total}] {name} seed {seed}: best {history[-1]:.5g} "
                          f"({wall:.1f} s)", flush=True)
    report = SamplerReport(pd.DataFrame(rows), histories, direction, n_trials, bench.info.run_id)
    client.log_text(bench.info.run_id, report.to_markdown(), "report.md")
    client.log_text(bench.info.run_id, report.results.to_csv(index=False), "results.csv")
    client.log_text(bench.info.run_id, report.summary(), "summary.txt")
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        client.log_artifact(bench.info.run_id, str(report.plot(Path(folder) / "best_so_far.png")))
    tracking.set_run_status(client, bench.info.run_id, "FINISHED")
    return report


# --------------------------------------------------------------------------- CatBoost problems


@dataclasses.dataclass(frozen=True)
class Problem:
    """A benchmark problem: objective, a same-budget grid, and a finish step."""

    name: str
    objective: Objective
    grid: dict[str, list[Any]]
    finish: Callable[[optuna.Study], dict[str, float]]
    noise_rmse: float | None = None


def catboost_problem(name: str, *, seed: int = 0, tuning_iterations: int = 200,
                     max_iterations: int = 2000, early_stopping_rounds: int = 50,
                     grid_shape: Sequence[int] | None = None) -> Problem:
    """``"diabetes"`` or ``"friedman1"`` over learning_rate x depth x l2_leaf_reg (grid
    4 x 4 x 3 = 48), or ``"wide"``: diabetes over six parameters, where a 48-point grid
    (3 x 2 x 2 x 2 x 2, the sixth parameter held at one value) is necessarily coarse."""
    from optuna.distributions import FloatDistribution
    from optuna.distributions import IntDistribution

    from optuna_mlflow_nested import catboost as cb
    from optuna_mlflow_nested import datasets

    if name not in ("diabetes", "friedman1", "wide"):
        raise ValueError(f"unknown problem {name!r}: diabetes, friedman1 or wide")
    X, y = datasets.load("friedman1" if name == "friedman1" else "diabetes", seed=seed)
    X_tr, X_va, X_te, y_tr, y_va, y_te = datasets.train_val_test_split(X, y, seed=seed)
    space: dict[str, Any] = {
        "learning_rate": FloatDistribution(0.01, 0.3, log=True),
        "depth": IntDistribution(3, 8),
        "l2_leaf_reg": FloatDistribution(1.0, 30.0, log=True),
    }
    shape = list(grid_shape or (4, 4, 3))
    if name == "wide":
        space.update({"random_strength": FloatDistribution(0.0, 2.0),
                      "bagging_temperature": FloatDistribution(0.0, 1.0),
                      "border_count": IntDistribution(32, 255)})
        shape = list(grid_shape or (3, 2, 2, 2, 2, 1))
    grid = cb.grid_from_space(space, dict(zip(space, shape)))
    if name == "wide" and grid_shape is None:
        grid["border_count"] = [128]
    common = {"random_seed": seed, "allow_writing_files": False, "verbose": False,
              "thread_count": os.cpu_count() or 1, "loss_function": "RMSE"}

    def objective(trial: optuna.Trial) -> float:
        from catboost import CatBoostRegressor

        params = {k: trial._suggest(k, d) for k, d in space.items()}
        model = CatBoostRegressor(iterations=tuning_iterations, **common, **params)
        model.fit(X_tr, y_tr)
        return cb._rmse(y_va, model.predict(X_va))

    def finish(study: optuna.Study) -> dict[str, float]:
        refit = cb.refit_and_score(study.best_params, X_tr, y_tr, X_va, y_va, X_te, y_te,
                                   common=common, max_iterations=max_iterations,
                                   early_stopping_rounds=early_stopping_rounds)
        out = {"test_rmse": refit.test["test_rmse"]}
        if name == "friedman1":
            out["test_rmse_ratio_to_noise"] = refit.test["test_rmse"] / datasets.FRIEDMAN1_NOISE
        return out

    return Problem(name, objective, grid, finish,
                   datasets.FRIEDMAN1_NOISE if name == "friedman1" else None)
