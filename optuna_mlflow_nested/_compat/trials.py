"""A budget of WAITING trials added at once: the queue of ``optimize(executor=...)``.

Optuna adds each trial in a transaction of its own (``create_new_trial``; ``add_trials``
too), and has no public way to add several in one. On SQLite each is a commit with its
own sync to disk, about 3 ms a trial here, so a budget of thousands took seconds before
any worker started.
On Optuna's RDB storage they are added here in one transaction per chunk, numbered the
way Optuna numbers them (under the same lock). Other storages add them one by one: a
journal file's append costs about 0.3 ms a trial here, near the chunks' 0.2 ms; Optuna's
gRPC proxy has no call that adds several (about 1 ms a trial); see
``benchmarks/claim_cost.py --queue --storage journal|grpc``.
"""

from __future__ import annotations

import random
import time
from typing import Any

import optuna
from optuna.trial import FrozenTrial
from optuna.trial import TrialState

#: Trials per transaction: another writer waits for SQLite's lock for one chunk at most.
CHUNK = 1000


def add_waiting_trials(study: optuna.Study, n: int) -> list[FrozenTrial]:
    """``n`` bare WAITING trials added to ``study``, as added, in number order.

    They are read back in one query (``add_trial`` reads each back after adding it). A
    trial another process took meanwhile (Optuna's ask pops WAITING trials) is read on
    its own.
    """
    storage = study._storage
    ids = _added_in_chunks(storage, study._study_id, n)
    if ids is None:
        template = optuna.trial.create_trial(state=TrialState.WAITING)
        ids = [storage.create_new_trial(study._study_id, template_trial=template)
               for _ in range(n)]
    if not ids:
        return []
    wanted = set(ids)
    found = {trial_id(t): t for t in study.get_trials(
        deepcopy=False, states=(TrialState.WAITING,)) if trial_id(t) in wanted}
    return [found.get(i) or storage.get_trial(i) for i in ids]


def trial_id(trial: FrozenTrial) -> int:
    """The storage's id of a trial: storages key on it, ``FrozenTrial`` keeps it private."""
    return trial._trial_id


def _added_in_chunks(storage: Any, study_id: int, n: int) -> list[int] | None:
    """The new trials' ids, or None where this storage has no such path (not RDB)."""
    from optuna_mlflow_nested._compat import rdb_storage  # (the package imports this module)

    backend = rdb_storage(storage)
    prepare = getattr(backend, "_get_prepared_new_trial", None)
    if backend is None or prepare is None:
        return None
    try:
        from optuna.storages._rdb import models
        from optuna.storages._rdb.storage import _create_scoped_session
    except ImportError:
        return None
    template = optuna.trial.create_trial(state=TrialState.WAITING)
    ids: list[int] = []
    while len(ids) < n:
        size = min(CHUNK, n - len(ids))
        chunk: list[int] = []
        number = -1
        for attempt in range(5):  # as Optuna's create_new_trial: a deadlock is retried
            try:
                with _create_scoped_session(backend.scoped_session) as session:
                    # Optuna's own lock for numbering: the study's row (SQLite: the file).
                    models.StudyModel.find_or_raise_by_id(study_id, session, for_update=True)
                    first = prepare(study_id, template, session)  # numbered as Optuna does
                    session.flush()
                    # Under that lock no other trial of the study is added: the rest
                    # follow the first one in id and number.
                    rest = [models.TrialModel(study_id=study_id, number=first.number + i,
                                              state=TrialState.WAITING, datetime_start=None,
                                              datetime_complete=None) for i in range(1, size)]
                    session.add_all(rest)
                    session.flush()
                    chunk, number = [first.trial_id] + [row.trial_id for row in rest], first.number
                break
            except optuna.exceptions.StorageInternalError:
                if chunk and _committed(backend, chunk, number):
                    break  # the commit went through, then failed to say so (a lost link)
                if attempt == 4:
                    raise
                chunk = []
                time.sleep(random.random() * 2.0)
        ids += chunk
    return ids


def _committed(backend: optuna.storages.RDBStorage, chunk: list[int], number: int) -> bool:
    """Whether a chunk whose commit raised is in the storage all the same: its first and
    last trials are there, WAITING, numbered from ``number`` on (else a retry would add
    the whole chunk again: trials no worker knows of)."""
    try:
        first, last = backend.get_trial(chunk[0]), backend.get_trial(chunk[-1])
    except (KeyError, optuna.exceptions.StorageInternalError):
        return False
    return (first.state == last.state == TrialState.WAITING and first.number == number
            and last.number == number + len(chunk) - 1)
