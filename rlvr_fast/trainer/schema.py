"""The typed schema of a dataclass config: each field's type (from its annotation) and range (from its ``_f(...)``
metadata), checked the same way for Python, YAML and command-line values.

Metadata keys a field may carry (all optional): ``ge``, ``gt``, ``le``, ``lt`` (numeric bounds), ``choices`` (a
``"module:REGISTRY"`` string naming a registry dict whose keys are the valid values, resolved lazily so the config
module imports nothing heavy), ``keys`` (the same for the keys of a mapping field, named ``keys_label`` in messages),
``allow_empty`` (a str field may be ""), ``on_resume="may_change"`` (resume accepts a
new value; every other field defines the run and must not change).

Every failure is a ``ConfigFieldError`` (a ValueError) whose message starts with ``RLVRConfig.<field>`` and names the
expected and the actual value; ``rlvr-fast`` reports it in one line with exit status 2.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import math
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["ConfigFieldError", "FieldSpec", "check_all", "check_field", "field_specs"]

_BASE_TYPES = {int: "an int", float: "a number", str: "a string", bool: "a boolean (true/false)", dict: "a mapping"}
_BOUNDS = {"ge": (">=", lambda v, b: v >= b), "gt": (">", lambda v, b: v > b), "le": ("<=", lambda v, b: v <= b)}
_BOUNDS["lt"] = ("<", lambda v, b: v < b)


class ConfigFieldError(ValueError):
    """A config value of the wrong type or out of range; the message names the field."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class FieldSpec:
    """One field of the schema: its base type, whether None is allowed, and its range metadata."""

    owner: str  # the dataclass's name, for messages
    name: str
    kind: type  # int, float, str, bool or dict
    optional: bool
    metadata: Mapping[str, Any]

    @property
    def choices(self) -> tuple[str, ...] | None:
        ref = self.metadata.get("choices")
        return None if ref is None else _registry_keys(ref)

    @property
    def keys(self) -> tuple[str, ...] | None:
        ref = self.metadata.get("keys")
        return None if ref is None else _registry_keys(ref)

    @property
    def may_change_on_resume(self) -> bool:
        return self.metadata.get("on_resume") == "may_change"

    def bounds(self) -> str:
        """The range in words, e.g. '> 0 and <= 1' ('' when unbounded)."""
        return " and ".join(f"{op} {self.metadata[key]!r}" for key, (op, _) in _BOUNDS.items() if key in self.metadata)

    def expected(self) -> str:
        """The expected value in words, e.g. 'a number > 0 or None'."""
        if self.choices is not None:
            text = f"one of {list(self.choices)}"
        else:
            text = " ".join(filter(None, (_BASE_TYPES[self.kind], self.bounds())))
        if self.keys is not None:
            text += f" with keys from {list(self.keys)}"
        return text + (" or None" if self.optional else "")

    def fail(self, value: Any, why: str = "", range_only: bool = False) -> ConfigFieldError:
        """The error for ``value``; a value of the right type out of range is reported by its range alone
        ('must be >= 1, got 0'), any other by the whole expectation and the value's type."""
        if range_only and self.bounds():
            expected, got = self.bounds() + (" or None" if self.optional else ""), repr(value)
        else:
            expected, got = self.expected(), f"{value!r} ({type(value).__name__})"
        return ConfigFieldError(self.name, f"{self.owner}.{self.name} must be {expected}, got {got}{why}")


@functools.cache
def _registry_keys(ref: str) -> tuple[str, ...]:
    module, _, attr = ref.partition(":")
    return tuple(getattr(importlib.import_module(module), attr))


def _base_and_optional(annotation) -> tuple[type, bool]:
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        non_none = [a for a in args if a is not type(None)]
        if len(non_none) != 1:
            raise TypeError(f"schema: unsupported annotation {annotation!r}")
        return _base_and_optional(non_none[0])[0], type(None) in args
    base = typing.get_origin(annotation) or annotation
    if base not in _BASE_TYPES:
        raise TypeError(f"schema: unsupported annotation {annotation!r}")
    return base, False


@functools.cache
def field_specs(cls: type) -> dict[str, FieldSpec]:
    """name -> FieldSpec for every field of the dataclass ``cls``, from its resolved annotations."""
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        kind, optional = _base_and_optional(hints[f.name])
        out[f.name] = FieldSpec(cls.__name__, f.name, kind, optional, f.metadata)
    return out


def check_field(spec: FieldSpec, value: Any) -> None:
    """Raise ConfigFieldError unless ``value`` has the field's type and lies in its range."""
    if value is None:
        if spec.optional:
            return
        raise spec.fail(value)
    kind = spec.kind
    if kind is bool:
        ok = isinstance(value, bool)
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif kind is dict:
        ok = isinstance(value, Mapping) and all(isinstance(k, str) for k in value)
    else:
        ok = isinstance(value, str)
    if not ok:
        hint = ""
        if kind in (int, float) and isinstance(value, str):
            hint = " (a quoted number, or YAML 1.1 reading 1e-5 as a string: write 1.0e-5)"
        raise spec.fail(value, hint)
    if kind is float and not math.isfinite(value):
        raise spec.fail(value, " (not finite)")
    if kind is str and not value and not spec.metadata.get("allow_empty"):
        noun = "path" if spec.name.endswith(("_file", "_dir")) else "string"  # a *_file / *_dir field holds a path
        expected = f"a non-empty {noun}" + (" or None" if spec.optional else "")
        raise ConfigFieldError(spec.name, f"{spec.owner}.{spec.name} must be {expected}, got {value!r}")
    for key, (_, holds) in _BOUNDS.items():
        if key in spec.metadata and not holds(value, spec.metadata[key]):
            raise spec.fail(value, range_only=True)
    choices = spec.choices
    if choices is not None and value not in choices:
        raise spec.fail(value)
    if spec.keys is not None:
        unknown = sorted(k for k in value if k not in spec.keys)
        if unknown:
            label = spec.metadata.get("keys_label", "keys")
            raise ConfigFieldError(
                spec.name, f"{spec.owner}.{spec.name}: unknown {label} {unknown}; known: {sorted(spec.keys)}"
            )


def check_all(obj: Any) -> None:
    """Check every field of the dataclass instance ``obj`` against its schema."""
    for name, spec in field_specs(type(obj)).items():
        check_field(spec, getattr(obj, name))
