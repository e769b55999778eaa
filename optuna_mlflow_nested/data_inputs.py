"""The data a study fits and scores on, as MLflow datasets (``mlflow.data``) with digests.

:func:`~optuna_mlflow_nested.tune_catboost` logs train, validation and test on the
parent run (contexts ``training``, ``validation``, ``testing``) and the training data
on each trial run. A dataset is described once (digest, schema, profile) as a plain,
JSON-serialisable dict: trial records carry it through the writer and the spool.
"""

from __future__ import annotations

from collections.abc import Sequence
import json
from typing import Any

from mlflow.entities import Dataset
from mlflow.entities import DatasetInput
from mlflow.entities import InputTag
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT
import numpy as np
import pandas as pd

__all__ = ["CONTEXTS", "dataset_input", "describe", "log_parent_inputs", "mlflow_dataset"]

#: The dataset names and their ``mlflow.data.context`` tags.
CONTEXTS = {"train": "training", "validation": "validation", "test": "testing"}
TARGET = "target"


def mlflow_dataset(X: Any, y: Any, name: str) -> Any:
    """``X`` with ``y`` as an ``mlflow.data`` dataset (pandas or NumPy), named ``name``."""
    from mlflow.data.numpy_dataset import from_numpy
    from mlflow.data.pandas_dataset import from_pandas

    if isinstance(X, pd.DataFrame):
        target = str(getattr(y, "name", None) or TARGET)
        while target in X.columns:
            target = f"_{target}"
        frame = X.reset_index(drop=True).assign(**{target: np.asarray(y)})
        return from_pandas(frame, targets=target, name=name)
    return from_numpy(np.asarray(X), targets=np.asarray(y), name=name)


def describe(X: Any, y: Any, name: str) -> dict[str, Any]:
    """The dataset as a plain dict: the entity's fields (``to_json``) and its context."""
    return {**json.loads(mlflow_dataset(X, y, name).to_json()), "context": CONTEXTS[name]}


def dataset_input(described: dict[str, Any]) -> DatasetInput:
    """The :class:`~mlflow.entities.DatasetInput` ``client.log_inputs`` takes for ``described``."""
    fields = {k: v for k, v in described.items() if k != "context"}
    return DatasetInput(Dataset(**fields), [InputTag(MLFLOW_DATASET_CONTEXT, described["context"])])


def log_parent_inputs(client: MlflowClient, run_id: str, described: Sequence[dict[str, Any]]) -> None:
    """Log the datasets the run does not have yet (a resumed study adds none twice)."""
    run = client.get_run(run_id)
    have = {(i.dataset.name, i.dataset.digest,
             {t.key: t.value for t in i.tags}.get(MLFLOW_DATASET_CONTEXT))
            for i in (run.inputs.dataset_inputs if run.inputs else [])}
    new = [d for d in described if (d["name"], d["digest"], d["context"]) not in have]
    if new:
        client.log_inputs(run_id, datasets=[dataset_input(d) for d in new])
