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
    from tt_core.api.config import AdapterConfig
    from tt_core.api.errors import (
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
    from tt_core.api.hookspecs import hookimpl
    from tt_core.api.register import MethodRegister
    from tt_core.model import AdapterModel, get_adapter_model
    from tt_core.plugins import get_plugin_manager
    from tt_core.registry import Registry
    from tt_core.relocation import Relocation, RelocationWarning
    from tt_core.tensors.state import AdapterState
    from tt_core.tensors.wrapper import AdapterLayer

# public name -> the module that defines it
_LAZY = {
    "AdapterConfig": "tt_core.api.config",
    "AdapterStateError": "tt_core.api.errors",
    "ArgumentTypeError": "tt_core.api.errors",
    "ConfigError": "tt_core.api.errors",
    "MissingFiles": "tt_core.api.errors",
    "PluginError": "tt_core.api.errors",
    "RegistryError": "tt_core.api.errors",
    "SavedFolderError": "tt_core.api.errors",
    "StorageError": "tt_core.api.errors",
    "TTError": "tt_core.api.errors",
    "hookimpl": "tt_core.api.hookspecs",
    "AdapterLayer": "tt_core.tensors.wrapper",
    "AdapterState": "tt_core.tensors.state",
    "AdapterModel": "tt_core.model",
    "get_adapter_model": "tt_core.model",
    "MethodRegister": "tt_core.api.register",
    "get_plugin_manager": "tt_core.plugins",
    "Registry": "tt_core.registry",
    "Relocation": "tt_core.relocation",
    "RelocationWarning": "tt_core.relocation",
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
    "Relocation",
    "RelocationWarning",
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
