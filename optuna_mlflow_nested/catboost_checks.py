"""Checks :func:`~optuna_mlflow_nested.tune_catboost` and the CLI run before anything is
written: arguments, data, and whether a resumed study's trials stay comparable."""

from __future__ import annotations

import importlib.util
import math
import numbers
from typing import Any

import optuna

from optuna_mlflow_nested import datasets
from optuna_mlflow_nested.samplers import SAMPLER_NAMES

__all__ = ["DATA_ATTR", "MAX_EXPERIMENT_NAME_LENGTH", "MAX_SEED", "MAX_STUDY_NAME_LENGTH",
           "SCORED", "check_arguments", "check_data", "check_resume", "checked_input", "data_fingerprint"]

#: What the trials were scored on: data digest, target name, seed, tree count (see
#: check_resume).
DATA_ATTR = "omn.data"
#: The study name is also the parent run's name: MLflow's ``runs.name`` column holds 250
#: characters (Optuna's ``studies.study_name`` 512); by default it names the experiment too.
MAX_STUDY_NAME_LENGTH = 250
#: MLflow's ``experiments.name`` column holds 256 characters (its API alone allows 500).
MAX_EXPERIMENT_NAME_LENGTH = 256
MAX_SEED = 2**32 - 2  # numpy's and so the samplers' limit, less one: the split takes seed + 1
_CLI_NAMES = {"study_name": "--study-name", "experiment_name": "--experiment",
              "timeout": "--timeout", "seed": "--seed", "sampler": "--sampler",
              "registered_model_name": "--register"}


def _stored_attrs(storage: Any, study_name: str | None) -> dict[str, Any]:
    if storage is None or study_name is None:
        return {}
    from optuna_mlflow_nested._study_setup import open_storage

    try:
        store = open_storage(storage)  # a storage that cannot be used: ValueError, no password
        return dict(store.get_study_user_attrs(store.get_study_id_from_name(study_name)))
    except KeyError:
        return {}


#: Trials scored with the study's tree count: a search stopped before its first may go
#: on with another count (check_resume), which is then the study's.
SCORED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)


def _has_scored_trials(storage: Any, study_name: str | None) -> bool:
    from optuna_mlflow_nested._study_setup import open_storage

    if study_name is None:
        return False
    store = open_storage(storage)
    return bool(store.get_all_trials(store.get_study_id_from_name(study_name), deepcopy=False,
                                     states=SCORED))


def check_arguments(*, timeout: Any, seed: Any, study_name: Any, experiment_name: Any,
                    sampler: Any = None, registered_model_name: Any = None,
                    cli: bool = False) -> None:
    """ValueError naming the argument (its command-line flag with ``cli``), before any write."""
    def name(arg: str) -> str:
        return _CLI_NAMES[arg] if cli else arg

    model = registered_model_name  # MLflow refuses it only after the search and the finish
    if model is not None and (not isinstance(model, str) or not model.strip()
                              or "/" in model or ":" in model):
        raise ValueError(f"{name('registered_model_name')} must be a non-empty model name "
                         f"without '/' or ':' (MLflow's rule), got {model!r}")

    if isinstance(sampler, str) and sampler.lower() not in SAMPLER_NAMES:
        raise ValueError(f"{name('sampler')} must be one of {', '.join(SAMPLER_NAMES)}"
                         f"{'' if cli else ' or an Optuna sampler'}, got {sampler!r}")

    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, numbers.Real)
                                or math.isnan(timeout) or timeout <= 0):
        raise ValueError(f"{name('timeout')} must be a positive number of seconds"
                         f"{'' if cli else ' or None'}, got {timeout!r}")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= int(seed) <= MAX_SEED:
        raise ValueError(f"{name('seed')} must be an integer from 0 to {MAX_SEED}, got {seed!r}")
    for arg, value, limit in (("study_name", study_name, MAX_STUDY_NAME_LENGTH),
                              ("experiment_name", experiment_name, MAX_EXPERIMENT_NAME_LENGTH)):
        if value is None:
            continue
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"{name(arg)} must be a non-empty string, got {value!r}")
        if len(value) > limit:
            raise ValueError(f"{name(arg)} is {len(value)} characters long; at most {limit} "
                             "fit MLflow's and Optuna's databases")


