"""Every docstring example in the package runs (and checks its output)."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import optuna_mlflow_nested

MODULES = sorted(
    m.name for m in pkgutil.walk_packages(optuna_mlflow_nested.__path__, "optuna_mlflow_nested.")
    if m.name != "optuna_mlflow_nested.__main__"
)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name: str) -> None:
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS, verbose=False)
    assert result.failed == 0, f"{result.failed} docstring example(s) failed in {name}"
