"""The writer process's own side: what runs in the child that
:class:`~optuna_mlflow_nested.tracking.writer_process.WriterProcess` starts.

It reads the parent's messages from a pipe (``open``, ``record``, ``took``, ``made``, ``flush``,
``close``, ``figures``, ``prepare``) and answers on another (``ready``,
``run``, ``reply``, ``lag``, ``health``, ``warn``). Each session (one ``optimize``) has
the same :class:`~optuna_mlflow_nested.tracking.writer.Writer` and
:class:`~optuna_mlflow_nested.tracking.run_pool.RunPool` as the in-process path. When
the parent is gone (the pipe ends), it delivers what it has, then exits.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
import contextlib
import logging
from multiprocessing.connection import Connection
import os
import sys
import threading
import time
from typing import Any
import warnings

from optuna_mlflow_nested.tracking.records import RunRecord


def _serve(receive: Connection, reply: Connection) -> None:
    from optuna_mlflow_nested._utils import redact_secrets
    from optuna_mlflow_nested.tracking.clients import get_client
    from optuna_mlflow_nested.tracking.delivery import RetryPolicy
    from optuna_mlflow_nested.tracking.run_pool import RunPool
    from optuna_mlflow_nested.tracking.spool import Spool
    from optuna_mlflow_nested.tracking.writer import Writer

    reply_lock = threading.Lock()

    def send(kind: str, key: str, payload: Any) -> None:
        # The parent may be gone (killed right after its last hand-off, even before this
        # process was up): what it sent is still delivered, so nothing here may fail.
        with reply_lock, contextlib.suppress(OSError):
            reply.send((kind, key, payload))

    class Session:
        def __init__(self, sid: str, options: dict[str, Any]) -> None:
            client = get_client(options["tracking_uri"])
            self.writer = Writer(client, options["threads"], Spool(options["spool_path"]),
                                 RetryPolicy(deadline=options["retry_deadline"]))
            self.pool = RunPool(client, options["experiment_id"], options["parent_run_id"],
                                # one of the spare runs waits in the parent: as many
                                # made ahead in all as with writer threads
                                options["study_name"], spare=max(1, options["spare"] - 1),
                                threads=options["threads"], tags=options["pool_tags"],
                                limit=options.get("limit"), start=False,  # see _serve's loop
                                # the parent knows every run made: if this process dies,
                                # it deletes those no trial took
                                on_made=lambda run: send("spare", sid, run.info.run_id))
            self.opened = time.monotonic()
            self.client = client
            self.credit = threading.Semaphore(1)
            self.closed = threading.Event()
            # Runs pushed to the parent, and those it took: at close, every pushed run it
            # did not take is deleted, also one pushed while its close was on the way.
            self.push_lock = threading.Lock()
            self.pushed: set[str] = set()
            self.taken: set[str] = set()
            self.sid = sid
            self.lag_reported = False
            self.healthy = True
            self.deadline = float(options["retry_deadline"]) + 30
            threading.Thread(target=self.push_runs, name=f"omn-session-{sid[:8]}",
                             daemon=True).start()

        def push_runs(self) -> None:
            while True:
                if not self.credit.acquire(timeout=0.5):
                    if self.closed.is_set():
                        return
                    continue
                with self.push_lock:
                    run = None
                    while run is None and not self.closed.is_set() and not self.pool.exhausted:
                        run = self.pool.take(1.0)  # returns at once when the pool closes
                        self.report_health(run is not None or self.pool.healthy)
                    if run is None:
                        return
                    self.pushed.add(run.info.run_id)  # deleted at close unless taken
                    if self.closed.is_set():
                        return
                    send("run", self.sid, run)

        def report_health(self, healthy: bool) -> None:
            """Tell the parent when the store stops or starts taking new runs: while it
            is away, trials do not wait for a run (see ``WriterProcess.take_run``)."""
            if healthy != self.healthy:
                self.healthy = healthy
                send("health", self.sid, healthy)

        def pool_delete(self, run_ids: list[str]) -> None:
            from optuna_mlflow_nested.tracking.clients import discard_runs

            discard_runs(self.client, run_ids)

        def close(self, given_back: list[str], timeout: float) -> tuple[bool, list[RunRecord]]:
            self.closed.set()
            self.pool.close()
            with self.push_lock:  # no push is under way past this point
                leftovers = (self.pushed - self.taken) | set(given_back)
            self.pool_delete(sorted(leftovers))
            drained = self.writer.close(timeout=timeout)
            return drained, list(self.writer.unsaved)

    newest: dict[str, str] = {}  # parent run -> its latest figures request
    newest_lock = threading.Lock()

    def draw_figures(token: str, tracking_uri: str, run_id: str, snapshot: dict[str, Any]) -> None:
        from optuna_mlflow_nested.tracking.figures import log_figures
        from optuna_mlflow_nested.tracking.figures import study_from_snapshot

        with newest_lock:
            if newest.get(run_id) != token:  # a later optimize of the study asked since
                send("reply", token, True)  # (a loop of short searches): its figures replace these
                return
        done = False
        try:
            # A store removed after optimize returned (a temporary folder) is not made
            # again; MLflow would first retry for a minute and a half.
            log_figures(get_client(tracking_uri, create=False), run_id,
                        study_from_snapshot(snapshot))
            done = True
        except FileNotFoundError as exc:
            logging.getLogger(__name__).debug("no figures: %s", exc)
            done = True
        except Exception as exc:  # the parent draws them itself then
            logging.getLogger(__name__).warning("could not draw the figures here: %s",
                                                redact_secrets(exc))
        finally:
            with newest_lock:
                if newest.get(run_id) == token:
                    del newest[run_id]
            send("reply", token, done)

    show = warnings.showwarning

    def forward(message: Any, category: type[Warning], filename: str, *rest: Any,
                **kwargs: Any) -> None:
        if os.sep + "optuna_mlflow_nested" + os.sep in filename:  # ours: the spool's
            send("warn", "", (category.__name__, str(message)))
        else:
            show(message, category, filename, *rest, **kwargs)

    warnings.showwarning = forward  # the user sees them in their own process (repeat_warnings)
    sessions: dict[str, Session] = {}
    drawing = ThreadPoolExecutor(max_workers=1, thread_name_prefix="omn-session-figures")
    send("ready", "", None)
    unstarted: list[Session] = []
    while True:
        if unstarted and (not receive.poll(0) or time.monotonic() - unstarted[0].opened > 0.5):
            # A session's pool starts once the messages sent while it opened the store
            # are read: the parent's "made" among them lower its budget first (else it
            # makes runs the parent already made, deleted at close).
            for opened in unstarted:
                opened.pool.start()
            unstarted.clear()
        try:
            message = receive.recv()
        except (EOFError, OSError):
            break  # the parent is gone or done: deliver what we have, then exit
        kind, key = message[0], message[1]
        if kind == "record":
            session = sessions.get(key)
            if session is not None:
                session.writer.put(message[2])
                if not session.lag_reported:
                    lag = session.writer.lag()
                    if lag is not None:
                        session.lag_reported = True
                        send("lag", key, lag)
        elif kind == "open":
            sessions[key] = Session(key, message[2])
            unstarted.append(sessions[key])
        elif kind == "prepare":  # a study was made: its optimize is likely to come
            with contextlib.suppress(Exception):  # the session says what is wrong, if it must
                get_client(message[2], create=False)  # (removed since: not made again)
        elif kind == "figures":  # one at a time, in the order asked: a later search's
            with newest_lock:  # figures are never overwritten by older ones
                newest[message[3]] = key
            drawing.submit(draw_figures, key, *message[2:5])
        elif kind == "made":  # the parent made a run itself (this process was starting)
            if key in sessions:
                sessions[key].pool.lower_limit(1)
        elif kind == "took":
            if key in sessions:
                sessions[key].taken.add(message[2])
                sessions[key].credit.release()
        elif kind == "flush":
            token, sid = key, message[2]
            drained = sessions[sid].writer.flush() if sid in sessions else True
            send("reply", token, drained)
        elif kind == "close":
            token, sid, given_back = key, message[2], message[3]
            session = sessions.pop(sid, None)
            if session in unstarted:  # closed before its pool started: it makes no run
                unstarted.remove(session)
            outcome = session.close(given_back, session.deadline) if session else (True, [])
            send("reply", token, outcome)
    for session in sessions.values():
        session.close([], 120.0)
    drawing.shutdown(wait=True)  # figures a parent that has gone asked for still land


def main(argv: list[str]) -> None:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the figures' in-memory studies
    # Every store call of this process is retried, or is best-effort cleanup that may
    # fail (see _compat.quiet_retried_store_errors).
    threading.current_thread().name = "omn-session-main"
    # This process only makes this project's writes, which retry with their own backoff
    # and spool: MLflow's own retries of a dead server (minutes per call) stay short,
    # urllib3's retry warnings quiet, 'View run' links (with credentials) unprinted, as
    # in the parent while it optimizes (clients.short_http_retries), unless the user
    # set them.
    from optuna_mlflow_nested._utils import prepare_quick_exit
    from optuna_mlflow_nested.tracking.clients import SHORT_HTTP_RETRIES

    for key, value in {**SHORT_HTTP_RETRIES, "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true"}.items():
        os.environ.setdefault(key, value)
    logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)
    receive = Connection(int(argv[0]), writable=False)
    reply = Connection(int(argv[1]), readable=False)
    _serve(receive, reply)
    prepare_quick_exit()  # everything is delivered, and the user's process waits for this exit


if __name__ == "__main__":
    main(sys.argv[1:])
