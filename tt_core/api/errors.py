"""The errors tt-adapters raises on purpose, in one hierarchy a program can catch.

Every class is a :class:`TTError`. Each also derives from the built-in
exception the same condition raised before the hierarchy existed
(``ValueError``, ``TypeError``, ``OSError``, ``RuntimeError``), so code that
caught those keeps working. ``tt`` exits 2 for a ``TTError`` and treats any
other exception as a bug.
"""

from __future__ import annotations


class TTError(Exception):
    """Base class of every error raised on purpose by tt_core and the shipped plugins."""


class ConfigError(TTError, ValueError):
    """A config, an argument or an adapter name is invalid; the message says which and what to pass."""


class ArgumentTypeError(TTError, TypeError):
    """An argument has the wrong type (a string where a list is wanted, say)."""


class AdapterStateError(TTError, ValueError, RuntimeError):
    """The call does not fit the model's state: an unknown adapter, a refused merge, a disabled block.

    Both a ``ValueError`` and a ``RuntimeError``: refusals of either kind were raised as one or the other.
    """


class PluginError(TTError, RuntimeError):
    """A plugin failed to load or to validate, or answered a hook wrongly."""


class SavedFolderError(TTError, ValueError):
    """A saved folder, manifest or weight file is missing, corrupt or does not fit the model."""


class MissingFiles(SavedFolderError):
    """Files a manifest lists are gone: a concurrent writer may have cleaned them up, so a reader retries."""


class RegistryError(TTError, ValueError):
    """A registry refused a name, a version or a publish."""


class StorageError(TTError, OSError):
    """A file-system or object-store step failed; the message names the path and what was kept."""
