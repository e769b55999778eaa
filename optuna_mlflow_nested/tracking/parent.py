"""The study's parent run: created once, study facts at the start, a summary at the end."""

from __future__ import annotations

import collections
from collections.abc import Callable
import contextlib
import json
import math
import threading
import time
from typing import Any
import warnings

from mlflow.entities import Metric
from mlflow.entities import Param
from mlflow.entities import RunTag
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_LOGGED_ARTIFACTS
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID
import optuna
from optuna.trial import FrozenTrial
from optuna.trial import TrialState

from optuna_mlflow_nested._utils import param_value
from optuna_mlflow_nested._utils import redact_secrets
from optuna_mlflow_nested._utils import safe_mapping
from optuna_mlflow_nested._utils import tag_value
from optuna_mlflow_nested.tracking.clients import get_client
from optuna_mlflow_nested.tracking.clients import set_run_status
from optuna_mlflow_nested.tracking.delivery import batches
from optuna_mlflow_nested.tracking.delivery import wait_out_busy_store
from optuna_mlflow_nested.tracking.figures import figures_wanted
from optuna_mlflow_nested.tracking.figures import log_figures
from optuna_mlflow_nested.tracking.records import ROLE_TAG
from optuna_mlflow_nested.tracking.records import STUDY_TAG
from optuna_mlflow_nested.tracking.warm_up import start_end_reads

DESCRIPTION_TAG = "mlflow.note.content"
#: Set by the CatBoost finish: the logged model, and ``NAME/VERSION`` once registered.
MODEL_URI_TAG = "best_model_uri"
REGISTERED_TAG = "registered_model_version"


def create_parent_run(
    client: MlflowClient, experiment_id: str, study_name: str, nest_under: str | None,
    tags: dict[str, Any] | None = None,
) -> str:
    # The identity tags win over the user's: a joiner reads the study's name here.
    all_tags = {**safe_mapping(tags or {}, tag_value), ROLE_TAG: "study", STUDY_TAG: study_name}
    if nest_under:
        all_tags[MLFLOW_PARENT_RUN_ID] = nest_under
    return str(client.create_run(experiment_id, tags=all_tags, run_name=study_name).info.run_id)


def log_parent_start(client: MlflowClient, run_id: str, params: dict[str, Any],
                     tags: dict[str, Any]) -> None:
    """Study-level facts, once, when the parent run is created."""
    client.log_batch(
        run_id,
        params=[Param(k, v) for k, v in safe_mapping(params, param_value).items()],
        tags=[RunTag(k, v) for k, v in safe_mapping(tags, tag_value).items()],
        synchronous=True,
    )


def mark_parent_running(client: MlflowClient, run_id: str, budget: dict[str, Any]) -> None:
    """Record the requested budget and reopen the parent; a server that is away is not fatal."""
    try:
        wait_out_busy_store(lambda: client.log_batch(
            run_id, tags=[RunTag(f"budget.{k}", str(v)) for k, v in budget.items()],
            synchronous=True))
        wait_out_busy_store(lambda: set_run_status(client, run_id, "RUNNING"))
    except Exception as exc:
        warnings.warn(f"could not update the parent run {run_id}: {redact_secrets(exc)}",
                      RuntimeWarning, stacklevel=3)


def running_best(study: optuna.Study, trials: list[FrozenTrial]) -> list[tuple[int, float]]:
    """(trial number, best value so far) after each complete trial; empty if multi-objective."""
    if len(study.directions) != 1:
        return []
    sign = 1.0 if study.direction == optuna.study.StudyDirection.MINIMIZE else -1.0
    best = math.inf
    history = []
    for trial in sorted(trials, key=lambda t: t.number):
        if trial.state == TrialState.COMPLETE and trial.value is not None:
            best = min(best, sign * trial.value)
            history.append((trial.number, sign * best))
    return history


def corner_points(history: list[tuple[int, float]]) -> list[tuple[int, float]]:
    """The steps of a running best that draw the same line in MLflow's charts, which
    join points with straight lines: the first and last, and both ends of each jump.

    Most of a search's trials do not improve on the best; each point is a row that a
    SQLite store inserts one by one.
    """
    last = len(history) - 1
    return [point for i, point in enumerate(history)
            if i in (0, last) or point[1] != history[i - 1][1] or point[1] != history[i + 1][1]]


def _best_tags(study: optuna.Study, trials: list[FrozenTrial],
               run_ids: dict[int, str]) -> tuple[dict[str, str], list[FrozenTrial]]:
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    if not complete:
        return {}, []
    best = study.best_trials if len(study.directions) > 1 else [study.best_trial]
    tags: dict[str, Any] = {}
    if len(study.directions) == 1:
        tags["best_trial"] = best[0].number
        if best[0].number in run_ids:
            tags["best_run_id"] = run_ids[best[0].number]
        tags.update({f"best.{k}": v for k, v in best[0].params.items()})
    else:
        tags["pareto_trials"] = ",".join(str(t.number) for t in best)
    return safe_mapping(tags, tag_value), best


