"""The published sampler benchmark: TPE, random, grid and QMC on the CatBoost problems.

48 trials per study, 10 seeds, problems diabetes, friedman1 and wide (six parameters),
report and plots written to benchmarks/samplers/ (report.md, samplers-<problem>.png),
every study nested under a benchmark run in MLflow (sqlite:///mlflow.db by default).

    python benchmarks/samplers.py            # the full benchmark (target: < 30 min, 2 cores)
    python benchmarks/samplers.py --quick    # smoke run (target: < 2 min)

Every argument of `optuna-mlflow-nested benchmark` passes through, e.g. the synthetic
problems: `--problems sphere-2d,rosenbrock-2d,rastrigin-5d,ackley-5d --samplers
tpe,random,qmc,cmaes --trials 50 --trial-runs 0` (see RESULTS.md).
"""

from __future__ import annotations

import sys
import time

from optuna_mlflow_nested.cli import main

if __name__ == "__main__":
    start = time.perf_counter()
    code = main(["benchmark", "--out", "benchmarks/samplers", *sys.argv[1:]])
    print(f"total wall time: {time.perf_counter() - start:.0f} s")
    raise SystemExit(code)
