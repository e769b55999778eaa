"""`optuna-mlflow-nested benchmark`: the command's work (its arguments are in cli.py)."""

from __future__ import annotations

import argparse
from pathlib import Path

from optuna_mlflow_nested.benchmark.compare import compare_samplers
from optuna_mlflow_nested.benchmark.problems import get_problem

__all__ = ["run_benchmark"]


def run_benchmark(args: argparse.Namespace) -> int:
    """Compare the samplers on each problem; write report.md and one plot per problem.

    Args:
        args: the parsed ``benchmark`` arguments.

    Returns:
        0.

    Raises:
        ValueError: a bad argument or problem name, before any study runs.
    """
    if args.quick:
        args.problems, args.trials, args.seeds, args.tuning_iterations = "diabetes", 12, 2, 50
    for name in ("trials", "seeds", "tuning_iterations"):
        if getattr(args, name) <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive")
    runs = args.trial_runs if args.trial_runs == "all" else args.trial_runs.removeprefix("top-")
    if runs != "all" and not runs.isdigit():
        raise ValueError(f'--trial-runs must be "all", K or top-K, got {args.trial_runs!r}')
    # Every problem name is checked (and its data loaded) before any study runs.
    problems = [get_problem(name, n_trials=args.trials, tuning_iterations=args.tuning_iterations)
                for name in args.problems.split(",")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sections = []
    for problem in problems:
        print(f"== {problem.name}", flush=True)
        report = compare_samplers(
            problem, samplers=tuple(args.samplers.split(",")), n_trials=args.trials,
            seeds=list(range(args.seeds)), experiment_name=args.experiment,
            tracking_uri=args.tracking_uri, benchmark_name=f"samplers-{problem.name}",
            pruner=args.pruner, trial_runs=runs if runs == "all" else int(runs),
        )
        plot = report.plot(out / f"samplers-{problem.name}.png")
        text = f"{problem.metric} of each study's best trial:\n\n{report.summary()}"
        if "test_rmse" in report.results:
            text += (f"\n\nTest RMSE after the finish step (early stopping, refit on "
                     f"train+validation):\n\n{report.summary(column='test_rmse')}")
        sections.append(f"## {problem.name}\n\n{text}\n\n{report.to_markdown()}\n\n"
                        f"![best so far]({plot.name})\n")
        print(text, flush=True)
    (out / "report.md").write_text("\n".join(sections))
    print(f"report: {out / 'report.md'}")
    return 0