def _description(study: optuna.Study, trials: list[FrozenTrial], best: list[FrozenTrial],
                 run_ids: dict[int, str], parent_tags: dict[str, str]) -> str:
    counts = collections.Counter(t.state.name for t in trials)
    directions = ", ".join(d.name.lower() for d in study.directions)
    params = sorted({p for t in trials for p in t.distributions})
    lines = [f"**Optuna study `{study.study_name}`** ({directions}), sampler "
             f"`{type(study.sampler).__name__}`.", "",
             f"Searched: {', '.join(f'`{p}`' for p in params) or 'no parameters'}.",
             f"Trials: {len(trials)} (" + ", ".join(f"{n} {s.lower()}" for s, n in
                                                   sorted(counts.items())) + ")."]
    budget = {k[len("budget."):]: v for k, v in parent_tags.items()
              if k.startswith("budget.") and v != "None"}
    if budget:
        lines.append("Budget of the last `optimize`: "
                     + ", ".join(f"`{k}={v}`" for k, v in sorted(budget.items())) + ".")
    lines.append("")
    if len(study.directions) == 1 and best:
        t = best[0]
        lines.append(f"Best: trial {t.number}, value **{t.value:.6g}**, run "
                     f"`{run_ids.get(t.number, '?')}`.")
        lines += [f"- `{k}` = {v!r}" for k, v in t.params.items()]
    elif best:
        lines.append("Pareto front: " + "; ".join(
            f"trial {t.number} {[round(v, 6) for v in (t.values or [])]}" for t in best))
    model_uri = parent_tags.get(MODEL_URI_TAG)
    if model_uri:
        lines += ["", f"Model (the finish step's refit): `{model_uri}`. Load it with "
                  f"`mlflow.pyfunc.load_model(\"{model_uri}\")` after `mlflow.set_tracking_uri(URI)` "
                  "(URI: this store), or the best model of the experiment with "
                  "`omn.load_best_model(EXPERIMENT, tracking_uri=URI)`."]
    registered = parent_tags.get(REGISTERED_TAG)
    if registered:
        lines.append(f"Registered as `{registered}`; production code loads "
                     f"`models:/{registered.rsplit('/', 1)[0]}@champion` (registry URI: this store).")
    return "\n".join(lines)


def refresh_description(client: MlflowClient, run_id: str, study: optuna.Study,
                        run_ids: dict[int, str]) -> None:
    """Rewrite the parent's description from the study and the parent's own tags."""
    trials = study.get_trials(deepcopy=False)
    if not trials:
        return
    _, best = _best_tags(study, trials, run_ids)
    tags = client.get_run(run_id).data.tags
    client.set_tag(run_id, DESCRIPTION_TAG, _description(study, trials, best, run_ids, tags))


def log_parent_summary(client: MlflowClient, run_id: str, study: optuna.Study,
                       run_ids: dict[int, str], figures: bool = True,
                       compact: bool = False, now: int = 0) -> None:
    """The parent's running ``best_value``, counts per state, best trial, table, figures.

    ``best_value`` is stepped by trial number at the :func:`corner_points` of the
    running best (its chart is the same as with every step). Only steps not yet
    logged are added to it, so calling this after each
    ``optimize`` (or from several workers) never duplicates history. ``compact`` (big
    searches): ``best_value`` only where it improves, parameter importances as
    metrics, and figures only up to :data:`~.figures.FIGURE_LIMIT` trials. ``now``: the
    metrics' timestamp in ms (default: now); the same one again adds no rows.
    """
    trials = study.get_trials(deepcopy=False)
    now = now or int(time.time() * 1000)
    logged = {m.step for m in client.get_metric_history(run_id, "best_value")}
    history = running_best(study, trials)
    if compact:
        history = [(s, v) for i, (s, v) in enumerate(history) if i == 0 or v != history[i - 1][1]]
    else:
        history = corner_points(history)
    metrics = [Metric("best_value", value, now, step) for step, value in history
               if step not in logged]
    counts = collections.Counter(t.state for t in trials)
    for state, name in [(TrialState.COMPLETE, "n_complete"), (TrialState.PRUNED, "n_pruned"),
                        (TrialState.FAIL, "n_failed")]:
        metrics.append(Metric(name, float(counts.get(state, 0)), now, 0))
    metrics.append(Metric("n_trials", float(len(trials)), now, 0))
    tags: dict[str, str] = {}
    if trials:
        tags, best = _best_tags(study, trials, run_ids)
        parent_tags = client.get_run(run_id).data.tags
        tags[DESCRIPTION_TAG] = _description(study, trials, best, run_ids, parent_tags)
        tags.update(_table_tag(parent_tags))
    # Metrics and tags first (an artifact store that fails loses only the files), in as
    # few calls as MLflow's batch limits allow (one, mostly): each call is a transaction
    # of several statements on a SQLite store.
    log_in_batches(client, run_id, metrics, [RunTag(k, v) for k, v in tags.items()])
    if not trials:
        return
    frame = _compact_frame(study, trials) if compact else study.trials_dataframe()
    client.log_text(run_id, frame.to_csv(index=False), "trials.csv")
    intermediate = {t.number: json.dumps(t.intermediate_values) for t in trials
                    if t.intermediate_values}
    table = frame.assign(run_id=frame["number"].map(run_ids),
                         intermediate_values=frame["number"].map(intermediate))
    for column in table.columns:
        if table[column].dtype.kind in "mMO":  # dates, durations, objects: as text
            table[column] = table[column].astype(str)
    # Not MlflowClient.log_table: it appends to the table the run already has (every
    # optimize of a study would add all its trials again), downloading it first.
    client.log_text(run_id, table.to_json(orient="split", index=False, date_format="iso"),
                    TABLE_FILE)
    if figures:
        log_parent_figures(client, run_id, study, compact)


