"""The examples run as shipped (small budgets where they take one)."""

from __future__ import annotations

from pathlib import Path
import subprocess
import sys

from mlflow.tracking import MlflowClient
import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.mark.slow  # every example end to end, each in a fresh interpreter
@pytest.mark.parametrize("script, args", [("wrap_existing_objective.py", []),
                                          ("nested_cv_folds.py", ["1"]),
                                          ("catboost_regression.py", ["2"]),
                                          ("lasso_grid.py", [])])
def test_example_runs(tmp_path: Path, script: str, args: list[str]) -> None:
    result = subprocess.run([sys.executable, str(EXAMPLES / script), *args], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "best" in result.stdout
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("examples")
    runs = client.search_runs([experiment.experiment_id])
    if script == "lasso_grid.py":
        parent = next(r for r in runs if r.info.run_name == "lasso-grid")
        assert {"scaler.json", "prediction_plot.png"} <= {
            a.path for a in client.list_artifacts(parent.info.run_id)}
        assert sum(r.data.tags.get("mlflow.parentRunId") == parent.info.run_id for r in runs) == 7
    elif script == "catboost_regression.py":
        assert any(r.data.tags.get("best_model") == "true" for r in runs)
    elif script == "nested_cv_folds.py":
        assert sorted(r.info.run_name for r in runs if r.info.run_name.startswith("fold-")) == [
            f"fold-{i}" for i in range(5)]
    else:
        assert sum(r.info.run_name.startswith("trial-") for r in runs) == 30
