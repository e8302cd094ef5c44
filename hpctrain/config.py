"""Typed configuration: dataclasses whose fields carry their default and their doc.

One source for defaults, validation and documentation. A section is a
``@dataclass`` whose fields are declared with :func:`option`; :func:`parse` turns a
mapping read from YAML into an instance, and fails with the key path, the file and
the closest valid key when something does not fit.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal, TypeVar, Union

from .errors import OptionsError

T = TypeVar("T")

_MISSING = dataclasses.MISSING


def option(default: Any = _MISSING, doc: str = "", *, factory: Any = _MISSING) -> Any:
    """Declare a configuration field with its default and a one-paragraph doc."""
    if factory is not _MISSING:
        return dataclasses.field(default_factory=factory, metadata={"doc": doc})
    if default is _MISSING:
        return dataclasses.field(metadata={"doc": doc})
    return dataclasses.field(default=default, metadata={"doc": doc})


def type_name(tp: Any) -> str:
    """A readable name for a type annotation, as shown in errors and docs."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in args)
    if origin in (Union, types.UnionType):
        return " | ".join("null" if a is type(None) else type_name(a) for a in args)
    if origin in (list, tuple):
        return f"list of {type_name(args[0])}" if args else "list"
    if origin in (dict, Mapping):
        return f"mapping of {type_name(args[1])}" if args else "mapping"
    if dataclasses.is_dataclass(tp):
        return "mapping"
    if tp is type(None):
        return "null"
    return {int: "integer", float: "number", str: "string", bool: "boolean"}.get(
        tp, getattr(tp, "__name__", str(tp))
    )


def _where(path: str, source: str) -> str:
    at = f"'{path}'" if path else "the top level"
    return f"{at} in {source}" if source else at


def suggest(key: str, valid: typing.Iterable[str]) -> str:
    """'; did you mean X?' for the closest valid key, or a list of the valid keys."""
    valid = sorted(valid)
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    if close:
        return f"; did you mean '{close[0]}'?"
    return f"; valid keys are: {', '.join(valid)}" if valid else ""


def _convert(value: Any, tp: Any, path: str, source: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, path, source)
            except OptionsError as error:
                errors.append(error)
        # a single non-null alternative gives the most useful message
        if len([a for a in args if a is not type(None)]) == 1:
            raise errors[0]
        raise OptionsError(f"{_where(path, source)} must be {type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value in args and type(value) in {type(a) for a in args}:
            return value
        raise OptionsError(
            f"{_where(path, source)} must be one of {', '.join(repr(a) for a in args)}"
            f", got {value!r}"
        )
    if dataclasses.is_dataclass(tp):
        return parse(tp, value, path, source)
    if origin in (list, tuple):
        if not isinstance(value, list):
            raise OptionsError(f"{_where(path, source)} must be {type_name(tp)}, got {value!r}")
        return [_convert(v, args[0], f"{path}[{i}]", source) for i, v in enumerate(value)]
    if origin in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise OptionsError(f"{_where(path, source)} must be {type_name(tp)}, got {value!r}")
        return {
            str(k): _convert(v, args[1], f"{path}.{k}" if path else str(k), source)
            for k, v in value.items()
        }
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif isinstance(tp, type) and isinstance(value, tp):
        return value
    raise OptionsError(
        f"{_where(path, source)} must be {type_name(tp)}, got {value!r} ({type(value).__name__})"
    )


def parse(cls: type[T], data: Any, path: str = "", source: str = "") -> T:
    """Build a ``cls`` instance from ``data``, validating keys and types.

    :param path: dotted key path of ``data`` inside the file, for messages
    :param source: the file the data came from, for messages
    """
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise OptionsError(f"{_where(path, source)} must be a mapping of options, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in data.items():
        key = str(key)
        sub = f"{path}.{key}" if path else key
        if key not in fields:
            raise OptionsError(f"unknown key {_where(sub, source)}{suggest(key, fields)}")
        kwargs[key] = _convert(value, hints[key], sub, source)
    for name, f in fields.items():
        required = f.default is _MISSING and f.default_factory is _MISSING
        if required and name not in kwargs:
            sub = f"{path}.{name}" if path else name
            raise OptionsError(f"missing required key {_where(sub, source)}")
    instance = cls(**kwargs)
    check = getattr(instance, "validate", None)
    if check is not None:
        check(path, source)
    return instance


def to_dict(instance: Any) -> Any:
    """Plain data (for YAML) from a dataclass instance, recursively."""
    if dataclasses.is_dataclass(instance) and not isinstance(instance, type):
        return {f.name: to_dict(getattr(instance, f.name)) for f in dataclasses.fields(instance)}
    if isinstance(instance, list):
        return [to_dict(v) for v in instance]
    if isinstance(instance, dict):
        return {k: to_dict(v) for k, v in instance.items()}
    return instance


def describe(cls: type, prefix: str = "") -> list[tuple[str, str, Any, str]]:
    """(key path, type, default, doc) for every field, nested sections flattened."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}.{f.name}" if prefix else f.name
        tp = hints[f.name]
        if f.default is not _MISSING:
            default = f.default
        elif f.default_factory is not _MISSING:
            default = to_dict(f.default_factory())
        else:
            default = _MISSING
        rows.append((key, type_name(tp), default, f.metadata.get("doc", "")))
        section = section_type(tp)
        if section is not None:
            rows.extend(describe(section, key))
    return rows


def section_type(tp: Any) -> type | None:
    """The dataclass of a nested section typed ``tp``: ``tp`` itself, or the
    dataclass of an optional section (``Section | None``); None for other types."""
    if dataclasses.is_dataclass(tp):
        return tp
    if typing.get_origin(tp) in (Union, types.UnionType):
        kinds = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(kinds) == 1 and dataclasses.is_dataclass(kinds[0]):
            return kinds[0]
    return None
