"""Bundled datasets and deterministic train/validation/test splits (nothing downloaded)."""

from __future__ import annotations

from collections.abc import Sequence
import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sklearn.model_selection import train_test_split

__all__ = ["load", "load_csv", "load_diabetes", "load_friedman1", "train_val_test_split",
           "MIN_ROWS", "check_features", "check_not_constant", "check_target", "digest", "n_rows"]

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
    file, a missing, non-numeric or constant target, NaN or infinity in the target,
    infinity in a feature column (NaN there is a missing value), or too few rows.
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
    check_target(y, f"target column {target!r}")
    check_features(frame, "feature")
    check_not_constant(y, f"target column {target!r}")
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


def check_target(y: Any, name: str) -> None:
    """A regression target: numeric, no NaN, no infinity (ValueError naming ``name``)."""
    values = pd.Series(np.asarray(y).ravel()) if not isinstance(y, pd.Series) else y
    if not pd.api.types.is_numeric_dtype(values) or pd.api.types.is_bool_dtype(values):
        raise ValueError(f"{name} must be numeric, got {values.dtype}")
    array = values.to_numpy(dtype=float, na_value=np.nan)
    missing = int(np.isnan(array).sum())
    if missing:
        raise ValueError(f"{name} has {missing} NaN value(s); a target needs a value in every row")
    infinite = int(np.isinf(array).sum())
    if infinite:
        raise ValueError(f"{name} has {infinite} infinite value(s)")


def check_not_constant(y: Any, name: str) -> None:
    array = np.asarray(y, dtype=float).ravel()
    if array.size and np.all(array == array[0]):
        raise ValueError(f"{name} is constant (every value is {array[0]:g}): nothing to learn")


def check_features(X: Any, name: str) -> None:
    """No infinite value in a numeric column (NaN is allowed: CatBoost treats it as missing)."""
    columns: list[tuple[Any, pd.Series]]
    if isinstance(X, pd.DataFrame):
        columns = [(c, X[c]) for c in X.columns]
    elif hasattr(X, "tocoo"):  # a SciPy sparse matrix: only its stored values can be infinite
        coo = X.tocoo()
        if np.issubdtype(coo.data.dtype, np.number):
            bad = coo.col[np.isinf(coo.data)]
            if bad.size:
                column = int(bad[0])
                raise ValueError(f"{name} column {column} has {int((bad == column).sum())} "
                                 "infinite value(s)")
        return
    else:
        array = np.asarray(X)
        if array.ndim != 2:
            raise ValueError(f"{name} must be two-dimensional, got shape {array.shape}")
        columns = [(j, pd.Series(array[:, j])) for j in range(array.shape[1])]
    for column, values in columns:
        if pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values):
            infinite = int(np.isinf(values.to_numpy(dtype=float, na_value=np.nan)).sum())
            if infinite:
                raise ValueError(f"{name} column {column!r} has {infinite} infinite value(s)")


def n_rows(X: Any) -> int:
    return int(X.shape[0]) if hasattr(X, "shape") else len(X)


def digest(*parts: Any) -> str:
    """A short fingerprint of tables and arrays (values, column names, order of rows)."""
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, (pd.DataFrame, pd.Series)):
            names = part.columns if isinstance(part, pd.DataFrame) else [part.name]
            h.update(repr([str(n) for n in names]).encode())
            try:
                hashed = pd.util.hash_pandas_object(part, index=False)
            except TypeError:  # unhashable cells (lists, dicts): their text then
                hashed = pd.util.hash_pandas_object(part.astype(str), index=False)
            h.update(hashed.to_numpy().tobytes())
        elif hasattr(part, "tocsr"):  # SciPy sparse
            csr = part.tocsr()
            h.update(f"sparse{csr.dtype.str}{csr.shape}".encode())
            for array in (csr.data, csr.indices, csr.indptr):
                h.update(np.ascontiguousarray(array).tobytes())
        else:
            array = np.asarray(part)
            h.update(f"{array.dtype.str}{array.shape}".encode())
            if array.dtype == object:
                h.update(pd.util.hash_array(array.ravel().astype(str)).tobytes())
            else:
                h.update(np.ascontiguousarray(array).tobytes())
    return h.hexdigest()[:16]


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
