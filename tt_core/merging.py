"""The merge engine: which adapters are folded into the base weights, and the checks before any write.

Invariant: an adapter is merged exactly once, exactly while it is listed in
:attr:`Merges.merged`. Every merge or unmerge of one adapter touches all of
its sites or none, and the list changes with it; a merge of several is all
or none (those already made are undone, newest first, on any error).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from tt_core.api.errors import AdapterStateError, PluginError
from tt_core.plugins import MethodHooks, get_plugin_manager
from tt_core.records import AdapterRecord, Site
from tt_core.tensors.distributed import reshard_fsdp


class Merges:
    """The adapters of ``model`` merged into its base weights, in the order they were merged.

    ``records`` is the model's live mapping of adapter records (read, never
    changed here). ``root`` is the module FSDP2 may have wrapped (the
    AdapterModel): merges reshard it first, so they write into the shards.
    """

    def __init__(self, model: nn.Module, records: Mapping[str, AdapterRecord], root: nn.Module) -> None:
        self.model = model
        self.records = records
        self.root = root
        self.merged: list[str] = []

    # ----------------------------------------------------------------- checks
    def check_order(self, active: list[str], merge_order: list[str]) -> None:
        """Refuse a merge whose base-first order changes what the active stack computes.

        The model applies merged adapters first (they are in the weight), then the
        unmerged active ones. Any pair whose order that swaps must commute.
        """
        applied = merge_order + [name for name in active if name not in merge_order]
        stack = active
        conflicts = []
        for i, first in enumerate(stack):
            for second in stack[i + 1 :]:
                if applied.index(second) > applied.index(first):
                    continue
                for site_a in self.records[first].sites:
                    for site_b in self.records[second].sites:
                        same = site_a.weight(self.model) is site_b.weight(self.model)
                        if same and not site_a.state.commutes_with(site_b.state):
                            conflicts.append((first, second, site_a.modules[0]))
        if conflicts:
            lines = [
                f"{a!r} ({self.records[a].config.method}) comes before {b!r} "
                f"({self.records[b].config.method}) in the active stack and both change the same rows "
                f"of {module}.weight"
                for a, b, module in conflicts
            ]
            last = max(stack.index(name) for name in merge_order if name in stack)
            raise AdapterStateError(
                f"merging {merge_order} would change the outputs of the active stack {stack}: "
                + "; ".join(lines)
                + f". Merge a prefix of the stack instead, e.g. merge_adapter({stack[: last + 1]}), "
                "or reorder the stack with set_adapter() first. Nothing was merged."
            )

    def check_ties(self, names: list[str]) -> None:
        """Refuse to merge an adapter whose plugin declined a module sharing the weight."""
        for name in names:
            for site in self.records[name].sites:
                if site.declined:
                    raise AdapterStateError(
                        f"adapter {name!r} ({self.records[name].config.method}) adapts {site.modules} but "
                        f"not {site.declined}, which hold the same weight: merging it would change their "
                        "outputs too. Use it unmerged, or have the plugin's tie_handler share it with them. "
                        "Nothing was merged."
                    )

    def check_writes(self, names: list[str]) -> None:
        """safe_merge: merge into copies of the weights, in their dtype, and refuse NaN or inf."""
        reshard_fsdp(self.root)  # FSDP2: write into the sharded weights it keeps, not a gathered copy
        copies: dict[int, torch.Tensor] = {}
        applied: list[tuple[MethodHooks, Site, torch.Tensor]] = []
        try:
            for name in names:
                hooks = self._hooks(name)
                for site in self.records[name].sites:
                    weight = site.weight(self.model)
                    copy_ = copies.setdefault(id(weight), weight.detach().clone())
                    _call_merge(hooks, site, copy_, unmerge=False)
                    applied.append((hooks, site, copy_))
                    if not bool(torch.isfinite(copy_).all()):
                        dtype = str(copy_.dtype).removeprefix("torch.")
                        raise AdapterStateError(
                            f"merging adapter {name!r} would write NaN or inf into {site.modules[0]}.weight "
                            f"({dtype}); safe_merge refused it and no weight was changed"
                        )
        finally:
            for hooks, site, copy_ in reversed(applied):
                _call_merge(hooks, site, copy_, unmerge=True)

    # ----------------------------------------------------------------- writes
    def _hooks(self, name: str) -> MethodHooks:
        manager = get_plugin_manager()
        return manager.hooks_for(manager.method_for(self.records[name].config).name)

    def merge_one(self, name: str) -> None:
        """Merge one adapter on every site, or on none; an adapter is never merged twice."""
        if name in self.merged:
            raise AdapterStateError(
                f"adapter {name!r} is already merged (merged: {self.merged}); merging it again would apply "
                "it twice. Nothing was changed."
            )
        reshard_fsdp(self.root)  # FSDP2: write into the sharded weights it keeps, not a gathered copy
        hooks = self._hooks(name)
        done: list[Site] = []
        try:
            for site in self.records[name].sites:
                _call_merge(hooks, site, site.weight(self.model), unmerge=False)
                site.state.merged = True
                done.append(site)
        except BaseException:
            for site in reversed(done):
                _call_merge(hooks, site, site.weight(self.model), unmerge=True)
                site.state.merged = False
            raise
        self.merged.append(name)

    def unmerge_last(self) -> None:
        """Unmerge the adapter merged last, on every site."""
        reshard_fsdp(self.root)  # FSDP2: write into the sharded weights it keeps, not a gathered copy
        name = self.merged[-1]
        hooks = self._hooks(name)
        for site in reversed(self.records[name].sites):
            _call_merge(hooks, site, site.weight(self.model), unmerge=True)
            site.state.merged = False
        self.merged.pop()

    def unmerge_all(self) -> None:
        """Unmerge everything, newest first."""
        while self.merged:
            self.unmerge_last()

    def merge_exactly(self, names: list[str]) -> None:
        """Leave exactly ``names`` merged, in this order: unmerge down to the longest common
        prefix of what is merged and ``names``, then merge the rest (all of it, or none)."""
        keep = 0
        while keep < min(len(names), len(self.merged)) and self.merged[keep] == names[keep]:
            keep += 1
        while len(self.merged) > keep:
            self.unmerge_last()
        self.merge_all_or_none(names[keep:])

    def merge_all_or_none(self, names: list[str], progress: Callable[[int], Any] | None = None) -> None:
        """Merge ``names`` in order; on any error unmerge those this call merged, and raise."""
        count = len(self.merged)
        try:
            for name in names:
                self.merge_one(name)
                if progress is not None:
                    progress(1)
        except BaseException:
            while len(self.merged) > count:
                self.unmerge_last()
            raise


def _call_merge(hooks: MethodHooks, site: Site, weight: torch.Tensor, unmerge: bool) -> None:
    if hooks.merge(state=site.state, weight=weight, unmerge=unmerge) is not True:
        verb = "unmerge" if unmerge else "merge"
        raise PluginError(
            f"the merge hook of {type(site.state).__name__} did not {verb} {site.modules[0]} (it must "
            "return True once done)"
        )
