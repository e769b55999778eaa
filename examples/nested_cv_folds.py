"""A RandomForest tuned with 5-fold cross-validation per trial: study -> trial -> fold.

Each fold is a grandchild run with its score, fit time and fitted model; the trial's
run holds the mean score. Data: scikit-learn's bundled diabetes set.

Run:  python examples/nested_cv_folds.py
"""

from __future__ import annotations

import mlflow
import numpy as np
import optuna
from sklearn.datasets import load_diabetes
from sklearn.ensemble import RandomForestRegressor

import optuna_mlflow_nested as omn

X, y = load_diabetes(return_X_y=True)


def objective(trial: optuna.Trial) -> float:
    model = RandomForestRegressor(
        n_estimators=trial.suggest_int("n_estimators", 20, 80, step=20),
        max_depth=trial.suggest_int("max_depth", 2, 8),
        min_samples_leaf=trial.suggest_int("min_samples_leaf", 1, 10),
        random_state=0,
        n_jobs=1,
    )
    scores = omn.cross_validate(model, X, y, cv=5, scoring="neg_root_mean_squared_error",
                                log_models=True)
    rmse = -float(np.mean(scores["test_score"]))
    mlflow.log_metric("cv_rmse_std", float(np.std(scores["test_score"])))
    return rmse


def main(n_trials: int = 8) -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = omn.create_study("rf-nested-cv", experiment_name="examples", seed=0,
                             tracking_uri="sqlite:///mlflow.db")
    study.optimize(objective, n_trials=n_trials)
    print(f"best CV RMSE {study.best_value:.2f} with {study.best_params}")


if __name__ == "__main__":
    import sys

    main(int(sys.argv[1]) if len(sys.argv) > 1 else 8)
