"""Small shared helpers: URI redaction, MLflow-safe keys and values, a quick process exit."""

from __future__ import annotations

import atexit
from collections.abc import Callable
import contextlib
import functools
import gc
import multiprocessing
import pickle
import re
import sys
import threading
import traceback
from typing import Any
from typing import ParamSpec
from typing import TypeVar

from mlflow.utils.validation import MAX_ENTITY_KEY_LENGTH
from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH
from mlflow.utils.validation import MAX_TAG_VAL_LENGTH

_INVALID_KEY_CHARS = re.compile(r"[^/\w.\- :]")


def redact_uri(uri: str | None) -> str | None:
    """Remove a password or token from a URI, keeping a database user name.

    >>> redact_uri("postgresql://bob:s3cret@db:5432/x")
    'postgresql://bob:***@db:5432/x'
    >>> redact_uri("https://s3cret@host/api?token=t0k&x=1")
    'https://***@host/api?token=***&x=1'
    """
    return None if uri is None else redact_secrets(uri)


# user:password@ (a password may hold a raw '/': SQLAlchemy's URL parser takes it so)
_USERINFO = re.compile(r"(\w[\w+.-]*://[^:/@\s'\"]*):[^@\s'\"]+@")
# a token alone before an HTTP host (for a database URL, that is the user name)
_HTTP_TOKEN = re.compile(r"(https?://)[^:/@\s'\"]+@", re.IGNORECASE)
# a secret in a query string (?password=..., &token=...), which SQLAlchemy passes on
_QUERY_SECRET = re.compile(r"([?&][\w.-]*(?:password|passwd|pwd|secret|token|key)[\w.-]*=)"
                           r"[^&#\s'\"]+", re.IGNORECASE)


def redact_secrets(text: object) -> str:
    """Remove passwords and tokens from every URI inside ``text`` (exception messages, logs).

    >>> redact_secrets("failed: http://u:pw@host:5000/api")
    'failed: http://u:***@host:5000/api'
    """
    text = _USERINFO.sub(r"\1:***@", str(text))
    text = _HTTP_TOKEN.sub(r"\1***@", text)
    return _QUERY_SECRET.sub(r"\1***", text)


def safe_key(key: str) -> str:
    """Map any string to a key MLflow accepts for params, metrics and tags.

    Characters MLflow rejects become ``_``, path tricks (leading ``/``, ``..``) are
    defused and the key is cut to MLflow's length limit. Deterministic, so the same
    Optuna name always lands under the same MLflow key.

    >>> safe_key("lr@layer[0]")
    'lr_layer_0_'
    """
    key = _INVALID_KEY_CHARS.sub("_", str(key))
    key = key.replace("..", "__").lstrip("/")
    while "//" in key:
        key = key.replace("//", "/")
    if not key or key in (".", "/"):
        key = "_"
    return key[:MAX_ENTITY_KEY_LENGTH]


