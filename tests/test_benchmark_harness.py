"""compare_samplers' harness defects (issue 15, part 2): each test failed on the code before."""

from __future__ import annotations

import time
from typing import Any

from mlflow.tracking import MlflowClient
import numpy as np
import optuna
import pandas as pd
import pytest
from scipy.stats import wilcoxon

from optuna_mlflow_nested import tracking
from optuna_mlflow_nested.benchmark import SamplerReport
from optuna_mlflow_nested.benchmark import compare_samplers
from optuna_mlflow_nested.benchmark.arms import sampler_arms


def quadratic(trial: optuna.Trial) -> float:
    return (trial.suggest_float("x", -2, 2) - 0.5) ** 2 + trial.suggest_int("k", 0, 3)


def all_runs(uri: str) -> list:
    client = MlflowClient(uri)
    ids = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(ids)


def benchmark_run(uri: str) -> Any:
    runs = [r for r in all_runs(uri) if r.data.tags.get(tracking.ROLE_TAG) == "benchmark"]
    assert len(runs) == 1, runs
    return runs[0]


# --------------------------------------------------------------------- samplers and seeds


def test_sampler_factories_get_each_seed(tracking_uri: str) -> None:
    report = compare_samplers(quadratic, samplers=[lambda seed: optuna.samplers.RandomSampler(seed=seed)],
                              n_trials=3, seeds=[0, 1], tracking_uri=tracking_uri, progress=False)
    assert set(report.results["sampler"]) == {"RandomSampler"}
    for seed in (0, 1):  # the same trials as bare Optuna with RandomSampler(seed=seed)
        bare = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
        bare.optimize(quadratic, n_trials=3)
        row = report.results[report.results["seed"] == seed].iloc[0]
        assert row["best_value"] == bare.best_value


def test_a_mapping_labels_sampler_variants() -> None:
    arms = sampler_arms({"tpe-mv": lambda seed: optuna.samplers.TPESampler(seed=seed, multivariate=True),
                         "tpe": "TPE"}, seeds=[0, 1], search_space=None)
    assert [label for label, _ in arms] == ["tpe-mv", "tpe"] and arms[1][1] == "tpe"
    with pytest.raises(ValueError, match="duplicate"):  # two unlabelled factories of one class
        sampler_arms([lambda s: optuna.samplers.TPESampler(seed=s),
                      lambda s: optuna.samplers.TPESampler(seed=s, multivariate=True)], [0], None)


def test_sampler_instances_are_refused_before_any_run(tracking_uri: str) -> None:
    with pytest.raises(TypeError, match="factory"):
        compare_samplers(quadratic, samplers=[optuna.samplers.RandomSampler(seed=0)], n_trials=2,
                         seeds=[0, 1], tracking_uri=tracking_uri, progress=False)
    assert all_runs(tracking_uri) == []


def test_a_factory_that_shares_one_instance_is_refused(tracking_uri: str) -> None:
    shared = optuna.samplers.RandomSampler(seed=0)
    with pytest.raises(TypeError, match="new sampler"):
        compare_samplers(quadratic, samplers=[lambda seed: shared], n_trials=2, seeds=[0, 1],
                         tracking_uri=tracking_uri, progress=False)
    assert all_runs(tracking_uri) == []


def test_duplicate_sampler_entries_are_refused_before_any_run(tracking_uri: str) -> None:
    with pytest.raises(ValueError, match="duplicate"):
        compare_samplers(quadratic, samplers=("tpe", "random", "tpe"), n_trials=2, seeds=[0],
                         tracking_uri=tracking_uri, progress=False)
    assert all_runs(tracking_uri) == []


# --------------------------------------------------------------------- the paired reading


def paired_report(a: list[float], b: list[float]) -> SamplerReport:
    seeds = list(range(len(a)))
    results = pd.DataFrame({"sampler": ["A"] * len(a) + ["B"] * len(b), "seed": seeds + seeds,
                            "best_value": a + b})
    return SamplerReport(results, {}, "minimize", 10)


