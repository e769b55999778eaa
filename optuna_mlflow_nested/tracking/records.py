"""FrozenTrial -> what MLflow gets: the one mapping from a trial to a run record.

The study, :class:`~optuna_mlflow_nested.MLflowCallback`, ``sync`` and ``reconcile`` all
build their writes with :func:`trial_record`.
"""

from __future__ import annotations

from collections.abc import Sequence
import copy
import dataclasses
import datetime
import json
import math
import time
from typing import Any

from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID
import optuna
from optuna.trial import FrozenTrial
from optuna.trial import TrialState

from optuna_mlflow_nested._utils import MAX_ENTITY_KEY_LENGTH
from optuna_mlflow_nested._utils import param_value
from optuna_mlflow_nested._utils import redact_uri
from optuna_mlflow_nested._utils import safe_key
from optuna_mlflow_nested._utils import safe_mapping
from optuna_mlflow_nested._utils import tag_value

STUDY_TAG = "optuna.study_name"
TRIAL_NUMBER_TAG = "optuna.trial_number"
ROLE_TAG = "optuna.role"
#: A run's own key where no trial number names it (a fold's run): a record of it in the
#: spool finds the run it was meant for, not another fold of the same name and parent.
RUN_KEY_TAG = "omn.run_key"

_STATUS = {
    TrialState.COMPLETE: "FINISHED",
    TrialState.PRUNED: "KILLED",
    TrialState.FAIL: "FAILED",
}

Metric = tuple[str, float, int, int]  # key, value, timestamp (ms), step


@dataclasses.dataclass
class RunRecord:
    """Everything one run's final write needs; JSON-serialisable for the spool."""

    tracking_uri: str
    experiment_id: str
    parent_run_id: str | None
    study_name: str
    trial_number: int | None
    run_id: str | None
    run_name: str
    status: str
    end_time: int
    start_time: int | None = None
    params: dict[str, str] = dataclasses.field(default_factory=dict)
    tags: dict[str, str] = dataclasses.field(default_factory=dict)
    metrics: list[Metric] = dataclasses.field(default_factory=list)
    texts: dict[str, str] = dataclasses.field(default_factory=dict)
    #: datasets the run used: ``Dataset`` entity fields and a ``context`` (see data_inputs)
    inputs: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    def to_json(self) -> str:
        # Credentials never reach the spool: `sync --tracking-uri` supplies them again.
        return json.dumps({**dataclasses.asdict(self), "tracking_uri": redact_uri(self.tracking_uri)})

    @classmethod
    def from_json(cls, line: str) -> RunRecord:
        data = json.loads(line)
        data["metrics"] = [tuple(m) for m in data["metrics"]]
        return cls(**data)


def trial_status(trial: FrozenTrial) -> str:
    """MLflow's status for a finished trial: FINISHED, KILLED (pruned) or FAILED."""
    return _STATUS.get(trial.state, "FAILED")


def metric_names(metric_name: str | Sequence[str], n_values: int) -> list[str]:
    """MLflowCallback's naming: one name, broadcast with ``_i`` suffixes, or one per value."""
    if isinstance(metric_name, str):
        if n_values > 1:
            return [f"{metric_name}_{i}" for i in range(n_values)]
        return [metric_name]
    if len(metric_name) != n_values:
        raise ValueError(
            "Running multi-objective optimization "
            f"with {n_values} objective values, but {len(metric_name)} names specified. "
            "Match objective values and names, or use default broadcasting."
        )
    return list(metric_name)


def millis(moment: datetime.datetime | None) -> int | None:
    return None if moment is None else int(moment.timestamp() * 1000)


def as_failed(trial: FrozenTrial) -> FrozenTrial:
    """The trial as FAIL, ended now: what an interrupted trial's run records."""
    failed = copy.deepcopy(trial)
    failed.state = TrialState.FAIL
    failed.values = None
    failed.datetime_complete = datetime.datetime.now()
    return failed


