"""CatBoost end to end on a pandas frame with a categorical column (Python API).

Tune with a fixed tree count, early-stop the best trial, refit on train+validation,
score once on the test set, log the model tagged best_model=true, and load it back.

Run:  python examples/catboost_regression.py [n_trials]
"""

from __future__ import annotations

import sys

import numpy as np
import optuna
import pandas as pd

import optuna_mlflow_nested as omn
from optuna_mlflow_nested.datasets import load_diabetes
from optuna_mlflow_nested.datasets import train_val_test_split


def make_frame(seed: int = 0) -> tuple[pd.DataFrame, pd.Series]:
    """The bundled diabetes data plus a generated categorical 'clinic' column."""
    X, y = load_diabetes()
    rng = np.random.default_rng(seed)
    clinic = rng.choice(["north", "south", "east", "west"], size=len(X))
    effect = pd.Series(clinic).map({"north": 25.0, "south": -25.0, "east": 0.0, "west": 10.0})
    X = X.assign(clinic=pd.Categorical(clinic))
    return X, y + effect.to_numpy()


def main(n_trials: int = 15) -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    X, y = make_frame()
    X_train, X_val, X_test, y_train, y_val, y_test = train_val_test_split(X, y, seed=42)
    result = omn.tune_catboost(
        X_train, y_train, X_val, y_val, X_test, y_test,
        n_trials=n_trials, seed=42, tuning_iterations=200,
        study_name="catboost-regression", experiment_name="examples",
        tracking_uri="sqlite:///mlflow.db",
    )  # the 'clinic' column is detected as categorical from its dtype
    print(f"best params       {result.best_params}")
    print(f"validation RMSE   {result.val_rmse_early_stopped:.2f} (early-stopped, "
          f"{result.tree_count} trees)")
    print(f"test RMSE         {result.test_rmse:.2f}  MAE {result.test_mae:.2f}  "
          f"R2 {result.test_r2:.3f}")
    model = omn.load_best_model("examples", tracking_uri="sqlite:///mlflow.db")
    print(f"best model loaded back: {model.tree_count_} trees; model URI {result.model_uri}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 15)
