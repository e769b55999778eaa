"""Opening a study's storage and finding or creating its one parent run."""

from __future__ import annotations

from collections.abc import Sequence
import contextlib
import numbers
import time
from typing import Any
from urllib.parse import urlsplit
import warnings

import mlflow
from mlflow.tracking import MlflowClient
import optuna

from optuna_mlflow_nested import _compat
from optuna_mlflow_nested import tracking
from optuna_mlflow_nested._adoption import adopt_once
from optuna_mlflow_nested._utils import redact_secrets
from optuna_mlflow_nested._utils import redact_uri
from optuna_mlflow_nested._utils import safe_key
from optuna_mlflow_nested.tracking import parent as parent_run

PARENT_RUN_ATTR = "mlflow_parent_run_id"
EXPERIMENT_ATTR = "mlflow_experiment_id"
_PARENT_WAIT_SECONDS = 120.0
#: The experiment of a study named "" (Optuna allows it; MLflow refuses the name "").
UNNAMED_STUDY_EXPERIMENT = "optuna-unnamed-study"


def attach_parent(
    study: optuna.Study, client: MlflowClient, experiment_name: str, *, created: bool,
    params: dict[str, Any], tags: dict[str, Any] | None, tracking_uri: str,
    storage_repr: str | None, mark_wait: float = 10.0,
) -> tuple[str, str]:
    """The study's one parent run: made by the process that created the study, found by
    others (who wait for it while the creator is still making it), made for a plain
    Optuna study (adopted) or a copy of another study (``optuna.copy_study`` copies the
    original's). Returns the run id and its experiment id. A study with no trial and no
    mark of this project waits ``mark_wait`` seconds for its creator's mark.

    Raises:
        ValueError: the study's parent run is not in this tracking store (another
            ``tracking_uri`` made it): its trials' runs would be lost or misfiled.
    """
    storage, study_id = _compat.study_storage(study)
    attrs = storage.get_study_system_attrs(study_id)
    if not created and PARENT_RUN_ATTR not in attrs and _parent_on_its_way(study, attrs,
                                                                            mark_wait):
        attrs = _wait_for_parent(study)
    if PARENT_RUN_ATTR in attrs and _own_parent(client, study, attrs[PARENT_RUN_ATTR],
                                                tracking_uri):
        return attrs[PARENT_RUN_ATTR], attrs[EXPERIMENT_ATTR]

    def make_parent() -> tuple[str, str]:
        experiment_id = tracking.get_or_create_experiment(
            client, experiment_name or UNNAMED_STUDY_EXPERIMENT)
        active = mlflow.active_run()
        run_id = parent_run.create_parent_run(client, experiment_id, study.study_name,
                                              active.info.run_id if active else None, tags)
        storage.set_study_system_attr(study_id, EXPERIMENT_ATTR, experiment_id)
        storage.set_study_system_attr(study_id, PARENT_RUN_ATTR, run_id)
        start_tags = {
            "tracking_uri": redact_uri(tracking_uri),
            "storage": storage_repr or "in-memory",
            "direction": ",".join(d.name for d in study.directions),
            "sampler": type(study.sampler).__name__,
        }
        parent_run.log_parent_start(client, run_id, params, start_tags)
        return run_id, experiment_id

    if created:
        return make_parent()
    # Adopted (a plain study, a copy): others may be adopting it at this moment.
    return adopt_once(study, stale=attrs.get(PARENT_RUN_ATTR), parent_key=PARENT_RUN_ATTR,
                      experiment_key=EXPERIMENT_ATTR, make_parent=make_parent)


