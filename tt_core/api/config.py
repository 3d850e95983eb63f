"""AdapterConfig: the base of every method's config, and its JSON form."""

from __future__ import annotations

import dataclasses
import enum
import json
import re
import sys
import types
import typing
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

from tt_core.api.errors import ConfigError

if TYPE_CHECKING:
    import torch


class _Mismatch(Exception):
    """A JSON value does not fit a declared type."""


def _from_json(value: Any, hint: Any) -> Any:
    """``value``, read from JSON, as a field declared ``hint`` holds it; :class:`_Mismatch` if unfit.

    Follows the declared type through ``X | None``, ``Optional``, ``Union``,
    ``Literal``, ``Annotated`` and nested lists, tuples and dicts. What JSON
    cannot keep comes back as declared: a tuple from a list, an ``int`` dict
    key from its string, an ``Enum`` member from its value. A hint this does
    not know (a class of the plugin's own) must be an instance of it.
    """
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any or isinstance(hint, typing.TypeVar):
        return value
    if origin is typing.Annotated:
        return _from_json(value, args[0])
    if origin in (typing.Union, types.UnionType):
        for arm in args:
            try:
                return _from_json(value, arm)
            except _Mismatch:
                continue
        raise _Mismatch
    if hint is None or hint is type(None):
        if value is None:
            return None
        raise _Mismatch
    if origin is typing.Literal:
        for choice in args:  # 1 == True in Python, so the types must agree too
            if value == choice and type(value) is type(choice):
                return choice
        raise _Mismatch
    if hint is list or origin is list:
        if not isinstance(value, list):
            raise _Mismatch
        return [_from_json(item, args[0] if args else Any) for item in value]
    if hint is tuple or origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise _Mismatch
        if not args or (len(args) == 2 and args[1] is Ellipsis):
            return tuple(_from_json(item, args[0] if args else Any) for item in value)
        if len(args) != len(value):
            raise _Mismatch
        return tuple(_from_json(item, arm) for item, arm in zip(value, args, strict=True))
    if hint is dict or origin is dict:
        if not isinstance(value, dict):
            raise _Mismatch
        key_hint, item_hint = args or (Any, Any)
        return {_key_from_json(key, key_hint): _from_json(item, item_hint) for key, item in value.items()}
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _Mismatch
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise _Mismatch
    if isinstance(hint, type) and issubclass(hint, enum.Enum) and not isinstance(value, hint):
        try:
            return hint(value)
        except ValueError:
            raise _Mismatch from None
    if isinstance(hint, type) and not isinstance(value, hint):
        raise _Mismatch
    return value


def _key_from_json(key: Any, hint: Any) -> Any:
    """A dict key as declared; JSON wrote a non-string key (``3``, ``true``) as its JSON text."""
    try:
        return _from_json(key, hint)
    except _Mismatch:
        if not isinstance(key, str):
            raise
    try:
        decoded = json.loads(key)
    except ValueError:
        raise _Mismatch from None
    return _from_json(decoded, hint)


def _field_types(cls: type) -> dict[str, Any]:
    """The declared type of each dataclass field of ``cls``, resolved from its annotation.

    A string annotation (``from __future__ import annotations``) naming
    something the class's module does not hold (a class defined inside a
    function) cannot be resolved: that field is left to the config's own
    ``__post_init__``.
    """
    fields = dataclasses.fields(cls)
    try:
        hints = typing.get_type_hints(cls, include_extras=True)
        return {field.name: hints[field.name] for field in fields}
    except Exception:  # NameError and the like: resolve field by field below
        pass
    module = sys.modules.get(cls.__module__)
    namespace = {**vars(typing), **(vars(module) if module is not None else {})}
    resolved = {}
    for field in fields:
        if not isinstance(field.type, str):
            resolved[field.name] = field.type
            continue
        try:
            # What typing.get_type_hints does with the class's own annotation text, one field at a time.
            resolved[field.name] = eval(field.type, namespace)
        except Exception:
            continue
    return resolved


