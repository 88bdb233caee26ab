"""Sweep files in W&B's sweep format, mapped onto Optuna's distributions, samplers and pruner.

The format is W&B's ("Sweep configuration options", docs.wandb.ai/guides/sweeps/sweep-config-keys,
and the reference parser ``wandb/sweeps`` ``params.py``): ``method``, ``metric``, ``parameters``,
``early_terminate``, ``run_cap``. ``program``, ``command`` and the other keys that only tell W&B's
agent how to launch a script are accepted and ignored: here every trial is a ``cifarlab.train.fit``.

One key is cifarlab's own, ignored by W&B, so a file stays valid for both::

    cifarlab:
      config: ../cnn.yaml          # base run config: a path (relative to this file) or an inline mapping
      set: {train.epochs: 4}       # overrides of the base (a mapping or a list of "key=value")
      map: {learning_rate: optim.lr}  # names of a foreign sweep file -> config keys
      time: 2h                     # total wall-clock budget, shared out over the trials (sweep/shares.py)

Parameter names address the run config as ``section.key`` (``optim.lr``, ``model.embed_dim``);
W&B's nested form (``model: {parameters: {embed_dim: ...}}``) means the same. A bare name
(``lr``) is resolved through ``cifarlab.map``, a two-entry alias table (``learning_rate``,
``optimizer``), or the one config key of that name. Every name and every bound is checked
against the config before a trial starts.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..config import SECTIONS, RunConfig, fit_schedule_to_epochs, override_keys
from ..errors import ConfigError

# W&B keys that describe how W&B launches or files a run: accepted, ignored.
IGNORED_KEYS = {"program", "command", "entity", "project", "description", "controller", "job", "image_uri"}
TOP_KEYS = {"name", "method", "metric", "parameters", "early_terminate", "run_cap", "cifarlab"} | IGNORED_KEYS
EXTENSION_KEYS = {"config", "set", "map", "time"}
METHODS = ("random", "grid", "bayes")

# W&B distributions Optuna cannot sample (it draws from bounded ranges and finite sets only).
UNSUPPORTED = {
    "normal": "an unbounded normal distribution",
    "q_normal": "an unbounded normal distribution",
    "log_normal": "an unbounded log-normal distribution",
    "q_log_normal": "an unbounded log-normal distribution",
    "beta": "a beta distribution",
    "q_beta": "a beta distribution",
    "categorical_w_probabilities": "weighted categories",
}
SUPPORTED = ("constant", "categorical", "int_uniform", "uniform", "q_uniform", "log_uniform", "log_uniform_values",
             "inv_log_uniform", "inv_log_uniform_values", "q_log_uniform", "q_log_uniform_values")

# Metric names: cifarlab's own (the columns of metrics.csv) and common W&B spellings of them.
METRICS = {"val_acc": "val_acc", "val_loss": "val_loss", "train_acc": "train_acc", "train_loss": "train_loss",
           "val_accuracy": "val_acc", "val/acc": "val_acc", "val/accuracy": "val_acc", "validation_accuracy": "val_acc",
           "val/loss": "val_loss", "validation_loss": "val_loss", "valid_loss": "val_loss",
           "train/acc": "train_acc", "train/accuracy": "train_acc", "train/loss": "train_loss"}
ALIASES = {"learning_rate": "optim.lr", "optimizer": "optim.name"}


@dataclass
class Param:
    """One searched hyperparameter, in Optuna's terms."""

    name: str  # the config key, section.key
    kind: str  # categorical | int | float
    dist: str  # the W&B distribution it came from (messages, ``narrow``)
    low: float | int | None = None
    high: float | int | None = None
    step: float | int | None = None
    log: bool = False
    choices: list[Any] = field(default_factory=list)

    # Optuna stores categorical choices as None/bool/int/float/str; other values (the CNN's
    # width lists) travel as their YAML text and are decoded when the trial's config is built.
    def encoded_choices(self) -> list[Any]:
        return [_encode(c) for c in self.choices]

    def decode(self, stored: Any) -> Any:
        if self.kind != "categorical":
            return stored
        for c in self.choices:
            if _encode(c) == stored:
                return copy.deepcopy(c)
        raise ConfigError(f"value {stored!r} of sweep parameter {self.name} is not one of its values {self.choices}")

    def suggest(self, trial) -> Any:
        """Draw this parameter for an Optuna trial; returns the value for the config."""
        if self.kind == "categorical":
            return self.decode(trial.suggest_categorical(self.name, self.encoded_choices()))
        if self.kind == "int":
            return trial.suggest_int(self.name, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        return trial.suggest_float(self.name, float(self.low), float(self.high), step=self.step, log=self.log)

    def grid(self) -> list[Any]:
        """Every value of a finite parameter (grid search); refuses continuous ones."""
        if self.kind == "categorical":
            return self.encoded_choices()
        if self.kind == "int" and not self.log:
            return list(range(int(self.low), int(self.high) + 1, int(self.step or 1)))
        if self.kind == "int" and self.log:
            return list(range(int(self.low), int(self.high) + 1))
        if self.step:
            n = int(round((self.high - self.low) / self.step))
            return [_round(self.low + i * self.step) for i in range(n + 1)]
        raise ConfigError(f"method: grid needs finite parameters, but {self.name} has the continuous distribution "
                          f"{self.dist}; give it values: [...], int_uniform or q_uniform")

    def probes(self) -> list[Any]:
        """Values checked against the config before any trial: every choice, both bounds, and for a float
        range an inner point that is not a round number (so an integer key given a float range fails)."""
        if self.kind == "categorical":
            return list(self.choices)
        if self.kind == "int":
            return [int(self.low), int(self.high)]
        return [float(self.low), float(self.high), float(self.low + (self.high - self.low) * 0.381966)]


@dataclass
class Hyperband:
    """W&B's ``early_terminate: {type: hyperband}`` as Optuna ``HyperbandPruner`` arguments."""

    min_resource: int
    max_resource: int | None  # None: the trial's train.epochs (Optuna's "auto" when epochs are searched)
    reduction_factor: int


@dataclass
class SweepSpec:
    name: str | None
    method: str
    metric: str  # a metrics.csv column
    goal: str  # minimize | maximize
    target: float | None
    params: list[Param]
    constants: dict[str, Any]
    hyperband: Hyperband | None
    run_cap: int | None
    raw: dict[str, Any]  # the file as parsed, with the base config inline and names resolved (stored in the study)

    @property
    def direction(self) -> str:
        return self.goal

    def grid_size(self) -> int:
        return math.prod(len(p.grid()) for p in self.params) if self.params else 1

    def trial_config(self, base: dict[str, Any], values: dict[str, Any]) -> RunConfig:
        """The validated run config of one trial: the base, the constants, then the drawn values."""
        cfg = RunConfig.from_dict(copy.deepcopy(base))
        base_epochs = cfg.train.epochs
        for key, value in {**self.constants, **values}.items():
            cfg.set(key, value)
        cfg.set("train.val_every", 1)  # the pruner needs the metric after every epoch
        # A searched train.epochs keeps an absolute warm-up at the base's share of the run (silently: per trial).
        fit_schedule_to_epochs(cfg, base_epochs, set(self.constants) | set(values), say=lambda message: None)
        return cfg.validate()


# --------------------------------------------------------------------------- loading
def load_sweep_file(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"sweep file not found: {p}")
    try:
        raw = yaml.safe_load(p.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"sweep file {p} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"sweep file {p} must be a mapping with method, metric and parameters")
    return raw


def base_config(raw: dict[str, Any], sweep_path: str | Path | None = None, config: str | Path | None = None,
                overrides: list[str] | None = None) -> dict[str, Any]:
    """The run config every trial starts from, as a dict.

    Precedence: ``config`` (the command line's ``--config``) or else ``cifarlab.config`` or the
    defaults; then ``cifarlab.set``; then the command line's ``overrides``.
    """
    ext = raw.get("cifarlab") or {}
    if not isinstance(ext, dict):
        raise ConfigError("sweep key 'cifarlab' must be a mapping (config, set, map)")
    unknown = set(ext) - EXTENSION_KEYS
    if unknown:
        raise ConfigError(f"unknown key(s) under 'cifarlab': {', '.join(sorted(unknown))} "
                          f"(expected: {', '.join(sorted(EXTENSION_KEYS))})")
    if config is not None:
        cfg = RunConfig.from_dict(_read_yaml(Path(config), "config file"))
    elif isinstance(ext.get("config"), dict):
        cfg = RunConfig.from_dict(ext["config"])
    elif isinstance(ext.get("config"), str):
        cfg = RunConfig.from_dict(_read_yaml(_relative(ext["config"], sweep_path), "cifarlab.config"))
    elif ext.get("config") is None:
        cfg = RunConfig()
    else:
        raise ConfigError("cifarlab.config must be a path or a mapping of config sections")
    config_epochs = cfg.train.epochs
    sets = ext.get("set") or []
    if isinstance(sets, dict):
        for key, value in sets.items():
            cfg.set(str(key), value)
        touched = override_keys([f"{k}=" for k in sets])
    elif isinstance(sets, list):
        cfg.apply_overrides([str(s) for s in sets])
        touched = override_keys([str(s) for s in sets])
    else:
        raise ConfigError("cifarlab.set must be a mapping {section.key: value} or a list of 'section.key=value'")
    cfg.apply_overrides(overrides or [])
    cfg.set("train.val_every", 1)
    fit_schedule_to_epochs(cfg, config_epochs, touched | override_keys(overrides))
    if cfg.data.path and Path(cfg.data.path).exists():
        # The base is stored in the study and reused by `narrow` and `best` from any directory.
        cfg.data.path = str(Path(cfg.data.path).resolve())
    return cfg.validate().to_dict()


def parse_sweep(raw: dict[str, Any], base: dict[str, Any]) -> SweepSpec:
    """Check a W&B sweep mapping against the base config and map it onto Optuna.

    Every error names the key at fault and comes before any trial runs.
    """
    raw = copy.deepcopy(raw)
    unknown = set(raw) - TOP_KEYS
    if unknown:
        raise ConfigError(f"unknown sweep key(s): {', '.join(sorted(unknown))} (W&B's keys are: "
                          f"{', '.join(sorted(TOP_KEYS - {'cifarlab'}))}; cifarlab's own: cifarlab)")
    method = raw.get("method")
    if method not in METHODS:
        raise ConfigError(f"sweep method must be one of {', '.join(METHODS)}, got {method!r}")
    metric, goal, target = _metric(raw.get("metric"))

    mapping = (raw.get("cifarlab") or {}).get("map") or {}
    if not isinstance(mapping, dict):
        raise ConfigError("cifarlab.map must be a mapping {sweep name: section.key}")
    cfg = RunConfig.from_dict(copy.deepcopy(base))
    entries = _flatten(raw.get("parameters"))
    params: list[Param] = []
    constants: dict[str, Any] = {}
    resolved: dict[str, Any] = {}
    for name, entry in entries:
        key = resolve_key(name, cfg, mapping)
        if key in resolved:
            raise ConfigError(f"sweep parameters {name!r} and another one both set {key}")
        resolved[key] = entry
        parsed = parse_param(key, entry, label=name)
        if isinstance(parsed, Param):
            params.append(parsed)
        else:
            constants[key] = parsed[0]
    spec = SweepSpec(name=raw.get("name"), method=method, metric=metric, goal=goal, target=target, params=params,
                     constants=constants, hyperband=_hyperband(raw.get("early_terminate")), run_cap=_run_cap(raw),
                     raw={})
    _check_against_config(spec, base)
    if method == "grid":
        for p in params:
            p.grid()  # raises for a continuous parameter
    out = {k: v for k, v in raw.items() if k not in IGNORED_KEYS and k != "cifarlab"}
    out["parameters"] = resolved
    out["cifarlab"] = {"config": copy.deepcopy(base)}
    spec.raw = out
    return spec


def resolve_key(name: str, cfg: RunConfig, mapping: dict[str, str]) -> str:
    """The config key a sweep parameter name stands for."""
    if name in mapping:
        return str(mapping[name])
    if "." in name:
        return name
    if name in ALIASES:
        return ALIASES[name]
    from ..models import model_defaults

    candidates = [f"{s}.{f}" for s, cls in SECTIONS.items() for f in cls.__dataclass_fields__
                  if f == name and f != "params"]
    try:
        if name in model_defaults(cfg.model.name):
            candidates.append(f"model.{name}")
    except ConfigError:
        pass
    if len(candidates) == 1:
        return candidates[0]
    if len(candidates) > 1:
        raise ConfigError(f"sweep parameter {name!r} is ambiguous: it could be {' or '.join(candidates)}; "
                          f"name it section.key or map it with cifarlab.map")
    raise ConfigError(f"unknown sweep parameter {name!r}: no key of the run config (sections "
                      f"{', '.join(SECTIONS)}) has that name; name it section.key or map it with cifarlab.map")


def parse_param(name: str, entry: Any, label: str | None = None) -> Param | tuple[Any]:
    """One W&B parameter -> a :class:`Param`, or ``(value,)`` for a constant."""
    label = label or name
    if not isinstance(entry, dict):
        raise ConfigError(f"sweep parameter {label} must be a mapping (value, values, min/max, distribution), "
                          f"got {entry!r}")
    dist = entry.get("distribution")
    if dist is None:  # W&B infers the distribution from the keys it finds
        if "value" in entry:
            dist = "constant"
        elif "values" in entry:
            dist = "categorical_w_probabilities" if "probabilities" in entry else "categorical"
        elif "min" in entry and "max" in entry:
            dist = "int_uniform" if _is_int(entry["min"]) and _is_int(entry["max"]) else "uniform"
        else:
            raise ConfigError(f"sweep parameter {label} needs value, values, or min and max")
    if dist in UNSUPPORTED:
        raise ConfigError(f"sweep parameter {label}: distribution {dist!r} ({UNSUPPORTED[dist]}) has no Optuna "
                          f"equivalent; use one of {', '.join(SUPPORTED)}")
    if dist not in SUPPORTED:
        raise ConfigError(f"sweep parameter {label}: unknown distribution {dist!r}; supported: {', '.join(SUPPORTED)}")
    if dist == "constant":
        if "value" not in entry:
            raise ConfigError(f"sweep parameter {label}: distribution constant needs 'value'")
        return (entry["value"],)
    if dist == "categorical":
        values = entry.get("values")
        if not isinstance(values, list) or not values:
            raise ConfigError(f"sweep parameter {label}: 'values' must be a non-empty list")
        encoded = [_encode(v) for v in values]
        if len(set(map(repr, encoded))) != len(encoded):
            raise ConfigError(f"sweep parameter {label}: 'values' has duplicates: {values}")
        return Param(name, "categorical", dist, choices=list(values))

    lo, hi = _bounds(entry, label, dist)
    q = _num(entry.get("q", 1))
    if dist == "int_uniform":
        if not (_is_int(lo) and _is_int(hi)):
            raise ConfigError(f"sweep parameter {label}: int_uniform needs integer min and max, got {lo}, {hi}")
        return Param(name, "int", dist, low=int(lo), high=int(hi))
    if dist == "uniform":
        return Param(name, "float", dist, low=float(lo), high=float(hi))
    if dist == "q_uniform":
        # W&B draws round(U(min, max) / q) * q: the multiples of q in the range, as ints when q is an int.
        if not _is_num(q) or q <= 0:
            raise ConfigError(f"sweep parameter {label}: q must be a positive number, got {q!r}")
        k_lo, k_hi = math.ceil(lo / q - 1e-9), math.floor(hi / q + 1e-9)
        if k_lo > k_hi:
            raise ConfigError(f"sweep parameter {label}: no multiple of q={q} lies in [{lo}, {hi}]")
        if _is_int(q):
            return Param(name, "int", dist, low=int(k_lo * q), high=int(k_hi * q), step=int(q))
        return Param(name, "float", dist, low=_round(k_lo * q), high=_round(k_hi * q), step=float(q))
    if dist in ("log_uniform", "inv_log_uniform", "q_log_uniform"):
        # Bounds are natural-log exponents: log_uniform draws exp(U(min, max)); inv_log_uniform draws X with
        # log(1/X) ~ U(min, max), i.e. exp(-U(min, max)), again log-uniform, on [exp(-max), exp(-min)].
        lo, hi = (math.exp(lo), math.exp(hi)) if dist != "inv_log_uniform" else (math.exp(-hi), math.exp(-lo))
    elif lo <= 0:
        raise ConfigError(f"sweep parameter {label}: {dist} needs min > 0, got {lo}")
    if dist in ("q_log_uniform", "q_log_uniform_values"):
        # Optuna has log-scale integers (step 1) but no log-scale grid of another step.
        if not (_is_int(q) and q == 1):
            raise ConfigError(f"sweep parameter {label}: distribution {dist!r} with q={q} has no Optuna equivalent "
                              f"(a log scale allows step 1 only); use q: 1, log_uniform_values, or values: [...]")
        k_lo, k_hi = math.ceil(lo - 1e-9), math.floor(hi + 1e-9)
        if k_lo > k_hi or k_lo < 1:
            raise ConfigError(f"sweep parameter {label}: no positive integer lies in [{lo}, {hi}]")
        return Param(name, "int", dist, low=k_lo, high=k_hi, log=True)
    # log_uniform_values and inv_log_uniform_values have the same law: the reciprocal of a log-uniform
    # variable is log-uniform (log(1/X) = -log X is uniform on the mirrored interval).
    return Param(name, "float", dist, low=float(lo), high=float(hi), log=True)


# --------------------------------------------------------------------------- helpers
def _flatten(params: Any, prefix: str = "") -> list[tuple[str, Any]]:
    if not isinstance(params, dict) or not params:
        raise ConfigError(f"sweep key '{prefix + 'parameters' if not prefix else prefix[:-1]}' must be a non-empty "
                          f"mapping of parameters")
    out = []
    for name, entry in params.items():
        if isinstance(entry, dict) and "parameters" in entry:  # W&B's nested parameters
            out += _flatten(entry["parameters"], f"{prefix}{name}.")
        else:
            out.append((f"{prefix}{name}", entry))
    return out


def _metric(metric: Any) -> tuple[str, str, float | None]:
    if metric is None:  # only random and grid may omit it in W&B; cifarlab still needs one for its report
        return "val_acc", "maximize", None
    if not isinstance(metric, dict) or "name" not in metric:
        raise ConfigError("sweep key 'metric' must be a mapping with name (and goal, target)")
    unknown = set(metric) - {"name", "goal", "target"}
    if unknown:
        raise ConfigError(f"unknown key(s) under 'metric': {', '.join(sorted(unknown))}")
    name = METRICS.get(str(metric["name"]))
    if name is None:
        raise ConfigError(f"metric {metric['name']!r} is not logged by cifarlab; use one of "
                          f"{', '.join(sorted(METRICS))}")
    goal = metric.get("goal", "minimize")  # W&B's default, even for accuracies
    if goal not in ("minimize", "maximize"):
        raise ConfigError(f"metric goal must be minimize or maximize, got {goal!r}")
    target = _num(metric.get("target"))
    if target is not None and not _is_num(target):
        raise ConfigError(f"metric target must be a number, got {target!r}")
    return name, goal, None if target is None else float(target)


def _hyperband(et: Any) -> Hyperband | None:
    """W&B's brackets -> Optuna's ``HyperbandPruner(min_resource, max_resource, reduction_factor)``.

    W&B places brackets at min_iter * eta^k, or (with max_iter and s) at max_iter / eta^k for
    k = 1..s; Optuna's rungs are min_resource * eta^k up to max_resource. So min_iter is the
    first rung, and with max_iter and s the first rung is max_iter / eta^s.
    """
    if et is None:
        return None
    if not isinstance(et, dict):
        raise ConfigError("sweep key 'early_terminate' must be a mapping with type: hyperband")
    if et.get("type") != "hyperband":
        raise ConfigError(f"early_terminate type {et.get('type')!r} is not supported; W&B's and cifarlab's only "
                          f"type is hyperband")
    unknown = set(et) - {"type", "min_iter", "max_iter", "s", "eta", "strict"}
    if unknown:
        raise ConfigError(f"unknown key(s) under 'early_terminate': {', '.join(sorted(unknown))}")
    eta = et.get("eta", 3)
    if not _is_int(eta) or eta < 2:
        raise ConfigError(f"early_terminate eta must be an integer >= 2, got {eta!r}")
    max_iter = et.get("max_iter")
    if max_iter is not None and (not _is_int(max_iter) or max_iter < 1):
        raise ConfigError(f"early_terminate max_iter must be a positive integer, got {max_iter!r}")
    if et.get("min_iter") is not None:
        min_iter = et["min_iter"]
        if not _is_int(min_iter) or min_iter < 1:
            raise ConfigError(f"early_terminate min_iter must be a positive integer, got {min_iter!r}")
    elif max_iter is not None:
        s = et.get("s")
        if not _is_int(s) or s < 1:
            raise ConfigError("early_terminate with max_iter needs s (the number of brackets), a positive integer")
        min_iter = max(1, int(max_iter // eta ** s))
    else:
        raise ConfigError("early_terminate hyperband needs min_iter, or max_iter and s")
    if max_iter is not None and max_iter < min_iter:
        raise ConfigError(f"early_terminate max_iter={max_iter} is below the first bracket {min_iter}")
    return Hyperband(int(min_iter), None if max_iter is None else int(max_iter), int(eta))


def _run_cap(raw: dict) -> int | None:
    cap = raw.get("run_cap")
    if cap is not None and (not _is_int(cap) or cap < 1):
        raise ConfigError(f"run_cap must be a positive integer, got {cap!r}")
    return cap


def _check_against_config(spec: SweepSpec, base: dict[str, Any]) -> None:
    """Apply every constant, choice and bound to the base config and validate it, key by key."""
    try:
        spec.trial_config(base, {})
    except ConfigError as e:
        raise ConfigError(f"sweep constants: {e}") from None
    for p in spec.params:
        for value in p.probes():
            try:
                spec.trial_config(base, {p.name: value})
            except ConfigError as e:
                raise ConfigError(f"sweep parameter {p.name}={value!r}: {e}") from None


def _bounds(entry: dict, label: str, dist: str) -> tuple[float, float]:
    if "min" not in entry or "max" not in entry:
        raise ConfigError(f"sweep parameter {label}: distribution {dist} needs min and max")
    lo, hi = _num(entry["min"]), _num(entry["max"])
    if not (_is_num(lo) and _is_num(hi)):
        raise ConfigError(f"sweep parameter {label}: min and max must be numbers, got {lo!r}, {hi!r}")
    if lo > hi:
        raise ConfigError(f"sweep parameter {label}: min {lo} is above max {hi}")
    return lo, hi


def _read_yaml(path: Path, what: str) -> dict:
    if not path.is_file():
        raise ConfigError(f"{what} not found: {path}")
    try:
        return yaml.safe_load(path.read_text()) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"{what} {path} is not valid YAML: {str(e).splitlines()[0]}") from None


def _relative(path: str, sweep_path: str | Path | None) -> Path:
    """A path in a sweep file is relative to that file (so it runs from any directory), else to the cwd."""
    p = Path(path)
    if not p.is_absolute() and sweep_path is not None and (Path(sweep_path).parent / p).exists():
        return Path(sweep_path).parent / p
    return p


def _encode(v: Any) -> Any:
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    return yaml.safe_dump(v, default_flow_style=True).strip()


def _num(v: Any) -> Any:
    """YAML 1.1 (PyYAML) reads ``1e-4`` as a string: take it as the number it spells."""
    if isinstance(v, str):
        try:
            return float(v)
        except ValueError:
            return v
    return v


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _round(x: float) -> float:
    return float(round(x, 12))
