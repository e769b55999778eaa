"""MLflow's fluent state, per process or per thread: the tracking URI and active
experiment a user set, every thread's active runs (private names: MLflow has no getter
for what was set, only for what it resolves to)."""

from __future__ import annotations

import os


def active_run_ids_of_all_threads() -> dict[int | None, list[str]]:
    """Thread ident -> ids of the runs active in that thread, outermost first: MLflowCallback
    nests trials run in Optuna's worker threads under the run the user started in the
    calling thread; ``mlflow.active_run()`` sees only its own thread."""
    from mlflow.tracking import fluent

    stacks = fluent._active_run_stack.get_all_thread_values()
    return {ident: [r.info.run_id for r in stack] for ident, stack in stacks.items()}


def default_experiment_id() -> str:
    """The experiment ``mlflow.start_run()`` would use (set_experiment, env, or default):
    MLflowCallback with ``create_experiment=False`` logs there, as the legacy callback
    did; MLflow resolves that only inside ``start_run``."""
    from mlflow.tracking import fluent

    return str(fluent._get_experiment_id())


def explicit_tracking_uri() -> str | None:
    """The URI set with ``mlflow.set_tracking_uri`` (``None`` when never set): restoring
    the user's state needs to know whether they set one; ``get_tracking_uri`` resolves a
    default."""
    from mlflow.tracking._tracking_service import utils

    return utils._tracking_uri


def active_experiment() -> tuple[str | None, str | None]:
    """MLflow's active experiment: ``set_experiment``'s choice and ``MLFLOW_EXPERIMENT_ID``.

    ``mlflow.start_run(nested=True)`` takes it, not its parent run's experiment: inside an
    objective the study's experiment is made active and the user's state restored after
    (:func:`set_active_experiment`). MLflow has no getter for the choice, and
    ``set_experiment`` reads the store on every call.
    """
    from mlflow.tracking import fluent

    return fluent._active_experiment_id, os.environ.get("MLFLOW_EXPERIMENT_ID")


def set_active_experiment(state: tuple[str | None, str | None]) -> None:
    """Set what :func:`active_experiment` returned."""
    from mlflow.tracking import fluent

    chosen, env = state
    fluent._active_experiment_id = chosen  # type: ignore[assignment]  # typed None in MLflow
    if env is None:
        os.environ.pop("MLFLOW_EXPERIMENT_ID", None)
    else:
        os.environ["MLFLOW_EXPERIMENT_ID"] = env
