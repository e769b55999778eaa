"""The command line: help, module entry point, usage errors."""

from __future__ import annotations

import subprocess
import sys

import pytest

from optuna_mlflow_nested.cli import main


def test_module_entry_point_shows_help() -> None:
    result = subprocess.run([sys.executable, "-m", "optuna_mlflow_nested", "--help"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0
    assert "optuna-mlflow-nested" in result.stdout and "sync" in result.stdout


def test_sync_usage_errors_exit_2(capsys: pytest.CaptureFixture, tracking_uri: str) -> None:
    assert main(["sync", "--study-name", "x"]) == 2
    assert "--study-name and --storage go together" in capsys.readouterr().err
    assert main(["sync", "--study-name", "nope", "--storage", "sqlite:///o.db",
                 "--tracking-uri", tracking_uri]) == 2
    assert "nope" in capsys.readouterr().err


def test_sync_with_nothing_to_do(capsys: pytest.CaptureFixture) -> None:
    assert main(["sync", "--spool", "missing.jsonl"]) == 0
    assert "0 run(s) delivered, 0 still pending" in capsys.readouterr().out