def _parent_on_its_way(study: optuna.Study, attrs: dict[str, Any], mark_wait: float) -> bool:
    """Whether another process of this project is making the study's parent run.

    Its creator marks the study (its run policy) right after Optuna creates it, then
    makes the parent run, and no trial can start before that. A study with trials and
    no mark is a plain Optuna study (adopted at once, not after the whole wait); one
    with neither waits ``mark_wait`` seconds for the mark.
    """
    if TRIAL_RUNS_ATTR in attrs:
        return True
    if study.get_trials(deepcopy=False):
        return False
    return _attrs_with_any(study, (TRIAL_RUNS_ATTR, PARENT_RUN_ATTR), mark_wait) is not None


def _wait_for_parent(study: optuna.Study) -> dict[str, Any]:
    attrs = _attrs_with_any(study, (PARENT_RUN_ATTR,), _PARENT_WAIT_SECONDS)
    if attrs is not None:
        return attrs
    warnings.warn(
        f"study {study.study_name!r} has no MLflow parent run after "
        f"{_PARENT_WAIT_SECONDS:.0f}s; creating one", RuntimeWarning, stacklevel=4,
    )
    storage, study_id = _compat.study_storage(study)
    return storage.get_study_system_attrs(study_id)


def _attrs_with_any(study: optuna.Study, keys: tuple[str, ...],
                seconds: float) -> dict[str, Any] | None:
    """The study's system attributes once one of ``keys`` is among them (looked at with a
    growing pause, up to a second), or ``None`` after ``seconds``."""
    storage, study_id = _compat.study_storage(study)
    deadline = time.monotonic() + seconds
    delay = 0.05
    while time.monotonic() < deadline:
        attrs = storage.get_study_system_attrs(study_id)
        if any(key in attrs for key in keys):
            return attrs
        time.sleep(delay)
        delay = min(delay * 2, 1.0)
    return None


def _own_parent(client: MlflowClient, study: optuna.Study, run_id: str,
                tracking_uri: str) -> bool:
    """Whether the run the study's attributes name is this study's parent in this store:
    False for a copy's (the original study's name on it), a ValueError where the store
    has no such run."""
    from mlflow.exceptions import MlflowException

    try:
        with tracking.short_http_retries(tracking_uri):  # (MLflow's own: minutes a call)
            run = client.get_run(run_id)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            return True  # a store that is away: its outage is handled where runs are written
        raise ValueError(
            f"study {study.study_name!r}: tracking_uri {redact_uri(tracking_uri)!r} has no "
            f"run {run_id}, the study's MLflow parent run: pass the tracking_uri the study "
            "was created with (or, if that run was deleted for good, start a new study)"
        ) from None
    # A parent run made before the study's name was a tag of it (older versions): its own.
    return run.data.tags.get(parent_run.STUDY_TAG, study.study_name) == study.study_name


def open_storage(storage: str | optuna.storages.BaseStorage | None) -> optuna.storages.BaseStorage:
    """The Optuna storage (a new in-memory one for ``None``), or a ValueError that names
    it, password removed."""
    if storage is None:
        return optuna.storages.InMemoryStorage()
    if not isinstance(storage, str):
        return storage
    try:
        return optuna.storages.get_storage(storage)
    except Exception as exc:
        shown = redact_uri(storage) or ""
        cause = exc.__cause__ or exc.__context__
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if isinstance(cause, ImportError):
            message = f"{message} ({cause}; pip install 'optuna-mlflow-nested[postgres]')"
        password = urlsplit(storage).password if "://" in storage else None
        if password:
            message = message.replace(password, "***")
        raise ValueError(f"storage {shown!r} is not usable: {redact_secrets(message)}") from None


def storage_repr(storage: Any) -> str | None:
    """The storage as text for logs and errors, credentials removed."""
    if storage is None:
        return None
    if isinstance(storage, str):
        return redact_uri(storage)
    url = getattr(storage, "url", None)
    return redact_uri(url) if isinstance(url, str) else type(storage).__name__


def check_optimize_args(func: Any, n_trials: Any, timeout: Any, n_jobs: Any) -> None:
    if not callable(func):
        raise TypeError(f"objective must be callable, got {type(func).__name__}")
    check_budget(n_trials, timeout, n_jobs)


