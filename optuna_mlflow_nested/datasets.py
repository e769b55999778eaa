"""Bundled datasets and deterministic train/validation/test splits (nothing downloaded)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import train_test_split

__all__ = ["load", "load_csv", "load_diabetes", "load_friedman1", "train_val_test_split",
           "MIN_ROWS"]

MIN_ROWS = 10
FRIEDMAN1_NOISE = 1.0


def load_diabetes() -> tuple[pd.DataFrame, pd.Series]:
    """scikit-learn's bundled diabetes regression data (442 rows, 10 features)."""
    from sklearn.datasets import load_diabetes as _load

    data = _load(as_frame=True)
    return data.data, data.target


def load_friedman1(n_samples: int = 5000, noise: float = FRIEDMAN1_NOISE,
                   seed: int = 0) -> tuple[pd.DataFrame, pd.Series]:
    """``make_friedman1`` (generated): with noise 1.0 the best possible RMSE is about 1.0."""
    from sklearn.datasets import make_friedman1

    X, y = make_friedman1(n_samples=n_samples, noise=noise, random_state=seed)
    return pd.DataFrame(X, columns=[f"x{i}" for i in range(X.shape[1])]), pd.Series(y, name="y")


def load_csv(path: str | Path, target: str | None) -> tuple[pd.DataFrame, pd.Series]:
    """A CSV file with a numeric target column; text columns become categorical features.

    Raises ValueError (or FileNotFoundError) with one clear sentence for a missing
    file, a missing or non-numeric target, NaN in the target, or too few rows.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {str(path)!r} does not exist")
    if not target:
        raise ValueError(f"--target is required with a CSV file ({path.name})")
    try:
        frame = pd.read_csv(path)
    except Exception as exc:
        raise ValueError(f"cannot read {str(path)!r} as CSV: {exc}") from None
    if target not in frame.columns:
        raise ValueError(f"target column {target!r} is not in {path.name} "
                         f"(columns: {', '.join(map(str, frame.columns[:20]))})")
    y = frame.pop(target)
    if not pd.api.types.is_numeric_dtype(y) or pd.api.types.is_bool_dtype(y):
        raise ValueError(f"target column {target!r} must be numeric, got {y.dtype}")
    if y.isna().any():
        raise ValueError(f"target column {target!r} has {int(y.isna().sum())} missing value(s)")
    if frame.shape[1] == 0:
        raise ValueError(f"{path.name} has no feature columns besides {target!r}")
    for column in frame.columns:
        if not pd.api.types.is_numeric_dtype(frame[column]):
            frame[column] = frame[column].astype("string").fillna("NA").astype("category")
    _check_rows(len(frame))
    return frame, y.astype(float)


def load(name_or_path: str, target: str | None = None, seed: int = 0) -> tuple[pd.DataFrame, pd.Series]:
    """``"diabetes"``, ``"friedman1"`` or a CSV path."""
    if name_or_path == "diabetes":
        return load_diabetes()
    if name_or_path == "friedman1":
        return load_friedman1(seed=seed)
    return load_csv(name_or_path, target)


def _check_rows(n: int) -> None:
    if n < MIN_ROWS:
        raise ValueError(f"too few rows to split into train, validation and test: {n} "
                         f"(need at least {MIN_ROWS})")


def train_val_test_split(
    X: pd.DataFrame | np.ndarray, y: pd.Series | np.ndarray, *, seed: int = 42,
    sizes: Sequence[float] = (0.6, 0.2, 0.2),
) -> tuple:
    """Split into train, validation and test parts, the same for the same seed.

    Returns ``X_train, X_val, X_test, y_train, y_val, y_test``.

    Example:
        >>> from optuna_mlflow_nested.datasets import load_diabetes, train_val_test_split
        >>> X, y = load_diabetes()
        >>> parts = train_val_test_split(X, y, seed=0)
        >>> [len(p) for p in parts[:3]]
        [265, 88, 89]
    """
    if len(sizes) != 3 or any(s <= 0 for s in sizes) or abs(sum(sizes) - 1.0) > 1e-9:
        raise ValueError(f"sizes must be three positive fractions summing to 1, got {tuple(sizes)}")
    if len(X) != len(y):
        raise ValueError(f"X and y have different lengths: {len(X)} and {len(y)}")
    _check_rows(len(X))
    train, val, test = sizes
    X_train, X_rest, y_train, y_rest = train_test_split(X, y, train_size=train, random_state=seed)
    X_val, X_test, y_val, y_test = train_test_split(
        X_rest, y_rest, train_size=val / (val + test), random_state=seed + 1)
    return X_train, X_val, X_test, y_train, y_val, y_test
