"""Optuna samplers by name."""

from __future__ import annotations

from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any

import optuna

__all__ = ["SAMPLER_NAMES", "make_sampler"]

SAMPLER_NAMES = ("tpe", "random", "grid", "qmc", "gp", "cmaes")


def make_sampler(
    sampler: str | optuna.samplers.BaseSampler | None,
    *,
    seed: int | None = None,
    search_space: Mapping[str, Sequence[Any]] | None = None,
) -> optuna.samplers.BaseSampler:
    """An Optuna sampler from a name in :data:`SAMPLER_NAMES`, or the object itself.

    Args:
        sampler: a sampler, a name, or ``None`` for TPE.
        seed: the sampler's seed (ignored for a sampler object).
        search_space: ``{"param": [values, ...]}``, required for ``"grid"``.

    Returns:
        The sampler.

    Raises:
        ValueError: an unknown name, or ``"grid"`` without ``search_space``.
        ImportError: ``"gp"`` without PyTorch.

    Example:
        >>> from optuna_mlflow_nested.samplers import make_sampler
        >>> type(make_sampler("random", seed=1)).__name__
        'RandomSampler'
    """
    if sampler is None:
        sampler = "tpe"
    if isinstance(sampler, optuna.samplers.BaseSampler):
        return sampler
    if not isinstance(sampler, str) or sampler.lower() not in SAMPLER_NAMES:
        raise ValueError(
            f"sampler must be an Optuna sampler or one of {', '.join(SAMPLER_NAMES)}; "
            f"got {sampler!r}"
        )
    name = sampler.lower()
    if name == "grid":
        if not search_space:
            raise ValueError('sampler="grid" needs search_space={"param": [values, ...]}')
        return optuna.samplers.GridSampler(
            {k: list(v) for k, v in search_space.items()}, seed=seed
        )
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "qmc":
        return optuna.samplers.QMCSampler(seed=seed, scramble=True, warn_independent_sampling=False)
    if name == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False)
    try:
        import torch  # noqa: F401
    except ImportError:
        raise ImportError('sampler="gp" needs PyTorch: pip install torch') from None
    return optuna.samplers.GPSampler(seed=seed)
