"""The parent run's figures: optimisation history and parameter importances."""

from __future__ import annotations

from collections.abc import Callable
import contextlib
import io
import logging
import threading
from typing import Any
import warnings

from mlflow.tracking import MlflowClient
import optuna
from optuna.trial import TrialState

from optuna_mlflow_nested._utils import redact_secrets

_logger = logging.getLogger(__name__)
_figure_imports: threading.Thread | None = None


def warm_up_figures() -> None:
    """Import matplotlib in the background while trials run (about 0.5 s saved at the end)."""
    global _figure_imports
    if _figure_imports is None:
        def _import() -> None:
            with contextlib.suppress(Exception):
                from matplotlib.figure import Figure
                import optuna.visualization.matplotlib  # noqa: F401
                import sklearn.ensemble  # noqa: F401  (fANOVA's forest, for importances)

                # The first PNG pays for fonts and the renderer; pay it now, off pyplot's
                # global state, which the user's objective may be using.
                figure = Figure(figsize=(1, 1))
                figure.add_subplot().plot([0, 1], label="warm-up")
                figure.savefig(io.BytesIO(), format="png")

        _figure_imports = threading.Thread(target=_import, name="omn-warm-up", daemon=True)
        _figure_imports.start()


def log_figures(client: MlflowClient, run_id: str, study: optuna.Study) -> None:
    """History and importance PNGs on ``run_id``; a figure never fails a study."""
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ovm

    complete = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    plots: list[tuple[str, Callable[[], Any]]] = []
    if complete and len(study.directions) == 1:
        plots.append(("optimization_history.png", lambda: ovm.plot_optimization_history(study)))
    if len(complete) >= 2 and complete[0].params and len(study.directions) == 1:
        plots.append(("param_importances.png", lambda: ovm.plot_param_importances(study)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, make in plots:
            try:
                axes = make()
                figure = axes.figure if hasattr(axes, "figure") else axes
                figure.set_size_inches(8, 5)
                figure.tight_layout()
                client.log_figure(run_id, figure, name)
                plt.close(figure)
            except Exception as exc:
                _logger.warning("could not draw %s: %s", name, redact_secrets(exc))
