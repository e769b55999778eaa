"""Cheap synthetic test functions (sphere, Rosenbrock, Rastrigin, Ackley) as problems.

A trial costs microseconds, so sampler comparisons run in seconds. Every function has
its minimum 0, moved off the centre of its box by a fixed shift
(:func:`shift`), so that no grid or symmetric design lands on the optimum by
construction.
"""

from __future__ import annotations

from collections.abc import Callable
import math
import re

import numpy as np
import optuna

from optuna_mlflow_nested.benchmark.problems import Problem

__all__ = ["FUNCTIONS", "synthetic_problem", "shift", "is_synthetic"]


def _sphere(z: np.ndarray) -> float:
    return float(np.sum(z ** 2))


def _rosenbrock(z: np.ndarray) -> float:
    u = z + 1.0  # the standard function has its minimum at (1, ..., 1)
    return float(np.sum(100.0 * (u[1:] - u[:-1] ** 2) ** 2 + (1.0 - u[:-1]) ** 2))


def _rastrigin(z: np.ndarray) -> float:
    return float(10.0 * len(z) + np.sum(z ** 2 - 10.0 * np.cos(2 * math.pi * z)))


def _ackley(z: np.ndarray) -> float:
    value = (-20.0 * math.exp(-0.2 * math.sqrt(float(np.mean(z ** 2))))
             - math.exp(float(np.mean(np.cos(2 * math.pi * z)))) + 20.0 + math.e)
    return max(0.0, value)  # 0 at the optimum, not -4e-16


#: name -> (function of the shifted point z (minimum 0 at z = 0), half-width of the box)
FUNCTIONS: dict[str, tuple[Callable[[np.ndarray], float], float]] = {
    "sphere": (_sphere, 5.12),
    "rosenbrock": (_rosenbrock, 2.048),
    "rastrigin": (_rastrigin, 5.12),
    "ackley": (_ackley, 32.768),
}

_NAME = re.compile(r"^(?P<function>[a-z]+)-(?P<dim>\d+)d$")


def shift(dim: int, half_width: float) -> np.ndarray:
    """The fixed offset of the optimum: ``0.3 * half_width * sin(i + 1)`` for axis ``i``.

    Returns:
        The optimum's position, inside the box ``[-half_width, half_width] ** dim``.

    Example:
        >>> shift(2, 10.0).round(3).tolist()
        [2.524, 2.728]
    """
    return 0.3 * half_width * np.sin(np.arange(1, dim + 1))


def is_synthetic(name: str) -> bool:
    """Whether ``name`` looks like ``<function>-<dim>d`` with a known function.

    Returns:
        ``True`` for e.g. ``"sphere-2d"``.
    """
    match = _NAME.match(name)
    return bool(match and match["function"] in FUNCTIONS)


def synthetic_problem(name: str, *, n_trials: int = 48, steps: int = 1, noise: float = 0.0,
                      seed: int = 0) -> Problem:
    """A synthetic problem by name: ``"sphere-2d"``, ``"rosenbrock-5d"``, ``"rastrigin-3d"``,
    ``"ackley-10d"`` (any dimension from 1, Rosenbrock from 2, to 100).

    Args:
        name: ``<function>-<dim>d``.
        n_trials: the budget; the grid gets ``k`` evenly spaced points per axis, the
            largest ``k >= 2`` with ``k ** dim <= n_trials`` (2 when even that is over).
        steps: with more than 1, each trial evaluates the function on ``steps`` noisy
            instances (like cross-validation folds), reports the running mean after
            each (``trial.report``) and stops when ``trial.should_prune()`` says so;
            the value is the mean. What a pruner saves is then counted in steps.
        noise: relative noise of an instance: ``f * exp(noise * e - noise ** 2 / 2)``,
            ``e`` standard normal, drawn from ``(seed, trial.number, step)``.
        seed: seeds the instance noise.

    Returns:
        The :class:`Problem` (minimise ``value``; its minimum is 0).

    Raises:
        ValueError: an unknown name or dimension, ``steps < 1``, ``noise < 0``.

    Example:
        >>> problem = synthetic_problem("sphere-2d", n_trials=16)
        >>> problem.name, sorted(problem.grid), len(problem.grid["x0"])
        ('sphere-2d', ['x0', 'x1'], 4)
    """
    match = _NAME.match(name)
    if not match or match["function"] not in FUNCTIONS:
        raise ValueError(f"unknown synthetic problem {name!r}: <function>-<dim>d with function "
                         f"one of {', '.join(FUNCTIONS)}, e.g. sphere-2d")
    function, half = FUNCTIONS[match["function"]]
    dim = int(match["dim"])
    if not (2 if match["function"] == "rosenbrock" else 1) <= dim <= 100:
        raise ValueError(f"{name}: the dimension must be 1 to 100 (Rosenbrock: 2 to 100)")
    if steps < 1 or noise < 0:
        raise ValueError(f"steps must be at least 1 and noise non-negative, got {steps}, {noise}")
    optimum = shift(dim, half)
    names = [f"x{i}" for i in range(dim)]

    def objective(trial: optuna.Trial) -> float:
        x = np.array([trial.suggest_float(n, -half, half) for n in names])
        value = function(x - optimum)
        if steps == 1 and noise == 0:
            return value
        total = 0.0
        for step in range(steps):
            rng = np.random.default_rng([seed, trial.number, step])
            total += value * math.exp(noise * rng.standard_normal() - noise ** 2 / 2)
            trial.report(total / (step + 1), step)
            if step + 1 < steps and trial.should_prune():
                raise optuna.TrialPruned(f"pruned after {step + 1} of {steps} steps")
        return total / steps

    k = 2
    while (k + 1) ** dim <= n_trials:
        k += 1
    grid = {n: [float(v) for v in np.linspace(-half, half, k)] for n in names}
    return Problem(name, objective, grid, None, direction="minimize", metric="value")
