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

from pathlib import Path

import pytest
import torch
from models import adapter_state, batch, build, logits, reference_logits
from numerics import assert_same_math
from verb_walks import VerbWalk

from tt_core import AdapterModel
from tt_plugins.lora_embedding import LoraEmbeddingConfig
from tt_plugins.trainable_tokens import TrainableTokensConfig

FAMILY = "llama_tied"
TOKEN_POOL = [3, 17, 64, 90, 100]  # ids some trainable-tokens adapter may train
STEPS = 60


class Walk(VerbWalk):
    """The model under test, what the test knows of each adapter, and the checks."""

    addable = ("tokens", "lora")
    verbs = ("add", "set_adapter", "merge", "merge", "unmerge", "delete", "load", "disable")

    def __init__(self, seed: int, folder: Path) -> None:
        super().__init__(seed)
        self.reference = build(FAMILY)
        self.base_weight = self.reference.get_input_embeddings().weight.detach().clone()
        self.adapter_model = AdapterModel(build(FAMILY))
        self.inputs = batch(FAMILY, TOKEN_POOL)
        self.kinds: dict[str, str] = {}
        self.saved: dict[str, tuple[Path, str]] = {}  # folder holding one adapter -> its kind
        for kind in ("tokens", "lora", "tokens"):
            self.add(kind)
        self.adapter_model.set_adapter(self.adapter_model.adapters[:2])
        for name in self.adapter_model.adapters:
            target = folder / name
            self.adapter_model.save_pretrained(target, selected_adapters=[name])
            self.saved[name] = (target, self.kinds[name])

    # ------------------------------------------------------------ the steps
    def add(self, kind: str) -> None:
        name = self.new_name(kind)
        if kind == "tokens":
            ids = self.random.sample(TOKEN_POOL, 2)
            self.adapter_model.add_adapter(name, TrainableTokensConfig(token_indices=ids, init_weights=False))
        else:
            self.adapter_model.add_adapter(name, LoraEmbeddingConfig(r=2, lora_alpha=4, init_weights=False))
            with torch.no_grad():  # leave the trainable-token rows alone: they are then exact
                self.state(name).lora_embedding_A[:, TOKEN_POOL] = 0
        self.kinds[name] = kind

    def load(self) -> str:
        source = self.random.choice(sorted(self.saved))
        folder, kind = self.saved[source]
        name = self.new_name("loaded")
        self.adapter_model.load_adapter(folder, name)  # strict: merged adapters are not the base
        self.kinds[name] = kind
        return f"load_adapter({source!r} as {name!r})"

    def forget(self, name: str) -> None:
        del self.kinds[name]

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

    def check_weights(self, merged: list[str]) -> None:
        weight = self.adapter_model.get_input_embeddings().weight.detach()
        expected = self.fold(merged)
        assert_same_math(weight, expected)
        assert torch.equal(weight[TOKEN_POOL], expected[TOKEN_POOL]), "token rows are not exact"
        assert (
            self.adapter_model.get_output_embeddings().weight
            is self.adapter_model.get_input_embeddings().weight
        )


@pytest.mark.parametrize("seed", range(4))
def test_merged_adapters_are_in_the_weight_exactly_once_through_any_verbs(seed, tmp_path):
    Walk(seed, tmp_path).run(STEPS)


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