def log_in_batches(client: MlflowClient, run_id: str, metrics: list[Metric],
                   tags: list[RunTag]) -> None:
    """``log_batch`` calls, each as full as MLflow allows (:func:`delivery.batches`)."""
    for metric_part, _, tag_part in batches(metrics, [], tags):
        client.log_batch(run_id, metrics=metric_part, tags=tag_part, synchronous=True)


def log_parent_figures(client: MlflowClient, run_id: str, study: optuna.Study,
                       compact: bool = False) -> None:
    """The parent's two figures, drawn in this process, if the search is due any."""
    if figures_wanted(len(study.get_trials(deepcopy=False)), compact):
        log_figures(client, run_id, study)


#: The parent's trials table, shown by the UI's artifact view as a table.
TABLE_FILE = "trials_table.json"


def _table_tag(run_tags: dict[str, str]) -> dict[str, str]:
    """The tag ``log_table`` sets so that the UI shows :data:`TABLE_FILE` as a table, if
    the run does not have it yet."""
    logged = json.loads(run_tags.get(MLFLOW_LOGGED_ARTIFACTS, "[]"))
    entry = {"path": TABLE_FILE, "type": "table"}
    return {} if entry in logged else {MLFLOW_LOGGED_ARTIFACTS: json.dumps([*logged, entry])}


def _compact_frame(study: optuna.Study, trials: list[FrozenTrial]) -> Any:
    """The trials as a table, built directly (a third of ``trials_dataframe``'s time)."""
    import pandas as pd

    single = len(study.directions) == 1
    rows = []
    for t in trials:
        row: dict[str, Any] = {"number": t.number, "state": t.state.name}
        if single:
            row["value"] = t.value
        else:
            row.update({f"values_{i}": v for i, v in enumerate(t.values or [])})
        row["datetime_start"] = t.datetime_start
        row["duration_s"] = ((t.datetime_complete - t.datetime_start).total_seconds()
                             if t.datetime_complete and t.datetime_start else None)
        row.update({f"params_{k}": v for k, v in t.params.items()})
        row.update({f"user_attrs_{k}": v for k, v in t.user_attrs.items()})
        rows.append(row)
    return pd.DataFrame(rows)


def start_search(study: Any, *, n_trials: int | None, timeout: float | None, n_jobs: int,
                 executor: Any) -> None:
    """The start of a ``NestedStudy.optimize``, in the calling process: the budget on the
    parent run, which is reopened (RUNNING)."""
    from optuna_mlflow_nested.tracking import figures
    from optuna_mlflow_nested.tracking.clients import short_http_retries

    if executor is None and study.trial_runs is None:
        # The writer process makes the first trial's run while this process records
        # the budget (2 cores: both at once). If it cannot start, optimize's own start
        # of the tracker says so, inside its try (the parent then ends FAILED).
        with contextlib.suppress(Exception):
            study._tracking.start(n_jobs, n_trials)
    budget = {"n_trials": n_trials, "timeout": timeout, "n_jobs": n_jobs,
              "executor": type(executor).__name__ if executor is not None else None}
    try:
        with short_http_retries(study.tracking_uri):
            mark_parent_running(get_client(study.tracking_uri), study.parent_run_id, budget)
    except BaseException:  # Ctrl-C on a slow server: no session left open for the next optimize
        study._tracking.stop()
        raise
    if study.trial_runs is None:  # big searches: no import competing for the GIL
        figures.warm_up_figures()


