"""Each ``optimize(executor=...)`` call's queue of WAITING trials, held against others.

A call's budget is queued as Optuna's WAITING trials, and a call also counts the
WAITING trials it finds (``enqueue_trial``'s, an earlier call's leftovers). Without a
mark, a second call at once counted the first one's queue as its own, and both calls'
workers shared it: neither ran its ``n_trials``. A call now holds its queue with a
lease in the study's system attributes (one write when it queues, one every
``REFRESH_S`` while it runs, one when it ends); other calls leave held trials alone. A
call whose process died stops renewing, and its leftovers are free again after
``LEASE_S``. Calls that start together are ordered by their marks (time, then session):
a call waits for the earlier ones' numbers before it counts WAITING trials, and after
it holds its own it looks again and gives up any an earlier call holds too (a call
that read before another's mark was written can have counted that one's new trials).
"""

from __future__ import annotations

from collections.abc import Iterable
import contextlib
import time
from typing import Any

import optuna
from optuna.trial import FrozenTrial

from optuna_mlflow_nested import _compat

PREFIX = "omn.queue:"
#: A lease not renewed for this long belongs to a call that died.
LEASE_S = 120.0
REFRESH_S = 20.0


class QueueLease:
    """This call's hold on its queued trials (numbers), by session."""

    def __init__(self, study: optuna.Study, session: str) -> None:
        self._store, self._sid = _compat.study_storage(study)
        self._key, self._session = PREFIX + session, session
        self._numbers: list[list[int]] | None = None
        self._renewed = 0.0
        self._at = time.time()  # its place in line: kept by every later write
        self._write()  # pending: calls marked after this one wait for its numbers

    def held_by_others(self, earlier_only: bool = False) -> set[int]:
        """Trial numbers other live calls hold (``earlier_only``: those that marked
        themselves before this one), once the earlier ones have queued theirs."""
        mine = (self._at, self._session)
        deadline = time.monotonic() + LEASE_S
        while True:
            held: set[int] = set()
            waiting_for_earlier = False
            for session, lease in self._live_leases():
                earlier = (lease["at"], session) < mine
                if lease["numbers"] is not None and (earlier or not earlier_only):
                    held.update(_expand(lease["numbers"]))
                elif lease["numbers"] is None and earlier:
                    waiting_for_earlier = True
            if not waiting_for_earlier or time.monotonic() > deadline:
                return held
            time.sleep(0.2)  # (each look reads all the study's attributes)

    def hold(self, numbers: Iterable[int]) -> None:
        self._numbers = _ranges(sorted(numbers))
        self._write()

    def hold_settled(self, study: optuna.Study, waiting: list[FrozenTrial]) -> list[FrozenTrial]:
        """Hold ``waiting`` (in number order); trials an earlier call holds too are left
        to it and replaced by new ones. Returns what this call holds."""
        for attempt in range(10):
            self.hold(t.number for t in waiting)
            taken = self.held_by_others(earlier_only=True)
            kept = [t for t in waiting if t.number not in taken]
            if len(kept) == len(waiting) or attempt == 9:
                break
            waiting = kept + _compat.add_waiting_trials(study, len(waiting) - len(kept))
        return waiting

    def renew(self) -> None:
        """Renew the lease (at most every ``REFRESH_S``; called while the call waits). A
        storage that fails now is tried again at the next renewal: the workers' own
        writes say what is wrong with it."""
        if time.monotonic() - self._renewed >= REFRESH_S:
            with contextlib.suppress(Exception):
                self._write()

    def release(self) -> None:
        """The call has ended: its leftovers are anyone's (the next call runs them first).
        Not raised (it would hide why the call ended): an unreleased lease expires."""
        with contextlib.suppress(Exception):
            self._store.set_study_system_attr(self._sid, self._key, None)

    def _write(self) -> None:
        self._renewed = time.monotonic()
        self._store.set_study_system_attr(self._sid, self._key, {
            "at": self._at, "renewed": time.time(), "numbers": self._numbers})

    def _live_leases(self) -> list[tuple[str, dict[str, Any]]]:
        now = time.time()
        return [(key[len(PREFIX):], value)
                for key, value in self._store.get_study_system_attrs(self._sid).items()
                if key.startswith(PREFIX) and key != self._key and isinstance(value, dict)
                and now - value.get("renewed", 0) < LEASE_S]


def _ranges(numbers: list[int]) -> list[list[int]]:
    """[3, 4, 5, 9] -> [[3, 5], [9, 9]]: a budget of thousands stays a short value."""
    out: list[list[int]] = []
    for n in numbers:
        if out and out[-1][1] == n - 1:
            out[-1][1] = n
        else:
            out.append([n, n])
    return out


def _expand(ranges: list[list[int]]) -> set[int]:
    return {n for first, last in ranges for n in range(first, last + 1)}
