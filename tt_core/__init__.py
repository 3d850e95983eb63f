"""tt_core: the framework for token-embedding adapters. Methods come from plugins."""

import pluggy

hookimpl = pluggy.HookimplMarker("tt_core")

from tt_core.config import AdapterConfig  # noqa: E402
from tt_core.errors import (  # noqa: E402
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
from tt_core.layer import AdapterLayer, AdapterState  # noqa: E402
from tt_core.model import AdapterModel, get_adapter_model  # noqa: E402
from tt_core.plugins import get_plugin_manager  # noqa: E402
from tt_core.registry import Registry  # noqa: E402

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
]
