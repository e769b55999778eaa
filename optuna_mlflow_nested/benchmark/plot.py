"""The best-so-far figure of a benchmark report (matplotlib, loaded on first use)."""

from __future__ import annotations

from typing import TYPE_CHECKING
import warnings

import numpy as np

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from optuna_mlflow_nested.benchmark.report import SamplerReport

__all__ = ["best_so_far_figure", "wants_log_scale"]

#: Values spanning more than this ratio (two decades) get a log y axis by default.
LOG_SPAN = 100.0


def wants_log_scale(values: np.ndarray) -> bool:
    """Whether ``values`` (all finite ones) are positive and span more than two decades.

    Returns:
        ``True`` for a log axis.

    Example:
        >>> import numpy as np
        >>> wants_log_scale(np.array([1.0, 1e-3])), wants_log_scale(np.array([0.0, 5.0]))
        (True, False)
    """
    finite = values[np.isfinite(values)]
    return bool(len(finite) and finite.min() > 0 and finite.max() / finite.min() > LOG_SPAN)


def best_so_far_figure(report: SamplerReport, log_y: bool | None = None) -> Figure:
    """Median best-so-far (step lines, as the value only changes at a trial) and the
    interquartile band per arm, against trial number.

    Args:
        report: the benchmark report.
        log_y: log y axis; ``None``: automatic (:func:`wants_log_scale`). A log axis
            asked for on values that are not all positive is a symmetric-log one.

    Returns:
        The figure, titled with the problem's name, the metric on the y axis.
    """
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4.5))
    axes = figure.add_subplot()
    plotted = []
    for arm in dict.fromkeys(report.results[report.arm]):
        curves = [h for (s, _), h in report.histories.items() if s == arm and h]
        if not curves:
            continue
        length = max(len(c) for c in curves)
        padded = np.array([c + [c[-1]] * (length - len(c)) for c in curves], dtype=float)
        plotted.append(padded)
        x = np.arange(1, length + 1)
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns: failed first trials
            median = np.nanmedian(padded, axis=0)
            low, high = np.nanquantile(padded, 0.25, axis=0), np.nanquantile(padded, 0.75, axis=0)
        line, = axes.step(x, median, where="post", label=f"{arm} (median)")
        axes.fill_between(x, low, high, step="post", alpha=0.2, color=line.get_color())
    values = np.concatenate([p.ravel() for p in plotted]) if plotted else np.array([])
    if log_y is None:
        log_y = wants_log_scale(values)
    if log_y:
        finite = values[np.isfinite(values)]
        if len(finite) and finite.min() > 0:
            axes.set_yscale("log")
        else:
            positive = np.abs(finite[finite != 0])
            axes.set_yscale("symlog", linthresh=float(positive.min()) if len(positive) else 1.0)
    axes.set_xlabel("trial")
    axes.set_ylabel(f"best {report.metric} so far ({report.direction})")
    seeds = report.results["seed"].nunique()
    title = f"best-so-far, median and IQR over {seeds} seeds"
    axes.set_title(f"{report.problem}: {title}" if report.problem else title)
    if plotted:
        axes.legend()
    figure.tight_layout()
    return figure

