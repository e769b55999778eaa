"""NestedStudy, create_study, load_study: an Optuna study with one MLflow parent run."""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Iterable
from collections.abc import Sequence
import numbers
import time
from typing import Any
from urllib.parse import urlsplit
import warnings

import mlflow
import optuna
from optuna.exceptions import DuplicatedStudyError
import pandas as pd

from optuna_mlflow_nested import tracking
from optuna_mlflow_nested._utils import redact_secrets
from optuna_mlflow_nested._utils import redact_uri
from optuna_mlflow_nested.seeding import seed_everything

__all__ = ["NestedStudy", "create_study", "load_study", "make_sampler", "SAMPLER_NAMES"]

PARENT_RUN_ATTR = "mlflow_parent_run_id"
EXPERIMENT_ATTR = "mlflow_experiment_id"
SAMPLER_NAMES = ("tpe", "random", "grid", "qmc", "gp", "cmaes")
_PARENT_WAIT_SECONDS = 120.0


def make_sampler(
    sampler: str | optuna.samplers.BaseSampler | None,
    *,
    seed: int | None = None,
    search_space: dict[str, Sequence[Any]] | None = None,
) -> optuna.samplers.BaseSampler:
    """An Optuna sampler from a name in :data:`SAMPLER_NAMES`, or the object itself.

    Example:
        >>> from optuna_mlflow_nested.study import make_sampler
        >>> type(make_sampler("random", seed=1)).__name__
        'RandomSampler'
    """
    if sampler is None:
        sampler = "tpe"
    if isinstance(sampler, optuna.samplers.BaseSampler):
        return sampler
    if not isinstance(sampler, str) or sampler.lower() not in SAMPLER_NAMES:
        raise ValueError(
            f"sampler must be an Optuna sampler or one of {', '.join(SAMPLER_NAMES)}; "
            f"got {sampler!r}"
        )
    name = sampler.lower()
    if name == "grid":
        if not search_space:
            raise ValueError('sampler="grid" needs search_space={"param": [values, ...]}')
        return optuna.samplers.GridSampler(
            {k: list(v) for k, v in search_space.items()}, seed=seed
        )
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "qmc":
        return optuna.samplers.QMCSampler(seed=seed, scramble=True, warn_independent_sampling=False)
    if name == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False)
    try:
        import torch  # noqa: F401
    except ImportError:
        raise ImportError('sampler="gp" needs PyTorch: pip install torch') from None
    return optuna.samplers.GPSampler(seed=seed)


def _check_directions(direction: Any, directions: Any) -> None:
    if direction is not None and directions is not None:
        raise ValueError("give either direction or directions, not both")
    for d in [direction] if directions is None else list(directions):
        if d is not None and str(getattr(d, "name", d)).lower() not in ("minimize", "maximize"):
            raise ValueError(f"direction must be 'minimize' or 'maximize', got {d!r}")


def _resolve_tracking_uri(tracking_uri: str | None) -> str:
    uri = tracking_uri if tracking_uri is not None else mlflow.get_tracking_uri()
    tracking.check_tracking_uri(uri)
    return tracking.absolute_uri(uri)


def _parent_context_run_id() -> str | None:
    run = mlflow.active_run()
    return run.info.run_id if run is not None else None


def _versions() -> dict[str, str]:
    out = {"optuna_version": optuna.__version__, "mlflow_version": mlflow.__version__}
    try:
        import catboost

        out["catboost_version"] = catboost.__version__
    except ImportError:
        pass
    return out


