"""Typed value coercion for the config and the model registry: convert a value to a type where that is
lossless, else a one-line ConfigError naming the key. Imports nothing of cifarlab but its errors, so that
config and models can both use it without importing each other."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any

from .errors import ConfigError


def coerce(name: str, value: Any, typ: Any) -> Any:
    """Convert ``value`` to ``typ`` where that is lossless, else raise ConfigError."""
    origin = typing.get_origin(typ)
    args = typing.get_args(typ)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        last: ConfigError | None = None
        for a in args:
            if a is type(None):
                continue
            try:
                return coerce(name, value, a)
            except ConfigError as e:
                last = e
        raise last or ConfigError(f"{name}: bad value {value!r}")
    if origin is list:
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise ConfigError(f"{name} must be a list, got {value!r}")
        (inner,) = args
        return [coerce(f"{name}[{i}]", v, inner) for i, v in enumerate(value)]
    if typ is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{name} must be true or false, got {value!r}")
    if typ is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (
                isinstance(value, float) and not value.is_integer()):
            raise ConfigError(f"{name} must be an integer, got {value!r}")
        return int(value)
    if typ is float:
        if isinstance(value, str):
            try:  # YAML 1.1 reads "1e-3" as a string
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{name} must be a number, got {value!r}")
        try:
            value = float(value)
        except OverflowError:  # an int beyond float range
            value = math.inf
        if not math.isfinite(value):  # a range check alone lets inf through where only a lower bound exists
            raise ConfigError(f"{name} must be a finite number, got {value!r}")
        return value
    if typ is str:
        if not isinstance(value, str):
            raise ConfigError(f"{name} must be a string, got {value!r}")
        return value
    return value


def coerce_like(name: str, value: Any, default: Any) -> Any:
    """Coerce a model hyperparameter to the type of its builder default."""
    if default is None or isinstance(default, dataclasses.Field):
        return value
    if isinstance(default, bool):
        return coerce(name, value, bool)
    if isinstance(default, int):
        return coerce(name, value, int)
    if isinstance(default, float):
        return coerce(name, value, float)
    if isinstance(default, str):
        return coerce(name, value, str)
    if isinstance(default, (list, tuple)):
        inner = type(default[0]) if default else Any
        inner = float if inner is float else int if inner is int else inner
        return coerce(name, value, list[inner]) if inner is not Any else list(value)
    return value


_UNITS = {"": 1.0, "s": 1.0, "sec": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0}


def parse_duration(name: str, value: Any) -> float:
    """Seconds from ``600``, ``"90s"``, ``"10m"``, ``"1.5h"`` (as Ultralytics' ``time`` and ``timeout`` do);
    a ConfigError naming ``name`` for anything else or a duration that is not positive."""
    text = str(value).strip().lower()
    num = text.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = text[len(num):]
    try:
        seconds = float(num) * _UNITS[unit]
    except (ValueError, KeyError):
        raise ConfigError(f"{name}={value!r} is not a duration: give seconds or a number with s, m or h "
                          f"(90s, 10m, 1.5h)") from None
    if not math.isfinite(seconds) or seconds <= 0:
        raise ConfigError(f"{name}={value!r} must be a positive duration")
    return seconds