def test_winner_named_by_the_signed_rank_direction_not_win_count() -> None:
    # 30 seeds: A wins 16 by tiny margins, B wins 14 by large ones (minimising).
    a = [10.0] * 30
    b = [10.0 + 0.001 * (i + 1) for i in range(16)] + [10.0 - (1 + i) for i in range(14)]
    report = paired_report(a, b)
    row = report.comparisons().iloc[0]
    expected = wilcoxon(np.array(a) - np.array(b), zero_method="zsplit").pvalue
    assert row["p (Wilcoxon)"] == pytest.approx(expected) and 0.04 < expected < 0.05
    text = report.summary()
    assert "B beat A" in text and "A beat B" not in text
    assert "rank-biserial" in text and "Hodges-Lehmann" in text
    assert (row["a better"], row["b better"]) == (16, 14) and row["better"] == "B"
    assert row["rank-biserial r"] < 0 < row["Hodges-Lehmann (a-b)"]  # B's way, in B's favour


def test_a_15_15_split_with_a_significant_test_names_the_winner() -> None:
    a = [10.0] * 30
    b = [10.0 + 0.001 * (i + 1) for i in range(15)] + [10.0 - (1 + i) for i in range(15)]
    report = paired_report(a, b)
    p = report.comparisons().iloc[0]["p (Wilcoxon)"]
    assert p < 0.05
    text = report.summary()
    assert "B beat A" in text and "no significant difference" not in text


def test_tiny_values_are_not_treated_as_ties() -> None:
    a = [1e-10 * (1 + 0.01 * i) for i in range(10)]
    b = [2e-10 * (1 + 0.01 * i) for i in range(10)]
    report = paired_report(a, b)
    row = report.comparisons().iloc[0]
    assert row["p (Wilcoxon)"] == pytest.approx(2 / 2 ** 10)
    assert "A beat B" in report.summary() and "p=n/a" not in report.summary()


def test_exactly_equal_values_give_no_test() -> None:
    report = paired_report([1.0] * 8, [1.0] * 8)
    assert np.isnan(report.comparisons().iloc[0]["p (Wilcoxon)"])
    assert "p=n/a" in report.summary()


# --------------------------------------------------------------------- failures end the run


def test_multi_objective_objective_fails_after_one_trial_and_the_run_is_failed(tracking_uri: str) -> None:
    calls = []

    def two_values(trial: optuna.Trial) -> tuple[float, float]:
        calls.append(1)
        x = trial.suggest_float("x", -1, 1)
        return x, x ** 2

    with pytest.raises(ValueError, match="single-objective"):
        compare_samplers(two_values, samplers=("tpe", "random"), n_trials=3, seeds=[0, 1],  # type: ignore[arg-type]
                         tracking_uri=tracking_uri, progress=False)
    assert len(calls) == 1
    run = benchmark_run(tracking_uri)
    assert run.info.status == "FAILED"
    assert "single-objective" in run.data.tags["benchmark.error"]


def test_an_objective_that_raises_ends_the_run_failed(tracking_uri: str) -> None:
    def broken(trial: optuna.Trial) -> float:
        raise ZeroDivisionError("broken objective")

    with pytest.raises(ZeroDivisionError):
        compare_samplers(broken, samplers=("tpe",), n_trials=3, seeds=[0], tracking_uri=tracking_uri,
                         progress=False)
    run = benchmark_run(tracking_uri)
    assert run.info.status == "FAILED"
    assert "broken objective" in run.data.tags["benchmark.error"]


def test_an_objective_that_always_fails_stops_after_one_study(tracking_uri: str) -> None:
    calls = []

    def nan(trial: optuna.Trial) -> float:
        calls.append(1)
        trial.suggest_float("x", 0, 1)
        return float("nan")

    with pytest.raises(RuntimeError, match="no trial completed"):
        compare_samplers(nan, samplers=("tpe", "random"), n_trials=3, seeds=[0, 1, 2],
                         tracking_uri=tracking_uri, progress=False)
    assert len(calls) == 3  # one study, not six
    run = benchmark_run(tracking_uri)
    assert run.info.status == "FAILED" and "no trial completed" in run.data.tags["benchmark.error"]


