"""The Optuna study behind a sweep: its storage, which trials count, its sampler and pruner, and its identity.

Storage is SQLite in the sweep directory by default, or any SQLAlchemy URL (``postgresql://``)
so that workers on several machines share one study. Every worker beats a heartbeat into the
storage (Optuna's ``heartbeat_interval``); a worker that dies (kill -9, power loss) leaves a
RUNNING trial whose heartbeat stops, and the next worker to look -- a live one, or the next
``sweep run`` -- marks it FAIL and queues its parameters again (:func:`requeue`).

The budget counts COMPLETE and PRUNED trials and trials that FAILed from their own error (a
diverged loss, a combination of values the model rejects): each of those is a result that
cost compute. Trials failed by a dead or interrupted worker and trials turned away by the
budget gate (:mod:`.objective`) do not count; they are re-run.

A study is continued only with the same sweep and the same base config (:func:`check_same_sweep`):
its trials would otherwise mix budgets, and ``best`` / ``narrow`` rebuild every trial's config
from the stored base.
"""

from __future__ import annotations

import contextlib
import copy
import json
import re
import sqlite3
import warnings
from pathlib import Path
from typing import Any

from ..errors import CifarlabError, ConfigError
from .spec import SweepSpec

DEFAULT_HEARTBEAT = 10  # seconds between heartbeats; a trial is stale after GRACE_FACTOR of them
GRACE_FACTOR = 3  # SQLite writers can wait a few seconds for the lock: leave room before calling a trial dead
MAX_RETRY = 3  # re-runs of a trial whose worker died, before its parameters are given up (they may crash it)


# --------------------------------------------------------------------------- states
def counted(t) -> bool:
    """Does a trial use up a place of the budget? (see the module docstring)"""
    from optuna.trial import TrialState

    return t.state in (TrialState.COMPLETE, TrialState.PRUNED) or (
        t.state == TrialState.FAIL and "error" in t.user_attrs)


def active(t) -> bool:
    from optuna.trial import TrialState

    return t.state == TrialState.RUNNING and "skipped" not in t.user_attrs


# --------------------------------------------------------------------------- storage
def default_storage(sweep_dir: Path) -> str:
    return f"sqlite:///{(sweep_dir / 'study.db').resolve()}"


def open_storage(url: str, heartbeat: int | None = None):
    """An Optuna ``RDBStorage`` for ``url``, with heartbeats (and re-queueing of dead workers' trials)."""
    import optuna
    import sqlalchemy.exc

    url = _with_driver(url)
    engine_kwargs: dict[str, Any] = {}
    if url.startswith("sqlite:///"):
        path = Path(url[len("sqlite:///"):])
        path.parent.mkdir(parents=True, exist_ok=True)
        # WAL lets readers proceed while one worker writes; the timeout makes writers queue instead of failing.
        with contextlib.closing(sqlite3.connect(path, timeout=60)) as con:
            con.execute("PRAGMA journal_mode=WAL")
        engine_kwargs["connect_args"] = {"timeout": 60}
    else:
        engine_kwargs["pool_pre_ping"] = True  # a server may drop idle connections during a long trial
    kwargs: dict[str, Any] = {}
    if heartbeat:
        import inspect

        cb_arg = ("heartbeat_stale_trial_callback" if "heartbeat_stale_trial_callback"
                  in inspect.signature(optuna.storages.RDBStorage).parameters else "failed_trial_callback")
        kwargs = {"heartbeat_interval": int(heartbeat), "grace_period": GRACE_FACTOR * int(heartbeat),
                  cb_arg: requeue}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # heartbeat_interval is marked experimental
            return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, **kwargs)
    except ImportError:  # Optuna turns the driver's ModuleNotFoundError into an ImportError
        raise CifarlabError(f"storage {redact(url)} needs its database driver: pip install 'cifarlab[postgres]' "
                            f"for PostgreSQL (psycopg2), or the driver your URL names") from None
    except (sqlalchemy.exc.SQLAlchemyError, optuna.exceptions.StorageInternalError) as e:
        raise CifarlabError(f"cannot open storage {redact(url)}: {str(e).strip().splitlines()[0]}") from None


def _with_driver(url: str) -> str:
    """``postgresql://`` with the installed driver: SQLAlchemy 2.1 defaults to psycopg 3, 2.0 to psycopg2,
    and the ``postgres`` extra installs psycopg2."""
    if not url.startswith("postgresql://"):
        return url
    import importlib.util

    for module, dialect in (("psycopg2", "postgresql+psycopg2"), ("psycopg", "postgresql+psycopg")):
        if importlib.util.find_spec(module) is not None:
            return dialect + url[len("postgresql"):]
    return url


def redact(url: str) -> str:
    """The URL with its password hidden, for messages."""
    return re.sub(r"://([^:/@]+):[^@]*@", r"://\1:***@", url)


def requeue(study, trial) -> None:
    """Queue a failed trial's parameters again, as a fresh trial (history and pruner rungs cleared).

    Optuna's ``RetryHeartbeatStaleTrialCallback`` copies every system attribute, including the
    ``completed_rung_*`` marks of the successive-halving pruner, which would make the retry skip
    rungs; only the grid point and the retry chain are kept here.
    """
    import optuna

    retry_cls = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None) or \
        optuna.storages.RetryFailedTrialCallback
    t = copy.deepcopy(trial)
    keep = ("grid_id", "search_space", "failed_trial", "retry_history")
    t.system_attrs = {k: v for k, v in t.system_attrs.items() if k in keep}
    t.user_attrs = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        retry_cls(max_retry=MAX_RETRY)(study, t)


