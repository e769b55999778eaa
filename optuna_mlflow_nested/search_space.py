"""The CatBoost search space, defined once, and grids over it."""

from __future__ import annotations

from collections.abc import Mapping
from collections.abc import Sequence
import math
from typing import Any

import numpy as np
import optuna
from optuna.distributions import BaseDistribution
from optuna.distributions import CategoricalDistribution
from optuna.distributions import FloatDistribution
from optuna.distributions import IntDistribution

__all__ = ["DEFAULT_SEARCH_SPACE", "grid_from_space", "suggest_all"]

#: The default search space (a user ``search_space`` replaces it whole).
DEFAULT_SEARCH_SPACE: dict[str, BaseDistribution] = {
    "learning_rate": FloatDistribution(0.01, 0.3, log=True),
    "depth": IntDistribution(3, 8),
    "l2_leaf_reg": FloatDistribution(0.5, 30.0, log=True),
    "random_strength": FloatDistribution(0.0, 2.0),
    "bagging_temperature": FloatDistribution(0.0, 1.0),
    "border_count": IntDistribution(32, 255),
    "min_data_in_leaf": IntDistribution(1, 50),
}

def space_from(search_space: Mapping[str, Any] | None) -> dict[str, BaseDistribution]:
    if search_space is None:
        return dict(DEFAULT_SEARCH_SPACE)
    if not isinstance(search_space, Mapping) or not search_space:
        raise ValueError("search_space must be a non-empty dict of name -> distribution or values")
    space: dict[str, BaseDistribution] = {}
    for name, spec in search_space.items():
        if isinstance(spec, BaseDistribution):
            space[name] = spec
        elif isinstance(spec, Sequence) and not isinstance(spec, str) and len(spec) > 0:
            space[name] = CategoricalDistribution(list(spec))
        else:
            raise ValueError(f"search_space[{name!r}] must be an Optuna distribution or a "
                             f"list of values, got {spec!r}")
    return space


def grid_from_space(space: Mapping[str, BaseDistribution],
                    points: Mapping[str, int] | int) -> dict[str, list]:
    """A fixed grid over the same ranges: ``points`` values per parameter (evenly spaced,
    on a log scale for log distributions).

    Example:
        >>> from optuna_mlflow_nested.search_space import grid_from_space, DEFAULT_SEARCH_SPACE
        >>> grid = grid_from_space({"depth": DEFAULT_SEARCH_SPACE["depth"]}, 3)
        >>> grid["depth"]
        [3, 6, 8]
    """
    grid: dict[str, list] = {}
    for name, dist in space.items():
        k = points if isinstance(points, int) else points[name]
        if isinstance(dist, CategoricalDistribution):
            grid[name] = list(dist.choices)[:k]
        elif isinstance(dist, (FloatDistribution, IntDistribution)):
            low, high = float(dist.low), float(dist.high)
            values = (np.geomspace(low, high, k) if dist.log else np.linspace(low, high, k))
            if isinstance(dist, IntDistribution):
                grid[name] = sorted({round(v) for v in values})
            else:
                grid[name] = [float(v) for v in values]
        else:
            raise ValueError(f"cannot make a grid for {name!r}: {dist!r}")
    return grid


def default_grid(space: Mapping[str, BaseDistribution], n_trials: int) -> dict[str, list]:
    per_dim = max(2, math.floor(n_trials ** (1 / len(space)) + 1e-9))
    return grid_from_space(space, per_dim)


def suggest_all(trial: optuna.Trial, space: Mapping[str, BaseDistribution]) -> dict[str, Any]:
    """One value per distribution of ``space``, through the trial's public suggest API."""
    out: dict[str, Any] = {}
    for name, dist in space.items():
        if isinstance(dist, FloatDistribution):
            out[name] = trial.suggest_float(name, dist.low, dist.high, log=dist.log, step=dist.step)
        elif isinstance(dist, IntDistribution):
            out[name] = trial.suggest_int(name, dist.low, dist.high, log=dist.log, step=dist.step)
        elif isinstance(dist, CategoricalDistribution):
            out[name] = trial.suggest_categorical(name, dist.choices)
        else:
            raise TypeError(f"unsupported distribution for {name!r}: {dist!r}")
    return out