class NestedStudy:
    """An Optuna study whose trials are child runs of one MLflow parent run.

    Create it with :func:`create_study` or :func:`load_study`. Attributes of the
    underlying :class:`optuna.Study` (``best_trial``, ``best_params``, ``trials``,
    ``trials_dataframe()``...) are reachable directly.

    Example:
        >>> import optuna_mlflow_nested as omn, tempfile, os
        >>> uri = "sqlite:///" + os.path.join(tempfile.mkdtemp(), "mlflow.db")
        >>> study = omn.create_study("doc", tracking_uri=uri, seed=0)
        >>> study.optimize(lambda t: t.suggest_float("x", -1, 1) ** 2, n_trials=3)
        >>> len(study.child_runs())
        3
    """

    def __init__(
        self,
        study: optuna.Study,
        *,
        tracking_uri: str,
        experiment_id: str,
        parent_run_id: str,
        metric_name: str | Sequence[str] = "value",
        seed: int | None = None,
    ) -> None:
        self.study = study
        self.tracking_uri = tracking_uri
        self.experiment_id = experiment_id
        self.parent_run_id = parent_run_id
        self.metric_name = metric_name
        self.seed = seed
        self._client = tracking.get_client(tracking_uri)
        self._tracker = tracking.TrialTracker(
            tracking_uri=tracking_uri, experiment_id=experiment_id, parent_run_id=parent_run_id,
            study_name=study.study_name, metric_name=metric_name,
        )
        self._warned_reseed = False

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_") or name == "study":
            raise AttributeError(name)
        return getattr(self.study, name)

    @property
    def study_name(self) -> str:
        return self.study.study_name

    def optimize(
        self,
        objective: Callable[[optuna.Trial], float | Sequence[float]],
        n_trials: int | None = None,
        timeout: float | None = None,
        n_jobs: int = 1,
        catch: Iterable[type[Exception]] | type[Exception] = (),
        callbacks: list[Callable[[optuna.Study, optuna.trial.FrozenTrial], None]] | None = None,
        show_progress_bar: bool = False,
    ) -> None:
        """Run ``study.optimize`` with every trial recorded as a child run.

        Writes happen in background threads and are flushed before this returns (or
        raises). Inside ``objective``, ``mlflow.log_*`` calls land in the trial's run.
        """
        if not callable(objective):
            raise TypeError(f"objective must be callable, got {type(objective).__name__}")
        if n_trials is not None and (
            isinstance(n_trials, bool) or not isinstance(n_trials, numbers.Integral) or n_trials <= 0
        ):
            raise ValueError(f"n_trials must be a positive integer or None, got {n_trials!r}")
        if timeout is not None and (not isinstance(timeout, numbers.Real) or timeout <= 0):
            raise ValueError(f"timeout must be a positive number or None, got {timeout!r}")
        if not isinstance(n_jobs, numbers.Integral) or n_jobs == 0 or n_jobs < -1:
            raise ValueError(f"n_jobs must be a positive integer or -1, got {n_jobs!r}")
        if n_jobs != 1 and self.seed is not None and not self._warned_reseed:
            self._warned_reseed = True
            warnings.warn(
                f"n_jobs={n_jobs}: Optuna reseeds the sampler for parallel trials, so the seed "
                "does not make this search reproducible; use n_jobs=1 for bit-identical runs.",
                UserWarning,
                stacklevel=2,
            )
        budget = {"n_trials": n_trials, "timeout": timeout, "n_jobs": n_jobs}
        tracking.mark_parent_running(self._client, self.parent_run_id, budget)
        tracker = self._tracker
        tracking.warm_up_figures()
        status = "FAILED"
        with tracking.global_tracking_uri(self.tracking_uri), \
                tracking.short_http_retries(self.tracking_uri):
            tracker.start(n_jobs)
            try:
                self.study.optimize(
                    tracker.wrap(objective),
                    n_trials=n_trials,
                    timeout=timeout,
                    n_jobs=n_jobs,
                    catch=catch,
                    callbacks=[tracker.close_trial, *(callbacks or [])],
                    show_progress_bar=show_progress_bar,
                )
                status = "FINISHED"
            except KeyboardInterrupt:
                status = "KILLED"
                raise
            finally:
                tracker.close_open_trials(self.study)
                tracker.stop()
                self._finish(status)

    def reconcile(self, create_missing: bool = False) -> int:
        """Mend MLflow from Optuna's storage: finish runs of trials that died with their
        worker and, with ``create_missing``, create runs for trials that have none.
        Returns the number of runs written."""
        return tracking.reconcile_study(
            self._client, self.study, experiment_id=self.experiment_id,
            parent_run_id=self.parent_run_id, tracking_uri=self.tracking_uri,
            metric_name=self.metric_name, create_missing=create_missing,
        )

    def _finish(self, status: str) -> None:
        # Optuna's storage holds the results: a tracking server that is away must not
        # turn a finished search into an exception.
        for step in (self.reconcile,
                     lambda: tracking.log_parent_summary(self._client, self.parent_run_id, self.study),
                     lambda: tracking.set_run_status(self._client, self.parent_run_id, status)):
            try:
                step()
            except Exception as exc:
                warnings.warn(f"could not update the parent run {self.parent_run_id}: "
                              f"{redact_secrets(exc)}",
                              RuntimeWarning, stacklevel=3)
                return

    def child_run_id(self, trial_number: int) -> str:
        """The MLflow run id of trial ``trial_number``."""
        for trial in self.study.get_trials(deepcopy=False):
            if trial.number == trial_number:
                run_id = trial.system_attrs.get(tracking.RUN_ID_ATTRIBUTE_KEY)
                if run_id is None:
                    raise KeyError(f"trial {trial_number} has no MLflow run (yet)")
                return run_id
        raise KeyError(f"no trial number {trial_number} in study {self.study_name!r}")

    def child_runs(self) -> pd.DataFrame:
        """``mlflow.search_runs`` of this study's trial runs, oldest first."""
        with tracking.global_tracking_uri(self.tracking_uri), \
                tracking.short_http_retries(self.tracking_uri):
            return mlflow.search_runs(
                experiment_ids=[self.experiment_id],
                filter_string=f"tags.mlflow.parentRunId = '{self.parent_run_id}' "
                f"and tags.`{tracking.ROLE_TAG}` = 'trial'",
                order_by=["attributes.start_time ASC"],
                max_results=100_000,
            )