def test_a_grid_that_misses_a_parameter_fails_after_one_trial(tracking_uri: str) -> None:
    calls = []

    def counted(trial: optuna.Trial) -> float:
        calls.append(1)
        return quadratic(trial)

    with pytest.raises(ValueError, match=r"grid.*'k'"):
        compare_samplers(counted, samplers=("random", "grid"), n_trials=3, seeds=[0, 1, 2],
                         search_space={"x": [0.0, 0.5, 1.0]}, tracking_uri=tracking_uri,
                         progress=False)
    assert len(calls) == 1
    run = benchmark_run(tracking_uri)
    assert run.info.status == "FAILED" and "'k'" in run.data.tags["benchmark.error"]


# --------------------------------------------------------------------- pruner, loop efficiency


def pruned_log() -> tuple[list[str], object]:
    log: list[str] = []

    def reporting(trial: optuna.Trial) -> float:
        value = trial.suggest_float("x", -1, 1) ** 2
        trial.report(value, 0)
        if trial.should_prune():
            log.append("pruned")
            raise optuna.TrialPruned()
        log.append("complete")
        return value

    return log, reporting


def test_no_pruning_unless_asked_and_the_pruner_is_recorded(tracking_uri: str) -> None:
    log, objective = pruned_log()
    report = compare_samplers(objective, samplers=("random",), n_trials=12, seeds=[0],  # type: ignore[arg-type]
                              tracking_uri=tracking_uri, progress=False)
    assert log == ["complete"] * 12  # Optuna's default MedianPruner would prune here
    client = MlflowClient(tracking_uri)
    assert client.get_run(report.benchmark_run_id).data.params["pruner"] == "NopPruner"
    study_run = client.get_run(report.results["parent_run_id"].iloc[0])
    assert study_run.data.params["pruner"] == "NopPruner"


def test_a_pruner_is_used_and_recorded(tracking_uri: str) -> None:
    log, objective = pruned_log()
    report = compare_samplers(objective, samplers=("random",), n_trials=12, seeds=[0, 1],  # type: ignore[arg-type]
                              pruner="median", tracking_uri=tracking_uri, progress=False)
    assert "pruned" in log
    assert report.results["pruned"].sum() == log.count("pruned")
    client = MlflowClient(tracking_uri)
    assert client.get_run(report.benchmark_run_id).data.params["pruner"] == "MedianPruner"
    for run_id in report.results["parent_run_id"]:
        assert client.get_run(run_id).data.params["pruner"] == "MedianPruner"


def test_loop_efficiency_counts_only_the_objective(tracking_uri: str) -> None:
    spent = [0.0]

    def instant(trial: optuna.Trial) -> float:
        start = time.perf_counter()
        value = trial.suggest_float("x", -1, 1) ** 2
        spent[0] += time.perf_counter() - start
        return value

    report = compare_samplers(instant, samplers=("random",), n_trials=20, seeds=[0],
                              tracking_uri=tracking_uri, progress=False)
    row = report.results.iloc[0]
    objective_s = row["loop_efficiency"] * row["wall_s"]
    # The harness's per-trial work (MLflow runs, Optuna's bookkeeping) is not objective time.
    assert spent[0] <= objective_s + 1e-9 and objective_s <= spent[0] + 0.05


# --------------------------------------------------------------------- plots


def test_plot_log_scale_labels_title_and_step_lines() -> None:
    results = pd.DataFrame({"sampler": ["tpe", "tpe"], "seed": [0, 1], "best_value": [1e-6, 1e-5]})
    histories = {("tpe", 0): [1.0, 1e-3, 1e-6], ("tpe", 1): [2.0, 1e-2, 1e-5]}
    report = SamplerReport(results, histories, "minimize", 3, metric="regret", problem="sphere-2d")
    axes = report.figure().axes[0]
    assert axes.get_yscale() == "log"
    assert "regret" in axes.get_ylabel() and "sphere-2d" in axes.get_title()
    lines = axes.get_lines()  # the one sampler's median curve
    assert len(lines) == 1 and lines[0].get_drawstyle() == "steps-post"
    assert report.figure(log_y=False).axes[0].get_yscale() == "linear"
    narrow = SamplerReport(results, {("tpe", 0): [3.0, 2.0, 1.5], ("tpe", 1): [3.0, 2.5, 2.0]},
                           "minimize", 3)
    assert narrow.figure().axes[0].get_yscale() == "linear"
