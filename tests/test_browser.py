"""MLflow's own UI, in a real headless Chromium, shows what this project records.

A real `mlflow server` (the session's) holds a study of three levels (study -> trials ->
cross-validation folds); Playwright drives Debian's Chromium (`/usr/bin/chromium`, never
a downloaded browser). Assertions are on text that is stable across MLflow's UI versions
(run names, tag keys and values, file names), never on CSS classes. Screenshots go to the
test's temporary folder.

MLflow 3.17's UI opens every experiment in the mode of its global "GenAI / Model training"
switch (default GenAI, remembered per browser), whatever the experiment's
``mlflow.experimentKind`` tag says; a UI without that switch follows the tag. Pages are opened
with ``workflowType=machine_learning``, which 3.17 honours and a UI without the switch ignores.
"""

from __future__ import annotations

from collections.abc import Iterator
import importlib.util
from pathlib import Path
import re
from typing import Any
import uuid

from mlflow.tracking import MlflowClient
import pytest

import optuna_mlflow_nested as omn

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
TIMEOUT_MS = 30_000  # each wait for the UI; a shared 2-core machine renders slowly
ML_MODE = "workflowType=machine_learning"


def _missing() -> str | None:
    if not CHROMIUM.exists():
        return f"no Chromium at {CHROMIUM} (Debian: apt-get install chromium; .ci/run does)"
    if importlib.util.find_spec("playwright") is None:
        return "Playwright for Python is missing (pip install playwright; .ci/run does)"
    return None


MISSING = _missing()
# A server, a browser and a CatBoost tune: .ci/run runs these with the slow tests.
pytestmark = [pytest.mark.skipif(MISSING is not None, reason=MISSING or ""), pytest.mark.slow]


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    context.set_default_timeout(TIMEOUT_MS)
    try:
        yield context.new_page()
    finally:
        context.close()


def expect(locator: Any) -> Any:
    """Playwright's ``expect`` (auto-waiting), with this file's timeout and no global setting."""
    from playwright.sync_api import Expect

    expect_ = Expect()
    expect_.set_options(timeout=TIMEOUT_MS)
    return expect_(locator)


def name_cell(page: Any, run_name: str) -> Any:
    """The runs table's Run Name cell of one run: its link, and its expand button if it has children."""
    return page.get_by_role("gridcell").filter(has=page.get_by_role("link", name=run_name, exact=True))


def tag(page: Any, key: str, value: str) -> Any:
    """A run page's tag shown as ``key: value`` (the two parts are separate elements)."""
    return page.get_by_text(re.compile(rf"^{re.escape(key)}\W*{re.escape(value)}$"))


def close_assistant(page: Any) -> None:
    """Close the assistant panel MLflow 3.17 opens on a first visit (for clear screenshots only).

    It stays closed in this browser context; a UI without one costs a 3 s look.
    """
    close = page.get_by_role("button", name="Close", exact=True)
    try:
        close.wait_for(state="visible", timeout=3_000)
    except Exception:  # playwright's TimeoutError: no assistant in this UI
        return
    close.click()
    expect(close).to_be_hidden()


