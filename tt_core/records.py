"""The adapter records: what the model keeps about each adapter, and the rule for adapter names.

The formats, the merge engine, status reports and per-sample serving take
these records (and the model they adapt), never the whole AdapterModel.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import torch
from torch import nn

from tt_core.api.config import AdapterConfig
from tt_core.api.errors import ConfigError
from tt_core.tensors.state import AdapterState
from tt_core.tensors.wrapper import AdapterLayer

#: Adapter names key modules and name folders on disk; this keeps them safe as both.
MAX_NAME_LENGTH = 64
_ADAPTER_NAME = re.compile(r"[A-Za-z0-9_-]+")
# Names an nn.ModuleDict already uses as attributes cannot be keys of one.
_RESERVED_NAMES = frozenset(name for name in dir(nn.ModuleDict()) if not name.startswith("__"))


def check_adapter_name(adapter_name: object) -> str:
    """Return ``adapter_name`` if it is a valid adapter name, else raise a ValueError saying why."""
    if not isinstance(adapter_name, str) or not _ADAPTER_NAME.fullmatch(adapter_name):
        raise ConfigError(
            f"adapter name {adapter_name!r} must be letters, digits, '_' or '-' (ASCII only: it names a "
            "module key and a folder on disk), e.g. 'chat_markers'"
        )
    if len(adapter_name) > MAX_NAME_LENGTH:
        raise ConfigError(
            f"adapter name {adapter_name[:20]}... is {len(adapter_name)} characters long; the limit is "
            f"{MAX_NAME_LENGTH}. Pick a shorter name."
        )
    if adapter_name in _RESERVED_NAMES:
        raise ConfigError(
            f"adapter name {adapter_name!r} is taken by a PyTorch module attribute; pick another, "
            f"e.g. {adapter_name + '_adapter'!r}"
        )
    return adapter_name


@dataclasses.dataclass
class Site:
    """One adapter state on one base weight, and every module name that uses it."""

    state: AdapterState
    modules: list[str]  # the target first, then the modules tied to it
    declined: list[str]  # modules holding the same weight that the plugin chose not to adapt

    def weight(self, model: nn.Module) -> torch.Tensor:
        """The weight as the model holds it now; never cached, since
        ``load_state_dict(..., assign=True)`` puts new Parameters in place."""
        module = model.get_submodule(self.modules[0])
        return module.base_layer.weight if isinstance(module, AdapterLayer) else module.weight  # type: ignore[return-value]


@dataclasses.dataclass
class AdapterRecord:
    """Everything the model keeps about one adapter."""

    config: AdapterConfig
    sites: list[Site]
    trainable: bool  # its parameters' requires_grad (outside disable_adapter(), which freezes every one)
    for_inference: bool  # loaded with is_trainable=False: set_adapter() keeps it frozen
    fingerprint: dict[str, Any]  # of the base it was added to, written into saves
    #: Where a combined adapter came from (the manifest's ``combined_from``); None for any other.
    combined_from: dict[str, Any] | None = None
    #: The registry version it was loaded from, ``{"name", "version"}``; None otherwise.
    origin: dict[str, Any] | None = None

    def states(self) -> list[AdapterState]:
        """The adapter's states, one per adapted weight."""
        return [site.state for site in self.sites]
