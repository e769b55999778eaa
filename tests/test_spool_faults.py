"""The outage spool across processes (issue 12, items 1 and 4): workers appending while
`sync` replays, two `sync` at once, a torn line, quotes in study names.

Every test uses real processes: an appender calling ``Spool.append`` and the
``optuna-mlflow-nested sync`` command, on a real SQLite tracking store.
"""

from __future__ import annotations

from pathlib import Path
import pickle
import re
import subprocess
import sys
import textwrap
import time

from mlflow.tracking import MlflowClient
import pytest

import optuna_mlflow_nested as omn
from optuna_mlflow_nested.cli import main
from optuna_mlflow_nested.tracking.records import RunRecord
from optuna_mlflow_nested.tracking.records import trial_record
from optuna_mlflow_nested.tracking.spool import Spool
from optuna_mlflow_nested.tracking.spool import replay_spool

# What a worker does while the server is away: one Spool.append per finished trial.
APPENDER = textwrap.dedent("""
    import os, pickle, sys, time
    from optuna_mlflow_nested.tracking.spool import Spool
    records = pickle.load(open(sys.argv[1], "rb"))
    spool = Spool(sys.argv[2])
    # With a 5th argument K: after K appends, wait until a sync has claimed the spool
    # (only a claim removes the file this process appends to), then append the rest.
    wait_after = int(sys.argv[5]) if len(sys.argv) > 5 else 0
    claimed = False
    open(sys.argv[3], "w").close()  # started
    for appended, record in enumerate(records):
        if appended and not os.path.exists(sys.argv[2]):
            claimed = True
        if wait_after and appended == wait_after:
            deadline = time.monotonic() + 120
            while not (claimed or not os.path.exists(sys.argv[2])):
                if time.monotonic() > deadline:
                    sys.exit("no sync claimed the spool while records were still to come")
                time.sleep(0.01)
        spool.append(record)
        time.sleep(float(sys.argv[4]))
""")


def _study_without_runs(tmp_path: Path, name: str, uri: str, n: int) -> omn.NestedStudy:
    """A finished study none of whose trials has a run (what a long outage leaves)."""
    study = omn.create_study(name, tracking_uri=uri, storage=f"sqlite:///{tmp_path / 'optuna.db'}",
                             sampler="random", seed=0, trial_runs=0)
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=n)
    return study


def _records(study: omn.NestedStudy) -> list[RunRecord]:
    return [trial_record(study, t, tracking_uri=study.tracking_uri,
                         experiment_id=study.experiment_id, parent_run_id=study.parent_run_id,
                         run_id=None) for t in study.trials]


def _runs_per_trial(study: omn.NestedStudy) -> dict[int, int]:
    client = MlflowClient(study.tracking_uri)
    counts: dict[int, int] = {}
    for run in client.search_runs([study.experiment_id], max_results=10_000):
        if run.info.run_id != study.parent_run_id:
            number = int(run.data.tags["optuna.trial_number"])
            counts[number] = counts.get(number, 0) + 1
    return counts


def _sync_cmd(spool: Path, uri: str) -> list[str]:
    return [sys.executable, "-m", "optuna_mlflow_nested", "sync", "--spool", str(spool),
            "--tracking-uri", uri]


def _delivered(stdout: str) -> int:
    match = re.search(r"(\d+) run\(s\) delivered", stdout)
    assert match, stdout
    return int(match.group(1))


def _pending_lines(spool: Path) -> list[str]:
    return [ln for ln in spool.read_text().splitlines() if ln.strip()] if spool.exists() else []


def _start_appender(tmp_path: Path, records: list[RunRecord], spool: Path,
                    pause: float, wait_after: int = 0) -> subprocess.Popen[bytes]:
    payload, started = tmp_path / "records.pkl", tmp_path / "appender-started"
    payload.write_bytes(pickle.dumps(records))
    proc = subprocess.Popen([sys.executable, "-c", APPENDER, str(payload), str(spool),
                             str(started), str(pause), str(wait_after)])
    deadline = time.monotonic() + 60
    while not started.exists():
        assert proc.poll() is None and time.monotonic() < deadline, "the appender did not start"
        time.sleep(0.05)
    return proc