def test_study_tree_and_parent_summary_in_the_ui(mlflow_server: Any, page: Any, tmp_path: Path) -> None:
    from sklearn.datasets import load_diabetes
    from sklearn.linear_model import Ridge

    X, y = load_diabetes(return_X_y=True)
    name = f"browser-{uuid.uuid4().hex[:8]}"
    study = omn.create_study(name, experiment_name=name, tracking_uri=mlflow_server.uri,
                             direction="maximize", seed=0)

    def objective(trial: Any) -> float:
        alpha = trial.suggest_float("alpha", 1e-3, 10.0, log=True)
        return float(omn.cross_validate(Ridge(alpha=alpha), X, y, cv=3)["test_score"].mean())

    n_trials = 3
    study.optimize(objective, n_trials=n_trials)
    best = study.best_trial.number
    best_run_id = study.child_run_id(best)
    client = MlflowClient(mlflow_server.uri)
    assert client.get_experiment(study.experiment_id).tags["mlflow.experimentKind"] == \
        "custom_model_development"

    # The experiment's runs table (model training, not GenAI's traces overview).
    page.goto(f"{mlflow_server.uri}/#/experiments/{study.experiment_id}/runs?{ML_MODE}")
    parent = name_cell(page, name)
    expect(parent).to_be_visible()
    expect(page.get_by_text("Run Name", exact=True)).to_be_visible()

    parent.get_by_role("button").click()  # expand the study: its trials
    for number in range(n_trials):
        expect(name_cell(page, f"trial-{number}")).to_be_visible()
    expect(name_cell(page, "fold-0")).to_have_count(0)
    name_cell(page, "trial-0").get_by_role("button").click()  # expand a trial: its folds
    for fold in range(3):
        expect(name_cell(page, f"fold-{fold}")).to_be_visible()
    close_assistant(page)
    page.evaluate("document.activeElement && document.activeElement.blur()")
    page.screenshot(path=tmp_path / "tree.png")

    # The parent run's page: description, best-trial tags, child runs. (Its link in the
    # table drops workflowType, and MLflow 3.17 would show the page in GenAI mode.)
    parent_url = parent.get_by_role("link", name=name, exact=True).get_attribute("href")
    assert parent_url and parent_url.endswith(f"/runs/{study.parent_run_id}"), parent_url
    page.goto(f"{mlflow_server.uri}/{parent_url}?{ML_MODE}")
    best_line = page.get_by_text(re.compile(rf"Best: trial {best}\b"))
    expect(best_line).to_be_visible()
    show_more = page.get_by_text("Show more", exact=True)  # a long description is folded
    if show_more.is_visible():
        show_more.click()
    expect(best_line).to_be_in_viewport()
    expect(tag(page, "best_trial", str(best))).to_be_visible()
    expect(tag(page, "best_run_id", best_run_id)).to_be_visible()
    expect(page.get_by_role("link", name="trial-0", exact=True)).to_be_visible()
    page.screenshot(path=tmp_path / "parent.png")

    # Its trials table, in the artifact viewer: one row per trial and the header row.
    page.get_by_role("tab", name="Artifacts").click()
    page.get_by_text("trials_table.json", exact=True).click()
    table = page.get_by_role("table")
    expect(table.get_by_role("columnheader", name="number")).to_be_visible()
    expect(table.get_by_role("row")).to_have_count(n_trials + 1)
    expect(table).to_contain_text(best_run_id)
    page.screenshot(path=tmp_path / "trials-table.png")


def assert_champion_on_run_page(page: Any, uri: str, experiment_id: str, run_id: str,
                                model_name: str) -> None:
    """The run page of a tuned model's parent: ``best_model`` tag, a dataset, the model version."""
    client = MlflowClient(uri)
    datasets = [d.dataset.name for d in client.get_run(run_id).inputs.dataset_inputs]
    assert datasets, "the parent run has no dataset inputs"
    versions = [v for v in client.search_model_versions(f"name='{model_name}'") if v.run_id == run_id]
    assert versions, f"no version of {model_name} comes from the parent run"
    page.goto(f"{uri}/#/experiments/{experiment_id}/runs/{run_id}?{ML_MODE}")
    expect(tag(page, "best_model", "true")).to_be_visible()
    # The run page lists the first dataset (name and digest) and "+N" for the others.
    shown = "|".join(re.escape(n) for n in datasets)
    expect(page.get_by_text(re.compile(rf"^({shown})\b")).first).to_be_visible()
    # The version: a link named NAME, showing "vN", to its page in the model registry.
    link = page.get_by_role("link", name=model_name, exact=True)
    expect(link.filter(has_text=re.compile(rf"\bv{versions[0].version}\b")).first).to_be_visible()


def test_tuned_catboost_champion_in_the_ui(request: pytest.FixtureRequest, tmp_path: Path) -> None:
    mlflow_server = request.getfixturevalue("mlflow_server")
    page = request.getfixturevalue("page")
    from optuna_mlflow_nested.datasets import load_diabetes
    from optuna_mlflow_nested.datasets import train_val_test_split

    X_tr, X_va, X_te, y_tr, y_va, y_te = train_val_test_split(*load_diabetes(), seed=0)
    name = f"browser-catboost-{uuid.uuid4().hex[:8]}"
    result = omn.tune_catboost(X_tr, y_tr, X_va, y_va, X_te, y_te, n_trials=2, tuning_iterations=20,
                               max_iterations=50, study_name=name, experiment_name=name,
                               tracking_uri=mlflow_server.uri,
                               registered_model_name="browser-test")
    assert_champion_on_run_page(page, mlflow_server.uri, result.study.experiment_id,
                                result.parent_run_id, "browser-test")
    close_assistant(page)
    page.screenshot(path=tmp_path / "catboost-parent.png")
