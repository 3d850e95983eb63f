"""The shipped methods pass the conformance kit (tt_core.testing), on every tiny model it has."""

import pytest
import torch

from tt_core import testing
from tt_plugins.lora_embedding import LoraEmbeddingConfig, LoraEmbeddingLayer
from tt_plugins.lora_linear import LoraLinearConfig, LoraLinearLayer
from tt_plugins.trainable_tokens import TrainableTokensConfig, TrainableTokensLayer


def tokens_config(vocab):
    return TrainableTokensConfig(token_indices=[3, 17, vocab - 1], init_weights=False)


def tokens_fold(state: TrainableTokensLayer, weight):
    return weight.index_copy(0, state.token_indices, state.trainable_tokens_rows)


TOKENS_BAD = [
    lambda vocab: TrainableTokensConfig(token_indices=[3, vocab]),  # out of range
    lambda vocab: TrainableTokensConfig(token_indices=[]),
    lambda vocab: TrainableTokensConfig(token_indices=[3, 3]),
    lambda vocab: TrainableTokensConfig(token_indices=[-1]),
    lambda vocab: TrainableTokensConfig(token_indices=[3], target_modules=["no_such_module"]),
]


def lora_config(vocab):
    return LoraEmbeddingConfig(r=4, lora_alpha=8, init_weights=False)


def lora_fold(state: LoraEmbeddingLayer, weight):
    return weight + state.scaling * (state.lora_embedding_B @ state.lora_embedding_A).T


LORA_BAD = [
    lambda vocab: LoraEmbeddingConfig(r=0),
    lambda vocab: LoraEmbeddingConfig(lora_alpha=float("nan")),
    lambda vocab: LoraEmbeddingConfig(target_modules=["no_such_module"]),
]


def lora_linear_config(vocab):
    return LoraLinearConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)


def lora_linear_fold(state: LoraLinearLayer, weight):
    # PEFT's update of an (out, in) weight; a Conv1D stores its weight transposed.
    delta = state.scaling * state.lora_B @ state.lora_A
    return weight + (delta.T if state.fan_in_fan_out else delta)


LORA_LINEAR_BAD = [
    lambda vocab: LoraLinearConfig(r=0, target_modules="all-linear"),
    lambda vocab: LoraLinearConfig(target_modules=None),
    lambda vocab: LoraLinearConfig(target_modules="all-linear", bias="all"),
    lambda vocab: LoraLinearConfig(target_modules="all-linear", init_lora_weights="pissa"),
    lambda vocab: LoraLinearConfig(target_modules="all-linear", lora_dropout=1.0),
    lambda vocab: LoraLinearConfig(target_modules=["no_such_module"]),
    # an embedding is not a linear layer: refused by detect_target
    lambda vocab: LoraLinearConfig(target_modules=r".*\.(embed_tokens|word_embeddings|wte)"),
    # a regular expression matching a whole attention block, not its projections
    lambda vocab: LoraLinearConfig(target_modules=r".*\.(self_attn|attention)"),
]


def lora_linear_tokens_config(vocab):
    # PEFT's combined adapter: LoRA on every projection and new rows of the embedding, one adapter
    return LoraLinearConfig(
        r=4,
        lora_alpha=8,
        target_modules="all-linear",
        init_lora_weights=False,
        trainable_token_indices=[3, 17, vocab - 1],
    )


def lora_linear_tokens_fold(state, weight):
    # one adapter, two kinds of state: the projections' LoRA, the embedding's (and a tied head's) rows
    if isinstance(state, TrainableTokensLayer):
        return tokens_fold(state, weight)
    return lora_linear_fold(state, weight)


LORA_LINEAR_TOKENS_BAD = [
    lambda vocab: LoraLinearConfig(target_modules="all-linear", trainable_token_indices=[3, vocab]),
    lambda vocab: LoraLinearConfig(target_modules="all-linear", trainable_token_indices=[3, 3]),
    lambda vocab: LoraLinearConfig(
        target_modules="all-linear", trainable_token_indices={"no_such_module": [3]}
    ),
]

METHODS = {
    "trainable_tokens": (tokens_config, tokens_fold, TOKENS_BAD),
    "lora_embedding": (lora_config, lora_fold, LORA_BAD),
    "lora_linear": (lora_linear_config, lora_linear_fold, LORA_LINEAR_BAD),
    "lora_linear_tokens": (lora_linear_tokens_config, lora_linear_tokens_fold, LORA_LINEAR_TOKENS_BAD),
}


@pytest.mark.parametrize("family", testing.FAMILIES)
@pytest.mark.parametrize("check", testing.CHECKS)
@pytest.mark.parametrize("method", list(METHODS))
def test_shipped_method_conforms(method, check, family):
    make_config, fold, bad_configs = METHODS[method]
    testing.run_check(check, family, make_config, fold, bad_configs=bad_configs)


def test_the_kit_catches_a_wrong_fold():
    def wrong(state, weight):
        return weight.index_copy(0, state.token_indices, state.trainable_tokens_rows * 1.01)

    with pytest.raises(AssertionError, match="differ from the hand-folded reference"):
        testing.run_check("outputs", "llama_tied", tokens_config, wrong)


def test_the_kit_catches_an_accepted_bad_config():
    with pytest.raises(AssertionError, match="was accepted"):
        testing.run_check(
            "bad_configs", "llama", tokens_config, tokens_fold, bad_configs=[tokens_config(128)]
        )


def test_the_kit_catches_vocabulary_sized_work(monkeypatch):
    # A forward that builds the whole effective weight, as PEFT's trainable tokens do.
    def dense_embed(self, input_ids, output, base_layer):
        weight = base_layer.weight.index_copy(0, self.token_indices, self.trainable_tokens_rows)
        return torch.nn.functional.embedding(input_ids, weight)

    monkeypatch.setattr(TrainableTokensLayer, "embed", dense_embed)
    with pytest.raises(AssertionError, match="allocates vocabulary-sized tensors"):
        testing.run_check("per_call_work", "llama", tokens_config, tokens_fold)


def test_the_kit_catches_a_table_built_per_call(monkeypatch):
    embed = TrainableTokensLayer.embed

    def rebuilding_embed(self, input_ids, output, base_layer):
        table = torch.full((base_layer.weight.shape[0],), -1)
        table[self.token_indices] = torch.arange(len(self.token_indices))
        return embed(self, input_ids, output, base_layer)

    monkeypatch.setattr(TrainableTokensLayer, "embed", rebuilding_embed)
    with pytest.raises(AssertionError, match="vocabulary|index tables"):
        testing.run_check("per_call_work", "llama", tokens_config, tokens_fold)
