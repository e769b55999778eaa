"""SamplerReport and PrunerReport: paired statistics over seeds, text that cannot over-claim."""

from __future__ import annotations

from collections.abc import Mapping
import dataclasses
import itertools
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING
from typing import Any
import warnings

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["SamplerReport", "PrunerReport", "paired_test"]

RESULT_COLUMNS = ("best_value", "test_rmse", "trials_to_1pct", "pruned", "steps", "wall_s", "cpu_s",
                  "objective_s", "loop_efficiency")


def paired_test(a: np.ndarray, b: np.ndarray, sign: float = 1.0) -> dict[str, Any]:
    """Paired comparison of ``a`` and ``b`` (one value per seed; smaller is better after
    multiplying by ``sign``).

    Args:
        a: values of the first arm, one per seed.
        b: values of the second arm, for the same seeds.
        sign: ``1.0`` when smaller is better, ``-1.0`` when larger is.

    Returns:
        ``p`` (two-sided Wilcoxon signed-rank, zeros split; ``nan`` when every paired
        difference is exactly zero), ``r`` (the matched-pairs rank-biserial correlation,
        > 0 when the ranks favour ``a``), ``better`` (``"a"``, ``"b"`` or ``""``: the
        direction of the signed-rank statistic, not the win count), ``hl`` (the
        Hodges-Lehmann estimate of ``a - b``, the shift the test is about), ``median``
        (median of ``a - b``) and the win counts ``a_wins``, ``b_wins``.

    Example:
        >>> import numpy as np
        >>> out = paired_test(np.array([1.0, 2.0, 3.0]), np.array([1.5, 2.5, 3.5]))
        >>> out["better"], out["r"], out["hl"]
        ('a', 1.0, -0.5)
    """
    from scipy.stats import rankdata
    from scipy.stats import wilcoxon

    raw = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    diff = raw * sign  # < 0: a better
    out: dict[str, Any] = {"a_wins": int(np.sum(diff < 0)), "b_wins": int(np.sum(diff > 0)),
                           "median": float(np.median(raw)) if len(raw) else math.nan,
                           "p": math.nan, "r": 0.0, "better": "", "hl": 0.0}
    if len(diff) == 0 or np.all(diff == 0):  # exact: tiny values are not ties
        return out
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out["p"] = float(wilcoxon(diff, zero_method="zsplit").pvalue)
    ranks = rankdata(np.abs(diff))
    zeros = ranks[diff == 0].sum() / 2  # zsplit: zero differences count half to each side
    a_ranks, b_ranks = ranks[diff < 0].sum() + zeros, ranks[diff > 0].sum() + zeros
    out["r"] = float((a_ranks - b_ranks) / (a_ranks + b_ranks))
    out["better"] = "a" if a_ranks > b_ranks else "b" if b_ranks > a_ranks else ""
    i, j = np.triu_indices(len(raw))
    out["hl"] = float(np.median((raw[i] + raw[j]) / 2))
    return out