class SearchEnd:
    """The end of a ``NestedStudy.optimize``, once, in the calling process: the parent's
    summary, reconcile, the figures, the parent's status.

    Optuna's storage holds the results: a tracking server that is away must not turn a
    finished search into an exception (a warning says what could not be written, and
    the steps after it are skipped). ``others_may_run`` (no executor: other processes may
    be running the study, as hand-started workers do): the last to end draws the figures.
    ``draw_here``: not in the writer process (the end at exit, ``ask_tell_end``).
    """

    def __init__(self, study: Any, *, others_may_run: bool = False,
                 draw_here: bool = False) -> None:
        self.study, self.draw_here = study, draw_here
        self.began = time.time() if others_may_run else None
        self.client = get_client(study.tracking_uri)
        self.compact = study.trial_runs is not None
        self._summary: bool | None = None  # written early: True, or failed (warned)
        self._stamp = 0  # the summary's metrics' timestamp (ms), once it is first written
        self._warming: threading.Thread | None = None
        self._begin, self._skip = threading.Event(), threading.Event()

    def warm_up(self, objective: Callable[[optuna.Trial], Any]) -> Callable[[optuna.Trial], Any]:
        """``objective``, which starts the end's reads as it is first called
        (:func:`~optuna_mlflow_nested.tracking.warm_up.start_end_reads`)."""
        if self.compact:
            return objective
        self._warming = start_end_reads(self.client, self.study, self._begin, self._skip)
        if self._warming is None:
            return objective
        begin = self._begin

        def first_call_begins(trial: optuna.Trial) -> Any:
            if not begin.is_set():
                begin.set()
            return objective(trial)

        return first_call_begins

    def _warmed(self) -> None:
        if self._warming is not None:
            if not self._begin.is_set():  # no trial ran: no reads (a later search makes them)
                self._skip.set()
                self._begin.set()
            self._warming.join()

    def _step(self, step: Callable[[], Any], stacklevel: int = 5) -> bool:
        try:
            wait_out_busy_store(step)
            return True
        except Exception as exc:
            warnings.warn(f"could not update the parent run {self.study.parent_run_id}: "
                          f"{redact_secrets(exc)}", RuntimeWarning, stacklevel=stacklevel)
            return False

    def _log_summary(self, figures: bool) -> None:
        study = self.study
        self._stamp = self._stamp or int(time.time() * 1000)  # a retry adds no metric rows
        log_parent_summary(self.client, study.parent_run_id, study, study.run_ids(),
                           figures=figures, compact=self.compact, now=self._stamp)

    def write_summary(self) -> None:
        """The summary without its figures, while the writer process still delivers the
        last trials' records (2 cores: both at once). Every trial's run exists by then,
        and reconcile changes no trial's run, except under ``trial_runs=K``, where it
        makes the K best trials' runs first (the summary then waits for :meth:`finish`).
        """
        self._warmed()
        if not self.compact and self._summary is None:  # called by tracker.stop, in optimize
            self._summary = self._step(lambda: self._log_summary(figures=False), stacklevel=7)

    def finish(self, status: str | None) -> Callable[[float], bool] | None:
        """Reconcile, the summary (unless :meth:`write_summary` wrote it), the figures
        and the parent's status (``None``: left as it is).

        Returns:
            A wait for the figures being drawn in the writer process (see
            :func:`~optuna_mlflow_nested.tracking.figures.start_elsewhere`), or ``None``:
            drawn here with the summary, or none due.
        """
        from optuna_mlflow_nested.tracking import figures

        self._warmed()
        study, run_id = self.study, self.study.parent_run_id
        if self._summary is False:  # failed (warned): reconcile, as before the summary
            self._step(study.reconcile)
            return None
        due = self.began is None or not figures.left_to_another_search(study, self.began, status)
        # Big searches (compact) use no writer process: their figures are drawn here.
        pending = None if self.compact or self.draw_here or not due else figures.start_elsewhere(
            self.client, study.tracking_uri, run_id, study)
        steps: list[Callable[[], Any]] = [study.reconcile]
        if self._summary is None:
            steps.append(lambda: self._log_summary(figures=due and pending is None))
        elif due and pending is None:  # written early, the writer process cannot draw them
            steps.append(lambda: log_parent_figures(self.client, run_id, study))
        if status is not None:
            steps.append(lambda: set_run_status(self.client, run_id, status))
        for step in steps:
            if not self._step(step):
                break
        return pending
