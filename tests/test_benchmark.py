"""compare_samplers and `optuna-mlflow-nested benchmark`: structure, not who wins (issue 7)."""

from __future__ import annotations

from pathlib import Path

from mlflow.tracking import MlflowClient
import optuna
import pytest

import optuna_mlflow_nested as omn
from optuna_mlflow_nested.cli import main


def quadratic(trial: optuna.Trial) -> float:
    return (trial.suggest_float("x", -2, 2) - 0.5) ** 2 + trial.suggest_int("k", 0, 3)


@pytest.mark.slow  # ~13 s: the default suite stays under 5 minutes on 2 cores
def test_report_structure_and_mlflow_tree(tracking_uri: str, tmp_path: Path) -> None:
    grid = {"x": [-2.0, -1.0, 0.0, 1.0, 2.0, 0.5], "k": [0]}
    report = omn.compare_samplers(quadratic, samplers=("tpe", "random", "grid"), n_trials=6,
                                  seeds=[0, 1, 2], search_space=grid, tracking_uri=tracking_uri,
                                  finish=lambda s: {"test_rmse": s.best_value + 1}, progress=False)
    results = report.results
    assert len(results) == 9
    assert set(zip(results["sampler"], results["seed"])) == {
        (s, k) for s in ("tpe", "random", "grid") for k in (0, 1, 2)}
    assert (results["trials"] == 6).all()
    assert {"best_value", "test_rmse", "trials_to_1pct", "wall_s", "cpu_s",
            "loop_efficiency"} <= set(results.columns)
    assert (results["test_rmse"] == results["best_value"] + 1).all()
    assert results["trials_to_1pct"].between(1, 6).all()
    assert (results.loc[results["sampler"] == "grid", "best_value"] == 0).all()  # 0.5 is on the grid
    assert set(report.histories) == set(zip(results["sampler"], results["seed"]))
    for (sampler, seed), history in report.histories.items():
        assert len(history) == 6 and history == sorted(history, reverse=True)
    table = report.summary_table()
    assert list(table["sampler"]) == ["tpe", "random", "grid"]
    assert {"best_value median", "best_value IQR"} <= set(table.columns)
    pairs = report.comparisons()
    assert len(pairs) == 3 and (pairs["pairs"] == 3).all()
    text = report.summary()
    assert "no significant difference" in text  # 3 seeds can never give p < 0.05
    assert "beat" not in text
    markdown = report.to_markdown()
    assert markdown.count("| sampler |") >= 2 and "p (Wilcoxon)" in markdown
    png = report.plot(tmp_path / "plot.png")
    assert png.read_bytes()[:4] == b"\x89PNG"

    client = MlflowClient(tracking_uri)
    bench = client.get_run(report.benchmark_run_id)
    assert bench.info.status == "FINISHED"
    assert {"report.md", "results.csv", "best_so_far.png", "summary.txt"} <= {
        a.path for a in client.list_artifacts(bench.info.run_id)}
    studies = client.search_runs([bench.info.experiment_id],
                                 f"tags.mlflow.parentRunId = '{bench.info.run_id}'")
    assert len(studies) == 9
    assert {(r.data.tags["benchmark.sampler"], r.data.tags["benchmark.seed"]) for r in studies} == {
        (s, str(k)) for s in ("tpe", "random", "grid") for k in (0, 1, 2)}
    for study_run in studies[:2]:
        trials = client.search_runs([bench.info.experiment_id],
                                    f"tags.mlflow.parentRunId = '{study_run.info.run_id}'")
        assert len(trials) == 6


def test_bad_arguments(tracking_uri: str) -> None:
    with pytest.raises(ValueError, match="search_space"):
        omn.compare_samplers(quadratic, samplers=("grid",), n_trials=2, seeds=[0],
                             tracking_uri=tracking_uri)
    with pytest.raises(ValueError, match="seeds"):
        omn.compare_samplers(quadratic, samplers=("tpe",), n_trials=2, seeds=[1, 1],
                             tracking_uri=tracking_uri)
    with pytest.warns(UserWarning, match="budgets are not equal"):
        omn.compare_samplers(quadratic, samplers=("grid",), n_trials=2, seeds=[0],
                             search_space={"x": [0.0, 1.0, 2.0], "k": [0]},
                             tracking_uri=tracking_uri, progress=False)


@pytest.mark.slow  # ~7 s: the default suite stays under 5 minutes on 2 cores
def test_benchmark_command_on_a_catboost_problem(tmp_path: Path) -> None:
    args = ["benchmark", "--problems", "wide", "--samplers", "tpe,grid,qmc", "--trials", "3",
            "--seeds", "2", "--tuning-iterations", "10", "--out", str(tmp_path / "out")]
    assert main(args) == 0
    report = (tmp_path / "out" / "report.md").read_text()
    assert "## wide" in report and "test_rmse" in report and "p (Wilcoxon)" in report
    assert (tmp_path / "out" / "samplers-wide.png").read_bytes()[:4] == b"\x89PNG"
