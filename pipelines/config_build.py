"""Plain data (YAML files, ``a.b=value`` overrides) into the typed config's dataclasses:
overrides applied, sections merged, every value coerced to its field's type and range,
unknown keys refused with the nearest valid one, each section's ``check()`` run. Every
problem is a one-line ConfigError naming the field (pipelines/config.py holds the
dataclasses)."""

from __future__ import annotations

import difflib
import math
import types
import typing
from dataclasses import fields, is_dataclass
from typing import Any, Literal

from pipelines.config_yaml import ConfigError, key_name, parse_yaml, show


def plain(value: Any) -> Any:
    """A dataclass (or a dict or list of them) as plain dicts and lists."""
    if is_dataclass(value):
        return {f.name: plain(getattr(value, f.name)) for f in fields(value)}
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain(v) for v in value]
    return value


def apply_override(data: dict, item: str) -> None:
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {show(item)}: expected KEY=VALUE, e.g. trainer.lr=2e-6")
    node = data
    parts = key.strip().split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {show(item)}: {key_name(part)} is a value, not a section")
        node = child
    node[parts[-1]] = parse_yaml(raw, f"override {key_name(key.strip())}") if raw.strip() else ""


def build_section(cls: type, data: Any, path: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{path or 'config'}: expected a mapping of fields, got {show(data)}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in fields(cls) if "recipe" not in f.metadata}
    for key in data:
        if key not in known:
            raise ConfigError(unknown_key_message(path, key, list(known)))
    kwargs = {}
    for name, value in data.items():
        default = known[name].default_factory() if callable(known[name].default_factory) else None
        if isinstance(default, dict) and isinstance(value, dict):
            # A mapping section (e.g. placement.roles) overrides entries, not the whole map.
            value = merge_sections(plain(default), value)
        kwargs[name] = _coerce(hints[name], value, _join(path, name), known[name].metadata)
    obj = cls(**kwargs)
    check = getattr(obj, "check", None)
    if check is not None:
        try:
            check()  # cross-field rules; messages are relative to this section
        except ConfigError as err:
            raise ConfigError(_join(path, str(err))) from None
    return obj


def merge_sections(base: dict, update: dict) -> dict:
    out = dict(base)
    for key, value in update.items():
        both = isinstance(out.get(key), dict) and isinstance(value, dict)
        out[key] = merge_sections(out[key], value) if both else value
    return out


def _coerce(tp: Any, value: Any, path: str, meta: Any = None) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, path, meta)
    if is_dataclass(tp):
        return build_section(tp, value, path)
    if origin is Literal:
        if value not in args:
            hint = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
            extra = f"; did you mean {hint[0]!r}?" if hint else ""
            raise ConfigError(f"{path}: must be one of {list(args)}, got {show(value)}{extra}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{path}: expected a list, got {show(value)}")
        return [_coerce(args[0], v, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {show(value)}")
        return {str(k): _coerce(args[1], v, f"{path}.{key_name(k)}") for k, v in value.items()}
    value = _scalar(tp, value, path)
    if meta:
        _check_range(value, path, meta)
    return value


def _scalar(tp: type, value: Any, path: str) -> Any:
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{path}: expected true or false, got {show(value)}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{path}: expected an integer, got {show(value)}")
    if tp is float:
        return _finite_float(value, path)
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{path}: expected a string, got {show(value)} (quote it in YAML)")
    raise TypeError(f"config schema uses an unsupported type {tp!r} at {path}")


def _finite_float(value: Any, path: str) -> float:
    """A float field's value; inf and nan are refused.

    No field gives a meaning to them (a learning rate or a clip of inf is a typo, and nan
    passes every range check since all comparisons with it are false).
    """
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ConfigError(f"{path}: expected a number, got {show(value)}")
    try:
        # YAML 1.1 reads `1e-6` (no dot) as a string: accept any float literal.
        number = float(value)
    except ValueError:
        raise ConfigError(f"{path}: expected a number, got {show(value)}") from None
    except OverflowError:  # an int of hundreds of digits
        raise ConfigError(f"{path}: {show(value)} is too large for a number") from None
    if not math.isfinite(number):
        raise ConfigError(f"{path}: must be a finite number, got {show(value)}")
    return number


def _check_range(value: Any, path: str, meta: Any) -> None:
    bounds = (("gt", "> ", lambda v, b: v > b), ("ge", ">= ", lambda v, b: v >= b),
              ("lt", "< ", lambda v, b: v < b), ("le", "<= ", lambda v, b: v <= b))
    for key, text, ok in bounds:
        bound = meta.get(key)
        if bound is not None and not ok(value, bound):
            raise ConfigError(f"{path}: must be {text}{bound}, got {show(value)}")


def unknown_key_message(path: str, key: str, valid: list[str]) -> str:
    where = path or "the top level"
    close = difflib.get_close_matches(str(key), valid, n=1, cutoff=0.5)
    hint = f"did you mean {_join(path, close[0])!r}? " if close else ""
    return (f"{_join(path, key_name(key))}: unknown key in {where}; {hint}"
            f"valid keys: {', '.join(valid)}")


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name



