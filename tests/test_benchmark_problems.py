"""Shipped benchmark problems (issue 15, part 4): synthetic functions, problems by name, the CLI."""

from __future__ import annotations

import math
from pathlib import Path

from mlflow.tracking import MlflowClient
import numpy as np
import optuna
import pytest

from optuna_mlflow_nested.benchmark import compare_samplers
from optuna_mlflow_nested.benchmark import get_problem
from optuna_mlflow_nested.benchmark import synthetic_problem
from optuna_mlflow_nested.benchmark.synthetic import FUNCTIONS
from optuna_mlflow_nested.benchmark.synthetic import shift
from optuna_mlflow_nested.cli import main


def value_at(name: str, point: np.ndarray) -> float:
    problem = synthetic_problem(name)
    return problem.objective(optuna.trial.FixedTrial({f"x{i}": float(v) for i, v in enumerate(point)}))


@pytest.mark.parametrize("function", sorted(FUNCTIONS))
@pytest.mark.parametrize("dim", [2, 5])
def test_minimum_is_zero_at_the_shifted_optimum_and_nowhere_on_the_grid(function: str, dim: int) -> None:
    name = f"{function}-{dim}d"
    optimum = shift(dim, FUNCTIONS[function][1])
    assert value_at(name, optimum) == pytest.approx(0.0, abs=1e-12)
    assert value_at(name, np.zeros(dim)) > 0.1  # the centre of the box is not the optimum
    grid = synthetic_problem(name, n_trials=100).grid
    assert min(abs(v - o) for axis, o in zip(grid.values(), optimum) for v in axis) > 1e-3


def test_known_values() -> None:
    assert value_at("sphere-3d", shift(3, 5.12) + 1) == pytest.approx(3.0)
    assert value_at("rastrigin-2d", shift(2, 5.12) + 1) == pytest.approx(2.0)  # cos(2 pi) = 1
    assert value_at("rosenbrock-4d", shift(4, 2.048) - 1) == pytest.approx(3.0)  # u = 0: (d - 1) * 1
    assert value_at("ackley-2d", shift(2, 32.768) + 1) == pytest.approx(
        -20 * math.exp(-0.2) - math.exp(1) + 20 + math.e)


def test_names_and_grids() -> None:
    for bad in ("sphere", "sphere-0d", "rosenbrock-1d", "nope-2d", "sphere-101d"):
        with pytest.raises(ValueError):
            get_problem(bad)
    problem = get_problem("rastrigin-3d", n_trials=30)
    assert sorted(problem.grid) == ["x0", "x1", "x2"]
    assert math.prod(len(v) for v in problem.grid.values()) == 27  # 3 ** 3 <= 30 < 4 ** 3
    assert problem.finish is None and problem.direction == "minimize"
    assert get_problem("wide", n_trials=5, tuning_iterations=5).grid["learning_rate"].__len__() == 5


def test_steps_report_the_running_mean_of_noisy_instances() -> None:
    problem = synthetic_problem("sphere-2d", steps=4, noise=0.3, seed=7)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    study.optimize(problem.objective, n_trials=3)
    for trial in study.trials:
        steps = trial.intermediate_values
        assert sorted(steps) == [0, 1, 2, 3]
        assert trial.value == pytest.approx(steps[3])
        exact = value_at("sphere-2d", np.array([trial.params["x0"], trial.params["x1"]]))
        assert trial.value != pytest.approx(exact)  # noisy, but around the exact value
        assert 0.3 * exact < trial.value < 3 * exact
    again = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    again.optimize(problem.objective, n_trials=3)
    assert [t.value for t in again.trials] == [t.value for t in study.trials]  # deterministic


def test_compare_samplers_takes_a_problem(tracking_uri: str) -> None:
    problem = synthetic_problem("sphere-2d", n_trials=4)
    report = compare_samplers(problem, samplers=("grid", "random"), n_trials=4, seeds=[0, 1],
                              tracking_uri=tracking_uri, progress=False)
    assert report.problem == "sphere-2d" and report.metric == "value"
    grid_best = min(value_at("sphere-2d", np.array([a, b]))
                    for a in problem.grid["x0"] for b in problem.grid["x1"])
    assert (report.results.loc[report.results["sampler"] == "grid", "best_value"] == grid_best).all()
    bench = MlflowClient(tracking_uri).get_run(report.benchmark_run_id)
    assert bench.info.run_name == "samplers-sphere-2d" and bench.data.params["problem"] == "sphere-2d"


def test_trial_runs_reach_create_study(tracking_uri: str) -> None:
    report = compare_samplers(lambda t: t.suggest_float("x", -1, 1) ** 2, samplers=("random",),
                              n_trials=5, seeds=[0], trial_runs=1, tracking_uri=tracking_uri,
                              progress=False)
    client = MlflowClient(tracking_uri)
    study_run = client.get_run(report.results["parent_run_id"].iloc[0])
    assert study_run.data.params["trial_runs"] == "1"
    children = client.search_runs([study_run.info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{study_run.info.run_id}'")
    assert len(children) == 1
    with pytest.raises(ValueError, match="trial_runs"):
        compare_samplers(lambda t: 0.0, samplers=("random",), n_trials=2, seeds=[0],
                         trial_runs="some", tracking_uri=tracking_uri, progress=False)


def test_benchmark_command_on_synthetic_problems(tmp_path: Path, tracking_uri: str) -> None:
    out = tmp_path / "out"
    args = ["benchmark", "--problems", "sphere-2d,rastrigin-3d", "--samplers", "tpe,grid",
            "--trials", "4", "--seeds", "1", "--out", str(out), "--tracking-uri", tracking_uri]
    with pytest.warns(UserWarning, match="budgets are not equal"):  # rastrigin-3d: 2 ** 3 points
        assert main(args) == 0
    report = (out / "report.md").read_text()
    assert "## sphere-2d" in report and "## rastrigin-3d" in report and "test_rmse" not in report
    assert (out / "samplers-rastrigin-3d.png").read_bytes()[:4] == b"\x89PNG"


def test_benchmark_command_refuses_bad_names_before_any_run(tmp_path: Path, tracking_uri: str,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    out = str(tmp_path / "out")
    assert main(["benchmark", "--problems", "sphere-2d,spher-2d", "--out", out,
                 "--tracking-uri", tracking_uri]) == 2
    assert "spher-2d" in capsys.readouterr().err
    assert main(["benchmark", "--problems", "sphere-2d", "--trial-runs", "best", "--out", out,
                 "--tracking-uri", tracking_uri]) == 2
    client = MlflowClient(tracking_uri)
    assert client.search_runs([e.experiment_id for e in client.search_experiments()]) == []
