"""What work in another process costs a CPU-bound objective on this machine (issue 16).

In ``benchmarks/overhead.py`` the numpy-bound objective's own work ran about 1 ms a
trial slower during our searches than during bare Optuna's; with the writer process,
the MLflow work runs on the other core while the objective computes. This script asks
whether such work slows an objective that shares nothing with it but the machine. It
times the same fixed work as overhead.py's objectives (``_numpy_work`` with one BLAS
thread, ``_python_work``; each calibrated to about 0.1 s) in this process's main
thread, in four conditions alternated round by round (a thread of this process reads a
pipe from the second process in each but the first; only the last sends on it):

- **alone**;
- **MLflow writing**: a second process makes one trial run every ``--period`` seconds
  through MLflow's public client (create_run, one log_batch, set_terminated: overhead.py's
  floor) on a SQLite file in WAL mode, as the writer process does for 0.1 s trials;
- **spinning**: a second process spins pure Python for the same CPU time per period
  as the MLflow process used in its latest round, and sleeps the rest;
- **woken**: a thread of this process waits on a pipe, as the writer process's reader
  thread does in the objective's process, and a second process sends it two small
  pickled messages per period (a trial's two: a spare run made, a run pushed).

Each condition reports the median time of a unit of work, its difference from alone,
the unit's time off the CPU (wall minus the thread's CPU time) over alone's, and the
second process's CPU per period (``psutil``).

    OPENBLAS_NUM_THREADS=1 python benchmarks/interference.py [--rounds 4] [--units 20]
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
import statistics
import subprocess
import sys
import tempfile
import threading
import time

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine_cost import cpu_seconds


def _background(kind: str, period: float, spin_ms: float, uri: str, fd: int) -> None:
    """The second process: after printing ``ready``, one unit of its work per period
    until stdin closes (checked between periods)."""
    from multiprocessing.connection import Connection
    import selectors

    if kind == "woken":
        pipe = Connection(fd, readable=False)
        message = ("run", "0" * 32, list(range(150)))  # about a pickled Run's size

        def work() -> None:
            pipe.send(message)
            pipe.send(("spare", "0" * 32, "0" * 32))
    elif kind == "mlflow":
        import mlflow
        from overhead import trial_run_maker

        mlflow.set_tracking_uri(uri)
        work = trial_run_maker(uri)
        work()  # the store's first-call costs
    else:
        def work() -> None:
            end = time.process_time() + spin_ms / 1000
            while time.process_time() < end:
                pass
    print("ready", flush=True)
    selector = selectors.DefaultSelector()
    selector.register(sys.stdin, selectors.EVENT_READ)
    next_start = time.monotonic()
    while True:
        work()
        next_start += period
        if selector.select(timeout=max(0.0, next_start - time.monotonic())):
            return  # stdin closed: stop


def _time_units(work, repeats: int, units: int) -> list[tuple[float, float]]:
    """(wall, wall minus this thread's CPU time) of each unit, in ms."""
    timings = []
    for _ in range(units):
        start, cpu = time.perf_counter(), time.thread_time()
        work(repeats)
        wall = time.perf_counter() - start
        timings.append((wall * 1000, (wall - (time.thread_time() - cpu)) * 1000))
    return timings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--units", type=int, default=20, help="units of work a condition")
    parser.add_argument("--period", type=float, default=0.1)
    parser.add_argument("--background", choices=("mlflow", "spin", "woken"),
                        help=argparse.SUPPRESS)
    parser.add_argument("--fd", type=int, default=-1, help=argparse.SUPPRESS)
    parser.add_argument("--spin-ms", type=float, default=0.0, help=argparse.SUPPRESS)
    parser.add_argument("--uri", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.background:
        _background(args.background, args.period, args.spin_ms, args.uri, args.fd)
        return

    import overhead

    overhead.calibrate(0.1)
    kinds = {"numpy": overhead._numpy_work, "python": overhead._python_work}
    results: dict[tuple[str, str], list[tuple[float, float]]] = {}
    background_cpu: dict[str, list[float]] = {"mlflow": [], "spin": [], "woken": []}
    spin_ms = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        uri = f"sqlite:///{tmp}/mlflow.db"
        from mlflow.tracking import MlflowClient

        from optuna_mlflow_nested.tracking.clients import use_wal

        MlflowClient(uri).search_experiments()  # created and migrated
        use_wal(Path(tmp) / "mlflow.db")
        started: list[subprocess.Popen[str]] = []
        try:
            for round_ in range(args.rounds):
                order = ["alone", "mlflow", "spin", "woken"]
                if round_ % 2:
                    order.reverse()
                if not spin_ms:  # the spinner needs the MLflow process's CPU first
                    order.remove("spin")
                    order.insert(order.index("mlflow") + 1, "spin")
                for condition in order:
                    proc = reader = None
                    if condition != "alone":
                        read_fd, write_fd = os.pipe()
                        proc = subprocess.Popen(
                            [sys.executable, __file__, "--background", condition,
                             "--period", str(args.period), "--spin-ms", str(spin_ms),
                             "--uri", uri, "--fd", str(write_fd)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            pass_fds=(write_fd,))
                        started.append(proc)
                        os.close(write_fd)
                        reader = threading.Thread(target=_read_all, args=(read_fd,), daemon=True)
                        reader.start()
                        assert proc.stdout is not None
                        ready = proc.stdout.readline()  # not in an assert: python -O drops those
                        if ready != "ready\n":
                            raise RuntimeError(f"the {condition} process did not start: {ready!r}")
                        cpu_before = cpu_seconds({proc.pid})
                        wall_before = time.monotonic()
                    for kind, work in kinds.items():
                        results.setdefault((condition, kind), []).extend(
                            _time_units(work, overhead._WORK[kind], args.units))
                    if proc is not None:
                        periods = (time.monotonic() - wall_before) / args.period
                        cpu = (cpu_seconds({proc.pid}) - cpu_before) / periods * 1000
                        background_cpu[condition].append(cpu)
                        assert proc.stdin is not None
                        proc.stdin.close()
                        proc.wait(timeout=60)
                        proc.stdout.close()
                        assert reader is not None
                        reader.join(timeout=60)
                        if condition == "mlflow":
                            spin_ms = cpu
                print(f"round {round_ + 1}: " + ", ".join(
                    f"{c} {statistics.median(t[0] for t in results[c, 'numpy'][-args.units:]):.1f}"
                    for c in order) + " ms a numpy unit", file=sys.stderr, flush=True)
        finally:
            for child in started:  # an error mid-condition: no second process left behind
                if child.poll() is None:
                    child.kill()

    print(f"`OPENBLAS_NUM_THREADS={os.environ['OPENBLAS_NUM_THREADS']} python "
          f"benchmarks/interference.py --rounds {args.rounds} --units {args.units} "
          f"--period {args.period}`\n")
    print("| objective's work | condition | ms a unit, median | over alone (ms) "
          "| over alone, round by round (ms) | off the CPU over alone (ms, median) "
          "| other process's CPU (ms a period, median) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    labels = {"alone": "alone", "mlflow": "MLflow writing trial runs",
              "spin": "pure Python spinning", "woken": "a thread here woken twice a period"}
    for kind in kinds:
        alone = [t[0] for t in results["alone", kind]]
        alone_off = statistics.median(t[1] for t in results["alone", kind])
        for condition, label in labels.items():
            walls = [t[0] for t in results[condition, kind]]
            median = statistics.median(walls)
            off = statistics.median(t[1] for t in results[condition, kind]) - alone_off
            cpu = (f"{statistics.median(background_cpu[condition]):.1f}"
                   if background_cpu.get(condition) else "")
            by_round = ", ".join(
                f"{_round_median(walls, i, args.units) - _round_median(alone, i, args.units):+.1f}"
                for i in range(args.rounds))
            print(f"| {kind} | {label} | {median:.2f} | {median - statistics.median(alone):+.2f} "
                  f"| {by_round} | {off:+.2f} | {cpu} |")


def _round_median(timings: list[float], round_: int, units: int) -> float:
    return statistics.median(timings[round_ * units:(round_ + 1) * units])


def _read_all(fd: int) -> None:
    """As the writer process's reader thread: each message taken under a lock and
    announced to waiting threads, until the pipe's end."""
    from multiprocessing.connection import Connection

    pipe, cond, received = Connection(fd, writable=False), threading.Condition(), []
    while True:
        try:
            message = pipe.recv()
        except EOFError:
            return
        with cond:
            received.append(message)
            cond.notify_all()


if __name__ == "__main__":
    main()
