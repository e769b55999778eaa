"""What an executor worker's claim of a queued trial costs, by the size of the budget.

The budget of ``optimize(executor=...)`` is queued as WAITING trials. Taking one
through Optuna's own pop (``Study._pop_waiting_trial_id``, what ``ask`` does, and what
workers did before) reads every unfinished trial of the study; ``_compat.claim_trial``
takes a trial whose id the worker knows. Both on a SQLite storage, one process, the
median of ``--claims`` claims (each trial told at once) per budget size.

    python benchmarks/claim_cost.py [--queued 32,200,1000] [--claims 10]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import optuna
from optuna.trial import TrialState
from optuna.trial import create_trial

from optuna_mlflow_nested import _compat


def claim_ms(queued: int, claims: int, by_id: bool) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        storage = f"sqlite:///{tmp}/optuna.db"
        study = optuna.create_study(storage=storage)
        ids = [_compat.trial_id(_compat.add_trial(study, create_trial(state=TrialState.WAITING)))
               for _ in range(queued)]
        worker = optuna.load_study(study_name=study.study_name, storage=storage,
                                   sampler=optuna.samplers.RandomSampler(seed=0))
        times = []
        for trial_id in ids[:claims]:
            start = time.perf_counter()
            if by_id:
                trial = _compat.claim_trial(worker, trial_id)
            else:
                worker._thread_local.cached_all_trials = None
                popped = worker._pop_waiting_trial_id()
                trial = None if popped is None else optuna.Trial(worker, popped)
            times.append(time.perf_counter() - start)
            assert trial is not None
            worker.tell(trial, 1.0)
        return statistics.median(times) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--queued", default="32,200,1000")
    parser.add_argument("--claims", type=int, default=10)
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    print("| queued trials | Optuna's pop (ms a claim) | claim by id (ms a claim) |")
    print("| --- | --- | --- |")
    for queued in (int(n) for n in args.queued.split(",")):
        print(f"| {queued} | {claim_ms(queued, args.claims, by_id=False):.1f} "
              f"| {claim_ms(queued, args.claims, by_id=True):.1f} |", flush=True)


if __name__ == "__main__":
    main()
