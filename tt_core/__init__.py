"""tt_core: the framework for token-embedding adapters. Methods come from plugins.

The public names below are imported on first use (PEP 562), so ``import
tt_core`` costs next to nothing: the ``tt`` command starts, and installs its
Ctrl-C handling, before torch and transformers load.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tt_core.config import AdapterConfig
    from tt_core.errors import (
        AdapterStateError,
        ArgumentTypeError,
        ConfigError,
        MissingFiles,
        PluginError,
        RegistryError,
        SavedFolderError,
        StorageError,
        TTError,
    )
    from tt_core.hookspecs import hookimpl
    from tt_core.layer import AdapterLayer, AdapterState
    from tt_core.model import AdapterModel, get_adapter_model
    from tt_core.plugins import MethodRegister, get_plugin_manager
    from tt_core.registry import Registry

# public name -> the module that defines it
_LAZY = {
    "AdapterConfig": "tt_core.config",
    "AdapterStateError": "tt_core.errors",
    "ArgumentTypeError": "tt_core.errors",
    "ConfigError": "tt_core.errors",
    "MissingFiles": "tt_core.errors",
    "PluginError": "tt_core.errors",
    "RegistryError": "tt_core.errors",
    "SavedFolderError": "tt_core.errors",
    "StorageError": "tt_core.errors",
    "TTError": "tt_core.errors",
    "hookimpl": "tt_core.hookspecs",
    "AdapterLayer": "tt_core.layer",
    "AdapterState": "tt_core.layer",
    "AdapterModel": "tt_core.model",
    "get_adapter_model": "tt_core.model",
    "MethodRegister": "tt_core.plugins",
    "get_plugin_manager": "tt_core.plugins",
    "Registry": "tt_core.registry",
}

__all__ = [
    "AdapterConfig",
    "AdapterStateError",
    "ArgumentTypeError",
    "ConfigError",
    "MissingFiles",
    "PluginError",
    "RegistryError",
    "SavedFolderError",
    "StorageError",
    "TTError",
    "AdapterLayer",
    "AdapterModel",
    "AdapterState",
    "get_adapter_model",
    "Registry",
    "get_plugin_manager",
    "hookimpl",
    "MethodRegister",
]


def __getattr__(name: str) -> Any:
    """Import a public name's module on first use; ``tt_core.<submodule>`` works as before too."""
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    if not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
