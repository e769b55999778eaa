"""The examples run as shipped (small budgets where they take one)."""

from __future__ import annotations

from pathlib import Path
import subprocess
import sys

from mlflow.tracking import MlflowClient
import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.mark.parametrize("script, args", [("wrap_existing_objective.py", []),
                                          ("nested_cv_folds.py", ["1"])])
def test_example_runs(tmp_path: Path, script: str, args: list[str]) -> None:
    result = subprocess.run([sys.executable, str(EXAMPLES / script), *args], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "best" in result.stdout
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("examples")
    runs = client.search_runs([experiment.experiment_id])
    if script == "nested_cv_folds.py":
        assert sorted(r.info.run_name for r in runs if r.info.run_name.startswith("fold-")) == [
            f"fold-{i}" for i in range(5)]
    else:
        assert sum(r.info.run_name.startswith("trial-") for r in runs) == 30
