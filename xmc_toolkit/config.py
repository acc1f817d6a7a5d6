"""Typed configuration helpers shared by every config dataclass.

A config is a ``@dataclass`` deriving from :class:`ConfigBase`. It round-trips through JSON
(``to_dict`` / ``from_dict`` / ``to_json`` / ``from_json``), rejects unknown keys, and validates
once: :meth:`ConfigBase.validate` collects *every* problem and raises one :class:`ConfigError`
listing them all. Subclasses implement :meth:`ConfigBase.problems`.
Merging order everywhere: defaults -> JSON file -> command-line flags (:meth:`ConfigBase.merged`).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

from .errors import ConfigError

__all__ = ["ConfigBase", "read_config_json"]

T = TypeVar("T", bound="ConfigBase")


@dataclasses.dataclass
class ConfigBase:
    """Mixin for config dataclasses: JSON round trip, strict keys, all-problems validation."""

    # -- validation -------------------------------------------------------------------------
    def problems(self) -> list[str]:
        """Return a list of human-readable problems (empty when valid). Override in subclasses."""
        return []

    def validate(self: T) -> T:
        """Raise :class:`ConfigError` listing every problem; return ``self`` when valid."""
        probs = self.problems()
        if probs:
            raise ConfigError(probs)
        return self

    # -- serialization ----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out[f.name] = v.to_dict() if isinstance(v, ConfigBase) else _plain(v)
        return out

    def to_json(self, indent: int = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, sort_keys=False)

    @classmethod
    def field_docs(cls) -> dict[str, str]:
        """Field name -> documentation (from ``metadata={"help": ...}``)."""
        return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cls)}

    @classmethod
    def from_dict(cls: type[T], data: Mapping[str, Any], *, validate: bool = True) -> T:
        """Build from a mapping; unknown keys and type mismatches are all reported together."""
        problems: list[str] = []
        names = {f.name: f for f in dataclasses.fields(cls)}
        hints = typing.get_type_hints(cls)
        kwargs: dict[str, Any] = {}
        for key, value in data.items():
            if key not in names:
                close = difflib.get_close_matches(key, list(names), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                problems.append(f"unknown key {key!r}{hint}")
                continue
            typ = hints.get(key)
            if value is None and typ is not None and type(None) not in typing.get_args(typ):
                problems.append(f"{key}=null is not allowed: give a value or leave {key!r} out "
                                "(its default applies then)")
                continue
            if isinstance(typ, type) and issubclass(typ, ConfigBase) and isinstance(value, Mapping):
                try:
                    value = typ.from_dict(value, validate=False)
                except ConfigError as exc:
                    problems.extend(f"{key}.{p}" for p in exc.problems)
                    continue
            else:
                value, err = _coerce(key, value, typ)
                if err:
                    problems.append(err)
                    continue
            kwargs[key] = value
        if problems:
            raise ConfigError(problems)
        obj = cls(**kwargs)
        return obj.validate() if validate else obj

    @classmethod
    def from_json(cls: type[T], path: str | Path, *, validate: bool = True) -> T:
        return cls.from_dict(read_config_json(path), validate=validate)

    def merged(self: T, overrides: Mapping[str, Any], *, validate: bool = True) -> T:
        """A copy with ``overrides`` applied (``None`` values are ignored), validated once."""
        base = self.to_dict()
        base.update({k: v for k, v in overrides.items() if v is not None})
        return type(self).from_dict(base, validate=validate)


def read_config_json(path: str | Path) -> dict[str, Any]:
    """The JSON object of a config file (``--config``).

    Raises:
        ConfigError: the file is missing, not UTF-8, not JSON, or not a JSON object.
    """
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError as exc:
        raise ConfigError(f"config file {str(path)!r} does not exist (--config)") from exc
    except json.JSONDecodeError as exc:
        raise ConfigError(f"config file {str(path)!r} is not valid JSON: {exc}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {str(path)!r} is not UTF-8 text (byte "
                          f"{exc.start}); pass a JSON file such as `xmc train "
                          "--print-config` writes") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a JSON object")
    return data


def _plain(v: Any) -> Any:
    if isinstance(v, tuple):
        return list(v)
    if isinstance(v, Path):
        return str(v)
    return v


def _coerce(key: str, value: Any, typ: Any) -> tuple[Any, str | None]:
    """Light type checking/coercion for JSON values; returns (value, error message or None)."""
    if typ is None or value is None:
        return value, None
    origin = typing.get_origin(typ)
    args = typing.get_args(typ)
    if origin is typing.Union or str(origin) == "types.UnionType":
        if value is None and type(None) in args:
            return None, None
        for a in args:
            if a is type(None):
                continue
            v, err = _coerce(key, value, a)
            if err is None:
                return v, None
        return value, f"{key}={value!r} has the wrong type (expected {typ})"
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            return value, f"{key}={value!r} must be a list"
        elem = args[0] if args else None
        if elem in (int, float, str, bool):
            for v in value:
                _, err = _coerce(key, v, elem)
                if err is not None:
                    return value, (f"{key}={list(value)!r}: every entry must be "
                                   f"{'an integer' if elem is int else 'a ' + elem.__name__}, "
                                   f"found {v!r}")
            value = [_coerce(key, v, elem)[0] for v in value]
        return (tuple(value) if origin is tuple else list(value)), None
    if typ is bool:
        if isinstance(value, bool):
            return value, None
        return value, f"{key}={value!r} must be true or false"
    if typ is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
            return value, f"{key}={value!r} must be an integer"
        return int(value), None
    if typ is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return value, f"{key}={value!r} must be a number"
        return float(value), None
    if typ is str:
        if not isinstance(value, str):
            return value, f"{key}={value!r} must be a string"
        return value, None
    return value, None
