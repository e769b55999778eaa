"""The ``optuna-mlflow-nested`` command line (also ``python -m optuna_mlflow_nested``)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
import sys

__all__ = ["main", "build_parser"]


class UsageError(Exception):
    """Bad input from the command line: one line on stderr, exit code 2."""


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
