"""AdapterConfig: the base of every method's config, and its JSON form."""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from typing import Any, ClassVar


def _matches(value: Any, hint: Any) -> bool:
    """Whether a JSON value fits a config field's type hint (the shapes configs use)."""
    origin = typing.get_origin(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, arm) for arm in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if origin is list:
        (item,) = typing.get_args(hint) or (Any,)
        return isinstance(value, list) and all(_matches(v, item) for v in value)
    if origin is dict:
        key, item = typing.get_args(hint) or (Any, Any)
        return isinstance(value, dict) and all(
            _matches(k, key) and _matches(v, item) for k, v in value.items()
        )
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True  # a hint this check does not know: the config's own validation decides


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
            raise ValueError(
                f"target_modules={value!r} is a string, so it is read as a regular expression, and it is "
                f"not a valid one ({error}); give a list of module names instead, e.g. ['embed_tokens']"
            ) from None
        return value
    if isinstance(value, (list, tuple, set, frozenset)) and all(isinstance(name, str) for name in value):
        return sorted(value) if isinstance(value, (set, frozenset)) else list(value)
    raise ValueError(
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
        """Build a config from :meth:`to_dict` output; unknown keys are an error."""
        data = {k: v for k, v in data.items() if k != "method"}
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(
                f"{cls.__name__} got unknown keys {unknown}; known keys are {sorted(names)}. "
                "Was this adapter saved by a newer version of its plugin?"
            )
        hints = typing.get_type_hints(cls)
        for key, value in data.items():
            if key in hints and not _matches(value, hints[key]):
                raise ValueError(
                    f"{cls.__name__} key {key!r} is {value!r}, which is not a {_describe(hints[key])}"
                )
        try:
            return cls(**data)
        except TypeError as error:  # a required field missing, say
            raise ValueError(f"{cls.__name__}: {error}") from None


def _describe(hint: Any) -> str:
    return hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", "")