# --------------------------------------------------------------------------- sampler and pruner
def make_sampler(spec: SweepSpec, seed: int | None):
    import optuna

    if spec.method == "grid":
        # GridSampler shuffles its grid with its seed and stores only the grid index in each trial: every
        # worker, on every machine and every rerun, must shuffle alike or indices name different points.
        return optuna.samplers.GridSampler({p.name: p.grid() for p in spec.params}, seed=0)
    if spec.method == "bayes":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # W&B's bayes is a Gaussian process; TPE is Optuna's default Bayesian sampler. The constant
            # liar keeps parallel workers from proposing the same point while the first one runs.
            return optuna.samplers.TPESampler(seed=seed, constant_liar=True)
    return optuna.samplers.RandomSampler(seed=seed)


def make_pruner(spec: SweepSpec, base: dict[str, Any]):
    import optuna

    hb = spec.hyperband
    if hb is None:
        return optuna.pruners.NopPruner()
    if hb.max_resource is not None:
        max_resource: int | str = hb.max_resource
    elif "train.epochs" in {p.name for p in spec.params} or spec.trial_config(base, {}).train.time_budget:
        max_resource = "auto"  # Optuna takes the longest trial it has seen (a time budget plans each one's epochs)
    else:
        max_resource = spec.trial_config(base, {}).train.epochs
        if max_resource < hb.min_resource:
            raise ConfigError(f"early_terminate min_iter={hb.min_resource} is beyond train.epochs={max_resource}: "
                              f"no trial would reach the first bracket")
    return optuna.pruners.HyperbandPruner(min_resource=hb.min_resource, max_resource=max_resource,
                                          reduction_factor=hb.reduction_factor)


# --------------------------------------------------------------------------- identity
# Base-config keys that say where a trial runs, not what it trains: they may differ between the machines and
# reruns of one study (each machine's --data names its own copy of the data set).
WHERE_KEYS = frozenset({"data.path", "train.device", "train.num_threads", "train.log_every"})


def check_same_sweep(stored: dict | None, current: dict, name: str) -> None:
    """Refuse to continue a study with another sweep or another base config: its trials would mix budgets,
    and ``best`` / ``narrow`` rebuild every trial's config from the stored base."""
    if stored is None:
        return
    keys = ("method", "metric", "parameters", "early_terminate")
    a = json.loads(json.dumps({k: stored.get(k) for k in keys}))
    b = json.loads(json.dumps({k: current.get(k) for k in keys}))
    if a != b:
        diff = [k for k in keys if a[k] != b[k]]
        raise ConfigError(f"study {name!r} exists with a different sweep ({', '.join(diff)} differ); "
                          f"give this sweep another --study name, or pass --new-study")
    diff = base_difference((stored.get("cifarlab") or {}).get("config"), (current.get("cifarlab") or {}).get("config"))
    if diff:
        shown = "; ".join(diff[:6]) + (f"; and {len(diff) - 6} more" if len(diff) > 6 else "")
        raise ConfigError(f"study {name!r} was run with another base config ({shown}): continue it with the "
                          f"same --config, --set, --epochs and --time, or start a new study with --study NAME or "
                          f"--new-study")


def base_difference(stored: dict | None, current: dict | None) -> list[str]:
    """``key: stored -> current`` for every base-config key that differs (WHERE_KEYS aside)."""
    if stored is None or current is None:
        return []
    a, b = _flat(_normalized(stored)), _flat(_normalized(current))
    return [f"{k}: {a.get(k, '(unset)')} -> {b.get(k, '(unset)')}" for k in sorted(set(a) | set(b))
            if k not in WHERE_KEYS and a.get(k) != b.get(k)]


def _normalized(config: dict) -> dict[str, Any]:
    """The config with today's defaults filled in and renamed keys mapped, so that a study stored by an older
    cifarlab compares equal to the same base today."""
    from ..config import RunConfig

    try:
        return json.loads(json.dumps(RunConfig.from_dict(copy.deepcopy(config)).to_dict()))
    except CifarlabError:  # a key this version no longer has: compare as stored
        return json.loads(json.dumps(config))


def _flat(config: dict) -> dict[str, Any]:
    return {f"{s}.{k}": v for s, values in config.items() if isinstance(values, dict) for k, v in values.items()}


def free_study_name(name: str, sweep: dict, out: str | Path, storage: str | None) -> str:
    """``name`` if no study of that name exists or it holds this very sweep and base, else the first free
    ``name-2``, ``name-3``, ... (``--new-study``)."""
    import optuna

    for i in range(1, 1000):
        candidate = name if i == 1 else f"{name}-{i}"
        sweep_dir = Path(out) / candidate
        url = storage or default_storage(sweep_dir)
        if storage is None and not (sweep_dir / "study.db").is_file():
            if not (sweep_dir / "trials").is_dir():
                return candidate
            continue
        store = open_storage(url)
        if candidate not in {s.study_name for s in optuna.get_all_study_summaries(store, include_best_trial=False)}:
            return candidate
        try:
            check_same_sweep(optuna.load_study(study_name=candidate, storage=store).user_attrs.get("sweep"),
                             sweep, candidate)
            return candidate
        except ConfigError:
            continue
    raise CifarlabError(f"no free study name {name}-N found")
