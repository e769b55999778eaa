"""pytest plugin: append every test report to the JSON-lines file named by $OMN_SUITE_OUTCOMES.

Loaded in both runs of ``.ci/optuna-suite`` (``-p outcomes``). One line per report phase,
written as it happens, so a run that is killed part way still leaves what it did.
``compare.py`` turns two such files into counts and a diff.
"""

from __future__ import annotations

import json
import os
from typing import Any

import pytest

_out: Any = None


def _message(report: Any) -> str:
    crash = getattr(report.longrepr, "reprcrash", None)
    if crash is not None:
        return str(crash.message)
    if isinstance(report.longrepr, tuple):  # skip: (file, line, reason)
        return str(report.longrepr[-1])
    return str(report.longrepr or "")


def _write(record: dict[str, Any]) -> None:
    if _out is not None:
        _out.write(json.dumps(record) + "\n")
        _out.flush()


def pytest_configure(config: pytest.Config) -> None:
    global _out
    path = os.environ.get("OMN_SUITE_OUTCOMES")
    if path and not hasattr(config, "workerinput"):
        _out = open(path, "a", encoding="utf-8")


def pytest_unconfigure(config: pytest.Config) -> None:
    global _out
    if _out is not None:
        _out.close()
        _out = None


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    _write({
        "nodeid": report.nodeid,
        "when": report.when,
        "outcome": report.outcome,
        "xfail": bool(getattr(report, "wasxfail", None) is not None),
        "duration": round(report.duration, 4),
        "message": _message(report)[:2000] if report.outcome != "passed" else "",
    })


def pytest_collectreport(report: pytest.CollectReport) -> None:
    if report.failed:
        _write({"nodeid": report.nodeid, "when": "collect", "outcome": "failed",
                "xfail": False, "duration": 0.0, "message": _message(report)[:2000]})


def pytest_report_header(config: pytest.Config) -> str:
    import optuna

    return f"optuna {optuna.__version__} imported from {os.path.dirname(optuna.__file__)}"
