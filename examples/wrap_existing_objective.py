"""Wrap an Optuna objective you already have: one parent run, one child run per trial.

Run:  python examples/wrap_existing_objective.py
Then: mlflow ui --backend-store-uri sqlite:///mlflow.db
"""

from __future__ import annotations

import mlflow
import optuna

import optuna_mlflow_nested as omn


def objective(trial: optuna.Trial) -> float:
    """An ordinary Optuna objective: nothing in it knows about the wrapper."""
    x = trial.suggest_float("x", -10, 10)
    y = trial.suggest_int("y", -3, 3)
    for step in range(5):  # intermediate values become a stepped metric
        trial.report((x - 2) ** 2 / (step + 1), step)
    mlflow.log_metric("x_abs", abs(x))  # lands in this trial's child run
    return (x - 2) ** 2 + y**2


def main() -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = omn.create_study("wrap-existing", experiment_name="examples", seed=42,
                             tracking_uri="sqlite:///mlflow.db", load_if_exists=False)
    study.optimize(objective, n_trials=30)
    print(f"best value {study.best_value:.4f} with {study.best_params}")
    print(f"parent run {study.parent_run_id}; trial 0 is run {study.child_run_id(0)}")


if __name__ == "__main__":
    main()
