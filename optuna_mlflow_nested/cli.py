"""The ``optuna-mlflow-nested`` command line (also ``python -m optuna_mlflow_nested``)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
import sys

__all__ = ["main", "build_parser"]


class UsageError(Exception):
    """Bad input from the command line: one line on stderr, exit code 2."""


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
    tune.add_argument("--workers", type=int, default=1,
                      help="local worker processes sharing the study (default 1: this process)")
    tune.add_argument("--timeout", type=float, default=None, help="seconds for the search")
    tune.add_argument("--no-progress", action="store_true", help="no progress bar")
    tune.set_defaults(handler=_run_tune)


def _add_worker_command(subparsers: argparse._SubParsersAction) -> None:
    worker = subparsers.add_parser(
        "worker", help="join an existing tune study (e.g. from another machine) and run trials",
        description="Run TRIALS more trials of a study that `tune` created, with the same data "
        "arguments, storage and tracking URI. Workers never run the finish step: the `tune` "
        "command does, once its own workers are done (run `tune` again to finish on the "
        "final best after remote workers stop).",
    )
    _add_data_arguments(worker)
    worker.add_argument("--trials", type=int, required=True, help="trials this worker runs")
    worker.add_argument("--threads", type=int, default=None, help="CatBoost threads per fit")
    worker.add_argument("--timeout", type=float, default=None,
                        help="stop starting trials after this many seconds")
    worker.set_defaults(handler=_run_worker)


def _load_split(args: argparse.Namespace) -> tuple:
    from optuna_mlflow_nested import datasets

    for name in ("trials", "tuning_iterations", "max_iterations", "early_stopping_rounds"):
        value = getattr(args, name, None)
        if value is not None and value <= 0:
            raise UsageError(f"--{name.replace('_', '-')} must be positive, got {value}")
    X, y = datasets.load(args.data, args.target, seed=args.seed)
    return datasets.train_val_test_split(X, y, seed=args.seed)


def _quiet_logs() -> None:
    import logging

    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)


def _tune_kwargs(args: argparse.Namespace) -> dict:
    return dict(seed=args.seed, sampler=args.sampler, tuning_iterations=args.tuning_iterations,
                max_iterations=args.max_iterations, early_stopping_rounds=args.early_stopping_rounds,
                study_name=args.study_name, experiment_name=args.experiment,
                tracking_uri=args.tracking_uri, storage=args.storage)


def _worker_command(args: argparse.Namespace, trials: int, threads: int) -> list[str]:
    command = [sys.executable, "-m", "optuna_mlflow_nested", "worker", "--trials", str(trials),
               "--threads", str(threads)]
    for name in ("data", "target", "seed", "sampler", "study_name", "experiment", "tracking_uri",
                 "storage", "tuning_iterations", "max_iterations", "early_stopping_rounds"):
        value = getattr(args, name)
        if value is not None:
            command += [f"--{name.replace('_', '-')}", str(value)]
    return command


def _run_workers(args: argparse.Namespace, remaining: int) -> None:
    """Split the remaining budget over local worker processes; wait, showing progress."""
    import os
    import subprocess
    import time

    import optuna

    workers = min(args.workers, remaining)
    shares = [remaining // workers + (i < remaining % workers) for i in range(workers)]
    threads = max(1, (os.cpu_count() or 1) // workers)
    procs = [subprocess.Popen(_worker_command(args, share, threads)) for share in shares]
    storage = optuna.storages.get_storage(args.storage)
    study_id = storage.get_study_id_from_name(args.study_name)
    bar = None
    if not args.no_progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=args.trials, initial=args.trials - remaining, desc="trials", unit="trial")
    try:
        while any(p.poll() is None for p in procs):
            if bar is not None:
                done = len(storage.get_all_trials(study_id, deepcopy=False,
                                                  states=_finished_states()))
                bar.update(max(0, done - bar.n))
            time.sleep(1.0)
    except KeyboardInterrupt:
        for proc in procs:
            proc.terminate()
        raise
    finally:
        if bar is not None:
            bar.close()
    failed = [p.returncode for p in procs if p.returncode != 0]
    if failed:
        raise RuntimeError(f"{len(failed)} worker process(es) failed (exit codes {failed})")


def _finished_states() -> tuple:
    from optuna.trial import TrialState

    return (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


def _run_tune(args: argparse.Namespace) -> int:
    import optuna_mlflow_nested as omn

    if args.workers < 1:
        raise UsageError(f"--workers must be at least 1, got {args.workers}")
    if args.n_jobs == 0 or args.n_jobs < -1:
        raise UsageError(f"--n-jobs must be positive or -1, got {args.n_jobs}")
    X_tr, X_va, X_te, y_tr, y_va, y_te = _load_split(args)  # bad data fails before any run
    _quiet_logs()
    common = _tune_kwargs(args)
    if args.workers > 1:
        # Create the study and its parent run once, then let the workers share it.
        from optuna_mlflow_nested.catboost import catboost_study

        study = catboost_study(study_name=args.study_name, experiment_name=args.experiment,
                               tracking_uri=args.tracking_uri, storage=args.storage,
                               sampler=args.sampler, seed=args.seed, n_trials=args.trials)
        done = len([t for t in study.trials if t.state.is_finished()])
        if args.trials - done > 0:
            _run_workers(args, args.trials - done)
    result = omn.tune_catboost(
        X_tr, y_tr, X_va, y_va, X_te, y_te, n_trials=args.trials, n_jobs=args.n_jobs,
        timeout=args.timeout, show_progress_bar=not args.no_progress and args.workers == 1,
        **common,
    )
    _print_summary(args, result)
    return 0


def _run_worker(args: argparse.Namespace) -> int:
    import optuna

    import optuna_mlflow_nested as omn

    X_tr, X_va, X_te, y_tr, y_va, y_te = _load_split(args)
    _quiet_logs()
    before = len(optuna.load_study(study_name=args.study_name, storage=args.storage).trials) \
        if _study_exists(args) else 0
    study = omn.tune_catboost(X_tr, y_tr, X_va, y_va, n_trials=args.trials, finish=False,
                              more_trials=True, threads_per_fit=args.threads,
                              timeout=args.timeout, **_tune_kwargs(args))
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


def _print_summary(args: argparse.Namespace, result: object) -> None:
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
    width = max(len(k) for k, _ in rows)
    print()
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    print(f"\nOpen it: mlflow ui --backend-store-uri {args.tracking_uri}")


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "-" if value is None else str(value)


def _add_benchmark_command(subparsers: argparse._SubParsersAction) -> None:
    bench = subparsers.add_parser(
        "benchmark", help="compare samplers (TPE, random, grid, QMC) on the CatBoost problems",
        description="Run every sampler with the same seeds and the same budget on the shipped "
        "CatBoost problems, nested as benchmark -> study -> trials in MLflow, and write a "
        "Markdown report and a best-so-far plot.",
    )
    bench.add_argument("--quick", action="store_true",
                       help="diabetes only, 2 seeds, 12 trials, 50 trees (about a minute)")
    bench.add_argument("--problems", default="diabetes,friedman1,wide")
    bench.add_argument("--samplers", default="tpe,random,grid,qmc")
    bench.add_argument("--trials", type=int, default=48)
    bench.add_argument("--seeds", type=int, default=10,
                       help="number of seeds (0, 1, ...); with fewer than 6 no paired "
                       "two-sided Wilcoxon test can reach p < 0.05")
    bench.add_argument("--tuning-iterations", type=int, default=200)
    bench.add_argument("--tracking-uri", default="sqlite:///mlflow.db")
    bench.add_argument("--experiment", default="sampler-benchmark")
    bench.add_argument("--out", default="benchmark-report", help="folder for report.md and PNGs")
    bench.set_defaults(handler=_run_benchmark)


def _run_benchmark(args: argparse.Namespace) -> int:
    from pathlib import Path

    from optuna_mlflow_nested.benchmark import catboost_problem
    from optuna_mlflow_nested.benchmark import compare_samplers

    if args.quick:
        args.problems, args.trials, args.seeds, args.tuning_iterations = "diabetes", 12, 2, 50
    for name in ("trials", "seeds", "tuning_iterations"):
        if getattr(args, name) <= 0:
            raise UsageError(f"--{name.replace('_', '-')} must be positive")
    _quiet_logs()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sections = []
    for name in args.problems.split(","):
        grid_shape = None
        if args.trials != 48:  # a grid as close to the budget as the dimensions allow
            grid_shape = (args.trials, 1, 1) if name != "wide" else (args.trials, 1, 1, 1, 1, 1)
        problem = catboost_problem(name, tuning_iterations=args.tuning_iterations,
                                   grid_shape=grid_shape)
        print(f"== {name}", flush=True)
        report = compare_samplers(
            problem.objective, samplers=tuple(args.samplers.split(",")), n_trials=args.trials,
            seeds=list(range(args.seeds)), search_space=problem.grid, direction="minimize",
            experiment_name=args.experiment, tracking_uri=args.tracking_uri,
            finish=problem.finish, benchmark_name=f"samplers-{name}",
        )
        plot = report.plot(out / f"samplers-{name}.png")
        text = (f"Validation RMSE of each study's best trial:\n\n{report.summary()}\n\n"
                f"Test RMSE after the finish step (early stopping, refit on train+validation):"
                f"\n\n{report.summary(column='test_rmse')}")
        sections.append(f"## {name}\n\n{text}\n\n{report.to_markdown()}\n\n"
                        f"![best so far]({plot.name})\n")
        print(text, flush=True)
    (out / "report.md").write_text("\n".join(sections))
    print(f"report: {out / 'report.md'}")
    return 0


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
    sync.set_defaults(handler=_run_sync)


def _run_sync(args: argparse.Namespace) -> int:
    from optuna_mlflow_nested import tracking

    if (args.study_name is None) != (args.storage is None):
        raise UsageError("--study-name and --storage go together")
    spool = args.spool or tracking.default_spool_path()
    delivered, remaining = tracking.replay_spool(spool, tracking_uri=args.tracking_uri)
    print(f"spool {spool}: {delivered} run(s) delivered, {remaining} still pending")
    mended = 0
    if args.study_name is not None:
        from optuna_mlflow_nested.study import load_study

        study = load_study(args.study_name, args.storage, tracking_uri=args.tracking_uri)
        mended = study.reconcile(create_missing=True)
        study._finish("FINISHED")
        print(f"study {args.study_name}: {mended} run(s) written to match Optuna's storage")
    return 1 if remaining else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
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
    try:
        return int(args.handler(args) or 0)
    except (UsageError, ValueError, KeyError, FileNotFoundError) as exc:
        print(f"optuna-mlflow-nested {args.command}: error: {exc}", file=sys.stderr)
        return 2