@dataclasses.dataclass(frozen=True)
class SamplerReport:
    """The results of :func:`compare_samplers`.

    ``results`` has one row per arm (sampler) and seed; ``histories`` the best-so-far
    value after each trial for each ``(arm, seed)``. ``arm`` names the column that
    tells the arms apart (``"sampler"``; ``"pruner"`` for :class:`PrunerReport`).
    """

    results: pd.DataFrame
    histories: Mapping[tuple[str, int], list[float]]
    direction: str
    n_trials: int
    benchmark_run_id: str | None = None
    metric: str = "value"
    problem: str | None = None
    arm: str = "sampler"

    def _sign(self) -> float:
        return 1.0 if self.direction == "minimize" else -1.0

    def _arms(self) -> list[str]:
        return list(dict.fromkeys(self.results[self.arm]))

    def summary_table(self) -> pd.DataFrame:
        """Per arm: median and interquartile range of each result column.

        Returns:
            One row per arm; ``<column> median`` and ``<column> IQR`` columns.
        """
        columns = [c for c in RESULT_COLUMNS if c in self.results and self.results[c].notna().any()]
        rows = []
        for arm, group in self.results.groupby(self.arm, sort=False):
            row: dict[str, Any] = {self.arm: arm, "seeds": len(group)}
            for column in columns:
                values = group[column].astype(float)
                row[f"{column} median"] = float(values.median())
                row[f"{column} IQR"] = float(values.quantile(0.75) - values.quantile(0.25))
            rows.append(row)
        return pd.DataFrame(rows)

    def comparisons(self, column: str = "best_value") -> pd.DataFrame:
        """Each pair of arms, paired by seed (see :func:`paired_test`).

        Returns:
            One row per pair: wins each way, ``better`` (the arm the signed-rank
            statistic favours), the two-sided Wilcoxon p, the rank-biserial r (> 0:
            ``a`` favoured), the Hodges-Lehmann and median paired differences ``a - b``.
        """
        wide = self.results.pivot(index="seed", columns=self.arm, values=column)
        rows = []
        for a, b in itertools.combinations(self._arms(), 2):
            pair = wide[[a, b]].dropna()
            if len(pair) == 0:
                continue
            test = paired_test(pair[a].to_numpy(), pair[b].to_numpy(), self._sign())
            rows.append({"a": a, "b": b, "pairs": len(pair), "a better": test["a_wins"],
                         "b better": test["b_wins"],
                         "better": {"a": a, "b": b}.get(test["better"], ""),
                         "p (Wilcoxon)": test["p"], "rank-biserial r": test["r"],
                         "Hodges-Lehmann (a-b)": test["hl"], "median diff (a-b)": test["median"]})
        return pd.DataFrame(rows)

    def _header(self, column: str) -> list[str]:
        lines = [f"{self.n_trials} trials per study, {self.results['seed'].nunique()} seeds, "
                 f"{self.direction} {column}" + (f" ({self.problem})." if self.problem else ".")]
        for _, row in self.summary_table().iterrows():
            lines.append(f"- {row[self.arm]}: median {row[f'{column} median']:.4g} "
                         f"(IQR {row[f'{column} IQR']:.3g})")
        return lines

    def summary(self, alpha: float = 0.05, column: str = "best_value") -> str:
        """Plain-text reading: a win is claimed only where the paired test supports it,
        and the winner is the arm the signed-rank statistic favours, with its effect size.

        Returns:
            One line per arm (median, IQR) and one per pair of arms.
        """
        lines = self._header(column)
        for _, row in self.comparisons(column).iterrows():
            p, n = row["p (Wilcoxon)"], row["pairs"]
            effect = (f"rank-biserial r={abs(row['rank-biserial r']):.2f}, Hodges-Lehmann "
                      f"paired difference {abs(row['Hodges-Lehmann (a-b)']):.3g}")
            if not math.isnan(p) and p < alpha and row["better"]:
                winner, loser = ((row["a"], row["b"]) if row["better"] == row["a"]
                                 else (row["b"], row["a"]))
                wins, losses = ((row["a better"], row["b better"]) if winner == row["a"]
                                else (row["b better"], row["a better"]))
                note = (f"; {loser} was better on more seeds, by smaller margins"
                        if losses > wins else "")
                lines.append(f"- {winner} beat {loser} (Wilcoxon p={p:.3f}; {effect} in "
                             f"{winner}'s favour; better on {wins} of {n} seeds{note}).")
            else:
                shown = "n/a" if math.isnan(p) else f"{p:.3f}"
                lines.append(f"- {row['a']} vs {row['b']}: no significant difference "
                             f"({row['a better']}-{row['b better']} over {n} seeds, p={shown}; "
                             f"with {n} seeds the smallest possible p is {2 / 2 ** n:.3g}).")
        return "\n".join(lines)

    def to_markdown(self) -> str:
        """The per-run table, the per-arm table and the paired comparisons.

        Returns:
            Three Markdown tables.
        """
        return "\n\n".join([
            markdown(self.results.drop(columns=["parent_run_id"], errors="ignore")),
            markdown(self.summary_table()),
            markdown(self.comparisons()),
        ])

    def figure(self, log_y: bool | None = None) -> Figure:
        """Best-so-far against trial number: median (step line) and IQR band per arm.

        Args:
            log_y: a logarithmic y axis; ``None``: when every value is positive and
                they span more than two decades.

        Returns:
            A matplotlib figure (not attached to pyplot).
        """
        from optuna_mlflow_nested.benchmark.plot import best_so_far_figure

        return best_so_far_figure(self, log_y)

    def plot(self, path: str | os.PathLike[str], log_y: bool | None = None) -> Path:
        """:meth:`figure`, saved as a PNG.

        Returns:
            ``path``.
        """
        path = Path(path)
        self.figure(log_y).savefig(path, dpi=110)
        return path


