"""AdapterConfig: the base of every method's config, and its JSON form."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar


class AdapterConfig:
    """Settings of one adapter. Subclasses are dataclasses that set ``method``.

    Every method's config has a ``target_modules`` field: module names (full
    names or name suffixes) to adapt, or ``None`` to let the method pick
    (usually the input embedding).
    """

    method: ClassVar[str] = ""
    target_modules: list[str] | None

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
        return cls(**data)
