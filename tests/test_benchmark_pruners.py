"""Pruners compared like samplers (issue 15, part 3): compare_pruners, PrunerReport, CV pruning."""

from __future__ import annotations

from mlflow.tracking import MlflowClient
import optuna
import pandas as pd
import pytest

from optuna_mlflow_nested.benchmark import PrunerReport
from optuna_mlflow_nested.benchmark import catboost_problem
from optuna_mlflow_nested.benchmark import compare_pruners
from optuna_mlflow_nested.benchmark import make_pruner
from optuna_mlflow_nested.benchmark import synthetic_problem


class AlwaysPrune(optuna.pruners.BasePruner):
    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        return True


def test_compare_pruners_counts_steps_saved_and_value_lost(tracking_uri: str) -> None:
    problem = synthetic_problem("sphere-2d", steps=4, noise=0.2)
    pruners = {"none": "none", "median": lambda: optuna.pruners.MedianPruner(n_startup_trials=2)}
    report = compare_pruners(problem, pruners=pruners, sampler="random", n_trials=8,
                             seeds=[0, 1], tracking_uri=tracking_uri, progress=False)
    assert isinstance(report, PrunerReport) and report.arm == "pruner"
    results = report.results.set_index(["pruner", "seed"])
    for seed in (0, 1):
        assert results.loc[("none", seed), "pruned"] == 0
        assert results.loc[("none", seed), "steps"] == 8 * 4
        assert results.loc[("median", seed), "pruned"] > 0
        assert results.loc[("median", seed), "steps"] < 8 * 4
    savings = report.savings().iloc[0]
    assert savings["pruner"] == "median" and savings["baseline"] == "none" and savings["pairs"] == 2
    assert savings["steps saved"] > 0
    text = report.summary()
    assert "median vs none" in text and "objective steps" in text and "not significant" in text
    client = MlflowClient(tracking_uri)
    bench = client.get_run(report.benchmark_run_id)
    assert bench.data.params["pruners"] == "none,median" and bench.info.status == "FINISHED"
    tags = {client.get_run(r).data.tags["benchmark.pruner"] for r in report.results["parent_run_id"]}
    assert tags == {"NopPruner", "MedianPruner"}


def test_savings_arithmetic_on_given_numbers() -> None:
    seeds = list(range(6))
    results = pd.DataFrame({
        "pruner": ["none"] * 6 + ["median"] * 6, "seed": seeds + seeds,
        "cpu_s": [10.0] * 6 + [6.0, 6.0, 6.0, 7.0, 7.0, 7.0],
        "best_value": [1.0] * 6 + [1.1] * 6, "pruned": [0] * 6 + [5] * 6})
    savings = PrunerReport(results, {}, "minimize", 20).savings().iloc[0]
    assert savings["cpu_s saved"] == pytest.approx(0.35)
    assert savings["cpu_s p"] == pytest.approx(2 / 2 ** 6)
    assert savings["best lost (median)"] == pytest.approx(0.1)
    assert (savings["seeds worse"], savings["seeds better"]) == (6, 0)
    assert savings["pruned trials (median)"] == 5
    maximize = PrunerReport(results, {}, "maximize", 20).savings().iloc[0]
    assert maximize["best lost (median)"] == pytest.approx(-0.1)  # higher is better: gained


def test_bad_pruners_fail_before_any_run(tracking_uri: str) -> None:
    problem = synthetic_problem("sphere-2d", steps=2)
    for pruners, error in ((("none", "nope"), ValueError), (("none",), ValueError),
                           (("none", "median", "median"), ValueError), (("none", 3), TypeError)):
        with pytest.raises(error):
            compare_pruners(problem, pruners=pruners, n_trials=2, seeds=[0],  # type: ignore[arg-type]
                            tracking_uri=tracking_uri, progress=False)
    client = MlflowClient(tracking_uri)
    assert client.search_runs([e.experiment_id for e in client.search_experiments()]) == []


def test_a_pruner_instance_is_copied_for_every_study() -> None:
    given = optuna.pruners.MedianPruner(n_startup_trials=2)
    first, second = make_pruner(given), make_pruner(given)
    assert first is not given and second is not first and isinstance(first, optuna.pruners.MedianPruner)
    assert type(make_pruner(lambda: AlwaysPrune())).__name__ == "AlwaysPrune"


def test_the_cv_problem_reports_each_fold_and_stops_when_pruned() -> None:
    problem = catboost_problem("diabetes-cv", tuning_iterations=5, folds=3)
    assert problem.metric == "CV RMSE"
    full = optuna.create_study(pruner=optuna.pruners.NopPruner(),
                               sampler=optuna.samplers.RandomSampler(seed=0))
    full.optimize(problem.objective, n_trials=1)
    trial = full.trials[0]
    assert sorted(trial.intermediate_values) == [0, 1, 2] and trial.value == trial.intermediate_values[2]
    cut = optuna.create_study(pruner=AlwaysPrune(), sampler=optuna.samplers.RandomSampler(seed=0))
    cut.optimize(problem.objective, n_trials=1)
    assert cut.trials[0].state == optuna.trial.TrialState.PRUNED
    assert list(cut.trials[0].intermediate_values) == [0]  # stopped after the first fold
