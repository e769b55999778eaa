"""Registering a finished model, and moving ``@champion`` only when validation says so.

Every registration gets the alias ``challenger``. The alias ``champion`` moves to it
only if the model has no champion yet, or the champion was validated on the same data
(equal data digest) with a higher (worse) validation RMSE. Other data: never moved
automatically (a warning, and the version's ``promotion`` tag says why). The test set
never decides. Everything goes through a client on the study's own tracking URI, which
is also its registry URI; MLflow's global tracking URI is set to it (and restored) only
around the new version's creation, which MLflow resolves through it.
"""

from __future__ import annotations

import math
from typing import Any
import warnings

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from optuna_mlflow_nested import tracking
from optuna_mlflow_nested._utils import tag_value

__all__ = ["CHALLENGER", "CHAMPION", "DIGEST_TAG", "PROMOTION_TAG", "VAL_TAG", "champion_uri",
           "register", "registry_client"]

CHAMPION = "champion"
CHALLENGER = "challenger"
DIGEST_TAG = "omn.data_digest"
VAL_TAG = "omn.val_rmse"
TEST_TAG = "omn.test_rmse"
PROMOTION_TAG = "promotion"


def registry_client(tracking_uri: str) -> MlflowClient:
    """A client whose registry is the tracking store itself (never the global registry URI)."""
    uri = tracking.absolute_uri(tracking_uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _decide(champion: Any, digest: str, val_rmse: float) -> tuple[bool, str]:
    """(promote?, why) for a new version against the current champion (or ``None``)."""
    if champion is None:
        return True, "champion: first version"
    if champion.tags.get(DIGEST_TAG) != digest:
        return False, "skipped: different validation data"
    try:
        old = float(champion.tags.get(VAL_TAG, "nan"))
    except ValueError:
        old = math.nan
    if math.isnan(old) or old > val_rmse:
        return True, f"champion: val_rmse {val_rmse!r} < {old!r} (version {champion.version})"
    return False, f"skipped: val_rmse {val_rmse!r} >= {old!r} (version {champion.version})"


def register(tracking_uri: str, name: str, model_uri: str, *, model_id: str | None, run_id: str,
             study_name: str, digest: str, val_rmse: float, test_rmse: float | None) -> str:
    """Register ``model_uri`` as a new version of ``name``; returns its version number.

    The version is tagged (study, parent run, data digest, validation and test RMSE,
    ``promotion``), always aliased ``challenger``, and ``champion`` when the rule in
    the module doc allows.
    """
    client = registry_client(tracking_uri)
    try:
        client.create_registered_model(name)
    except MlflowException as exc:
        if exc.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
            raise
    try:
        champion = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        champion = None
    promote, why = _decide(champion, digest, val_rmse)
    tags = {"omn.study": tag_value(study_name), "omn.parent_run_id": run_id, DIGEST_TAG: digest,
            VAL_TAG: repr(float(val_rmse)), PROMOTION_TAG: why}
    if test_rmse is not None:
        tags[TEST_TAG] = repr(float(test_rmse))
    # MLflow's SQL registry resolves the logged model's models:/ URI through the global
    # tracking URI: any other store than ./mlflow.db failed ("Logged model ... not found").
    with tracking.global_tracking_uri(tracking_uri):
        version = client.create_model_version(name, source=model_uri, run_id=run_id,
                                              tags=tags, model_id=model_id)
    client.set_registered_model_alias(name, CHALLENGER, version.version)
    if promote:
        client.set_registered_model_alias(name, CHAMPION, version.version)
    elif champion is not None and why.startswith("skipped: different"):
        warnings.warn(f"version {version.version} of {name!r} was not promoted to @{CHAMPION}: "
                      f"it was validated on other data (digest {digest}) than the champion "
                      f"(version {champion.version}); compare them yourself and move the alias "
                      "by hand if it is better", UserWarning, stacklevel=3)
    return str(version.version)


def champion_uri(tracking_uri: str, name: str, alias: str = CHAMPION) -> str:
    """The logged model behind ``models:/name@alias``, resolved in the study's own registry."""
    return str(registry_client(tracking_uri).get_model_version_by_alias(name, alias).source)
