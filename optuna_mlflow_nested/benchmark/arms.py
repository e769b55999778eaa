"""The arms of a benchmark: samplers and pruners by name or factory, checked up front."""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Mapping
from collections.abc import Sequence
import copy
from typing import Any

import optuna

from optuna_mlflow_nested.samplers import SAMPLER_NAMES

__all__ = ["SamplerSpec", "PrunerSpec", "sampler_arms", "pruner_arms", "make_pruner", "PRUNER_NAMES"]

SamplerFactory = Callable[[int], optuna.samplers.BaseSampler]
#: A sampler name (``"tpe"``, ...) or a factory ``seed -> sampler``.
SamplerSpec = str | SamplerFactory
PrunerFactory = Callable[[], optuna.pruners.BasePruner]
#: A pruner name, a factory ``() -> pruner`` or a pruner (deep-copied for every study).
PrunerSpec = str | PrunerFactory | optuna.pruners.BasePruner | None

PRUNER_NAMES = ("none", "median", "hyperband", "successive-halving", "wilcoxon")


def _labelled(entries: Sequence[Any] | Mapping[str, Any], kind: str) -> list[tuple[str | None, Any]]:
    if isinstance(entries, Mapping):
        return [(str(label), spec) for label, spec in entries.items()]
    if isinstance(entries, str) or not isinstance(entries, Sequence):
        raise TypeError(f"{kind}s must be a sequence (or a mapping label -> {kind}), got {entries!r}")
    return [(None, spec) for spec in entries]


def _no_duplicates(labels: list[str], kind: str) -> None:
    seen = [label for i, label in enumerate(labels) if label in labels[:i]]
    if seen:
        raise ValueError(f"duplicate {kind} entries: {', '.join(map(repr, dict.fromkeys(seen)))}; "
                         f"each {kind} once (label variants with a mapping {{'name': factory}})")


def sampler_arms(samplers: Sequence[SamplerSpec] | Mapping[str, SamplerSpec], seeds: Sequence[int],
                 search_space: Mapping[str, Sequence[Any]] | None) -> list[tuple[str, SamplerSpec]]:
    """``(label, name or factory)`` per sampler, every check that needs no trial done.

    A sampler *instance* is refused: reused across seeds it would keep its own seed,
    and the ``seed`` column would only label the run order. A factory is called with
    the first two seeds to check that it makes a new sampler each time.

    Returns:
        The labelled arms, in order.

    Raises:
        TypeError: an instance, a factory that returns no sampler or a shared one.
        ValueError: an unknown name, duplicates, ``"grid"`` without ``search_space``.
    """
    arms: list[tuple[str, SamplerSpec]] = []
    for label, spec in _labelled(samplers, "sampler"):
        if isinstance(spec, optuna.samplers.BaseSampler):
            raise TypeError(
                f"samplers= takes names or factories, not a {type(spec).__name__} instance: one "
                "instance would be reused for every seed with its own seed. Pass a factory, "
                f"e.g. lambda seed: optuna.samplers.{type(spec).__name__}(seed=seed)")
        if isinstance(spec, str):
            if spec.lower() not in SAMPLER_NAMES:
                raise ValueError(f"unknown sampler {spec!r}: one of {', '.join(SAMPLER_NAMES)} "
                                 "or a factory seed -> sampler")
            if spec.lower() == "grid" and not search_space:
                raise ValueError('sampler "grid" needs search_space={"param": [values, ...]}')
            arms.append((label or spec.lower(), spec.lower()))
            continue
        if not callable(spec):
            raise TypeError(f"a sampler must be a name or a factory seed -> sampler, got {spec!r}")
        made = [spec(seed) for seed in list(seeds)[:2]]
        if not all(isinstance(s, optuna.samplers.BaseSampler) for s in made):
            raise TypeError(f"the sampler factory {spec!r} must return an Optuna sampler, "
                            f"got {type(made[0]).__name__}")
        if len(made) == 2 and made[0] is made[1]:
            raise TypeError(f"the sampler factory {spec!r} returned one instance for two seeds: "
                            "it must build a new sampler from each seed")
        arms.append((label or type(made[0]).__name__, spec))
    if not arms:
        raise ValueError("samplers must name at least one sampler")
    _no_duplicates([label for label, _ in arms], "sampler")
    return arms


def make_pruner(spec: PrunerSpec) -> optuna.pruners.BasePruner:
    """A fresh pruner for one study.

    Args:
        spec: ``None`` or ``"none"`` (no pruning: :class:`optuna.pruners.NopPruner`),
            ``"median"``, ``"hyperband"``, ``"successive-halving"``, ``"wilcoxon"``
            (Optuna's defaults), a factory ``() -> pruner``, or a pruner (deep-copied,
            so that no state is shared between studies).

    Returns:
        The pruner.

    Raises:
        ValueError: an unknown name.
        TypeError: anything else.

    Example:
        >>> type(make_pruner(None)).__name__, type(make_pruner("median")).__name__
        ('NopPruner', 'MedianPruner')
    """
    if spec is None or isinstance(spec, str):
        name = (spec or "none").lower()
        makers: dict[str, PrunerFactory] = {
            "none": optuna.pruners.NopPruner, "median": optuna.pruners.MedianPruner,
            "hyperband": optuna.pruners.HyperbandPruner,
            "successive-halving": optuna.pruners.SuccessiveHalvingPruner,
            "wilcoxon": optuna.pruners.WilcoxonPruner}
        if name not in makers:
            raise ValueError(f"unknown pruner {spec!r}: one of {', '.join(PRUNER_NAMES)}, a factory "
                             "() -> pruner or a pruner")
        return makers[name]()
    if isinstance(spec, optuna.pruners.BasePruner):
        return copy.deepcopy(spec)
    if callable(spec):
        pruner = spec()
        if not isinstance(pruner, optuna.pruners.BasePruner):
            raise TypeError(f"the pruner factory {spec!r} must return an Optuna pruner, "
                            f"got {type(pruner).__name__}")
        return pruner
    raise TypeError(f"a pruner must be a name, a factory () -> pruner or a pruner, got {spec!r}")


def pruner_label(spec: PrunerSpec) -> str:
    """The name a pruner spec is recorded under: the pruner's class name.

    Returns:
        e.g. ``"MedianPruner"``.
    """
    return type(make_pruner(spec)).__name__


def pruner_arms(pruners: Sequence[PrunerSpec] | Mapping[str, PrunerSpec]) -> list[tuple[str, PrunerSpec]]:
    """``(label, spec)`` per pruner (label: the name given, else the class name).

    Returns:
        The labelled arms, in order.

    Raises:
        ValueError: an unknown name, duplicates, fewer than two pruners.
    """
    arms = []
    for label, spec in _labelled(pruners, "pruner"):
        made = make_pruner(spec)  # checks names and factories now, before any run
        arms.append((label or (spec.lower() if isinstance(spec, str) else type(made).__name__), spec))
    if len(arms) < 2:
        raise ValueError("compare_pruners needs at least two pruners (the first is the baseline)")
    _no_duplicates([label for label, _ in arms], "pruner")
    return arms
