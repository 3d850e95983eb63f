"""The plugin manager: entry-point plugins, run-time plugins, and the methods they own.

Plugins come from the entry-point group ``tt_core.plugins`` (loaded with
pluggy's own loader, which records each plugin's distribution) and from
objects registered at run time (``get_plugin_manager().register(obj)``). Each
plugin's ``register_methods`` hook is called once, when it is registered. A
plugin that fails to import, implements a hook tt_core does not define (a
misspelled name), registers a bad method, or claims a method name another
plugin owns is reported by name with its error and skipped; set
``TT_STRICT_PLUGINS=1`` to turn that into an exception, and
``TT_DISABLE_PLUGINS=a,b`` to leave plugins out by name.

The core asks a method's hooks only of the plugin that registered the method
(and of the core defaults in :mod:`tt_core.defaults`, called last), through
:meth:`PluginManager.hooks_for`. So no plugin can answer for another's config.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.metadata
import os
import warnings
from typing import Any

import pluggy

from tt_core import defaults
from tt_core.api import hookspecs
from tt_core.api.config import AdapterConfig
from tt_core.api.errors import PluginError
from tt_core.api.register import Method, MethodRegister

ENTRY_POINT_GROUP = "tt_core.plugins"
DEFAULTS_NAME = "tt_core.defaults"


class PluginManager(pluggy.PluginManager):
    """pluggy's manager plus the method table and the list of failed plugins."""

    def __init__(self) -> None:
        super().__init__(hookspecs.PROJECT_NAME)
        self.add_hookspecs(hookspecs)
        self.failures: list[tuple[str, str]] = []
        self._methods: dict[str, Method] = {}
        self._callers: dict[str, MethodHooks] = {}
        self._table: dict[str, Method] | None = None  # _methods with distributions, built on first use
        self.register(defaults, name=DEFAULTS_NAME)

    def register(self, plugin: object, name: str | None = None) -> str | None:
        """Register ``plugin`` and the methods it declares; a bad declaration unregisters it."""
        plugin_name = super().register(plugin, name)
        if plugin_name is None:  # blocked
            return None
        try:
            self._check_hook_names(plugin_name, plugin)
            methods = self._declared(plugin_name, plugin)
        except Exception:
            super().unregister(plugin)
            raise
        for method in methods:
            self._methods[method.name] = method
        self._forget_tables()
        return plugin_name

    def _check_hook_names(self, plugin_name: str, plugin: object) -> None:
        """pluggy's ``check_pending``, run as each plugin comes: a misspelled hook name is an error.

        Every plugin registered before passed this check, so whatever it finds
        belongs to ``plugin``.
        """
        try:
            self.check_pending()
        except pluggy.PluginValidationError:
            unknown = sorted(
                caller.name
                for caller in self.get_hookcallers(plugin) or []
                if not caller.has_spec()
                and any(impl.plugin is plugin and not impl.optionalhook for impl in caller.get_hookimpls())
            )
            known = sorted(name for name, caller in vars(self.hook).items() if caller.has_spec())
            hints = []
            for name in unknown:
                close = difflib.get_close_matches(name, known, n=1)
                hints.append(f"{name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
            raise PluginError(
                f"plugin {plugin_name!r} implements {', '.join(hints)}, which is not a tt_core hook; "
                f"rename it to one of {known}, or mark it @hookimpl(optionalhook=True) if it is meant "
                "to be absent from this version of tt_core"
            ) from None

    def _declared(self, plugin_name: str, plugin: object) -> list[Method]:
        register = MethodRegister(plugin_name)
        others = [p for p in self.get_plugins() if p is not plugin]
        self.subset_hook_caller("register_methods", others)(register=register)
        for method in register.methods:
            owner = self._methods.get(method.name)
            if owner is not None:
                raise PluginError(
                    f"method {method.name!r} is already provided by plugin {owner.plugin!r}"
                    f"{self._from(owner.plugin)}; uninstall one of them, or set "
                    f"TT_DISABLE_PLUGINS={plugin_name}"
                )
        names = [method.name for method in register.methods]
        if len(set(names)) != len(names):
            raise PluginError(f"plugin {plugin_name!r} registers a method name twice: {names}")
        return register.methods

    def unregister(self, plugin: object | None = None, name: str | None = None) -> Any:
        """Unregister a plugin, given as the object or by name, and the methods it registered."""
        if name is None and plugin is not None:
            name = self.get_name(plugin)  # before pluggy forgets it
        removed = super().unregister(plugin, name)
        self._methods = {key: m for key, m in self._methods.items() if m.plugin != name}
        self._forget_tables()
        return removed

    def load_entry_points(self, strict: bool | None = None) -> None:
        """Load every plugin of the ``tt_core.plugins`` group, each on its own.

        One that fails is reported in :attr:`failures` (and warned about) and
        skipped; the others keep working.
        """
        if strict is None:
            strict = os.environ.get("TT_STRICT_PLUGINS", "") not in ("", "0")
        for blocked in os.environ.get("TT_DISABLE_PLUGINS", "").split(","):
            if blocked.strip():
                self.set_blocked(blocked.strip())
        # In name order, whatever sys.path says: of two plugins claiming one method, the first keeps it.
        entry_points = sorted(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name)
        for entry_point in entry_points:
            if self.has_plugin(entry_point.name) or self.is_blocked(entry_point.name):
                continue
            try:
                self.load_setuptools_entrypoints(ENTRY_POINT_GROUP, name=entry_point.name)
                self._forget_tables()  # pluggy records the distribution after registering the plugin
            except Exception as error:
                if self.get_plugin(entry_point.name) is not None:
                    self.unregister(name=entry_point.name)
                message = f"{type(error).__name__}: {error}"
                self.failures.append((entry_point.name, message))
                if strict:
                    raise PluginError(
                        f"tt plugin {entry_point.name!r} ({entry_point.value}) failed: {message}"
                    ) from error
                warnings.warn(
                    f"tt plugin {entry_point.name!r} ({entry_point.value}) was skipped: {message}",
                    stacklevel=2,
                )

    def distribution(self, plugin_name: str) -> tuple[str, str] | None:
        """(package name, version) of the distribution that installed a plugin, from pluggy."""
        plugin = self.get_plugin(plugin_name)
        for candidate, dist in self.list_plugin_distinfo():
            if candidate is plugin:
                return dist.project_name, dist.version
        return None

    def _from(self, plugin_name: str) -> str:
        dist = self.distribution(plugin_name)
        return f" (package {dist[0]} {dist[1]})" if dist else ""

    def _forget_tables(self) -> None:
        """Drop what is derived from the registered plugins; called whenever one comes or goes."""
        self._callers.clear()
        self._table = None

    @property
    def methods(self) -> dict[str, Method]:
        """Every registered method by name, with the package that provides it (a copy)."""
        if self._table is None:
            dists = {
                self.get_name(plugin): (dist.project_name, dist.version)
                for plugin, dist in self.list_plugin_distinfo()
            }
            self._table = {}
            for name, method in self._methods.items():
                dist = dists.get(method.plugin, (None, None))
                self._table[name] = dataclasses.replace(method, distribution=dist[0], version=dist[1])
        return dict(self._table)

    def method_for(self, config: AdapterConfig) -> Method:
        """The registered method whose config class ``config`` is."""
        method = self.methods.get(getattr(config, "method", None))  # type: ignore[arg-type]
        if method is None or not isinstance(config, method.config_class):
            raise PluginError(
                f"no installed plugin provides adapter method {getattr(config, 'method', None)!r} "
                f"(installed: {sorted(self._methods)}); install the plugin's package, "
                "or register it with tt_core.get_plugin_manager().register(plugin)"
            )
        return method

    def hooks_for(self, method_name: str) -> MethodHooks:
        """The hooks of one method: its plugin's answers, then the core defaults."""
        if method_name not in self._callers:
            owner = self.get_plugin(self._methods[method_name].plugin)
            others = [p for p in self.get_plugins() if p is not owner and p is not defaults]
            self._callers[method_name] = MethodHooks(self, others)
        return self._callers[method_name]

    def config_from_dict(self, data: dict[str, Any]) -> AdapterConfig:
        """Rebuild a saved config through the plugin that registered its method."""
        name = data.get("method")
        if name not in self._methods:
            raise PluginError(
                f"the saved adapter uses method {name!r}, which no installed plugin provides "
                f"(installed: {sorted(self._methods)}); install the plugin that provides it"
            )
        return self._methods[name].config_class.from_dict(data)


class MethodHooks:
    """The hooks asked of one method's plugin only (then of the core defaults)."""

    def __init__(self, manager: PluginManager, others: list[object]) -> None:
        self.detect_target = manager.subset_hook_caller("detect_target", others)
        self.create_layer = manager.subset_hook_caller("create_layer", others)
        self.tie_handler = manager.subset_hook_caller("tie_handler", others)
        self.merge = manager.subset_hook_caller("merge", others)
        self.hotswap = manager.subset_hook_caller("hotswap", others)
        self.peft_export = manager.subset_hook_caller("peft_export", others)
        self.combine = manager.subset_hook_caller("combine", others)


_manager: PluginManager | None = None


def get_plugin_manager() -> PluginManager:
    """The process-wide plugin manager, loading entry points on first use."""
    global _manager
    if _manager is None:
        _manager = PluginManager()
        _manager.load_entry_points()
    return _manager