def _attach_parent(
    study: optuna.Study, client: Any, experiment_id: str, *, created: bool,
    nest_under: str | None, params: dict[str, Any], tags: dict[str, Any] | None,
    tracking_uri: str, storage_repr: str | None,
) -> tuple[str, str]:
    """The study's one parent run: made by the process that created the study, found by others."""
    attrs = study._storage.get_study_system_attrs(study._study_id)
    if PARENT_RUN_ATTR in attrs:
        return attrs[PARENT_RUN_ATTR], attrs[EXPERIMENT_ATTR]
    if not created:
        deadline = time.monotonic() + _PARENT_WAIT_SECONDS
        delay = 0.05
        while time.monotonic() < deadline:
            attrs = study._storage.get_study_system_attrs(study._study_id)
            if PARENT_RUN_ATTR in attrs:
                return attrs[PARENT_RUN_ATTR], attrs[EXPERIMENT_ATTR]
            time.sleep(delay)
            delay = min(delay * 2, 1.0)
        warnings.warn(
            f"study {study.study_name!r} has no MLflow parent run after "
            f"{_PARENT_WAIT_SECONDS:.0f}s; creating one", RuntimeWarning, stacklevel=3,
        )
    run_id = tracking.create_parent_run(client, experiment_id, study.study_name, nest_under, tags)
    study._storage.set_study_system_attr(study._study_id, EXPERIMENT_ATTR, experiment_id)
    study._storage.set_study_system_attr(study._study_id, PARENT_RUN_ATTR, run_id)
    start_tags = {
        "tracking_uri": redact_uri(tracking_uri),
        "storage": storage_repr or "in-memory",
        "direction": ",".join(d.name for d in study.directions),
        "sampler": type(study.sampler).__name__,
    }
    tracking.log_parent_start(client, run_id, {**params, **_versions()}, start_tags)
    return run_id, experiment_id


def _open_storage(storage: str | optuna.storages.BaseStorage | None) -> Any:
    """The Optuna storage, or a ValueError that names it (password removed)."""
    if storage is None or not isinstance(storage, str):
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
        raise ValueError(f"storage {shown!r} is not usable: {message}") from None


def _storage_repr(storage: Any) -> str | None:
    if storage is None:
        return None
    if isinstance(storage, str):
        return redact_uri(storage)
    url = getattr(storage, "url", None)
    return redact_uri(url) if isinstance(url, str) else type(storage).__name__


