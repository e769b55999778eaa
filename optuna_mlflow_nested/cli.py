"""The ``optuna-mlflow-nested`` command line (also ``python -m optuna_mlflow_nested``)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
import logging
import signal
import sys
import threading
from typing import TYPE_CHECKING
from typing import Any

if TYPE_CHECKING:
    from optuna_mlflow_nested.catboost import CatBoostResult
    from optuna_mlflow_nested.study import NestedStudy

from optuna_mlflow_nested._cli_engines import CommandParser
from optuna_mlflow_nested._cli_engines import UsageError
from optuna_mlflow_nested._cli_engines import add_heartbeat_arguments
from optuna_mlflow_nested._cli_engines import executor_from
from optuna_mlflow_nested._cli_engines import in_flags
from optuna_mlflow_nested._cli_engines import storage_from

__all__ = ["UsageError", "main", "build_parser"]


def _add_data_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", default="diabetes",
                        help="diabetes (bundled, default), friedman1 (generated, 5,000 rows, "
                        "noise 1.0) or a CSV file")
    parser.add_argument("--target", help="target column of the CSV file")
    parser.add_argument("--seed", type=int, default=42, help="seed for split, sampler, CatBoost")
    parser.add_argument("--sampler", default="tpe", help="tpe, random, grid, qmc, gp or cmaes")
    parser.add_argument("--study-name", default="catboost-tune")
    parser.add_argument("--experiment", default=None,
                        help="MLflow experiment (default: the study name)")
    parser.add_argument("--tracking-uri", default="sqlite:///mlflow.db")
    parser.add_argument("--storage", default="sqlite:///optuna.db", help="Optuna storage URL")
    add_heartbeat_arguments(parser)
    parser.add_argument("--tuning-iterations", type=int, default=300,
                        help="trees per tuning trial (fixed)")
    parser.add_argument("--max-iterations", type=int, default=5000,
                        help="tree limit of the early-stopped fit")
    parser.add_argument("--early-stopping-rounds", type=int, default=100)


def _add_tune_command(subparsers: argparse._SubParsersAction) -> None:
    tune = subparsers.add_parser(
        "tune", help="tune CatBoost, refit the best on train+validation, test it, log it",
        description="Tune a CatBoostRegressor (fixed tree count), early-stop the best trial, "
        "refit it on train+validation with that tree count, score it once on the test set, "
        "and log it to MLflow tagged best_model=true. Re-running with the same --study-name "
        "and --storage resumes until --trials trials are done in total.",
    )
    _add_data_arguments(tune)
    tune.add_argument("--trials", type=int, default=50, help="total trial budget (default 50)")
    tune.add_argument("--n-jobs", type=int, default=1, help="trial threads in this process")
    tune.add_argument("--dask", metavar="ADDRESS", default=None,
                      help="run the trials on this Dask scheduler (tcp://host:8786); "
                      "needs a shared --storage")
    tune.add_argument("--workers", type=int, default=1,
                      help="local worker processes sharing the study (default 1: this process)")
    tune.add_argument("--timeout", type=float, default=None, help="seconds for the search")
    tune.add_argument("--no-progress", action="store_true", help="no progress bar")
    tune.add_argument("--register", metavar="NAME", default=None,
                      help="register the final model as a new version of NAME (alias "
                      "challenger; champion only if better on the same validation data)")
    tune.set_defaults(handler=_run_tune)


def _add_worker_command(subparsers: argparse._SubParsersAction) -> None:
    worker = subparsers.add_parser(
        "worker", help="join an existing tune study (e.g. from another machine) and run trials",
        description="Run TRIALS more trials of a `tune` study (made here if it does not exist "
        "yet), with the same data arguments, storage and tracking URI. Workers never run the "
        "finish step: the `tune` "
        "command does, once its own workers are done (run `tune` again to finish on the "
        "final best after remote workers stop).",
    )
    _add_data_arguments(worker)
    worker.add_argument("--trials", type=int, required=True, help="trials this worker runs")
    worker.add_argument("--threads", type=int, default=None, help="CatBoost threads per fit")
    worker.add_argument("--timeout", type=float, default=None,
                        help="stop starting trials after this many seconds")
    worker.set_defaults(handler=_run_worker)


def _quiet_logs() -> None:
    import os

    import optuna

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    for handler in logging.getLogger("optuna").handlers:
        handler.addFilter(_MUTE_AFTER_INTERRUPT)


class _MuteAfterInterrupt(logging.Filter):
    """Ctrl-C in a trial: no Optuna traceback nor failed-trial lines; main() says it once."""
    interrupted = False

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], KeyboardInterrupt):
            self.interrupted = True
        return not self.interrupted


_MUTE_AFTER_INTERRUPT = _MuteAfterInterrupt()


def _tune_kwargs(args: argparse.Namespace) -> dict:
    return dict(seed=args.seed, sampler=args.sampler, tuning_iterations=args.tuning_iterations,
                max_iterations=args.max_iterations, early_stopping_rounds=args.early_stopping_rounds,
                study_name=args.study_name, experiment_name=args.experiment,
                tracking_uri=args.tracking_uri, storage=storage_from(args))


def _run_tune(args: argparse.Namespace) -> int:
    from optuna_mlflow_nested.catboost import CatBoostResult
    from optuna_mlflow_nested.catboost import _tune
    from optuna_mlflow_nested.catboost_checks import checked_input

    if args.workers < 1:
        raise UsageError(f"--workers must be at least 1, got {args.workers}")
    if args.dask and args.workers != 1:
        raise UsageError("give --workers or --dask, not both")
    if args.n_jobs == 0 or args.n_jobs < -1:
        raise UsageError(f"--n-jobs must be positive or -1, got {args.n_jobs}")
    if args.n_jobs != 1 and (args.dask or args.workers > 1):
        raise UsageError("--n-jobs with --workers/--dask: the workers run the trials in parallel")
    split, _ = checked_input(args)  # bad input fails before anything is written
    X_tr, X_va, X_te, y_tr, y_va, y_te = split
    _quiet_logs()
    common = _tune_kwargs(args)
    with executor_from(args) as executor:
        result = _tune(
            X_tr, y_tr, X_va, y_va, X_te, y_te, n_trials=args.trials, n_jobs=args.n_jobs,
            timeout=args.timeout, show_progress_bar=not args.no_progress,
            data_source=args.data, executor=executor, registered_model_name=args.register,
            **common,
        )
    assert isinstance(result, CatBoostResult)
    _print_summary(args, result)
    return 0


def _run_worker(args: argparse.Namespace) -> int:
    import optuna

    from optuna_mlflow_nested.catboost import _tune
    from optuna_mlflow_nested.catboost_checks import checked_input
    from optuna_mlflow_nested.study import NestedStudy

    (X_tr, X_va, _, y_tr, y_va, _), _ = checked_input(args)
    _quiet_logs()
    before = len(optuna.load_study(study_name=args.study_name, storage=args.storage).trials) \
        if _study_exists(args) else 0
    study = _tune(X_tr, y_tr, X_va, y_va, n_trials=args.trials, finish=False, more_trials=True,
                  threads_per_fit=args.threads, timeout=args.timeout, data_source=args.data,
                  **_tune_kwargs(args))
    assert isinstance(study, NestedStudy)
    print(f"worker done: study {study.study_name!r} now has {len(study.trials)} trial(s) "
          f"({before} before this worker started)")
    return 0


def _study_exists(args: argparse.Namespace) -> bool:
    import optuna

    try:
        optuna.storages.get_storage(args.storage).get_study_id_from_name(args.study_name)
        return True
    except KeyError:
        return False


def _print_summary(args: argparse.Namespace, result: CatBoostResult) -> None:
    r = result
    rows = [("best params", ""), *[(f"  {k}", _fmt(v)) for k, v in r.best_params.items()],
            ("validation RMSE (best trial, fixed trees)", _fmt(r.best_value)),
            ("validation RMSE (early-stopped)", _fmt(r.val_rmse_early_stopped)),
            ("best iteration / tree count", f"{r.best_iteration} / {r.tree_count}"),
            ("test RMSE", _fmt(r.test_rmse)), ("test MAE", _fmt(r.test_mae)),
            ("test R2", _fmt(r.test_r2))]
    if args.data == "friedman1" and r.test_rmse is not None:
        rows.append(("test RMSE / best possible (noise 1.0)", _fmt(r.test_rmse / 1.0)))
    rows += [("trials", str(len(r.study.trials))), ("parent run id", r.parent_run_id),
             ("model", r.model_uri)]
    if r.model_version is not None:
        rows.append(("registered", f"models:/{args.register}/{r.model_version}"))
    width = max(len(k) for k, _ in rows)
    print()
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    from urllib.parse import urlsplit

    from optuna_mlflow_nested._utils import redact_uri

    uri = str(args.tracking_uri)
    if uri.startswith(("http://", "https://")):  # a server: its UI is there (no credentials)
        parts = urlsplit(uri)
        base = f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}{parts.path.rstrip('/')}"
        print(f"\nOpen it: {base}/#/experiments/{r.study.experiment_id}/runs/{r.parent_run_id}")
    else:
        print(f"\nOpen it: mlflow ui --backend-store-uri {redact_uri(uri)}")


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "-" if value is None else str(value)


def _add_benchmark_command(subparsers: argparse._SubParsersAction) -> None:
    bench = subparsers.add_parser(
        "benchmark", help="compare samplers (TPE, random, grid, QMC) on shipped problems",
        description="Run every sampler with the same seeds and the same budget on the shipped "
        "problems (CatBoost ones, or cheap synthetic functions that run in seconds), nested "
        "as benchmark -> study -> trials in MLflow, and write a Markdown report and a "
        "best-so-far plot per problem.",
    )
    bench.add_argument("--quick", action="store_true",
                       help="diabetes only, 2 seeds, 12 trials, 50 trees (about a minute)")
    bench.add_argument("--problems", default="diabetes,friedman1,wide",
                       help="comma-separated: diabetes, friedman1, wide, diabetes-cv, "
                       "friedman1-cv (CatBoost), or synthetic <function>-<dim>d with function "
                       "sphere, rosenbrock, rastrigin or ackley, e.g. sphere-2d,rastrigin-5d")
    bench.add_argument("--samplers", default="tpe,random,grid,qmc")
    bench.add_argument("--trials", type=int, default=48)
    bench.add_argument("--seeds", type=int, default=10,
                       help="number of seeds (0, 1, ...); with fewer than 6 no paired "
                       "two-sided Wilcoxon test can reach p < 0.05")
    bench.add_argument("--tuning-iterations", type=int, default=200,
                       help="CatBoost trees per trial (CatBoost problems)")
    bench.add_argument("--pruner", default="none",
                       help="none (default), median, hyperband, successive-halving, wilcoxon")
    bench.add_argument("--trial-runs", default="all",
                       help='"all" (every trial a child run) or K / top-K: only the K best '
                       "trials get child runs, every trial is in each study's trials table")
    bench.add_argument("--tracking-uri", default="sqlite:///mlflow.db")
    bench.add_argument("--experiment", default="sampler-benchmark")
    bench.add_argument("--out", default="benchmark-report", help="folder for report.md and PNGs")
    bench.set_defaults(handler=_run_benchmark)


def _run_benchmark(args: argparse.Namespace) -> int:
    from optuna_mlflow_nested.benchmark.command import run_benchmark

    _quiet_logs()
    return run_benchmark(args)


def _add_sync_command(subparsers: argparse._SubParsersAction) -> None:
    sync = subparsers.add_parser(
        "sync",
        help="replay undelivered trial runs from the spool and reconcile MLflow with Optuna",
        description="Replay the spool of writes a tracking server did not take, then (with "
        "--study-name and --storage) finish child runs of trials whose worker died and create "
        "runs for trials that have none. Idempotent: running it twice writes nothing new.",
    )
    sync.add_argument("--spool", help="spool file (default: $OMN_SPOOL or "
                      "./optuna-mlflow-nested.spool.jsonl)")
    sync.add_argument("--tracking-uri", help="MLflow tracking URI (with credentials if needed)")
    sync.add_argument("--study-name", help="Optuna study to reconcile")
    sync.add_argument("--storage", help="Optuna storage URL of that study")
    add_heartbeat_arguments(sync)
    sync.set_defaults(handler=_run_sync)


def _parent_status_after_sync(study: NestedStudy, grace_period: float) -> str | None:
    """FINISHED for a RUNNING parent whose study has no trial running any more (its
    workers are gone); an ended parent (KILLED, FAILED) or a live search: unchanged."""
    from optuna_mlflow_nested._heartbeats import held_trials

    if study._client.get_run(study.parent_run_id).info.status != "RUNNING":
        return None
    return None if held_trials(study, grace_period) else "FINISHED"


def _run_sync(args: argparse.Namespace) -> int:
    import contextlib
    from pathlib import Path
    import warnings

    from filelock import Timeout
    from mlflow.exceptions import MlflowException
    import optuna
    import requests

    from optuna_mlflow_nested import tracking
    from optuna_mlflow_nested._utils import redact_secrets
    from optuna_mlflow_nested._utils import redact_uri
    from optuna_mlflow_nested._utils import scrub_exception
    from optuna_mlflow_nested.tracking.spool import sync_lock

    if (args.study_name is None) != (args.storage is None):
        raise UsageError("--study-name and --storage go together")
    spool = args.spool or tracking.default_spool_path()
    # Two syncs of one spool or one study wait for each other: two reconciles of a study
    # at once would each create the runs it lacks.
    locks = [sync_lock("spool", str(Path(spool).resolve()))]
    if args.study_name is not None:
        locks.append(sync_lock("study", str(redact_uri(args.storage)), args.study_name))
    with contextlib.ExitStack() as stack:
        for lock in locks:
            try:
                lock.acquire(blocking=False)
            except Timeout:
                print("waiting for another `sync` of the same spool or study...", file=sys.stderr)
                lock.acquire()
            stack.callback(lock.release)
        if args.tracking_uri is not None:  # MLflow's own retries last minutes per call
            stack.enter_context(tracking.short_http_retries(args.tracking_uri))
        try:
            delivered, remaining = tracking.replay_spool(spool, tracking_uri=args.tracking_uri)
            print(f"spool {spool}: {delivered} run(s) delivered, {remaining} still pending")
            if args.study_name is not None:
                from optuna_mlflow_nested.factories import load_study

                study = load_study(args.study_name, storage_from(args),
                                   tracking_uri=args.tracking_uri)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                    optuna.storages.fail_stale_trials(study)  # trials of workers that died
                mended = study.reconcile(create_missing=True, orphan_age=args.grace_period)
                study._finish(_parent_status_after_sync(study, args.grace_period))
                study.wait_for_figures()  # a failure to draw them is said before the result
                print(f"study {args.study_name}: {mended} run(s) written or deleted to match "
                      "Optuna's storage")
        except Exception as exc:
            scrub_exception(exc)  # MLflow's messages carry the tracking URI, password too
            if not isinstance(exc, (MlflowException, requests.RequestException)):
                raise
            print(f"optuna-mlflow-nested sync: error: {in_flags(redact_secrets(exc))}",
                  file=sys.stderr)
            return 1
    return 1 if remaining else 0


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(
        prog="optuna-mlflow-nested",
        description="Optuna searches recorded in MLflow as a tree: study -> trial -> fold.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    # One registration function per subcommand.
    _add_tune_command(subparsers)
    _add_worker_command(subparsers)
    _add_benchmark_command(subparsers)
    _add_sync_command(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "handler", None) is None:
        parser.print_help()
        return 0
    stop = _term_is_an_interrupt() if args.command in ("tune", "worker") else None
    try:
        return int(args.handler(args) or 0)
    except (UsageError, ValueError, KeyError, FileNotFoundError) as exc:
        from optuna_mlflow_nested._utils import redact_secrets

        message = in_flags(redact_secrets(exc))
        print(f"optuna-mlflow-nested {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        again = "; run the same command again to resume" if args.command in ("tune", "worker") else ""
        print(f"optuna-mlflow-nested {args.command}: interrupted{again}", file=sys.stderr)
        return 130
    except Exception as exc:
        if type(exc).__name__ != "FinishError":  # not imported: only `tune` raises it
            raise
        print(f"optuna-mlflow-nested {args.command}: error: {exc}", file=sys.stderr)
        return 1
    finally:
        _MUTE_AFTER_INTERRUPT.interrupted = False
        if stop is not None:
            signal.signal(signal.SIGTERM, stop)


def _term_is_an_interrupt() -> Any:
    """SIGTERM (``kill``, ``timeout``, a batch scheduler) is Ctrl-C to ``tune`` and ``worker``:
    the trial fails and its run is flushed, the parent ends KILLED. Returns the handler
    it replaced (``None`` outside the main thread, where Python sets none)."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    return signal.signal(signal.SIGTERM, interrupt)