def trial_record(
    study: optuna.Study,
    trial: FrozenTrial,
    *,
    tracking_uri: str,
    experiment_id: str,
    parent_run_id: str | None,
    run_id: str | None,
    metric_name: str | Sequence[str] = "value",
    run_name: str | None = None,
    history: bool = True,
    user_attr_tags: bool = True,
    study_user_attr_tags: bool = False,
    error_text: str | None = None,
) -> RunRecord:
    """What MLflow gets for ``trial``: params, values, tags, state, times.

    Args:
        study: the trial's study (its name and directions go into tags).
        trial: the trial, finished or not (an unfinished trial has no ``state`` tag).
        tracking_uri: where the record goes (kept without credentials in the spool).
        experiment_id: the run's experiment.
        parent_run_id: the run it nests under, or ``None``.
        run_id: the run to write, or ``None`` to find or create the trial's run.
        metric_name: name(s) of the objective value(s), as MLflowCallback names them.
        run_name: the run's name; ``trial-<number>`` by default.
        history: also the trial number as a metric, intermediate values as a stepped
            metric, the fail reason and the trial role tag (this project's child runs;
            MLflowCallback's runs have none of these).
        user_attr_tags: the trial's user attributes as tags.
        study_user_attr_tags: the study's user attributes as tags.
        error_text: a traceback, logged as ``traceback.txt``.

    Returns:
        A :class:`RunRecord` for :func:`~optuna_mlflow_nested.tracking.delivery.deliver`.

    Example:
        >>> import optuna
        >>> from optuna_mlflow_nested.tracking.records import trial_record
        >>> study = optuna.create_study(study_name="doc")
        >>> study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=1)
        >>> record = trial_record(study, study.trials[0], tracking_uri="sqlite:///m.db",
        ...                       experiment_id="0", parent_run_id=None, run_id=None)
        >>> record.run_name, record.status, sorted(record.params)
        ('trial-0', 'FINISHED', ['x'])
    """
    end = millis(trial.datetime_complete) or int(time.time() * 1000)
    metrics: list[Metric] = []
    if history:
        metrics.append(("trial_number", float(trial.number), end, 0))
    if trial.values is not None:
        names = metric_names(metric_name, len(trial.values))
        metrics += [(safe_key(n), float(v), end, 0) for n, v in zip(names, trial.values)
                    if not math.isnan(v)]
    tags: dict[str, Any] = {
        "number": str(trial.number),
        "datetime_start": str(trial.datetime_start),
        "datetime_complete": str(trial.datetime_complete),
    }
    if trial.state.is_finished():
        tags["state"] = trial.state.name
    directions = [d.name for d in study.directions]
    tags["direction"] = directions[0] if len(directions) == 1 else str(directions)
    tags.update({f"{k}_distribution": v for k, v in trial.distributions.items()})
    if history:
        step_time = millis(trial.datetime_start) or end
        value_key = safe_key(metric_name if isinstance(metric_name, str) else "value")
        # Cut before the suffix: within MLflow's limit, and never the value's own key.
        key = value_key[:MAX_ENTITY_KEY_LENGTH - len("_intermediate")] + "_intermediate"
        metrics += [(key, float(v), step_time, int(step))
                    for step, v in sorted(trial.intermediate_values.items()) if not math.isnan(v)]
        if "fail_reason" in trial.system_attrs:
            tags["fail_reason"] = trial.system_attrs["fail_reason"]
    # User attributes may overwrite the descriptive tags (as MLflowCallback lets them),
    # never the identity tags below.
    if user_attr_tags:
        tags.update(trial.user_attrs)
    if study_user_attr_tags:
        tags.update(study.user_attrs)
    out = safe_mapping(tags, tag_value)
    out.update({STUDY_TAG: study.study_name, TRIAL_NUMBER_TAG: str(trial.number)})
    if history:
        out[ROLE_TAG] = "trial"
    if parent_run_id:
        out[MLFLOW_PARENT_RUN_ID] = parent_run_id
    return RunRecord(
        tracking_uri=tracking_uri,
        experiment_id=experiment_id,
        parent_run_id=parent_run_id,
        study_name=study.study_name,
        trial_number=trial.number,
        run_id=run_id,
        run_name=run_name or f"trial-{trial.number}",
        status=trial_status(trial),
        end_time=end,
        start_time=millis(trial.datetime_start),
        params=safe_mapping(trial.params, param_value),
        tags=out,
        metrics=metrics,
        texts={"traceback.txt": error_text} if error_text else {},
    )


def fail_non_finite(trial: optuna.Trial, result: Any) -> Any:
    """Turn +/-inf into NaN, which Optuna records as a FAILED trial while the study goes on."""
    values = result if isinstance(result, Sequence) and not isinstance(result, str) else [result]
    try:
        if any(math.isinf(float(v)) for v in values):
            trial.set_user_attr("non_finite_value", str(result))
            return float("nan") if values is not result else [float("nan")] * len(values)
    except (TypeError, ValueError):
        pass
    return result