def create_study(
    study_name: str | None = None,
    *,
    experiment_name: str | None = None,
    tracking_uri: str | None = None,
    storage: str | optuna.storages.BaseStorage | None = None,
    sampler: str | optuna.samplers.BaseSampler | None = None,
    search_space: dict[str, Sequence[Any]] | None = None,
    pruner: optuna.pruners.BasePruner | None = None,
    direction: str | optuna.study.StudyDirection | None = None,
    directions: Sequence[str | optuna.study.StudyDirection] | None = None,
    seed: int | None = None,
    metric_name: str | Sequence[str] = "value",
    load_if_exists: bool = False,
    tags: dict[str, Any] | None = None,
) -> NestedStudy:
    """Create an Optuna study and its MLflow parent run (or join both when they exist).

    Args:
        study_name: Optuna study name; also the parent run's name and, unless
            ``experiment_name`` is given, the MLflow experiment's.
        experiment_name: MLflow experiment (created if missing).
        tracking_uri: MLflow tracking URI; MLflow's current one when ``None``.
        storage: Optuna storage (URL or object); in memory when ``None``.
        sampler: an Optuna sampler or one of ``"tpe"`` (default), ``"random"``,
            ``"grid"`` (needs ``search_space``), ``"qmc"``, ``"gp"``, ``"cmaes"``.
        seed: seeds ``random``, numpy and the sampler. Reproducible with ``n_jobs=1``.
        metric_name: MLflow metric name(s) for the objective value(s).
        load_if_exists: join an existing study (and its parent run) of that name.
        tags: extra tags for the parent run.

    If an MLflow run is active in the calling thread, the parent run nests under it.

    Example:
        >>> import optuna_mlflow_nested as omn, tempfile, os
        >>> uri = "sqlite:///" + os.path.join(tempfile.mkdtemp(), "mlflow.db")
        >>> study = omn.create_study("quad", tracking_uri=uri, sampler="random", seed=1)
        >>> study.optimize(lambda t: (t.suggest_float("x", -5, 5) - 1) ** 2, n_trials=5)
        >>> study.child_run_id(0) != study.parent_run_id
        True
    """
    _check_directions(direction, directions)
    if seed is not None:
        seed_everything(seed)
    if isinstance(metric_name, str):
        pass
    elif not isinstance(metric_name, Sequence) or not all(isinstance(m, str) for m in metric_name):
        raise TypeError(f"metric_name must be a string or a sequence of strings, got {metric_name!r}")
    optuna_sampler = make_sampler(sampler, seed=seed, search_space=search_space)
    uri = _resolve_tracking_uri(tracking_uri)
    optuna_storage = _open_storage(storage)
    try:
        study = optuna.create_study(
            storage=optuna_storage, sampler=optuna_sampler, pruner=pruner, study_name=study_name,
            direction=direction, directions=directions,
        )
        created = True
    except DuplicatedStudyError:
        if not load_if_exists:
            raise
        study = optuna.load_study(
            study_name=study_name, storage=optuna_storage, sampler=optuna_sampler, pruner=pruner
        )
        created = False
    client = tracking.get_client(uri)
    exp_name = experiment_name or study.study_name
    experiment_id = tracking.get_or_create_experiment(client, exp_name)
    params = {
        "sampler": type(optuna_sampler).__name__,
        "seed": seed,
        "directions": ",".join(d.name for d in study.directions),
        "metric_name": metric_name,
        "pruner": type(pruner).__name__ if pruner is not None else None,
    }
    if search_space is not None:
        params["search_space"] = {k: list(v) for k, v in search_space.items()}
    parent_run_id, experiment_id = _attach_parent(
        study, client, experiment_id, created=created, nest_under=_parent_context_run_id(),
        params=params, tags=tags, tracking_uri=uri, storage_repr=_storage_repr(storage),
    )
    return NestedStudy(
        study, tracking_uri=uri, experiment_id=experiment_id, parent_run_id=parent_run_id,
        metric_name=metric_name, seed=seed,
    )


def load_study(
    study_name: str,
    storage: str | optuna.storages.BaseStorage,
    *,
    tracking_uri: str | None = None,
    sampler: str | optuna.samplers.BaseSampler | None = None,
    search_space: dict[str, Sequence[Any]] | None = None,
    pruner: optuna.pruners.BasePruner | None = None,
    seed: int | None = None,
    metric_name: str | Sequence[str] = "value",
) -> NestedStudy:
    """Attach to an existing study and its parent run (resume, or add a worker).

    Example:
        >>> import optuna_mlflow_nested as omn, tempfile, os
        >>> d = tempfile.mkdtemp()
        >>> uri, db = f"sqlite:///{d}/mlflow.db", f"sqlite:///{d}/optuna.db"
        >>> first = omn.create_study("s", tracking_uri=uri, storage=db)
        >>> again = omn.load_study("s", db, tracking_uri=uri)
        >>> again.parent_run_id == first.parent_run_id
        True
    """
    if seed is not None:
        seed_everything(seed)
    optuna_sampler = make_sampler(sampler, seed=seed, search_space=search_space)
    uri = _resolve_tracking_uri(tracking_uri)
    try:
        study = optuna.load_study(study_name=study_name, storage=_open_storage(storage),
                                  sampler=optuna_sampler, pruner=pruner)
    except KeyError:
        raise ValueError(
            f"no study named {study_name!r} in storage {_storage_repr(storage)!r}"
        ) from None
    client = tracking.get_client(uri)
    attrs = study._storage.get_study_system_attrs(study._study_id)
    if PARENT_RUN_ATTR in attrs:
        parent_run_id, experiment_id = attrs[PARENT_RUN_ATTR], attrs[EXPERIMENT_ATTR]
    else:  # a plain Optuna study: adopt it
        experiment_id = tracking.get_or_create_experiment(client, study.study_name)
        parent_run_id, experiment_id = _attach_parent(
            study, client, experiment_id, created=True, nest_under=_parent_context_run_id(),
            params={"sampler": type(optuna_sampler).__name__, "seed": seed}, tags=None,
            tracking_uri=uri, storage_repr=_storage_repr(storage),
        )
    return NestedStudy(
        study, tracking_uri=uri, experiment_id=experiment_id, parent_run_id=parent_run_id,
        metric_name=metric_name, seed=seed,
    )
