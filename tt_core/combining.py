"""Weighted combinations of adapters: the checks the core owns, and the call of the method's ``combine`` hook.

:meth:`AdapterModel.add_weighted_adapter` delegates here. The core does not
know how a method's state combines; it knows that the sources must be of one
method, on the same modules, and unmerged from the weights they adapt (a
method such as trainable tokens reads the base rows), and it records where the
result came from (the manifest's ``combined_from``, docs/manifest.md).
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from tt_core.api.combining import RANDOM_TYPES, Combination, CombineSite
from tt_core.api.config import AdapterConfig
from tt_core.api.errors import AdapterStateError, ConfigError, PluginError
from tt_core.plugins import get_plugin_manager
from tt_core.records import AdapterRecord, Site
from tt_core.tensors.state import AdapterState
from tt_core.tensors.targets import named_base_modules
from tt_core.tensors.wrapper import AdapterLayer


def _check_sources(records: Mapping[str, AdapterRecord], names: list[str]) -> None:
    first = records[names[0]]
    first_modules = sorted(site.modules[0] for site in first.sites)
    for name in names[1:]:
        record = records[name]
        if record.config.method != first.config.method:
            raise ConfigError(
                f"adapters {names[0]!r} ({first.config.method}) and {name!r} ({record.config.method}) are "
                "of different methods; only adapters of one method can be combined"
            )
        modules = sorted(site.modules[0] for site in record.sites)
        same = modules == first_modules and all(
            site.modules == _site_of(first, site.modules[0]).modules for site in record.sites
        )
        if not same:
            raise ConfigError(
                f"adapters {names[0]!r} and {name!r} adapt different modules ({names[0]!r}: "
                f"{[site.modules for site in first.sites]}, "
                f"{name!r}: {[site.modules for site in record.sites]}); "
                "only adapters on the same targets can be combined"
            )


def _site_of(record: AdapterRecord, target: str) -> Site:
    return next(site for site in record.sites if site.modules[0] == target)


def _check_unmerged(
    model: nn.Module, records: Mapping[str, AdapterRecord], names: list[str], merged: list[str]
) -> None:
    """Refuse while a source, or any adapter sharing a weight with one, is merged into that weight."""
    weights = {id(site.weight(model)) for name in names for site in records[name].sites}
    for other in merged:
        if any(id(site.weight(model)) in weights for site in records[other].sites):
            raise AdapterStateError(
                f"adapter {other!r} is merged into a weight that {names} adapt, so the weight does not hold "
                "the base the sources change; unmerge_adapter() first, combine, then merge again"
            )


def combine(
    model: nn.Module,
    records: Mapping[str, AdapterRecord],
    merged: list[str],
    combination: Combination,
) -> tuple[AdapterConfig, list[Site], dict[str, Any]]:
    """The new adapter's config and sites (not yet on the model), and its ``combined_from`` record.

    Nothing changes on the model or the sources: the caller adds the sites.
    """
    names = list(combination.adapters)
    _check_sources(records, names)
    _check_unmerged(model, records, names, merged)
    if combination.seed is None and combination.combination_type in RANDOM_TYPES:
        # Drawn from torch's generator, as PEFT's masks are, and recorded: the result can be remade.
        combination = dataclasses.replace(combination, seed=int(torch.randint(0, 2**31 - 1, ()).item()))
    first = records[names[0]]
    modules = dict(named_base_modules(model))
    combine_sites = [
        CombineSite(
            modules=list(site.modules),
            base_layer=modules[site.modules[0]],
            states=[_site_of(records[name], site.modules[0]).state for name in names],
        )
        for site in first.sites
    ]
    configs = [copy.deepcopy(records[name].config) for name in names]
    manager = get_plugin_manager()
    method = manager.method_for(first.config)
    answer = manager.hooks_for(method.name).combine(
        configs=configs, sites=combine_sites, combination=combination
    )
    config, states = _checked_answer(answer, method.name, method.config_class, len(combine_sites))
    sources = {id(state) for site in combine_sites for state in site.states}
    sites = []
    for site, state in zip(first.sites, states, strict=True):
        if id(state) in sources:
            raise PluginError(f"the combine hook of method {method.name!r} returned a source's own state")
        for name in site.modules:
            AdapterLayer.check_wrappable(name, modules[name], state)
        sites.append(Site(state, list(site.modules), list(site.declined)))
    return config, sites, _record(records, combination)


def _checked_answer(
    answer: object, method: str, config_class: type[AdapterConfig], count: int
) -> tuple[AdapterConfig, list[AdapterState]]:
    if (
        not isinstance(answer, tuple)
        or len(answer) != 2
        or not isinstance(answer[0], config_class)
        or not isinstance(answer[1], list)
        or len(answer[1]) != count
        or not all(isinstance(state, AdapterState) for state in answer[1])
    ):
        raise PluginError(
            f"the combine hook of method {method!r} returned {type(answer).__name__}, not (a "
            f"{config_class.__name__}, a list of {count} tt_core.AdapterState, one per site)"
        )
    return answer[0], answer[1]


def _record(records: Mapping[str, AdapterRecord], combination: Combination) -> dict[str, Any]:
    """What the manifest's ``combined_from`` holds: the type, each source and its weight, the options."""
    sources = []
    for name, weight in zip(combination.adapters, combination.weights, strict=True):
        source: dict[str, Any] = {"adapter": name, "weight": weight}
        origin = records[name].origin
        if origin is not None:
            source["registry"] = dict(origin)
        sources.append(source)
    return {"combination_type": combination.combination_type, "sources": sources, **combination.record()}
