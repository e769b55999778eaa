"""Seeding: one seed for ``random``, numpy, the Optuna sampler and CatBoost."""

from __future__ import annotations

import hashlib
import random

import numpy as np

__all__ = ["seed_everything", "trial_seed"]


def seed_everything(seed: int) -> int:
    """Seed Python's ``random`` and numpy's global generator; return ``seed``.

    The Optuna sampler gets the seed through ``create_study(seed=...)`` and CatBoost
    through ``random_seed`` in :func:`optuna_mlflow_nested.tune_catboost`.

    Example:
        >>> import numpy as np, optuna_mlflow_nested as omn
        >>> _ = omn.seed_everything(7); a = np.random.rand()
        >>> _ = omn.seed_everything(7); a == np.random.rand()
        True
    """
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}: {seed!r}")
    if not 0 <= int(seed) < 2**32:
        raise ValueError(f"seed must be in [0, 2**32), got {seed}")
    random.seed(int(seed))
    np.random.seed(int(seed))
    return int(seed)


def trial_seed(seed: int, trial_number: int) -> int:
    """A deterministic per-trial seed derived from the study seed and trial number.

    Example:
        >>> from optuna_mlflow_nested.seeding import trial_seed
        >>> trial_seed(42, 3) == trial_seed(42, 3) != trial_seed(42, 4)
        True
    """
    digest = hashlib.sha256(f"{int(seed)}:{int(trial_number)}".encode()).digest()
    return int.from_bytes(digest[:4], "little")
