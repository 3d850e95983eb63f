"""The merge engine's invariant with PEFT's combined adapter (LoRA on the projections and token rows).

As tests/tt_core/test_merge_invariant.py, for adapters made of two kinds of
state: random walks over the verbs (add, set_adapter, merge_adapter of
subsets, unmerge_adapter, delete_adapter, disable_adapter) on a tied model
holding ``LoraLinearConfig(..., trainable_token_indices=...)`` adapters and
trainable-tokens adapters. After every step each adapted weight (every
projection, the embedding and the head tied to it) is the base weight with
exactly the merged adapters folded in, in merge order, and the logits are
those of the active stack; the token rows are compared bit for bit.
"""

from __future__ import annotations

import pytest
import torch
from models import batch, build
from numerics import assert_same_math
from torch import nn
from torch.func import functional_call
from verb_walks import VerbWalk

from tt_core import AdapterModel, AdapterState
from tt_core.testing import effective_weights
from tt_plugins.lora_linear import LoraLinearConfig, LoraLinearLayer
from tt_plugins.trainable_tokens import TrainableTokensConfig, TrainableTokensLayer

FAMILY = "llama_tied"
TOKEN_POOL = [3, 17, 64, 90, 100]
STEPS = 40


def fold(state: AdapterState, weight: torch.Tensor) -> torch.Tensor:
    """One state's effective weight, by hand: rows replaced, or ``scaling * B @ A`` added."""
    if isinstance(state, TrainableTokensLayer):
        return weight.index_copy(0, state.token_indices, state.trainable_tokens_rows.detach())
    assert isinstance(state, LoraLinearLayer)
    return weight + (state.scaling * state.lora_B @ state.lora_A).detach()


class Walk(VerbWalk):
    addable = ("tokens", "combined")

    def __init__(self, seed: int) -> None:
        super().__init__(seed)
        self.reference = build(FAMILY).eval()
        self.adapter_model = AdapterModel(build(FAMILY)).eval()
        self.inputs = batch(FAMILY, TOKEN_POOL)
        for kind in ("combined", "tokens", "combined"):
            self.add(kind)
        self.adapter_model.set_adapter(self.adapter_model.adapters[:2])

    def add(self, kind: str) -> None:
        name = self.new_name(kind)
        ids = self.random.sample(TOKEN_POOL, 2)
        if kind == "tokens":
            self.adapter_model.add_adapter(name, TrainableTokensConfig(token_indices=ids, init_weights=False))
            return
        config = LoraLinearConfig(
            r=2,
            lora_alpha=4,
            target_modules="all-linear",
            init_lora_weights=False,
            trainable_token_indices=ids,
        )
        self.adapter_model.add_adapter(name, config)
        with torch.no_grad():  # the rows start as the base's (as in PEFT): move them
            for key, parameter in self.adapter_model.named_parameters():
                if key.endswith(f"{name}.trainable_tokens_rows"):
                    parameter.add_(torch.randn_like(parameter))

    def folded(self, stack: list[str]) -> dict[str, torch.Tensor]:
        return effective_weights(self.adapter_model, self.reference, stack, {name: fold for name in stack})

    def expected_logits(self, stack: list[str]) -> torch.Tensor:
        return functional_call(
            self.reference, self.folded(stack), args=(), kwargs=self.inputs, tie_weights=False
        ).logits

    def check_weights(self, merged: list[str]) -> None:
        model: nn.Module = self.adapter_model.model
        expected = self.folded(merged)
        for key, weight in expected.items():
            module = model.get_submodule(key.removesuffix(".weight"))
            actual = module.base_layer.weight.detach()
            assert_same_math(actual, weight)  # LoRA's updates added (and subtracted) in merge order
            if module.base_layer is model.get_input_embeddings().base_layer:
                assert torch.equal(actual[TOKEN_POOL], weight[TOKEN_POOL]), "token rows are not exact"
        assert model.get_output_embeddings().weight is model.get_input_embeddings().weight


@pytest.mark.parametrize("seed", range(4))
def test_merged_combined_adapters_are_in_every_weight_exactly_once(seed):
    Walk(seed).run(STEPS)
