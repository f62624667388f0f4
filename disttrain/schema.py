"""Type checks for configuration values, from the annotations that already describe them.

Every config group is checked against a typed description before anything runs: the Trainer's
options against ``TrainerConfig``'s fields, a strategy's options against its constructor's
signature, the app's top-level keys against ``AppConfig``. A bad value raises one ConfigError
naming the key, the value and the rule (``trainer.max_epochs='abc': expected an integer``).
"""

from __future__ import annotations

import collections.abc
import dataclasses
import inspect
import types
import typing
from typing import Any, Callable, Literal, Mapping, Union

from disttrain.errors import ConfigError


def describe(annotation: Any) -> str:
    """A type annotation in words: ``int | None`` -> ``an integer or null``."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is Any or annotation is inspect.Parameter.empty:
        return "anything"
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (Union, types.UnionType):
        return " or ".join(describe(a) for a in args)
    if annotation is type(None):
        return "null"
    if origin in (list, tuple, collections.abc.Sequence) or annotation in (list, tuple):
        return f"a list of {describe(args[0])}" if args else "a list"
    if origin in (dict, collections.abc.Mapping) or annotation is dict:
        return f"a mapping of {describe(args[1])}" if len(args) == 2 else "a mapping"
    words = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    return words.get(annotation, getattr(annotation, "__name__", str(annotation)))


def matches(value: Any, annotation: Any) -> bool:
    """Whether ``value`` (as it comes from YAML/OmegaConf or Python) fits ``annotation``. Strict
    where it matters: ``1.5`` is not an integer, ``true`` is not a number, ``"3"`` not an int."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is Any or annotation is inspect.Parameter.empty or annotation is object:
        return True
    if origin is Literal:
        return any(value == a and type(value) is type(a) for a in args)
    if origin in (Union, types.UnionType):
        return any(matches(value, a) for a in args)
    if annotation is type(None):
        return value is None
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    if origin in (list, tuple, collections.abc.Sequence) or annotation in (list, tuple):
        if not isinstance(value, (list, tuple)) and not _is_listconfig(value):
            return False
        return not args or all(matches(v, args[0]) for v in value)
    if origin in (dict, collections.abc.Mapping) or annotation is dict:
        if not isinstance(value, Mapping) and not _is_dictconfig(value):
            return False
        return len(args) != 2 or all(matches(v, args[1]) for v in value.values())
    if isinstance(annotation, type):
        return isinstance(value, annotation)
    return True  # an annotation we do not interpret: accept


def check(key: str, value: Any, annotation: Any) -> None:
    """Raise ConfigError unless ``value`` fits ``annotation``."""
    if not matches(value, annotation):
        raise ConfigError(f"{key}={value!r}: expected {describe(annotation)}")


def check_dataclass_fields(obj: Any, prefix: str) -> None:
    """Check every field of dataclass instance ``obj`` against its annotation."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        check(f"{prefix}.{f.name}", getattr(obj, f.name), hints.get(f.name, Any))


def check_dataclass_keys(cls: type, values: Mapping[str, Any], prefix: str) -> None:
    """Unknown keys for dataclass ``cls`` raise ConfigError listing the known ones."""
    known = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in values if k not in known]
    if unknown:
        raise ConfigError(f"{prefix}.{unknown[0]} is not an option of {prefix}: known options are {known}")


def check_call(fn: Callable[..., Any], values: Mapping[str, Any], prefix: str, hint: str = "") -> None:
    """Check the keyword arguments ``values`` that config passes to ``fn`` (a class or function)
    against its signature: unknown names (unless it takes ``**kwargs``) and annotated types.
    ``hint`` is appended to an unknown-name message."""
    target = fn.__init__ if inspect.isclass(fn) else fn  # type: ignore[misc]
    try:
        sig = inspect.signature(target)
        hints = typing.get_type_hints(target)
    except (TypeError, ValueError, NameError):
        return  # builtins and C functions: nothing to check against
    params = {n: p for n, p in sig.parameters.items() if n != "self"}
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    for name, value in values.items():
        if name not in params:
            if not takes_any:
                known = [n for n, p in params.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
                raise ConfigError(f"{prefix}.{name} is not an option of {prefix}: known options are {known}{hint}")
            continue
        check(f"{prefix}.{name}", value, hints.get(name, params[name].annotation))


def _is_listconfig(value: Any) -> bool:
    return type(value).__name__ == "ListConfig"


def _is_dictconfig(value: Any) -> bool:
    return type(value).__name__ == "DictConfig"
