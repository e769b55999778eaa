"""A LASSO grid over alpha from 1 down to 0.001 with the grid sampler.

Each alpha is a child run; the fitted scaler and a prediction plot of the best alpha
are artifacts of the parent run. Data: scikit-learn's bundled diabetes set.

Run:  python examples/lasso_grid.py
"""

from __future__ import annotations

from matplotlib.figure import Figure
from mlflow.tracking import MlflowClient
import numpy as np
import optuna
from sklearn.linear_model import Lasso
from sklearn.metrics import mean_squared_error
from sklearn.preprocessing import StandardScaler

import optuna_mlflow_nested as omn
from optuna_mlflow_nested.datasets import load_diabetes
from optuna_mlflow_nested.datasets import train_val_test_split

ALPHAS = [1.0, 0.3, 0.1, 0.03, 0.01, 0.003, 0.001]


def main() -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    X, y = load_diabetes()
    X_train, X_val, _, y_train, y_val, _ = train_val_test_split(X, y, seed=0)
    scaler = StandardScaler().fit(X_train)
    Xs_train, Xs_val = scaler.transform(X_train), scaler.transform(X_val)

    def objective(trial: optuna.Trial) -> float:
        alpha = trial.suggest_float("alpha", 0.001, 1.0, log=True)
        model = Lasso(alpha=alpha, max_iter=50_000).fit(Xs_train, y_train)
        trial.set_user_attr("nonzero_coefficients", int(np.sum(model.coef_ != 0)))
        return float(np.sqrt(mean_squared_error(y_val, model.predict(Xs_val))))

    study = omn.create_study("lasso-grid", experiment_name="examples", sampler="grid",
                             search_space={"alpha": ALPHAS}, tracking_uri="sqlite:///mlflow.db")
    study.optimize(objective, n_trials=len(ALPHAS))

    best = Lasso(alpha=study.best_params["alpha"], max_iter=50_000).fit(Xs_train, y_train)
    predicted = best.predict(Xs_val)
    figure = Figure(figsize=(5, 5))
    axes = figure.add_subplot()
    axes.scatter(y_val, predicted, s=10)
    axes.plot([y_val.min(), y_val.max()], [y_val.min(), y_val.max()], "--", color="grey")
    axes.set(xlabel="actual (validation)", ylabel="predicted",
             title=f"LASSO, alpha={study.best_params['alpha']}")
    client = MlflowClient(study.tracking_uri)
    client.log_figure(study.parent_run_id, figure, "prediction_plot.png")
    # The scaler as plain JSON (no pickles): enough to rebuild it anywhere.
    client.log_dict(study.parent_run_id, {"columns": list(X.columns),
                                          "mean": scaler.mean_.tolist(),
                                          "scale": scaler.scale_.tolist()}, "scaler.json")
    for trial in sorted(study.trials, key=lambda t: -t.params["alpha"]):
        print(f"alpha={trial.params['alpha']:<6} RMSE={trial.value:.2f} "
              f"nonzero={trial.user_attrs['nonzero_coefficients']}")
    print(f"best alpha {study.best_params['alpha']} (parent run {study.parent_run_id})")


if __name__ == "__main__":
    main()
