"""create_study and load_study: Optuna's factories, each with the study's parent run."""

from __future__ import annotations

from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any
from typing import Literal

import optuna
from optuna.exceptions import DuplicatedStudyError
from optuna.study.study import create_study as _optuna_create_study
from optuna.study.study import load_study as _optuna_load_study

from optuna_mlflow_nested import _compat
from optuna_mlflow_nested import tracking
from optuna_mlflow_nested._study_setup import attach_parent
from optuna_mlflow_nested._study_setup import check_directions
from optuna_mlflow_nested._study_setup import check_metric_name
from optuna_mlflow_nested._study_setup import open_storage
from optuna_mlflow_nested._study_setup import parse_trial_runs
from optuna_mlflow_nested._study_setup import remember_trial_runs
from optuna_mlflow_nested._study_setup import storage_repr
from optuna_mlflow_nested._study_setup import versions
from optuna_mlflow_nested.samplers import make_sampler
from optuna_mlflow_nested.seeding import seed_everything
from optuna_mlflow_nested.seeding import trial_seed
from optuna_mlflow_nested.study import NestedStudy

__all__ = ["StudyNotFoundError", "create_study", "load_study"]


class StudyNotFoundError(ValueError, KeyError):
    """No study of that name: a ``KeyError`` as in :func:`optuna.load_study`, and a
    ``ValueError`` naming the study and the storage (password removed)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def resumed_sampler(study: optuna.Study, sampler: Any, seed: int | None,
                    search_space: Mapping[str, Sequence[Any]] | None) -> Any:
    """A sampler named with a seed, for a study that already has trials, seeded from the
    seed and the trial count: resuming with the seed it started with would repeat the
    first trials' parameters. ``None`` when there is nothing to change."""
    if seed is None or isinstance(sampler, optuna.samplers.BaseSampler):
        return None
    done = len(study.get_trials(deepcopy=False))
    if not done:
        return None
    return make_sampler(sampler, seed=trial_seed(seed, done), search_space=search_space)


def create_study(
    study_name: str | None = None,
    *,
    experiment_name: str | None = None,
    tracking_uri: str | None = None,
    storage: str | optuna.storages.BaseStorage | None = None,
    sampler: str | optuna.samplers.BaseSampler | None = None,
    search_space: Mapping[str, Sequence[Any]] | None = None,
    pruner: optuna.pruners.BasePruner | None = None,
    direction: Literal["minimize", "maximize"] | optuna.study.StudyDirection | None = None,
    directions: Sequence[Literal["minimize", "maximize"] | optuna.study.StudyDirection] | None = None,
    seed: int | None = None,
    metric_name: str | Sequence[str] = "value",
    load_if_exists: bool = False,
    tags: dict[str, Any] | None = None,
    trial_runs: str | int = "all",
) -> NestedStudy:
    """:func:`optuna.create_study` plus the study's MLflow parent run.

    Takes every argument of :func:`optuna.create_study` with the same meaning, and:

    Args:
        study_name: Optuna study name; also the parent run's name and, unless
            ``experiment_name`` is given, the MLflow experiment's.
        experiment_name: MLflow experiment (created if missing).
        tracking_uri: MLflow tracking URI; MLflow's current one when ``None``.
        storage: Optuna storage (URL or object); in memory when ``None``.
        sampler: an Optuna sampler or one of ``"tpe"`` (default), ``"random"``,
            ``"grid"`` (needs ``search_space``), ``"qmc"``, ``"gp"``, ``"cmaes"``.
        search_space: ``{"param": [values, ...]}`` for ``sampler="grid"``.
        seed: seeds ``random``, numpy and the sampler. Reproducible with ``n_jobs=1``.
        metric_name: MLflow metric name(s) for the objective value(s).
        load_if_exists: join an existing study (and its parent run) of that name.
        tags: extra tags for the parent run.
        trial_runs: ``"all"`` (every trial a child run) or ``K`` / ``"top-K"``: for
            big searches, only the K best trials (and the failed ones, with their
            tracebacks) become child runs, created at the end of each ``optimize``;
            every trial's params, values, state and intermediate values are in the
            parent's trials table and ``best_value`` is stepped on the parent. Inside
            the objective ``mlflow.log_*`` then lands on the parent run. Kept with the
            study, so workers and ``load_study`` follow it.

    Returns:
        A :class:`NestedStudy` (an :class:`optuna.Study`) whose parent run exists. If
        an MLflow run is active in the calling thread, the parent run nests under it.

    Raises:
        ValueError: a bad argument, named; a storage or tracking URI that cannot be used.
        TypeError: an argument of the wrong type (``seed="1"``, ``metric_name=3``), named.
        optuna.exceptions.DuplicatedStudyError: the study exists and ``load_if_exists``
            is false.

    Example:
        >>> import optuna, optuna_mlflow_nested as omn, tempfile, os
        >>> uri = "sqlite:///" + os.path.join(tempfile.mkdtemp(), "mlflow.db")
        >>> study = omn.create_study("quad", tracking_uri=uri, sampler="random", seed=1)
        >>> study.optimize(lambda t: (t.suggest_float("x", -5, 5) - 1) ** 2, n_trials=5)
        >>> study.child_run_id(0) != study.parent_run_id
        True
        >>> fig = optuna.visualization.plot_optimization_history(study)
    """
    keep = parse_trial_runs(trial_runs)
    check_directions(direction, directions)
    # (An existing study joined keeps its own directions: checked once it is loaded.)
    check_metric_name(metric_name, len(directions) if directions is not None
                      else None if load_if_exists else 1)
    if seed is not None:
        seed_everything(seed)
    optuna_sampler = make_sampler(sampler, seed=seed, search_space=search_space)
    uri = tracking.resolve_tracking_uri(tracking_uri)
    optuna_storage = open_storage(storage)
    try:
        plain = _optuna_create_study(
            storage=optuna_storage, sampler=optuna_sampler, pruner=pruner, study_name=study_name,
            direction=direction, directions=directions,
        )
        created = True
        # The mark first: processes joining meanwhile wait for this one's parent run.
        keep = remember_trial_runs(plain, keep, created=True)
    except DuplicatedStudyError:
        if not load_if_exists:
            raise
        plain = _optuna_load_study(study_name=study_name, storage=optuna_storage,
                                   sampler=optuna_sampler, pruner=pruner)
        plain.sampler = resumed_sampler(plain, sampler, seed, search_space) or plain.sampler
        created = False
        keep = remember_trial_runs(plain, keep, created=False)
    try:
        check_metric_name(metric_name, len(plain.directions))
    except ValueError:
        if created:  # (load_if_exists without directions: the study was new)
            optuna.delete_study(study_name=plain.study_name, storage=optuna_storage)
        raise
    client = tracking.get_client(uri)
    params: dict[str, Any] = {
        "sampler": type(optuna_sampler).__name__,
        "seed": seed,
        "directions": ",".join(d.name for d in plain.directions),
        "metric_name": metric_name,
        "pruner": type(plain.pruner).__name__,
    }
    if search_space is not None:
        params["search_space"] = {k: list(v) for k, v in search_space.items()}
    params["trial_runs"] = trial_runs
    parent_run_id, experiment_id = attach_parent(
        plain, client, experiment_name or plain.study_name, created=created, params={**params, **versions()},
        tags=tags, tracking_uri=uri, storage_repr=storage_repr(storage),
    )
    return NestedStudy(
        plain.study_name, _compat.study_storage(plain)[0], plain.sampler, plain.pruner,
        tracking_uri=uri, experiment_id=experiment_id, parent_run_id=parent_run_id,
        metric_name=metric_name, seed=seed, trial_runs=keep,
    )