@pytest.mark.slow  # real processes: ~12 s
def test_syncs_while_a_worker_appends_deliver_every_record_exactly_once(
        tmp_path: Path, tracking_uri: str) -> None:
    """60 appends 50 ms apart; `sync` runs again and again meanwhile, then once after."""
    study = _study_without_runs(tmp_path, "appended", tracking_uri, 60)
    spool = tmp_path / "s.jsonl"
    appender = _start_appender(tmp_path, _records(study), spool, 0.05)
    delivered, syncs = 0, 0
    try:
        while appender.poll() is None:
            result = subprocess.run(_sync_cmd(spool, tracking_uri), capture_output=True,
                                    text=True, timeout=120)
            assert result.returncode == 0, result.stderr[-2000:]
            delivered += _delivered(result.stdout)
            syncs += 1
    finally:
        if appender.poll() is None:
            appender.kill()
    assert appender.wait() == 0
    result = subprocess.run(_sync_cmd(spool, tracking_uri), capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    delivered += _delivered(result.stdout)
    assert syncs >= 1
    assert delivered == 60
    assert _runs_per_trial(study) == {n: 1 for n in range(60)}
    assert _pending_lines(spool) == []
    assert not list(tmp_path.glob("s.jsonl.claimed.*")), "a claim was left behind"


@pytest.mark.slow  # real processes: ~12 s
def test_two_syncs_at_once_beside_a_worker_deliver_every_record_exactly_once(
        tmp_path: Path, tracking_uri: str) -> None:
    """Two `sync` processes start together on a full spool while a worker keeps appending.

    The worker appends 10 of its 20 records, then the rest only once a sync has claimed
    the spool: records arrive while the syncs deliver (else each sync, seconds in
    importing MLflow, could claim after the last append)."""
    study = _study_without_runs(tmp_path, "raced", tracking_uri, 60)
    records = _records(study)
    spool = tmp_path / "s.jsonl"
    with pytest.warns(RuntimeWarning, match="did not take"):
        for record in records[:40]:
            Spool(spool).append(record)
    appender = _start_appender(tmp_path, records[40:], spool, 0.05, wait_after=10)
    try:
        syncs = [subprocess.Popen(_sync_cmd(spool, tracking_uri), stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for _ in range(2)]
        outputs = [proc.communicate(timeout=120) for proc in syncs]
    finally:
        if appender.poll() is None:
            appender.wait(180)
    assert appender.returncode == 0, "the worker saw no claim while it had records to append"
    assert [proc.returncode for proc in syncs] == [0, 0], [err[-2000:] for _, err in outputs]
    delivered = sum(_delivered(out) for out, _ in outputs)
    last = subprocess.run(_sync_cmd(spool, tracking_uri), capture_output=True, text=True,
                          timeout=120)
    assert last.returncode == 0, last.stderr[-2000:]
    assert delivered + _delivered(last.stdout) == 60
    assert delivered >= 40  # the two syncs shared the 40 records, none twice
    assert _runs_per_trial(study) == {n: 1 for n in range(60)}
    assert _pending_lines(spool) == []


def test_a_torn_line_neither_swallows_the_next_record_nor_blocks_replay(
        tmp_path: Path, tracking_uri: str, caplog: pytest.LogCaptureFixture) -> None:
    """A worker killed (or out of disk) mid-append leaves half a line and no newline.

    Before: the next append was glued onto the half line (that record was lost in an
    unparseable line) and every later `sync` failed on it, delivering nothing after it.
    """
    study = _study_without_runs(tmp_path, "torn", tracking_uri, 4)
    records = _records(study)
    spool = Spool(tmp_path / "s.jsonl")
    with pytest.warns(RuntimeWarning):
        spool.append(records[0])
    torn = records[1].to_json()[:40]
    with open(spool.path, "a") as handle:  # what the dying worker managed to write
        handle.write(torn)
    spool.append(records[2])
    spool.append(records[3])
    assert main(["sync", "--spool", str(spool.path), "--tracking-uri", tracking_uri]) == 0
    assert _runs_per_trial(study) == {0: 1, 2: 1, 3: 1}
    assert _pending_lines(spool.path) == []
    kept = Path(f"{spool.path}.corrupt")
    assert kept.read_text().splitlines() == [torn], "the torn line is kept, not dropped"
    assert oct(kept.stat().st_mode & 0o777) == "0o600"
    assert str(kept) in caplog.text
    assert main(["sync", "--spool", str(spool.path), "--tracking-uri", tracking_uri]) == 0


def test_replay_to_a_dead_server_gives_up_on_it_after_one_record(
        tmp_path: Path, tracking_uri: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each record used to wait out MLflow's HTTP retries (minutes) against a dead server."""
    from conftest import free_port

    study = _study_without_runs(tmp_path, "dead", tracking_uri, 8)
    spool = Spool(tmp_path / "s.jsonl")
    with pytest.warns(RuntimeWarning):
        for record in _records(study):
            spool.append(record)
    dead = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    started = time.monotonic()
    assert replay_spool(spool.path, tracking_uri=dead) == (0, 8)
    elapsed = time.monotonic() - started
    assert elapsed < 12, f"{elapsed:.0f}s: every record waited for the dead server"
    assert len(_pending_lines(spool.path)) == 8
    assert replay_spool(spool.path, tracking_uri=tracking_uri) == (8, 0)
    assert _runs_per_trial(study) == {n: 1 for n in range(8)}


@pytest.mark.parametrize("name", ["it's", 'say "hi"', "both ' and \" here"])
def test_quotes_in_a_study_name_through_spool_sync_and_reconcile(
        tmp_path: Path, tracking_uri: str, name: str) -> None:
    study = _study_without_runs(tmp_path, name, tracking_uri, 3)
    spool = Spool(tmp_path / "q.jsonl")
    records = _records(study)
    with pytest.warns(RuntimeWarning):
        for record in records[:2]:
            spool.append(record)
    args = ["sync", "--spool", str(spool.path), "--tracking-uri", tracking_uri]
    assert main(args) == 0
    assert main(args) == 0  # idempotent
    assert _runs_per_trial(study) == {0: 1, 1: 1}
    # sync with the study (it keeps no trial runs: trial_runs=0, so nothing to create)
    assert main([*args, "--study-name", name, "--storage",
                 f"sqlite:///{tmp_path / 'optuna.db'}"]) == 0
    assert _runs_per_trial(study) == {0: 1, 1: 1}
    reopened = omn.load_study(name, f"sqlite:///{tmp_path / 'optuna.db'}",
                              tracking_uri=tracking_uri)
    reopened.trial_runs = None  # every trial a run: reconcile creates the third one
    assert reopened.reconcile(create_missing=True) == 1
    assert reopened.reconcile(create_missing=True) == 0
    assert _runs_per_trial(study) == {0: 1, 1: 1, 2: 1}
    assert sorted(reopened.child_runs()["tags.optuna.trial_number"]) == ["0", "1", "2"]
    assert _pending_lines(spool.path) == []


@pytest.mark.slow  # real processes: ~12 s
def test_two_syncs_of_one_study_at_once_give_each_trial_one_run(
        tmp_path: Path, tracking_uri: str) -> None:
    """`sync --study-name` creates the runs a study lacks; two at once must not both do it."""
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = omn.create_study("twice", tracking_uri=tracking_uri, storage=storage,
                             sampler="random", seed=0)
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=40)
    client = MlflowClient(tracking_uri)
    for run_id in study.run_ids().values():  # the runs are gone (say, deleted by mistake)
        client.delete_run(run_id)
    spool = tmp_path / "s.jsonl"
    cmd = [*_sync_cmd(spool, tracking_uri), "--study-name", "twice", "--storage", storage]
    syncs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outputs = [proc.communicate(timeout=120) for proc in syncs]
    assert [proc.returncode for proc in syncs] == [0, 0], [err[-2000:] for _, err in outputs]
    assert _runs_per_trial(study) == {n: 1 for n in range(40)}


def test_a_fold_record_replays_into_its_own_run_and_no_other(tracking_uri: str) -> None:
    # A fold's record was looked up by study tag, parent and name: a fold run whose
    # creation landed but whose answer was lost (a server killed mid-request) lacks the
    # study tag, so the replay made a second one; and two folds of one name under one
    # parent (cross_validate called twice in a run) were taken for one. Its key finds it.
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

    from optuna_mlflow_nested.tracking import RUN_KEY_TAG
    from optuna_mlflow_nested.tracking import deliver

    client = MlflowClient(tracking_uri)
    experiment_id = client.create_experiment("folds")
    parent = client.create_run(experiment_id).info.run_id
    runs = {key: client.create_run(experiment_id, run_name="fold-0", tags={
        RUN_KEY_TAG: key, MLFLOW_PARENT_RUN_ID: parent}).info.run_id for key in ("a", "b")}
    for key in ("b", "c"):  # "b": its creation's answer was lost; "c": never created
        record = RunRecord(
            tracking_uri=tracking_uri, experiment_id=experiment_id, parent_run_id=parent,
            study_name="", trial_number=None, run_id=None, run_name="fold-0",
            status="FINISHED", end_time=2, start_time=1, metrics=[("score", 0.5, 1, 0)],
            tags={RUN_KEY_TAG: key, MLFLOW_PARENT_RUN_ID: parent})
        runs[key] = runs.get(key) or deliver(client, record)
        assert deliver(client, record) == runs[key]  # a second replay finds it too
    children = {r.data.tags[RUN_KEY_TAG]: r for r in client.search_runs(
        [experiment_id], f"tags.mlflow.parentRunId = '{parent}'")}
    assert {k: r.info.run_id for k, r in children.items()} == runs
    assert children["a"].data.metrics == {} and children["a"].info.status == "RUNNING"
    assert children["b"].data.metrics == {"score": 0.5} and children["b"].info.status == "FINISHED"