def check_budget(n_trials: Any, timeout: Any, n_jobs: Any) -> None:
    """``optimize``'s ``n_trials``, ``timeout`` and ``n_jobs``."""
    if n_trials is not None and (
        isinstance(n_trials, bool) or not isinstance(n_trials, numbers.Integral) or n_trials < 0
    ):
        # 0 is valid, as in Optuna: nothing runs.
        raise ValueError(f"n_trials must be a non-negative integer or None, got {n_trials!r}")
    if timeout is not None and (not isinstance(timeout, numbers.Real) or timeout <= 0):
        raise ValueError(f"timeout must be a positive number or None, got {timeout!r}")
    if not isinstance(n_jobs, numbers.Integral) or n_jobs == 0 or n_jobs < -1:
        raise ValueError(f"n_jobs must be a positive integer or -1, got {n_jobs!r}")


def check_directions(direction: Any, directions: Any) -> None:
    if direction is not None and directions is not None:
        raise ValueError("Specify only one of `direction` and `directions`.")
    for d in [direction] if directions is None else list(directions):
        if d is not None and str(getattr(d, "name", d)).lower() not in ("minimize", "maximize"):
            raise ValueError(f"direction must be 'minimize' or 'maximize', got {d!r}")


def check_metric_name(metric_name: Any, n_objectives: int | None = None) -> None:
    """A string (broadcast as ``name_i`` over several objectives), or one string per
    objective where ``n_objectives`` is known; no two names, nor a name and the
    ``trial_number`` metric of each child run, may share an MLflow key."""
    names = [metric_name] if isinstance(metric_name, str) else metric_name
    if not isinstance(names, Sequence) or not all(isinstance(m, str) for m in names):
        raise TypeError(f"metric_name must be a string or a sequence of strings, got {metric_name!r}")
    if not isinstance(metric_name, str) and n_objectives not in (None, len(names)):
        raise ValueError(f"metric_name names {len(names)} value(s) but the study has "
                         f"{n_objectives} objective(s): {list(names)!r}")
    if isinstance(metric_name, str) and (n_objectives or 1) > 1:  # as records.metric_names
        names = [f"{metric_name}_{i}" for i in range(n_objectives or 1)]
    keys = [safe_key(name) for name in [*names, "trial_number"]]
    if len(set(keys)) < len(keys):
        raise ValueError(f"metric_name {metric_name!r}: two metrics would get the same MLflow "
                         f"key (keys {keys[:-1]!r}; each child run also logs 'trial_number')")


def versions() -> dict[str, str]:
    from importlib import metadata

    out = {"optuna_version": optuna.__version__, "mlflow_version": mlflow.__version__}
    with contextlib.suppress(metadata.PackageNotFoundError):
        out["catboost_version"] = metadata.version("catboost")
    return out


TRIAL_RUNS_ATTR = "omn.trial_runs"


def parse_trial_runs(trial_runs: Any) -> int | None:
    """``"all"`` -> ``None``; ``K`` or ``"top-K"`` -> K (a non-negative int)."""
    value = trial_runs
    if isinstance(value, str) and value != "all":
        value = value[4:] if value.startswith("top-") else value
        value = int(value) if value.isdigit() else trial_runs
    if value == "all":
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f'trial_runs must be "all", a non-negative integer K or "top-K", '
                         f"got {trial_runs!r}")
    return value


def remember_trial_runs(study: optuna.Study, keep: int | None, *, created: bool) -> int | None:
    """The study's run policy: set by its creator, read by everyone who joins it."""
    storage, study_id = _compat.study_storage(study)
    if created:
        storage.set_study_system_attr(study_id, TRIAL_RUNS_ATTR, "all" if keep is None else keep)
        return keep
    stored = storage.get_study_system_attrs(study_id).get(TRIAL_RUNS_ATTR, "all")
    return None if stored == "all" else int(stored)
