"""The object handed to a plugin's ``register_methods`` hook, and the method record it builds."""

from __future__ import annotations

import dataclasses
from typing import Any

from tt_core.api.config import AdapterConfig
from tt_core.api.errors import ArgumentTypeError, PluginError


@dataclasses.dataclass(frozen=True)
class Method:
    """One adapter method: its name, config class and the plugin providing it."""

    name: str
    config_class: type[AdapterConfig]
    plugin: str
    distribution: str | None = None  # the installed package providing it, if any
    version: str | None = None


class MethodRegister:
    """Handed to ``register_methods``; a plugin calls it once per config class."""

    def __init__(self, plugin_name: str) -> None:
        self.plugin_name = plugin_name
        self.methods: list[Method] = []

    def __call__(self, config_class: type[AdapterConfig], *extra: Any) -> None:
        if extra:
            raise ArgumentTypeError(
                "register() takes only the config class; the method's name is its `method` class "
                f"attribute (got register({config_class!r}, {', '.join(map(repr, extra))}))"
            )
        if not (isinstance(config_class, type) and issubclass(config_class, AdapterConfig)):
            raise ArgumentTypeError(
                f"register() needs a subclass of tt_core.AdapterConfig, got {config_class!r}"
            )
        name = config_class.method
        if not isinstance(name, str) or not name:
            raise PluginError(
                f"{config_class.__name__} must set the class attribute `method` to the method's name"
            )
        self.methods.append(Method(name, config_class, self.plugin_name))
