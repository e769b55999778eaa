"""The published pruner benchmark: what pruning saves and what it costs, paired over seeds.

Problems (all shipped, nothing downloaded):

- ``diabetes-cv``: CatBoost over learning_rate x depth x l2_leaf_reg, scored by 3-fold
  cross-validation on train+validation; the running mean RMSE is reported after each
  fold, so a pruner can stop a trial after one or two folds. The finish step refits
  each study's best trial and scores the test set once (``test_rmse``).
- ``sphere-5d`` and ``rastrigin-5d`` (synthetic): each trial evaluates the function on
  5 noisy instances (relative noise 0.2, like folds), reporting the running mean.

Every pruner runs with the same TPE seed on every seed; the report pairs them by seed
against no pruning: CPU time, time inside the objective and objective steps saved,
against the best value (and, for CatBoost, the test RMSE) lost, with two-sided
Wilcoxon signed-rank tests. Writes benchmarks/pruners/report.md and one plot per problem.

    python benchmarks/pruners.py --tracking-uri sqlite:////tmp/pb/full.db   # full
    python benchmarks/pruners.py --quick --out /tmp/pbq                    # smoke run
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
import time
import warnings

import optuna

from optuna_mlflow_nested.benchmark import PrunerReport
from optuna_mlflow_nested.benchmark import catboost_problem
from optuna_mlflow_nested.benchmark import compare_pruners
from optuna_mlflow_nested.benchmark import synthetic_problem
from optuna_mlflow_nested.benchmark.report import markdown

CATBOOST_PRUNERS = ("none", "median", "hyperband", "wilcoxon")
SYNTHETIC_PRUNERS = ("none", "median", "hyperband", "successive-halving", "wilcoxon")


def section(name: str, report: PrunerReport, out: Path, extra: str) -> str:
    plot = report.plot(out / f"pruners-{name}.png")
    text = [f"## {name}\n", extra, "", report.summary(), ""]
    if "test_rmse" in report.results:
        text += ["Test RMSE after the finish step:", "", report.summary(column="test_rmse"), ""]
    text += ["Savings against no pruning (paired by seed):", "", markdown(report.savings()), ""]
    if "test_rmse" in report.results:
        text += ["The same on test RMSE:", "", markdown(report.savings(column="test_rmse")), ""]
    text += ["Per pruner (median, IQR over seeds):", "", markdown(report.summary_table()), "",
             f"![best so far]({plot.name})", ""]
    return "\n".join(text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 seeds, few trials (smoke run)")
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--catboost-trials", type=int, default=30)
    parser.add_argument("--synthetic-trials", type=int, default=40)
    parser.add_argument("--tuning-iterations", type=int, default=100)
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--synthetic-trial-runs", default="0",
                        help='trial_runs of the synthetic studies ("all" or K; default 0: '
                        "every trial in the trials table, no child runs)")
    parser.add_argument("--tracking-uri", default="sqlite:///mlflow.db")
    parser.add_argument("--out", default="benchmarks/pruners")
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.catboost_trials, args.synthetic_trials, args.tuning_iterations = 2, 8, 10, 20
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    seeds = list(range(args.seeds))
    synthetic_runs = args.synthetic_trial_runs
    synthetic_runs = synthetic_runs if synthetic_runs == "all" else int(synthetic_runs)
    start = time.perf_counter()
    sections = []
    cv = catboost_problem("diabetes-cv", tuning_iterations=args.tuning_iterations, folds=args.folds)
    print("== diabetes-cv", flush=True)
    report = compare_pruners(cv, pruners=CATBOOST_PRUNERS, sampler="tpe",
                             n_trials=args.catboost_trials, seeds=seeds,
                             tracking_uri=args.tracking_uri, experiment_name="pruner-benchmark")
    sections.append(section("diabetes-cv", report, out,
                            f"TPE, {args.catboost_trials} trials, {args.folds}-fold CV, "
                            f"{args.tuning_iterations} trees per fit, every trial a child run."))
    for name in ("sphere-5d", "rastrigin-5d"):
        print(f"== {name}", flush=True)
        problem = synthetic_problem(name, steps=5, noise=0.2)
        report = compare_pruners(problem, pruners=SYNTHETIC_PRUNERS, sampler="tpe",
                                 n_trials=args.synthetic_trials, seeds=seeds,
                                 tracking_uri=args.tracking_uri, experiment_name="pruner-benchmark",
                                 trial_runs=synthetic_runs)
        sections.append(section(name, report, out,
                                f"TPE, {args.synthetic_trials} trials, 5 noisy instances per "
                                f"trial (relative noise 0.2), trial_runs={synthetic_runs}."))
    total = time.perf_counter() - start
    (out / "report.md").write_text("\n".join(sections) + f"\nTotal wall time: {total:.0f} s\n")
    print("\n".join(sections))
    print(f"report: {out / 'report.md'}\ntotal wall time: {total:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
