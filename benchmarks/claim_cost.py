"""What an executor worker's claim of a queued trial costs, by the size of the budget,
and (``--queue``) what queueing the budget costs before any worker starts.

The budget of ``optimize(executor=...)`` is queued as WAITING trials. Taking one
through Optuna's own pop (``Study._pop_waiting_trial_id``, what ``ask`` does, and what
workers did before) reads every unfinished trial of the study; ``_compat.claim_trial``
takes a trial whose id the worker knows. Both on a SQLite storage, one process, the
median of ``--claims`` claims (each trial told at once) per budget size.

With ``--queue``: the budget of ``--queued`` WAITING trials added to a fresh study
(``--storage sqlite``, the default; ``journal``: a journal file; ``grpc``: Optuna's
gRPC storage proxy, run in a process of its own in front of a journal file, as README
advises), one ``create_new_trial`` each as Optuna adds them (on SQLite a transaction
each), against ``_compat.add_waiting_trials`` (since 2026-12-05, one transaction per
chunk of 1,000 on RDB storages; elsewhere the same loop); both read the trials back
once, as ``optimize`` does. Medians of ``--rounds`` rounds (else ``--claims``),
alternated.

    python benchmarks/claim_cost.py [--queued 32,200,1000] [--claims 10]
    python benchmarks/claim_cost.py --queue [--storage sqlite|journal|grpc] [--rounds 3]
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
import contextlib
import os
import signal
import socket
import statistics
import subprocess
import sys
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


@contextlib.contextmanager
def grpc_proxy() -> Iterator[optuna.storages.BaseStorage]:
    """Optuna's gRPC storage proxy over a journal file, in its own process group."""
    with tempfile.TemporaryDirectory() as tmp, socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
        probe.close()
        code = ("import optuna; from optuna.storages.journal import JournalFileBackend; "
                "optuna.storages.run_grpc_proxy_server(optuna.storages.JournalStorage("
                f"JournalFileBackend({tmp + '/journal.log'!r})), host='127.0.0.1', port={port})")
        proxy = subprocess.Popen([sys.executable, "-c", code], start_new_session=True,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            storage = optuna.storages.GrpcStorageProxy(host="127.0.0.1", port=port)
            storage.wait_server_ready(timeout=60)
            yield storage
        finally:
            os.killpg(proxy.pid, signal.SIGKILL)
            proxy.wait(timeout=10)


def queue_seconds(queued: int, chunked: bool, storage_kind: str,
                  proxy: optuna.storages.BaseStorage | None = None) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        storage: str | optuna.storages.BaseStorage = f"sqlite:///{tmp}/optuna.db"
        if storage_kind == "journal":
            storage = optuna.storages.JournalStorage(
                optuna.storages.journal.JournalFileBackend(f"{tmp}/journal.log"))
        elif proxy is not None:  # a fresh study on the one proxy
            storage = proxy
        study = optuna.create_study(storage=storage)
        start = time.perf_counter()
        if chunked:
            added = _compat.add_waiting_trials(study, queued)
        else:
            template = create_trial(state=TrialState.WAITING)
            for _ in range(queued):
                study._storage.create_new_trial(study._study_id, template_trial=template)
            added = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
        seconds = time.perf_counter() - start
        assert [t.number for t in added] == list(range(queued))
        return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--queued", default="32,200,1000")
    parser.add_argument("--claims", type=int, default=10)
    parser.add_argument("--queue", action="store_true", help="time queueing the budget instead")
    parser.add_argument("--storage", choices=("sqlite", "journal", "grpc"), default="sqlite",
                        help="with --queue: the study's storage")
    parser.add_argument("--rounds", type=int, help="with --queue: rounds (default: --claims)")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if args.queue:
        with grpc_proxy() if args.storage == "grpc" else contextlib.nullcontext() as proxy:
            print(f"storage: {args.storage}")
            print("| queued trials | a create_new_trial each (s) | add_waiting_trials (s) "
                  "| ratio |")
            print("| --- | --- | --- | --- |")
            for queued in (int(n) for n in args.queued.split(",")):
                times: dict[bool, list[float]] = {False: [], True: []}
                for round_ in range(args.rounds or args.claims):
                    for chunked in (False, True) if round_ % 2 == 0 else (True, False):
                        times[chunked].append(queue_seconds(queued, chunked, args.storage, proxy))
                each, chunks = (statistics.median(times[c]) for c in (False, True))
                print(f"| {queued} | {each:.3f} | {chunks:.3f} | {each / chunks:.1f}x |",
                      flush=True)
        return
    print("| queued trials | Optuna's pop (ms a claim) | claim by id (ms a claim) |")
    print("| --- | --- | --- |")
    for queued in (int(n) for n in args.queued.split(",")):
        print(f"| {queued} | {claim_ms(queued, args.claims, by_id=False):.1f} "
              f"| {claim_ms(queued, args.claims, by_id=True):.1f} |", flush=True)


if __name__ == "__main__":
    main()
