"""The parent run's figures: optimisation history and parameter importances."""

from __future__ import annotations

from collections.abc import Callable
import contextlib
import datetime
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
#: Above this many trials, a compact summary (``trial_runs=K``) draws no figures.
FIGURE_LIMIT = 1000
_figure_imports: threading.Thread | None = None


def figures_wanted(n_trials: int, compact: bool) -> bool:
    """Whether the summary of a search with ``n_trials`` trials draws the figures."""
    return n_trials > 0 and (not compact or n_trials <= FIGURE_LIMIT)


def warm_up_figures() -> None:
    """Load matplotlib while trials run (about 0.5 s saved at the end), when the figures
    will be drawn in this process (writer threads).

    Not in the writer process: ``optimize`` does not wait for the figures drawn there,
    and importing matplotlib while the first search's writes arrive slowed them (a cold
    search cost 36-47 against 18-22 ms per trial, ``benchmarks/RESULTS.md``).
    """
    from optuna_mlflow_nested.tracking.process_session import uses_writer_process

    if not uses_writer_process():
        warm_up_here()


def warm_up_here() -> None:
    """Import matplotlib in a background thread of this process (once)."""
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


def left_to_another_search(study: Any, began: float, status: str | None) -> bool:
    """Whether the end of a search of ``study`` without an executor, begun at ``began``
    (``time.time()``), leaves the parent's figures to another process's search.

    Hand-started workers of one study each drew them over the whole study at their end,
    the largest part of what a worker process costs beyond its trials
    (``benchmarks/RESULTS.md``): Matplotlib, and scikit-learn, which Optuna's importance
    module imports, in its writer process. ``True`` when the search finished (``status``
    FINISHED) and a trial asked through this project (it has a run) that started during
    it is still RUNNING: that trial's search ends later and draws them over more trials.
    A trial running for longer than ten times the longest that started since ``began``
    and finished (and a minute), or that started over a minute in the future (another
    host's clock), is taken for one whose process died; on any error, ``False``.
    """
    if status != "FINISHED":
        return False  # interrupted: a trial of this search may be left RUNNING
    try:  # (Optuna's storages give naive local times)
        since, now = datetime.datetime.fromtimestamp(began), datetime.datetime.now()
        running = [t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
                   if t.datetime_start is not None and t.datetime_start > since]
        if not running:  # (most ends: no more reads)
            return False
        asked_here = study.run_ids()  # not a plain Optuna worker's, which draws none
        longest = max((t.duration.total_seconds() for t in study.get_trials(deepcopy=False)
                       if t.duration is not None and t.datetime_start > since), default=0.0)
        window = max(60.0, 10 * longest)
        return any(t.number in asked_here
                   and -60.0 <= (now - t.datetime_start).total_seconds() <= window
                   for t in running)
    except Exception as exc:  # a figure too many rather than none
        _logger.debug("figures drawn here: %s", redact_secrets(exc))
        return False


def trials_snapshot(study: optuna.Study) -> dict[str, Any]:
    """What :func:`log_figures` draws from, as plain picklable data (for the writer process)."""
    return {"study_name": study.study_name, "directions": list(study.directions),
            "trials": study.get_trials(deepcopy=False)}


def study_from_snapshot(snapshot: dict[str, Any]) -> optuna.Study:
    """An in-memory study with the snapshot's trials under their own numbers.

    Trials not finished yet (another worker's) become failed placeholders: the figures
    show complete trials only, and the numbers after them stay the same.
    """
    study = optuna.create_study(study_name=snapshot["study_name"],
                                directions=snapshot["directions"])
    for trial in sorted(snapshot["trials"], key=lambda t: t.number):
        if not trial.state.is_finished():
            trial = optuna.trial.create_trial(state=TrialState.FAIL)
        study.add_trial(trial)
    return study


def start_elsewhere(client: MlflowClient, tracking_uri: str, run_id: str,
                    study: optuna.Study) -> Callable[[float], bool] | None:
    """Start drawing the figures in the writer process, if it is in use, and return.

    Returns a call that waits up to its argument's seconds for them (and draws them here
    if the writer process could not), or ``None``: the summary draws them here.
    Matplotlib then never loads in the objective's process, and ``optimize`` does not
    wait for the drawing (the slowest part of the parent's summary, about 0.2 s): the
    writer process draws figures one request at a time, in the order asked, skipping a
    request of a study that has asked again since (a loop of short searches draws
    only the newest), and finishes them before it exits, also when this process has
    exited or was killed meanwhile (it reads the end of its pipe, then finishes what
    it was sent).
    """
    from optuna_mlflow_nested.tracking.process_session import uses_writer_process
    from optuna_mlflow_nested.tracking.writer_process import WriterProcess

    if not uses_writer_process() or not figures_wanted(len(study.get_trials(deepcopy=False)), False):
        return None
    try:
        process = WriterProcess.get()
        if not process.wait_ready():
            return None
        token = process.submit("figures", tracking_uri, run_id, trials_snapshot(study))
    except Exception as exc:
        _logger.debug("figures stay in this process: %s", redact_secrets(exc))
        return None
    def wait(timeout: float) -> bool:  # the study drops it once it returned True
        drawn = process.reply(token, timeout)
        if drawn is None and process.alive():
            return False  # still drawing: ask again later
        if drawn is not True:
            log_figures(client, run_id, study)  # the writer process could not: draw here
        return True

    return wait
