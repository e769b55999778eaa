"""Trial events -> MLflow, one job per module.

==================  ==========================================================
``records``         FrozenTrial -> :class:`RunRecord` (the one mapping)
``delivery``        one record -> MLflow writes: idempotent, batched, retried
``writer``          background delivery: bounded queue, writer threads, flush
``writer_process``  the writer in a child process (default outside executor workers)
``writer_child``    that child's side: sessions, spare runs, the parent's figures
``run_pool``        child runs created ahead of the trials
``spool``           outage spool and replay (cross-process safe)
``tracker``         a trial's lifecycle: open its run, record its end
``reconcile``       MLflow made to agree with Optuna's storage
``parent``          parent run: start, budget, summary
``ask_tell_end``    a search made through ask/tell: its parent ended at exit
``figures``         the parent's PNG figures
``clients``         cached clients, URIs, experiments, the global tracking URI
==================  ==========================================================

Data flow: trial -> :func:`records.trial_record` -> :class:`writer.Writer` (in the
writer process, or in threads) ->
:func:`delivery.deliver` -> MLflow (or :class:`spool.Spool` while it is away).
"""

from __future__ import annotations

from optuna_mlflow_nested.tracking.clients import absolute_uri
from optuna_mlflow_nested.tracking.clients import check_tracking_uri
from optuna_mlflow_nested.tracking.clients import get_client
from optuna_mlflow_nested.tracking.clients import get_or_create_experiment
from optuna_mlflow_nested.tracking.clients import global_tracking_uri
from optuna_mlflow_nested.tracking.clients import resolve_tracking_uri
from optuna_mlflow_nested.tracking.clients import set_run_status
from optuna_mlflow_nested.tracking.clients import short_http_retries
from optuna_mlflow_nested.tracking.delivery import RetryPolicy
from optuna_mlflow_nested.tracking.delivery import deliver
from optuna_mlflow_nested.tracking.records import ROLE_TAG
from optuna_mlflow_nested.tracking.records import RUN_KEY_TAG
from optuna_mlflow_nested.tracking.records import STUDY_TAG
from optuna_mlflow_nested.tracking.records import TRIAL_NUMBER_TAG
from optuna_mlflow_nested.tracking.records import RunRecord
from optuna_mlflow_nested.tracking.records import metric_names
from optuna_mlflow_nested.tracking.records import trial_record
from optuna_mlflow_nested.tracking.records import trial_status
from optuna_mlflow_nested.tracking.spool import Spool
from optuna_mlflow_nested.tracking.spool import default_spool_path
from optuna_mlflow_nested.tracking.spool import replay_spool
from optuna_mlflow_nested.tracking.tracker import TrialTracker
from optuna_mlflow_nested.tracking.tracker import current_trial

__all__ = [
    "ROLE_TAG",
    "RUN_KEY_TAG",
    "STUDY_TAG",
    "TRIAL_NUMBER_TAG",
    "RetryPolicy",
    "RunRecord",
    "Spool",
    "TrialTracker",
    "absolute_uri",
    "check_tracking_uri",
    "current_trial",
    "default_spool_path",
    "deliver",
    "get_client",
    "get_or_create_experiment",
    "global_tracking_uri",
    "metric_names",
    "replay_spool",
    "resolve_tracking_uri",
    "set_run_status",
    "short_http_retries",
    "trial_record",
    "trial_status",
]
