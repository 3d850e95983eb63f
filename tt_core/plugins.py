"""The plugin manager: entry-point plugins, run-time plugins, and their methods.

Plugins come from the entry-point group ``tt_core.plugins`` and from objects
registered at run time (``get_plugin_manager().register(obj)``). A plugin that
fails to import or to validate is reported by name with its error and skipped;
set ``TT_STRICT_PLUGINS=1`` to turn that into an exception.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import os
import warnings
from typing import Any

import pluggy

from tt_core import hookspecs
from tt_core.config import AdapterConfig

ENTRY_POINT_GROUP = "tt_core.plugins"


@dataclasses.dataclass(frozen=True)
class Method:
    """One adapter method: its name, config class and the plugin providing it."""

    name: str
    config_class: type[AdapterConfig]
    plugin: str
    distribution: str | None = None  # the installed package providing it, if any
    version: str | None = None


class MethodRegister:
    """Handed to ``register_methods``; a plugin calls it once per method."""

    def __init__(self, plugin_name: str) -> None:
        self.plugin_name = plugin_name
        self.methods: list[Method] = []

    def __call__(self, name: str, config_class: type[AdapterConfig]) -> None:
        if not (isinstance(config_class, type) and issubclass(config_class, AdapterConfig)):
            raise TypeError(f"config_class for method {name!r} must subclass tt_core.AdapterConfig")
        if config_class.method != name:
            raise ValueError(
                f"method {name!r} is registered with {config_class.__name__}, whose "
                f"method attribute is {config_class.method!r}; make them equal"
            )
        self.methods.append(Method(name, config_class, self.plugin_name))


class PluginManager(pluggy.PluginManager):
    """pluggy's manager plus the method table and the list of failed plugins."""

    def __init__(self) -> None:
        super().__init__("tt_core")
        self.add_hookspecs(hookspecs)
        self.failures: list[tuple[str, str]] = []
        self.distributions: dict[str, tuple[str, str]] = {}  # plugin name -> (package, version)
        self._methods: dict[str, Method] | None = None

    def register(self, plugin: object, name: str | None = None) -> str | None:
        self._methods = None
        return super().register(plugin, name)

    def unregister(self, plugin: object | None = None, name: str | None = None) -> Any:
        self._methods = None
        return super().unregister(plugin, name)

    def load_entry_points(self, strict: bool | None = None) -> None:
        """Import and register every plugin of the ``tt_core.plugins`` group."""
        if strict is None:
            strict = os.environ.get("TT_STRICT_PLUGINS", "") not in ("", "0")
        for entry_point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            if self.get_plugin(entry_point.name) is not None or self.is_blocked(entry_point.name):
                continue
            try:
                plugin = entry_point.load()
                self.register(plugin, name=entry_point.name)
                if entry_point.dist is not None:
                    self.distributions[entry_point.name] = (entry_point.dist.name, entry_point.dist.version)
                self._collect(entry_point.name, plugin)
                self.check_pending()
            except Exception as error:
                if self.get_plugin(entry_point.name) is not None:
                    self.unregister(name=entry_point.name)
                message = f"{type(error).__name__}: {error}"
                self.failures.append((entry_point.name, message))
                if strict:
                    raise RuntimeError(
                        f"tt plugin {entry_point.name!r} ({entry_point.value}) failed: {message}"
                    ) from error
                warnings.warn(
                    f"tt plugin {entry_point.name!r} ({entry_point.value}) was skipped: {message}",
                    stacklevel=2,
                )

    def _collect(self, plugin_name: str, plugin: object) -> list[Method]:
        impl = getattr(plugin, "register_methods", None)
        register = MethodRegister(plugin_name)
        if impl is not None:
            impl(register=register)
        distribution, version = self.distributions.get(plugin_name, (None, None))
        return [dataclasses.replace(m, distribution=distribution, version=version) for m in register.methods]

    @property
    def methods(self) -> dict[str, Method]:
        """Every registered method by name; a name claimed twice is an error."""
        if self._methods is None:
            table: dict[str, Method] = {}
            for plugin_name, plugin in self.list_name_plugin():
                if plugin is None:
                    continue
                for method in self._collect(plugin_name, plugin):
                    if method.name in table:
                        raise ValueError(
                            f"adapter method {method.name!r} is provided by both plugin "
                            f"{table[method.name].plugin!r} and {plugin_name!r}; uninstall one"
                        )
                    table[method.name] = method
            self._methods = table
        return self._methods

    def method_for(self, config: AdapterConfig) -> Method:
        """The registered method whose config class ``config`` is."""
        method = self.methods.get(config.method)
        if method is None or not isinstance(config, method.config_class):
            raise ValueError(
                f"no installed plugin provides adapter method {config.method!r} "
                f"(installed: {sorted(self.methods)}); install the plugin's package, "
                "or register it with tt_core.get_plugin_manager().register(plugin)"
            )
        return method

    def config_from_dict(self, data: dict[str, Any]) -> AdapterConfig:
        """Rebuild a saved config through the plugin that registered its method."""
        name = data.get("method")
        if name not in self.methods:
            raise ValueError(
                f"the saved adapter uses method {name!r}, which no installed plugin provides "
                f"(installed: {sorted(self.methods)}); install the plugin that provides it"
            )
        return self.methods[name].config_class.from_dict(data)


_manager: PluginManager | None = None


def get_plugin_manager() -> PluginManager:
    """The process-wide plugin manager, loading entry points on first use."""
    global _manager
    if _manager is None:
        _manager = PluginManager()
        _manager.load_entry_points()
    return _manager