def _describe(hint: Any) -> str:
    """``a list[str] | None``, ``an int``: the declared type as an error message names it."""
    text = hint.__name__ if isinstance(hint, type) and not typing.get_args(hint) else repr(hint)
    text = text.replace("typing.", "")
    return f"{'an' if text[0].lower() in 'aeio' else 'a'} {text}"


def check_target_modules(value: Any) -> list[str] | str | None:
    """Validate a config's ``target_modules`` as PEFT reads it, for ``__post_init__``.

    ``None`` lets the method pick (usually the input embedding); a list names
    modules by full name or name suffix; a string is a regular expression that
    must match a module's full name.
    """
    if value is None:
        return None
    if isinstance(value, str):
        try:
            re.compile(value)
        except re.error as error:
            raise ConfigError(
                f"target_modules={value!r} is a string, so it is read as a regular expression, and it is "
                f"not a valid one ({error}); give a list of module names instead, e.g. ['embed_tokens']"
            ) from None
        return value
    if isinstance(value, (list, tuple, set, frozenset)) and all(isinstance(name, str) for name in value):
        return sorted(value) if isinstance(value, (set, frozenset)) else list(value)
    raise ConfigError(
        f"target_modules must be None, a list of module names or a regular expression, got {value!r}"
    )


class AdapterConfig:
    """Settings of one adapter. Subclasses are dataclasses that set ``method``.

    Every method's config has a ``target_modules`` field: module names (full
    names or name suffixes) to adapt, or ``None`` to let the method pick
    (usually the input embedding).
    """

    method: ClassVar[str] = ""
    target_modules: list[str] | str | None

    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready form written to ``adapter_config.json``."""
        data = dataclasses.asdict(self)  # type: ignore[call-overload]
        data["method"] = self.method
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AdapterConfig:
        """Build a config from :meth:`to_dict` output (or its JSON), checking each value against its field.

        Unknown keys, and a value that does not fit the field's declared type,
        are a :class:`~tt_core.api.errors.ConfigError` naming the key.
        """
        data = {k: v for k, v in data.items() if k != "method"}
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(
                f"{cls.__name__} got unknown keys {unknown}; known keys are {sorted(names)}. "
                "Was this adapter saved by a newer version of its plugin?"
            )
        declared = _field_types(cls)
        values = {}
        for key, value in data.items():
            if key not in declared:
                values[key] = value
                continue
            try:
                values[key] = _from_json(value, declared[key])
            except _Mismatch:
                raise ConfigError(
                    f"{cls.__name__} key {key!r} is {value!r}, which is not {_describe(declared[key])} "
                    f"(the type of {cls.__name__}.{key}); give a value of that type, or save the adapter "
                    "again with the installed version of its plugin"
                ) from None
        try:
            return cls(**values)
        except TypeError as error:  # a required field missing, say
            raise ConfigError(f"{cls.__name__}: {error}") from None

    def relocate_tokens(
        self, moved: Mapping[int, int], tensors: dict[str, torch.Tensor], vocabulary: Mapping[str, int]
    ) -> tuple[AdapterConfig, dict[str, torch.Tensor]]:
        """This adapter with its tokens moved to other ids: a new config and the tensors it loads.

        Asked by ``Registry.load(..., relocate=True)`` (docs/registry.md) before
        anything changes. ``moved`` maps old token ids to new ones (ids not in
        it stay). ``tensors`` are the saved ones, keyed ``<target>.<name>``.
        ``vocabulary`` gives, for each target whose rows are token ids (the
        input embedding, the output head and modules tied to them), its row
        count after the load: the returned tensors must fit it. The result
        must give each token, at its new id, exactly what this adapter gave it
        at the old one; a method that cannot promise that raises
        :class:`~tt_core.api.errors.ConfigError` saying why. The default
        refuses: a method says how its state follows token ids.
        """
        raise ConfigError(
            f"method {self.method!r} does not say how to move its rows to other token ids or onto a larger "
            "vocabulary (AdapterConfig.relocate_tokens); load it without relocate=True, with adapters whose "
            "tokens do not collide"
        )
