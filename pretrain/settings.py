"""Typed settings: nested dataclasses filled from a YAML file and `section.key=value` overrides.

Every key is checked against the dataclasses: an unknown key or a value of the wrong type raises
`ConfigError` with one line that names the key, so a typo never silently falls back to a default.
A field typed `Literal["a", "b"]` accepts only those values: the one mechanism for choices.
Used by the pretraining config (pretrain.config) and the finetuning config (finetune.config).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from pretrain.errors import ConfigError


def apply_file(config: Any, path: str | Path) -> None:
    """Merge a YAML file of sections into the dataclass `config`, checking every key."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        loaded = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        first_line = str(error).splitlines()[0]
        raise ConfigError(f"config file {path} is not valid YAML: {first_line}") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections")
    _merge(config, loaded, prefix="")


def apply_value(config: Any, dotted_key: str, value: Any) -> None:
    """Set one `section.key` (already a Python value), with the same checks as a file."""
    _merge(config, _nest(dotted_key.strip().split("."), value), prefix="")


def apply_overrides(config: Any, overrides: list[str] | tuple) -> None:
    """`section.key=value` strings; values are parsed as YAML (`100`, `[0.9, 0.95]`, `{a: 1}`)."""
    for override in overrides:
        key, sep, raw_value = override.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {override!r} is not of the form section.key=value")
        apply_value(config, key, _parse_scalar(raw_value))


def to_dict(config: Any) -> dict:
    """Plain nested dict (tuples as lists) of a dataclass config, for YAML, JSON and W&B."""
    return _plain(dataclasses.asdict(config))


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value


def _parse_scalar(raw: str) -> Any:
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


def _nest(keys: list[str], value: Any) -> dict:
    for key in reversed(keys):
        value = {key: value}
    return value


def _merge(target: Any, updates: dict, prefix: str) -> None:
    known = {f.name: f for f in dataclasses.fields(target)}
    hints = typing.get_type_hints(type(target))
    for key, value in updates.items():
        dotted = f"{prefix}{key}"
        if key not in known:
            raise ConfigError(
                f"unknown config key '{dotted}' (known in this section: {', '.join(known)})"
            )
        current = getattr(target, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"config key '{dotted}' is a section; give it a mapping")
            _merge(current, value, prefix=f"{dotted}.")
        elif isinstance(current, dict) and isinstance(value, dict):
            # Free-form kwargs: nested keys merge into the mapping.
            setattr(target, key, {**current, **value})
        else:
            setattr(target, key, coerce(value, hints[key], dotted))


def coerce(value: Any, annotation: Any, dotted: str) -> Any:
    """`value` as the field type `annotation` wants it, or ConfigError naming `dotted`."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [arg for arg in args if arg is not type(None)]
        return coerce(value, inner[0], dotted)
    if origin is typing.Literal:
        if value not in args:
            choices = ", ".join(str(arg) for arg in args)
            raise ConfigError(f"config key '{dotted}' must be one of {choices}; got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"config key '{dotted}' needs a list of {len(args)} values")
        return tuple(coerce(item, arg, dotted) for item, arg in zip(value, args))
    if annotation is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{dotted}' needs a mapping, got {value!r}")
        return value
    return _coerce_plain(value, annotation, dotted)


def _coerce_plain(value: Any, annotation: type, dotted: str) -> Any:
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation is float and isinstance(value, str):
        # YAML 1.1 reads "1e-3" (no dot) as a string; Python's float() reads it as meant.
        try:
            return float(value)
        except ValueError:
            pass
    if annotation is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, annotation) or (annotation is int and isinstance(value, bool)):
        raise ConfigError(
            f"config key '{dotted}' needs {annotation.__name__}, got {value!r} "
            f"({type(value).__name__})"
        )
    return value
