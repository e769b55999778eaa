"""Mean sampled value of a parameter per benchmark and sampler, read back from MLflow.

Reads the tree that `optuna-mlflow-nested benchmark` (or `compare_samplers`) wrote:
benchmark run -> study runs tagged `benchmark.sampler` -> trial runs with params.

    python benchmarks/sampled_params.py --tracking-uri sqlite:////tmp/sb/full.db --param depth
"""

from __future__ import annotations

import argparse

import mlflow


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tracking-uri", default="sqlite:///mlflow.db")
    parser.add_argument("--experiment", default="sampler-benchmark")
    parser.add_argument("--param", default="depth")
    args = parser.parse_args()
    mlflow.set_tracking_uri(args.tracking_uri)
    runs = mlflow.search_runs(experiment_names=[args.experiment], max_results=100_000)
    if runs.empty:
        raise SystemExit(f"no runs in experiment {args.experiment!r} at {args.tracking_uri}")
    names = runs.set_index("run_id")["tags.mlflow.runName"]
    studies = runs[runs["tags.benchmark.sampler"].notna()].set_index("run_id")
    trials = runs[runs["tags.mlflow.parentRunId"].isin(studies.index)].copy()
    parent = studies.loc[trials["tags.mlflow.parentRunId"]]
    trials["benchmark"] = names.reindex(parent["tags.mlflow.parentRunId"]).to_numpy()
    trials["sampler"] = parent["tags.benchmark.sampler"].to_numpy()
    trials["value"] = trials[f"params.{args.param}"].astype(float)
    table = trials.groupby(["benchmark", "sampler"], sort=False)["value"].agg(["mean", "count"])
    print(f"| benchmark | sampler | mean {args.param} | trials |")
    print("| --- | --- | --- | --- |")
    for (benchmark, sampler), row in table.iterrows():
        print(f"| {benchmark} | {sampler} | {row['mean']:.2f} | {int(row['count'])} |")


if __name__ == "__main__":
    main()
