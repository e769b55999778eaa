"""The package's shape: small modules, private names only in _compat/, lazy heavy imports."""

from __future__ import annotations

from pathlib import Path
import re
import subprocess
import sys

import optuna_mlflow_nested

PACKAGE = Path(optuna_mlflow_nested.__file__).parent
PRIVATE = re.compile(r"_fluent\.|_tracking_client|_tracking_utils|_get_experiment_id|\._storage\b"
                     r"|\._study_id\b|\._trial_id\b|\._suggest\(|_active_run_stack|\._validate\("
                     r"|_thread_local|_pop_waiting_trial_id|\._backend\b|\._max_workers\b"
                     r"|\._is_multi_objective\b|(?<!self)\._tracking_uri\b"
                     r"|\._file_path\b|\._lock_file\b|\._lock_target_file\b")


def modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_every_module_fits_on_a_screen_or_two() -> None:
    sizes = {p.relative_to(PACKAGE).as_posix(): len(p.read_text().splitlines()) for p in modules()}
    assert {name: n for name, n in sizes.items() if n > 400} == {}


def test_private_mlflow_and_optuna_names_only_in_compat() -> None:
    offenders = {p.name: PRIVATE.findall(p.read_text()) for p in modules()
                 if p.parent.name != "_compat"}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_library_never_picks_a_matplotlib_backend_nor_imports_posix_only_modules() -> None:
    for path in modules():
        text = path.read_text()
        assert "matplotlib.use(" not in text, path
        assert not re.search(r"^\s*import (fcntl|termios|resource|pwd|grp)\b", text, re.M), path


def heavy_modules_after(statement: str) -> str:
    code = (f"import sys; {statement}; "
            "print(sorted(m for m in ('catboost', 'sklearn', 'scipy', 'matplotlib') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return out.stdout.strip()


def test_import_is_lazy_about_heavy_libraries() -> None:
    # Nothing heavy beyond what Optuna and MLflow import themselves (SciPy, with some versions).
    assert heavy_modules_after("import optuna_mlflow_nested") == heavy_modules_after(
        "import optuna, mlflow")
    # and the lazy names resolve
    assert callable(optuna_mlflow_nested.tune_catboost)
    assert callable(optuna_mlflow_nested.cross_validate)
