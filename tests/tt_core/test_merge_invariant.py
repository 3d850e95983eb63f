"""An adapter is merged into a weight exactly when its name is in ``merged_adapters``, once.

Random walks over the verbs (add, set_adapter, merge_adapter of subsets,
unmerge_adapter, delete_adapter of idle, active and merged adapters,
load_adapter, disable_adapter) on a tied model holding trainable tokens and
LoRA on the embedding. After every step the embedding weight is the base
weight with exactly the merged adapters folded in, in merge order, and the
model's logits are those of the active stack.

The LoRA adapters leave the trainable-token rows alone (their ``A`` is zero
there), so those rows are compared bit for bit: merging writes the adapter's
rows exactly, and unmerging puts back exactly the rows it found.
"""

from __future__ import annotations

import random
import warnings
from pathlib import Path

import pytest
import torch
from models import adapter_state, batch, build, logits, reference_logits

from tt_core import AdapterModel
from tt_plugins.lora_embedding import LoraEmbeddingConfig
from tt_plugins.trainable_tokens import TrainableTokensConfig

FAMILY = "llama_tied"
TOKEN_POOL = [3, 17, 64, 90, 100]  # ids some trainable-tokens adapter may train
STEPS = 60


class Walk:
    """The model under test, what the test knows of each adapter, and the checks."""

    def __init__(self, seed: int, folder: Path) -> None:
        self.random = random.Random(seed)
        torch.manual_seed(seed)
        self.reference = build(FAMILY)
        self.base_weight = self.reference.get_input_embeddings().weight.detach().clone()
        self.adapter_model = AdapterModel(build(FAMILY))
        self.inputs = batch(FAMILY, TOKEN_POOL)
        self.kinds: dict[str, str] = {}
        self.saved: dict[str, tuple[Path, str]] = {}  # folder holding one adapter -> its kind
        self.count = 0
        for kind in ("tokens", "lora", "tokens"):
            self.add(kind)
        self.adapter_model.set_adapter(self.adapter_model.adapters[:2])
        for name in self.adapter_model.adapters:
            target = folder / name
            self.adapter_model.save_pretrained(target, selected_adapters=[name])
            self.saved[name] = (target, self.kinds[name])

    # ------------------------------------------------------------ the steps
    def add(self, kind: str) -> None:
        name = f"{kind}{self.count}"
        self.count += 1
        if kind == "tokens":
            ids = self.random.sample(TOKEN_POOL, 2)
            self.adapter_model.add_adapter(name, TrainableTokensConfig(token_indices=ids, init_weights=False))
        else:
            self.adapter_model.add_adapter(name, LoraEmbeddingConfig(r=2, lora_alpha=4, init_weights=False))
            with torch.no_grad():  # leave the trainable-token rows alone: they are then exact
                self.state(name).lora_embedding_A[:, TOKEN_POOL] = 0
        self.kinds[name] = kind

    def step(self) -> str:
        model = self.adapter_model
        names = model.adapters
        verb = self.random.choice(
            ["add", "set_adapter", "merge", "merge", "unmerge", "delete", "load", "disable"]
        )
        if verb == "add" and len(names) >= 5:
            verb = "delete"
        if not names or verb == "add":
            self.add(self.random.choice(["tokens", "lora"]))
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
            del self.kinds[name]
            return f"delete_adapter({name!r}) (merged {model.merged_adapters})"
        if verb == "load":
            source = self.random.choice(sorted(self.saved))
            folder, kind = self.saved[source]
            name = f"loaded{self.count}"
            self.count += 1
            # strict=False: a merged LoRA changes the weight the saved fingerprint describes
            model.load_adapter(folder, name, strict=False)
            self.kinds[name] = kind
            return f"load_adapter({source!r} as {name!r})"
        merged, active = model.merged_adapters, model.active_adapters
        with model.disable_adapter():
            self.check_weight([])
            with torch.no_grad():
                torch.testing.assert_close(logits(model, self.inputs), self.expected_logits([]))
        assert (model.merged_adapters, model.active_adapters) == (merged, active)
        return "disable_adapter()"

    # ------------------------------------------------------------ the checks
    def state(self, name: str) -> torch.nn.Module:
        return adapter_state(self.adapter_model, FAMILY, name)

    def fold(self, names: list[str]) -> torch.Tensor:
        """The base weight with ``names`` applied in order: tokens replace rows, LoRA adds."""
        weight = self.base_weight
        for name in names:
            state = self.state(name)
            if self.kinds[name] == "tokens":
                weight = weight.index_copy(0, state.token_indices, state.trainable_tokens_rows.detach())
            else:
                weight = weight + state.delta_weight().detach()
        return weight

    def expected_logits(self, stack: list[str]) -> torch.Tensor:
        return reference_logits(self.reference, FAMILY, self.fold(stack), self.inputs)

    def check_weight(self, merged: list[str]) -> None:
        weight = self.adapter_model.get_input_embeddings().weight.detach()
        expected = self.fold(merged)
        torch.testing.assert_close(weight, expected)
        assert torch.equal(weight[TOKEN_POOL], expected[TOKEN_POOL]), "token rows are not exact"
        assert (
            self.adapter_model.get_output_embeddings().weight
            is self.adapter_model.get_input_embeddings().weight
        )

    def check(self) -> None:
        model = self.adapter_model
        merged = model.merged_adapters
        assert len(set(merged)) == len(merged), f"merged twice: {merged}"
        assert set(merged) <= set(model.active_adapters)
        self.check_weight(merged)
        with torch.no_grad():
            torch.testing.assert_close(
                logits(model, self.inputs), self.expected_logits(model.active_adapters)
            )


@pytest.mark.parametrize("seed", range(4))
def test_merged_adapters_are_in_the_weight_exactly_once_through_any_verbs(seed, tmp_path):
    walk = Walk(seed, tmp_path)
    walk.check()
    done: list[str] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # switching while merged, deleting the active adapter
        for _ in range(STEPS):
            done.append(walk.step())
            try:
                walk.check()
            except AssertionError as error:
                raise AssertionError(f"after {done[-8:]}: {error}") from error
    walk.adapter_model.unmerge_adapter()
    walk.check_weight([])


def test_deleting_an_idle_adapter_leaves_a_merged_stack_as_it_was():
    model = AdapterModel(build(FAMILY))
    model.add_adapter("tokens", TrainableTokensConfig(token_indices=[3, 17], init_weights=False))
    model.add_adapter("style", LoraEmbeddingConfig(r=2, lora_alpha=4, init_weights=False))
    model.add_adapter("idle", TrainableTokensConfig(token_indices=[64], init_weights=False))
    base = model.get_input_embeddings().weight.detach().clone()
    inputs = batch(FAMILY, [3, 17, 64])
    model.set_adapter(["tokens", "style"])
    model.merge_adapter()
    weight = model.get_input_embeddings().weight
    merged_weight = weight.detach().clone()
    with torch.no_grad():
        before = logits(model, inputs)
    model.delete_adapter("idle")
    assert model.merged_adapters == ["tokens", "style"]
    assert torch.equal(weight, merged_weight)
    with torch.no_grad():
        assert torch.equal(logits(model, inputs), before)
    model.unmerge_adapter()
    assert torch.equal(weight[[3, 17]], base[[3, 17]])
    torch.testing.assert_close(weight, base)
