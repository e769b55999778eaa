"""`optuna-mlflow-nested tune` and `worker` (issues 3 and 6)."""

from __future__ import annotations

from pathlib import Path
import subprocess
import sys

from mlflow.tracking import MlflowClient
import pytest

from optuna_mlflow_nested.cli import main

FAST = ["--tuning-iterations", "20", "--max-iterations", "100", "--early-stopping-rounds", "10",
        "--no-progress"]


def runs_of(tmp: Path, experiment: str = "catboost-tune") -> tuple[MlflowClient, list, str]:
    client = MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}")
    exp = client.get_experiment_by_name(experiment)
    return client, client.search_runs([exp.experiment_id], max_results=1000), exp.experiment_id


def assert_one_parent_four_trials_one_model(tmp: Path) -> None:
    client, runs, experiment_id = runs_of(tmp)
    parents = [r for r in runs if r.data.tags.get("optuna.role") == "study"]
    assert len(parents) == 1 and parents[0].data.tags["best_model"] == "true"
    assert sorted(r.info.run_name for r in runs if r.info.run_name.startswith("trial-")) == [
        f"trial-{i}" for i in range(4)]
    assert len(client.search_logged_models(experiment_ids=[experiment_id])) == 1


def test_tune_defaults_summary_and_resume(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["tune", "--trials", "3", *FAST]) == 0
    out = capsys.readouterr().out
    for text in ("best params", "validation RMSE (early-stopped)", "test RMSE",
                 "best iteration / tree count", "parent run id",
                 "mlflow ui --backend-store-uri sqlite:///mlflow.db"):
        assert text in out
    assert "View run" not in out
    assert (tmp_path / "mlflow.db").exists() and (tmp_path / "optuna.db").exists()
    client, runs, _ = runs_of(tmp_path)
    parents = [r for r in runs if r.data.tags.get("optuna.role") == "study"]
    assert len(parents) == 1 and parents[0].data.tags["best_model"] == "true"
    assert parents[0].info.run_id in out

    assert main(["tune", "--trials", "5", *FAST]) == 0  # resumes to 5 in total
    client, runs, _ = runs_of(tmp_path)
    assert len([r for r in runs if r.data.tags.get("optuna.role") == "study"]) == 1
    assert sorted(r.info.run_name for r in runs if r.info.run_name.startswith("trial-")) == [
        f"trial-{i}" for i in range(5)]
    assert main(["tune", "--trials", "5", *FAST]) == 0  # budget spent: no trial, finish again
    _, runs, _ = runs_of(tmp_path)
    assert sum(r.info.run_name.startswith("trial-") for r in runs) == 5


def test_friedman1_reports_ratio_to_noise(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["tune", "--data", "friedman1", "--trials", "2", *FAST]) == 0
    assert "test RMSE / best possible (noise 1.0)" in capsys.readouterr().out


def test_workers_share_one_study_and_finish_once(tmp_path: Path) -> None:
    assert main(["tune", "--trials", "4", "--workers", "2", *FAST]) == 0
    client, runs, experiment_id = runs_of(tmp_path)
    parents = [r for r in runs if r.data.tags.get("optuna.role") == "study"]
    assert len(parents) == 1
    assert sorted(r.info.run_name for r in runs if r.info.run_name.startswith("trial-")) == [
        f"trial-{i}" for i in range(4)]
    assert len(client.search_logged_models(experiment_ids=[experiment_id])) == 1
    for run in (r for r in runs if r.info.run_name.startswith("trial-")):  # from the workers
        assert [i.dataset.name for i in run.inputs.dataset_inputs] == ["train"]

    # another machine joins with `worker`: more trials, no second finish
    assert main(["worker", "--trials", "2", "--tuning-iterations", "20"]) == 0
    client, runs, experiment_id = runs_of(tmp_path)
    assert sum(r.info.run_name.startswith("trial-") for r in runs) == 6
    assert len(client.search_logged_models(experiment_ids=[experiment_id])) == 1