def _cut(value: Any, limit: int) -> str:
    text = str(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def param_value(value: Any) -> str:
    return _cut(value, MAX_PARAM_VAL_LENGTH)


def tag_value(value: Any) -> str:
    return _cut(value, MAX_TAG_VAL_LENGTH)


def safe_mapping(items: dict[str, Any], to_value: Any) -> dict[str, str]:
    """Sanitise keys and values. On a key collision a name MLflow takes as it is keeps
    the key, and the others get ``-1``, ``-2``, ... in sorted order: a name maps the same
    way whatever order the names came in (Optuna's params come in suggest order).

    >>> safe_mapping({"lr@1": 1, "lr_1": 2}, str)
    {'lr_1-1': '1', 'lr_1': '2'}
    """
    safe = {raw_key: safe_key(raw_key) for raw_key in items}  # (once: per trial, per key)
    keys: dict[Any, str] = {}
    taken: set[str] = set()
    for raw_key in sorted(items, key=lambda k: (safe[k] != str(k), str(k))):
        key, n = safe[raw_key], 1
        while key in taken:
            suffix = f"-{n}"
            key = safe[raw_key][: MAX_ENTITY_KEY_LENGTH - len(suffix)] + suffix
            n += 1
        keys[raw_key] = key
        taken.add(key)
    return {keys[raw_key]: to_value(raw_value) for raw_key, raw_value in items.items()}


def scrub_exception(exc: BaseException) -> BaseException:
    """Mask passwords in ``exc`` and the exceptions chained to it, in place; returns it.

    MLflow puts the whole tracking URI, credentials included, into its exception
    messages ("API request to http://user:pw@host/... failed"): anything that lets such
    an exception out (re-raised, logged, or printed as a traceback) scrubs it first.

    >>> str(scrub_exception(RuntimeError("to http://u:pw@h/api failed")))
    'to http://u:***@h/api failed'
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        try:
            if any(isinstance(a, str) and redact_secrets(a) != a for a in current.args):
                current.args = tuple(redact_secrets(a) if isinstance(a, str) else a
                                     for a in current.args)
            message = getattr(current, "message", None)  # MlflowException keeps a copy
            if isinstance(message, str) and redact_secrets(message) != message:
                current.message = redact_secrets(message)  # type: ignore[attr-defined]
        except (AttributeError, TypeError):  # an exception type with read-only fields
            pass
        current = current.__cause__ or current.__context__
    return exc


def error_that_travels(exc: Exception) -> Exception:
    """``exc``, or a ``RuntimeError`` naming it, with its message and traceback, when
    ``exc`` does not survive pickling.

    An executor sends a task's error back pickled. A process pool whose result does not
    unpickle (an exception whose ``__init__`` takes other arguments than its ``args``)
    breaks: every task fails with "terminated abruptly" and the error is lost. One that
    pickle or cloudpickle (Dask's, submitit's) sends and takes back is kept as it is.

    >>> class TwoArgs(Exception):
    ...     def __init__(self, a, b):
    ...         super().__init__(f"{a} {b}")
    >>> str(error_that_travels(TwoArgs("too", "far"))).split(" (")[0]
    'a worker raised optuna_mlflow_nested._utils.TwoArgs: too far'
    >>> error_that_travels(ValueError("x")).args
    ('x',)
    """
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception as why:
        try:  # Dask and submitit send it with cloudpickle (classes of __main__ by value)
            import cloudpickle

            pickle.loads(cloudpickle.dumps(exc))
            return exc
        except Exception:
            pass
        kind = type(exc)
        shown = "".join(traceback.format_exception(exc))
        return RuntimeError(redact_secrets(
            f"a worker raised {kind.__module__}.{kind.__qualname__}: {exc} (which cannot be "
            f"sent back as it is: {type(why).__name__}: {why}); its traceback there:\n{shown}"))


_P = ParamSpec("_P")
_R = TypeVar("_R")


def masks_secrets(fn: Callable[_P, _R]) -> Callable[_P, _R]:
    """Decorate a function that talks to MLflow: what it raises has passwords masked."""

    @functools.wraps(fn)
    def masked(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        try:
            return fn(*args, **kwargs)
        except BaseException as exc:
            scrub_exception(exc)
            raise

    return masked


def prepare_quick_exit(*, collect_first: bool = False) -> None:
    """Close the SQLAlchemy engines' connections; leave the rest of the exit to the OS.

    For a process that exists for this project's work (the writer process, a submitit
    job): its interpreter's finalization would spend most of a second in full garbage
    collections over MLflow's, SQLAlchemy's and Optuna's objects. What it did that
    matters is done here first: each engine closes its connections, so that SQLite
    checkpoints and removes a WAL file. ``gc.freeze`` then keeps the objects still alive
    out of those last collections; objects freed by reference counting are finalized as
    before. With ``collect_first``, a collection runs before, so that garbage already
    unreachable (a user objective's) is finalized as the exit would have done; only
    objects still alive in reference cycles at the exit skip their finalizers, which
    Python does not promise to run then.
    """
    if collect_first:
        gc.collect()
    engines = sys.modules.get("sqlalchemy.engine")
    if engines is not None:
        for candidate in gc.get_objects():
            if issubclass(type(candidate), engines.Engine):  # no __class__ of a user's proxy
                with contextlib.suppress(Exception):  # closing is best effort
                    candidate.dispose()
    gc.freeze()


_quick_exit_registered = False


def quick_exit_if_submitit_job() -> None:
    """In a submitit job's process, end it quickly: :func:`prepare_quick_exit` at its exit.

    Only where this task is the job's own: its main thread, in the process submitit
    started (``python -m submitit.core._submit``, local or SLURM), which writes the
    task's result and then exits. Not in processes a job spawned, nor in a thread pool.
    """
    global _quick_exit_registered
    main = getattr(sys.modules.get("__main__"), "__spec__", None)
    if (_quick_exit_registered or getattr(main, "name", None) != "submitit.core._submit"
            or multiprocessing.parent_process() is not None
            or threading.current_thread() is not threading.main_thread()):
        return
    _quick_exit_registered = True
    atexit.register(_flush_then_prepare_quick_exit)


def _flush_then_prepare_quick_exit() -> None:
    # Registered after the trackers' own exit flush, so it runs before it (LIFO):
    # flush first, so that nothing is written through the engines after they close.
    from optuna_mlflow_nested.tracking.tracker import _flush_at_exit

    _flush_at_exit()
    prepare_quick_exit(collect_first=True)
