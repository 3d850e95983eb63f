"""tt_core: the framework for token-embedding adapters. Methods come from plugins."""

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