@pytest.mark.slow
def test_readme_kubernetes_order_workers_first_then_tune_tops_up_and_finishes(
        tmp_path: Path) -> None:
    # README's Kubernetes recipe: the pods' workers make the study, then one `tune`
    # runs what the budget still lacks and the finish step, once.
    assert main(["worker", "--trials", "2", "--tuning-iterations", "20"]) == 0
    assert main(["worker", "--trials", "1", "--tuning-iterations", "20"]) == 0
    client, runs, experiment_id = runs_of(tmp_path)
    assert sum(r.info.run_name.startswith("trial-") for r in runs) == 3
    assert client.search_logged_models(experiment_ids=[experiment_id]) == []
    assert main(["tune", "--trials", "4", *FAST]) == 0
    assert_one_parent_four_trials_one_model(tmp_path)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--data", "missing.csv", "--target", "y"], "does not exist"),
        (["--data", "{csv}"], "--target is required"),
        (["--data", "{csv}", "--target", "nope"], "target column 'nope' is not in"),
        (["--data", "{csv}", "--target", "city"], "must be numeric"),
        (["--data", "{nan}", "--target", "y"], "missing value"),
        (["--data", "{tiny}", "--target", "y"], "too few rows"),
        (["--trials", "0"], "--trials must be positive"),
        (["--sampler", "bogus"], "sampler"),
    ],
)
def test_bad_input_exits_2_with_one_line(tmp_path: Path, args: list[str], message: str,
                                        capsys: pytest.CaptureFixture) -> None:
    rows = "\n".join(f"{i},{'a' if i % 2 else 'b'},{i * 1.5}" for i in range(30))
    (tmp_path / "data.csv").write_text("x,city,y\n" + rows + "\n")
    (tmp_path / "nan.csv").write_text("x,y\n" + "\n".join(f"{i},{'' if i == 3 else i}" for i in range(30)))
    (tmp_path / "tiny.csv").write_text("x,y\n1,2\n2,3\n")
    args = [a.format(csv="data.csv", nan="nan.csv", tiny="tiny.csv") for a in args]
    assert main(["tune", *args, *FAST]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and lines[0].startswith("optuna-mlflow-nested")
    assert not (tmp_path / "mlflow.db").exists()  # no half-made parent run anywhere


@pytest.mark.parametrize(
    "args, flag, python_name",
    [
        (["--tracking-uri", "foo://bar"], "--tracking-uri 'foo://bar'", "tracking_uri"),
        (["--workers", "2", "--storage", "sqlite:///:memory:"], "--workers/--dask cannot share",
         "optimize(executor=...)"),
        (["--tracking-uri", "sqlite:///other.db"], "pass the --tracking-uri", "tracking_uri"),
        # A value the user wrote is theirs: only the message's own words are flags.
        (["--data", "tracking_uri.csv"], "data file 'tracking_uri.csv' does not", "--tracking-uri"),
    ],
)
def test_bad_input_is_named_by_its_flag_not_its_python_name(
        tmp_path: Path, args: list[str], flag: str, python_name: str,
        capsys: pytest.CaptureFixture) -> None:
    # The command's checks are the library's: their messages named Python arguments
    # (tracking_uri, optimize(executor=...)) that a user of the command never wrote.
    if "sqlite:///other.db" in args:  # a study made with another tracking store: joined
        import optuna_mlflow_nested as omn

        omn.create_study("catboost-tune", storage="sqlite:///optuna.db",
                         tracking_uri="sqlite:///mlflow.db")
    assert main(["tune", "--trials", "2", *args, *FAST]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and flag in lines[0] and python_name not in lines[0], lines


def test_bad_input_from_the_installed_command(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "optuna_mlflow_nested", "tune", "--data",
                             "missing.csv", "--target", "y"], cwd=tmp_path, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "optuna-mlflow-nested tune: error: data file 'missing.csv' does not exist"]
    assert not (tmp_path / "mlflow.db").exists()


@pytest.mark.parametrize("args, texts", [
    (["tune", "--trials", "abc"], ["optuna-mlflow-nested tune: error: ", "--trials", "'abc'"]),
    (["tune", "--bogus"], ["optuna-mlflow-nested: error: ", "--bogus", "COMMAND --help"]),
    (["worker"], ["optuna-mlflow-nested worker: error: ", "--trials"]),
    (["nonsense"], ["optuna-mlflow-nested: error: ", "'nonsense'"]),
])
def test_a_bad_option_is_one_line_and_exit_code_2(
        tmp_path: Path, args: list[str], texts: list[str], capsys: pytest.CaptureFixture) -> None:
    # README: bad input, a bad option included, prints one line on stderr and exits 2.
    # argparse's own errors printed the whole usage first (16 lines for tune --trials abc).
    with pytest.raises(SystemExit) as exited:
        main(args)
    assert exited.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(texts[0]) and all(t in lines[0] for t in texts[1:]), lines
    assert "--help" in lines[0]  # where the usage is now
    assert not list(tmp_path.iterdir())  # nothing written


def test_grid_search_with_workers_uses_one_grid(tmp_path: Path) -> None:
    import optuna

    assert main(["tune", "--trials", "4", "--workers", "2", "--sampler", "grid", *FAST]) == 0
    study = optuna.load_study(study_name="catboost-tune", storage="sqlite:///optuna.db")
    grid = study.user_attrs["omn.grid"]
    assert len(study.trials) == 4
    for trial in study.trials:
        assert all(trial.params[name] in values for name, values in grid.items())


@pytest.mark.slow
def test_tune_on_a_dask_cluster(tmp_path: Path) -> None:
    pytest.importorskip("distributed")
    import os

    from tests_support import DaskCluster

    cluster = DaskCluster(tmp_path, dict(os.environ))
    cluster.add_worker()
    cluster.add_worker()
    try:
        assert main(["tune", "--trials", "4", "--dask", cluster.address, *FAST]) == 0
    finally:
        cluster.stop()
    assert_one_parent_four_trials_one_model(tmp_path)


@pytest.mark.slow
def test_sigterm_to_tune_with_workers_stops_cleanly_and_resumes(tmp_path: Path) -> None:
    import signal
    import time

    import optuna

    command = [sys.executable, "-m", "optuna_mlflow_nested", "tune", "--trials", "6",
               "--workers", "2", "--tuning-iterations", "3000", "--max-iterations", "100",
               "--early-stopping-rounds", "10", "--no-progress"]
    proc = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # until a worker is inside a trial
        try:
            trials = optuna.load_study(study_name="catboost-tune", storage=storage).trials
        except (KeyError, Exception):
            trials = []
        if any(t.state.name == "RUNNING" for t in trials):
            break
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)  # what `kill`, `timeout` or a batch scheduler send
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err
    states = [t.state.name for t in optuna.load_study(study_name="catboost-tune",
                                                      storage=storage).trials]
    assert "RUNNING" not in states
    client, runs, experiment_id = runs_of(tmp_path)
    everything = client.search_runs([experiment_id], run_view_type=3, max_results=1000)
    assert "RUNNING" not in {r.info.status for r in everything}, "trials, spares, parent ended"
    parent = next(r for r in runs if r.data.tags.get("optuna.role") == "study")
    assert parent.info.status == "KILLED"
    # run again: resumes to the budget and finishes
    fast = [*command[:command.index("--tuning-iterations")], *FAST]
    assert subprocess.run(fast, cwd=tmp_path, capture_output=True, timeout=300).returncode == 0
    client, runs, _ = runs_of(tmp_path)
    study = optuna.load_study(study_name="catboost-tune", storage=storage)
    assert all(t.state.is_finished() for t in study.trials)
    # The trials the interrupt cut short stay FAILED and are run again: not in the budget.
    interrupted = [t for t in study.trials if "omn.interrupted" in t.system_attrs]
    assert {t.state.name for t in interrupted} <= {"FAIL"}
    assert len(study.trials) - len(interrupted) == 6
    everything = client.search_runs([runs[0].info.experiment_id], run_view_type=3, max_results=1000)
    assert "RUNNING" not in {r.info.status for r in everything}
    parent = next(r for r in runs if r.data.tags.get("optuna.role") == "study")
    assert parent.info.status == "FINISHED" and parent.data.tags["best_model"] == "true"
