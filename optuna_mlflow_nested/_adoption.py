"""One parent run for a study that several processes adopt at the same moment.

A plain Optuna study (or a copy made by ``optuna.copy_study``, which carries the
original's parent run id) has no parent run of its own, and every process that loads it
makes one. Optuna's study attributes have no compare-and-set, so such processes take
turns by Lamport's bakery algorithm over them: each writes a ticket one above the
highest it reads, the one with the lowest (ticket, key) makes the parent run, and the
others find it. A ticket is cleared (``None``) when its holder is done: Optuna cannot
delete a study attribute.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Iterator
import time
from typing import Any
import uuid

import optuna

from optuna_mlflow_nested import _compat

TICKET_PREFIX = "omn.adopter:"
#: How long an adopter waits for the ones ahead of it (one that died holds its place).
WAIT_S = 120.0


def adopt_once(study: optuna.Study, *, stale: str | None, parent_key: str, experiment_key: str,
               make_parent: Callable[[], tuple[str, str]]) -> tuple[str, str]:
    """The parent run (id, experiment id) of an adopted study, made by one adopter.

    Args:
        study: the study, without a parent run of its own.
        stale: the parent run id its attributes held (a copy's original's), or ``None``.
        parent_key: the study system attribute of the parent run id.
        experiment_key: the attribute of its experiment id.
        make_parent: makes the parent run and writes both attributes; returns them.

    Returns:
        The parent run id and experiment id: made here, or by an adopter ahead.
    """
    storage, study_id = _compat.study_storage(study)
    me = f"{TICKET_PREFIX}{uuid.uuid4().hex}"

    def made(attrs: dict[str, Any]) -> tuple[str, str] | None:
        run_id = attrs.get(parent_key)
        return None if run_id in (None, stale) else (run_id, attrs[experiment_key])

    storage.set_study_system_attr(study_id, me, [0, True])  # choosing its ticket
    try:
        attrs = storage.get_study_system_attrs(study_id)
        if (found := made(attrs)) is not None:
            return found
        mine = 1 + max((ticket for _, ticket, _ in _others(attrs, me)), default=0)
        storage.set_study_system_attr(study_id, me, [mine, False])
        deadline, delay = time.monotonic() + WAIT_S, 0.02
        while time.monotonic() < deadline:
            attrs = storage.get_study_system_attrs(study_id)
            if (found := made(attrs)) is not None:
                return found
            if not any(choosing or (ticket, key) < (mine, me)
                       for key, ticket, choosing in _others(attrs, me)):
                break  # first in line
            time.sleep(delay)
            delay = min(delay * 2, 0.5)
        return make_parent()
    finally:
        storage.set_study_system_attr(study_id, me, None)


def _others(attrs: dict[str, Any], me: str) -> Iterator[tuple[str, int, bool]]:
    """The other adopters' live tickets: (key, ticket, still choosing)."""
    for key, value in attrs.items():
        if key.startswith(TICKET_PREFIX) and key != me and value:
            yield key, int(value[0]), bool(value[1])