def check_data(X_train: Any, y_train: Any, X_val: Any, y_val: Any, X_test: Any, y_test: Any) -> None:
    """ValueError naming the argument (and column) for data CatBoost cannot learn from."""
    if (X_test is None) != (y_test is None):
        raise ValueError("give both X_test and y_test, or neither")
    parts = [("X_train", X_train, "y_train", y_train), ("X_val", X_val, "y_val", y_val)]
    if X_test is not None:
        parts.append(("X_test", X_test, "y_test", y_test))
    for x_name, X, y_name, y in parts:
        rows = datasets.n_rows(X)
        if rows != len(y):
            raise ValueError(f"{x_name} and {y_name} have different lengths: {rows} and {len(y)}")
        if rows == 0:
            raise ValueError(f"{x_name} is empty")
        datasets.check_features(X, x_name)
        datasets.check_target(y, y_name)
    datasets.check_not_constant(y_train, "y_train")


def data_fingerprint(X_train: Any, y_train: Any, X_val: Any, y_val: Any, *, seed: int,
                     source: str | None = None, tuning_iterations: int | None = None,
                     ) -> dict[str, Any]:
    """What makes trials comparable: the data they fit and score on, its target, the seed
    and the fixed tree count of their fits (more trees score lower)."""
    target = getattr(y_train, "name", None)
    return {"digest": datasets.digest(X_train, y_train, X_val, y_val), "seed": int(seed),
            "target": None if target is None else str(target), "source": source,
            "tuning_iterations": None if tuning_iterations is None else int(tuning_iterations)}


def check_resume(storage: Any, study_name: str | None, fingerprint: dict[str, Any],
                 *, cli: bool = False) -> None:
    """Refuse to add trials on other data, another target, another seed or another tree
    count to a study. The tree count only once a trial was scored with it; a study made
    before the count was kept is not checked for it."""
    stored = _stored_attrs(storage, study_name).get(DATA_ATTR)
    if not stored:
        return
    new = fingerprint
    trees = stored.get("tuning_iterations"), new.get("tuning_iterations")
    if stored.get("seed") != new["seed"]:
        what, old_text, new_text = "seed", f"seed={stored.get('seed')}", f"seed={new['seed']}"
        if cli:
            what, old_text, new_text = "--seed", f"--seed {stored.get('seed')}", f"{new['seed']}"
    elif stored.get("target") != new["target"] and stored.get("source") == new["source"]:
        what = "--target" if cli else "target"  # y_train's name from Python
        old_text, new_text = f"{what} {stored.get('target')!r}", repr(new["target"])
    elif stored.get("digest") != new["digest"]:
        what = "--data" if cli else "data"

        def data(fp: dict[str, Any]) -> str:
            source = f"{fp['source']} " if fp.get("source") else ""
            return f"{source}(digest {fp.get('digest')})"

        old_text, new_text = f"{what} {data(stored)}", data(new)
    elif None not in trees and trees[0] != trees[1] and _has_scored_trials(storage, study_name):
        what, old_text, new_text = "tuning_iterations", *(f"tuning_iterations={n}" for n in trees)
        if cli:
            what, old_text, new_text = "--tuning-iterations", f"--tuning-iterations {trees[0]}", \
                str(trees[1])
    else:
        return
    raise ValueError(f"cannot resume study {study_name!r}: it was tuned with {old_text}, not "
                     f"{new_text}; its trials would not be comparable (use the same {what} or "
                     f"another {'--study-name' if cli else 'study_name'})")


def checked_input(args: Any) -> tuple[tuple, dict[str, Any]]:
    """The CLI's ``tune`` and ``worker``: every check that needs no store, then the resume
    check (it reads the study); returns the split and its fingerprint."""
    for name in ("trials", "tuning_iterations", "max_iterations", "early_stopping_rounds"):
        value = getattr(args, name, None)
        if value is not None and value <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {value}")
    check_arguments(timeout=args.timeout, seed=args.seed, study_name=args.study_name,
                    experiment_name=args.experiment, sampler=args.sampler,
                    registered_model_name=getattr(args, "register", None), cli=True)
    if getattr(args, "threads", None) is not None and args.threads < 1:
        raise ValueError(f"--threads must be at least 1, got {args.threads}")
    if args.sampler == "gp" and importlib.util.find_spec("torch") is None:
        raise ValueError("--sampler gp needs PyTorch: pip install torch")
    X, y = datasets.load(args.data, args.target, seed=args.seed)
    split = datasets.train_val_test_split(X, y, seed=args.seed)
    X_tr, X_va, X_te, y_tr, y_va, y_te = split
    check_data(X_tr, y_tr, X_va, y_va, X_te, y_te)
    fingerprint = data_fingerprint(X_tr, y_tr, X_va, y_va, seed=args.seed, source=args.data,
                                   tuning_iterations=args.tuning_iterations)
    check_resume(args.storage, args.study_name, fingerprint, cli=True)
    return split, fingerprint