def load_study(
    study_name: str | None,
    storage: str | optuna.storages.BaseStorage,
    *,
    tracking_uri: str | None = None,
    sampler: str | optuna.samplers.BaseSampler | None = None,
    search_space: Mapping[str, Sequence[Any]] | None = None,
    pruner: optuna.pruners.BasePruner | None = None,
    seed: int | None = None,
    metric_name: str | Sequence[str] = "value",
    experiment_name: str | None = None,
    tags: Mapping[str, Any] | None = None,
) -> NestedStudy:
    """:func:`optuna.load_study` plus the study's parent run (resume, or add a worker).

    A plain Optuna study without a parent run is adopted: it gets one, in
    ``experiment_name`` (default: the study's name) with ``tags``. A study that has a
    parent run keeps it, and its experiment: both arguments are then ignored.

    Returns:
        A :class:`NestedStudy` attached to the study's parent run.

    Raises:
        ValueError: no study of that name in ``storage`` (or an unusable storage).

    Example:
        >>> import optuna_mlflow_nested as omn, tempfile, os
        >>> d = tempfile.mkdtemp()
        >>> uri, db = f"sqlite:///{d}/mlflow.db", f"sqlite:///{d}/optuna.db"
        >>> first = omn.create_study("s", tracking_uri=uri, storage=db)
        >>> again = omn.load_study("s", db, tracking_uri=uri)
        >>> again.parent_run_id == first.parent_run_id
        True
    """
    check_metric_name(metric_name)
    if seed is not None:
        seed_everything(seed)
    optuna_sampler = make_sampler(sampler, seed=seed, search_space=search_space)
    uri = tracking.resolve_tracking_uri(tracking_uri)
    try:
        plain = _optuna_load_study(study_name=study_name, storage=open_storage(storage),
                                   sampler=optuna_sampler, pruner=pruner)
        plain.sampler = resumed_sampler(plain, sampler, seed, search_space) or plain.sampler
    except KeyError:
        raise StudyNotFoundError(
            f"no study named {study_name!r} in storage {storage_repr(storage)!r}"
        ) from None
    check_metric_name(metric_name, len(plain.directions))
    keep = remember_trial_runs(plain, None, created=False)
    parent_run_id, experiment_id = attach_parent(
        plain, tracking.get_client(uri), experiment_name or plain.study_name, created=False,
        params={"sampler": type(optuna_sampler).__name__, "seed": seed, **versions()},
        tags=dict(tags) if tags else None, tracking_uri=uri, storage_repr=storage_repr(storage),
        mark_wait=0.0,  # loading, not creating: no creator is expected to be on its way
    )
    return NestedStudy(
        plain.study_name, _compat.study_storage(plain)[0], plain.sampler, plain.pruner,
        tracking_uri=uri, experiment_id=experiment_id, parent_run_id=parent_run_id,
        metric_name=metric_name, seed=seed, trial_runs=keep,
    )
