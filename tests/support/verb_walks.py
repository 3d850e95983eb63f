"""A random walk over AdapterModel's verbs, checking the merge engine's invariant after every step.

A subclass says how to add an adapter of each kind (``add``), which base
weights it expects (``check_weights``) and which logits (``expected_logits``);
the walk does the rest: add, set_adapter, merge_adapter of subsets,
unmerge_adapter, delete_adapter (of merged adapters a third of the time),
disable_adapter, and ``load`` when the subclass gives one.
"""

from __future__ import annotations

import random
import warnings

import torch
from models import logits
from numerics import assert_same_math

from tt_core import AdapterModel


class VerbWalk:
    addable: tuple[str, ...] = ()  # the kinds ``add`` takes
    verbs: tuple[str, ...] = ("add", "set_adapter", "merge", "merge", "unmerge", "delete", "disable")
    adapter_model: AdapterModel
    inputs: dict[str, torch.Tensor]

    def __init__(self, seed: int) -> None:
        self.random = random.Random(seed)
        torch.manual_seed(seed)
        self.count = 0

    # -------------------------------------------------------- what a walk gives
    def add(self, kind: str) -> None:
        raise NotImplementedError

    def load(self) -> str:
        raise NotImplementedError

    def forget(self, name: str) -> None:
        """``name`` was deleted."""

    def check_weights(self, merged: list[str]) -> None:
        raise NotImplementedError

    def expected_logits(self, stack: list[str]) -> torch.Tensor:
        raise NotImplementedError

    # ---------------------------------------------------------------- the walk
    def new_name(self, kind: str) -> str:
        self.count += 1
        return f"{kind}{self.count - 1}"

    def step(self) -> str:
        model = self.adapter_model
        names = model.adapters
        verb = self.random.choice(self.verbs)
        if verb == "add" and len(names) >= 5:
            verb = "delete"
        if not names or verb == "add":
            self.add(self.random.choice(self.addable))
            return "add"
        if verb == "set_adapter":
            stack = self.random.sample(names, self.random.randint(1, min(3, len(names))))
            model.set_adapter(stack)
            return f"set_adapter({stack})"
        if verb == "merge":
            active = model.active_adapters
            chosen = (
                None
                if self.random.random() < 0.3
                else self.random.sample(active, self.random.randint(1, len(active)))
            )
            merged = model.merged_adapters
            try:
                model.merge_adapter(chosen)
            except ValueError:  # a merge that would reorder non-commuting adapters
                assert model.merged_adapters == merged
                return f"merge_adapter({chosen}) refused"
            return f"merge_adapter({chosen})"
        if verb == "unmerge":
            model.unmerge_adapter()
            return "unmerge_adapter()"
        if verb == "delete":
            # a merged one a third of the time (when there is one), else any: idle or active
            pool = model.merged_adapters if self.random.random() < 0.3 else []
            name = self.random.choice(pool or names)
            model.delete_adapter(name)
            self.forget(name)
            return f"delete_adapter({name!r}) (merged {model.merged_adapters})"
        if verb == "load":
            return self.load()
        merged, active = model.merged_adapters, model.active_adapters
        with model.disable_adapter():
            self.check_weights([])
            with torch.no_grad():
                assert_same_math(logits(model, self.inputs), self.expected_logits([]))
        assert (model.merged_adapters, model.active_adapters) == (merged, active)
        return "disable_adapter()"

    def check(self) -> None:
        model = self.adapter_model
        merged = model.merged_adapters
        assert len(set(merged)) == len(merged), f"merged twice: {merged}"
        assert set(merged) <= set(model.active_adapters)
        self.check_weights(merged)
        with torch.no_grad():
            assert_same_math(logits(model, self.inputs), self.expected_logits(model.active_adapters))

    def run(self, steps: int) -> None:
        """``steps`` random steps, each checked; then everything unmerged gives the base weights back."""
        self.check()
        done: list[str] = []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # switching while merged, deleting the active adapter
            for _ in range(steps):
                done.append(self.step())
                try:
                    self.check()
                except AssertionError as error:
                    raise AssertionError(f"after {done[-8:]}: {error}") from error
        self.adapter_model.unmerge_adapter()
        self.check_weights([])
