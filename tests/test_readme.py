"""The README's API example runs as written."""

from __future__ import annotations

from pathlib import Path
import re
import subprocess
import sys

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.mark.slow  # default suite under 5 min on 2 cores
def test_readme_api_example_runs(tmp_path: Path) -> None:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    example = next(b for b in blocks if "omn.create_study(\"my-study\"" in b)
    result = subprocess.run([sys.executable, "-c", example], cwd=tmp_path, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "trial-" in result.stdout and (tmp_path / "mlflow.db").exists()
    assert "View run" not in result.stdout


@pytest.mark.slow  # ~26 s
def test_readme_compare_samplers_example_runs(tmp_path: Path) -> None:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    example = next(b for b in blocks if "omn.compare_samplers(" in b)
    check = "\nassert len(report.results) == 18, report.results\n"
    result = subprocess.run([sys.executable, "-c", example + check], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "12 trials per study, 6 seeds" in result.stdout
    assert (tmp_path / "samplers.png").stat().st_size > 0


@pytest.mark.slow  # CatBoost fits, ~20 s
def test_readme_catboost_example_runs_and_loads_its_model(tmp_path: Path) -> None:
    # The recipe loaded the best model by the study name "catboost-tune", which only the
    # CLI gives by default: tune_catboost without study_name made an Optuna "no-name-..."
    # study, and load_best_model raised "no MLflow experiment named 'catboost-tune'".
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    example = next(b for b in blocks if "omn.tune_catboost(" in b and "load_best_model" in b)
    assert "n_trials=50," in example
    short = example.replace("n_trials=50,", "n_trials=3, tuning_iterations=20, max_iterations=50,")
    check = ("\nimport numpy as np\n"
             "assert np.allclose(model.predict(X_test), result.model.predict(X_test))\n"
             "print('loaded', type(model).__name__)\n")
    result = subprocess.run([sys.executable, "-c", short + check], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "loaded" in result.stdout
