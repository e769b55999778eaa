"""Wall time of the main job: `optuna-mlflow-nested tune` with no arguments.

Runs the installed command in a fresh scratch folder (so it creates mlflow.db and
optuna.db from nothing, as a new user would) and prints the wall time of each run.

    python benchmarks/tune_speed.py [--repeat N]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    times = []
    for i in range(args.repeat):
        folder = tempfile.mkdtemp(prefix="omn-tune-speed-")
        start = time.perf_counter()
        result = subprocess.run([sys.executable, "-m", "optuna_mlflow_nested", "tune", "--no-progress"],
                                cwd=folder, capture_output=True, text=True)
        wall = time.perf_counter() - start
        if result.returncode != 0:
            sys.exit(f"tune failed: {result.stderr[-2000:]}")
        summary = [ln for ln in result.stdout.splitlines() if "RMSE" in ln or "tree count" in ln]
        times.append(wall)
        print(f"run {i + 1}: {wall:.1f} s wall")
        for line in summary:
            print("   ", line)
        shutil.rmtree(folder, ignore_errors=True)
    print(f"cores: {os.cpu_count()}  wall min {min(times):.1f} s  max {max(times):.1f} s "
          f"(target: at most 60 s)")


if __name__ == "__main__":
    main()