@dataclasses.dataclass(frozen=True)
class PrunerReport(SamplerReport):
    """The results of :func:`compare_pruners`: a :class:`SamplerReport` whose arms are
    pruners (``arm="pruner"``) and whose first arm is the baseline (no pruning)."""

    arm: str = "pruner"

    def savings(self, baseline: str | None = None, column: str = "best_value") -> pd.DataFrame:
        """Each pruner against the baseline, paired by seed: cost saved, value lost.

        Args:
            baseline: the arm to compare against; the first one by default.
            column: the value compared (``best_value``; ``test_rmse`` after a finish step).

        Returns:
            One row per other pruner: median CPU time, wall time, time inside the
            objective and objective steps saved (fractions of the baseline's, paired
            by seed), each with its Wilcoxon p; the median
            best value lost (> 0: worse than the baseline), its Hodges-Lehmann estimate,
            seeds where pruning was worse / better, p, the arm the signed-rank statistic
            favours, and the median pruned trials.
        """
        baseline = baseline or self._arms()[0]
        sign = self._sign()
        rows = []
        for arm in self._arms():
            if arm == baseline:
                continue
            row: dict[str, Any] = {"pruner": arm, "baseline": baseline}
            for cost in ("cpu_s", "wall_s", "objective_s", "steps"):
                if cost not in self.results or not self.results[cost].notna().any():
                    continue
                wide = self.results.pivot(index="seed", columns=self.arm, values=cost)[
                    [baseline, arm]].dropna().astype(float)
                with np.errstate(divide="ignore", invalid="ignore"):
                    saved = 1 - wide[arm] / wide[baseline]
                row[f"{cost} saved"] = float(saved.median())
                row[f"{cost} p"] = paired_test(wide[arm].to_numpy(), wide[baseline].to_numpy())["p"]
            wide = self.results.pivot(index="seed", columns=self.arm, values=column)[
                [baseline, arm]].dropna().astype(float)
            test = paired_test(wide[arm].to_numpy(), wide[baseline].to_numpy(), sign)
            row.update({"pairs": len(wide), "best lost (median)": test["median"] * sign,
                        "best lost (Hodges-Lehmann)": test["hl"] * sign,
                        "seeds worse": test["b_wins"], "seeds better": test["a_wins"],
                        "best p": test["p"],
                        "favoured": {"a": arm, "b": baseline}.get(test["better"], "")})
            if "pruned" in self.results:
                row["pruned trials (median)"] = float(
                    self.results.loc[self.results[self.arm] == arm, "pruned"].median())
            rows.append(row)
        return pd.DataFrame(rows)

    def summary(self, alpha: float = 0.05, column: str = "best_value") -> str:
        """Per pruner against the baseline: what it saved and what it cost, paired.

        Returns:
            The per-arm medians, then one line per pruner.
        """
        lines = self._header(column)
        for _, row in self.savings(column=column).iterrows():
            parts = []
            for cost, word in (("cpu_s", "CPU time"), ("objective_s", "objective time"),
                               ("steps", "objective steps")):
                if f"{cost} saved" in row and not math.isnan(row[f"{cost} saved"]):
                    p = row[f"{cost} p"]
                    significant = not math.isnan(p) and p < alpha
                    parts.append(f"{word} saved {row[f'{cost} saved']:+.0%} "
                                 f"({'p=' + format(p, '.3f') if not math.isnan(p) else 'no difference'}"
                                 f"{'' if significant else ', not significant'})")
            p = row["best p"]
            verdict = ("no significant difference" if math.isnan(p) or p >= alpha else
                       "significantly worse" if row["favoured"] == row["baseline"] else
                       "significantly better")
            lost = (f"{column} {verdict}: {row['best lost (median)']:+.4g} (median paired "
                    f"change, > 0 = worse; worse on {row['seeds worse']}, better on "
                    f"{row['seeds better']} of {row['pairs']} seeds, "
                    f"p={'n/a' if math.isnan(p) else format(p, '.3f')})")
            pruned = (f", {row['pruned trials (median)']:g} trials pruned (median)"
                      if "pruned trials (median)" in row else "")
            lines.append(f"- {row['pruner']} vs {row['baseline']}: {'; '.join(parts)}; {lost}{pruned}.")
        return "\n".join(lines)

    def to_markdown(self) -> str:
        """The per-run table, the per-pruner table and the savings against the baseline.

        Returns:
            Three Markdown tables.
        """
        return "\n\n".join([
            markdown(self.results.drop(columns=["parent_run_id"], errors="ignore")),
            markdown(self.summary_table()),
            markdown(self.savings()),
        ])


def markdown(frame: pd.DataFrame) -> str:
    """A DataFrame as a Markdown table (floats to 4 significant digits).

    Returns:
        The table.
    """
    def cell(value: Any) -> str:
        if isinstance(value, float):
            return "nan" if math.isnan(value) else f"{value:.4g}"
        return str(value)

    header = "| " + " | ".join(map(str, frame.columns)) + " |"
    rule = "| " + " | ".join("---" for _ in frame.columns) + " |"
    body = ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([header, rule, *body])
