"""Import cost of the package against `import optuna, mlflow` (issue 11: at most 1.2x).

Each statement runs in a fresh interpreter, interleaved, REPEATS times; medians and
their ratio are printed.

    python benchmarks/import_time.py [--repeats 15]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

STATEMENTS = {
    "import optuna, mlflow": "import optuna, mlflow",
    "import optuna_mlflow_nested": "import optuna_mlflow_nested",
}


def once(statement: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", statement], check=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    for statement in STATEMENTS.values():
        once(statement)  # warm the file cache
    times: dict[str, list[float]] = {label: [] for label in STATEMENTS}
    for _ in range(args.repeats):
        for label, statement in STATEMENTS.items():
            times[label].append(once(statement))
    medians = {label: statistics.median(values) for label, values in times.items()}
    for label, value in medians.items():
        print(f"{label:<30} median {value * 1000:7.0f} ms over {args.repeats} fresh interpreters")
    base, ours = medians.values()
    print(f"ratio {ours / base:.2f} (target <= 1.20)")


if __name__ == "__main__":
    main()
