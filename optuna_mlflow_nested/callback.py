"""MLflowCallback: drop-in successor of optuna-integration's deprecated callback."""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Sequence
import functools
import threading
from typing import Any

import mlflow
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID
import optuna
from optuna.trial import FrozenTrial

from optuna_mlflow_nested import _compat
from optuna_mlflow_nested import tracking

__all__ = ["MLflowCallback"]

RUN_ID_ATTRIBUTE_KEY = "mlflow_run_id"
# start_run arguments the run creation itself understands; the rest are rejected
# loudly instead of being dropped silently.
_KNOWN_KWARGS = {"experiment_id", "run_name", "nested", "tags", "parent_run_id", "description",
                 "log_system_metrics"}


class MLflowCallback:
    """Callback to track Optuna trials with MLflow: ``optuna_integration.mlflow.MLflowCallback``
    with one import changed, without its flaws.

    Same constructor, behaviour and :meth:`track_in_mlflow`, but pruned trials end
    KILLED and failed trials FAILED, ``mlflow_kwargs={"nested": True}`` nests every
    trial under the run active in the thread that called ``optimize`` (also with
    ``n_jobs > 1``), ``parent_run_id`` and other ``start_run`` arguments are honoured,
    :meth:`track_in_mlflow` lets trials run in parallel, and there is no deprecation
    warning. Writes go through :mod:`optuna_mlflow_nested.tracking`, the library's
    one logging path.

    Example:
        >>> import optuna, tempfile, os
        >>> from optuna_mlflow_nested import MLflowCallback
        >>> uri = "sqlite:///" + os.path.join(tempfile.mkdtemp(), "mlflow.db")
        >>> callback = MLflowCallback(tracking_uri=uri, metric_name="loss")
        >>> study = optuna.create_study(study_name="cb-doc")
        >>> study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2, callbacks=[callback])
    """

    def __init__(
        self,
        tracking_uri: str | None = None,
        metric_name: str | Sequence[str] = "value",
        create_experiment: bool = True,
        mlflow_kwargs: dict[str, Any] | None = None,
        tag_study_user_attrs: bool = False,
        tag_trial_user_attrs: bool = True,
    ) -> None:
        if not isinstance(metric_name, Sequence):
            raise TypeError(
                f"Expected metric_name to be string or sequence of strings, got {type(metric_name)}."
            )
        self._tracking_uri = tracking_uri
        self._metric_name = metric_name
        self._create_experiment = create_experiment
        self._mlflow_kwargs = mlflow_kwargs or {}
        unknown = set(self._mlflow_kwargs) - _KNOWN_KWARGS
        if unknown:
            raise TypeError(f"mlflow_kwargs has arguments start_run does not take: {sorted(unknown)}")
        self._tag_study_user_attrs = tag_study_user_attrs
        self._tag_trial_user_attrs = tag_trial_user_attrs
        self._experiments: dict[str, str] = {}
        self._lock = threading.Lock()  # guards only the experiment cache, never a trial
        self._context_tags: dict[str, str] | None = None

    # -- the callback -----------------------------------------------------------------
    def __call__(self, study: optuna.study.Study, trial: FrozenTrial) -> None:
        uri, client = self._client()
        run_id = trial.system_attrs.get(RUN_ID_ATTRIBUTE_KEY)
        record = tracking.trial_record(
            study, trial, tracking_uri=uri, experiment_id=self._experiment_id(client, study),
            parent_run_id=self._parent_run_id(check_active=run_id is None), run_id=run_id,
            metric_name=self._metric_name, run_name=self._run_name(trial), history=False,
            user_attr_tags=self._tag_trial_user_attrs,
            study_user_attr_tags=self._tag_study_user_attrs,
        )
        tracking.deliver(client, record, lookup=False, create_tags=self._creation_tags())

    def track_in_mlflow(self) -> Callable:
        """Decorator: the objective runs inside its trial's MLflow run, so its own
        ``mlflow.log_*`` calls land there. Trials are not serialised.

        Returns:
            Objective function with tracking to MLflow enabled.
        """

        def decorator(func: Callable[[optuna.Trial], Any]) -> Callable[[optuna.Trial], Any]:
            @functools.wraps(func)
            def wrapper(trial: optuna.trial.Trial) -> float | Sequence[float]:
                uri, client = self._client()
                parent = self._parent_run_id(check_active=True)
                tags = self._creation_tags()
                if parent:
                    tags[MLFLOW_PARENT_RUN_ID] = parent
                run = client.create_run(self._experiment_id(client, trial.study), tags=tags,
                                        run_name=self._run_name(trial))
                _compat.set_trial_system_attr(trial, RUN_ID_ATTRIBUTE_KEY, run.info.run_id)
                try:
                    with tracking.global_tracking_uri(uri), _compat.active_run(run):
                        return func(trial)
                except optuna.TrialPruned:
                    raise
                except BaseException:
                    # The callback may never run for this trial: end the run now.
                    tracking.set_run_status(client, run.info.run_id, "FAILED")
                    raise

            return wrapper

        return decorator

    # -- helpers ----------------------------------------------------------------------
    def _client(self) -> tuple[str, Any]:
        uri = self._tracking_uri or mlflow.get_tracking_uri()
        return uri, tracking.get_client(uri)

    def _run_name(self, trial: Any) -> str:
        return self._mlflow_kwargs.get("run_name", str(trial.number))

    def _experiment_id(self, client: Any, study: optuna.study.Study) -> str:
        if self._create_experiment:
            with self._lock:
                if study.study_name not in self._experiments:
                    self._experiments[study.study_name] = tracking.get_or_create_experiment(
                        client, study.study_name)
                return self._experiments[study.study_name]
        if self._mlflow_kwargs.get("experiment_id") is not None:
            return str(self._mlflow_kwargs["experiment_id"])
        return _compat.default_experiment_id()

    def _parent_run_id(self, check_active: bool) -> str | None:
        """The run trials nest under: ``parent_run_id``, else the run active in this thread,
        else (Optuna worker threads) the one active in the thread that called optimize."""
        nested = bool(self._mlflow_kwargs.get("nested"))
        active = mlflow.active_run()
        own = [active.info.run_id] if active is not None else []
        if own and not nested and check_active:
            raise Exception(
                (
                    "Run with UUID {} is already active. To start a new run, first end the "
                    + "current run with mlflow.end_run(). To start a nested "
                    + "run, call start_run with nested=True"
                ).format(own[0])
            )
        if self._mlflow_kwargs.get("parent_run_id"):
            return self._mlflow_kwargs["parent_run_id"]
        if not nested:
            return None
        if own:
            return own[-1]
        stacks = _compat.active_run_ids_of_all_threads()
        main = stacks.get(threading.main_thread().ident) or []
        if main:
            return main[-1]
        others = [stack[-1] for stack in stacks.values() if stack]
        return others[0] if len(others) == 1 else None

    def _creation_tags(self) -> dict[str, str]:
        if self._context_tags is None:
            from mlflow.tracking.context import registry

            self._context_tags = {k: str(v) for k, v in registry.resolve_tags().items()}
        tags = dict(self._context_tags)
        tags.update({k: str(v) for k, v in (self._mlflow_kwargs.get("tags") or {}).items()})
        if self._mlflow_kwargs.get("description"):
            tags["mlflow.note.content"] = str(self._mlflow_kwargs["description"])
        return tags
