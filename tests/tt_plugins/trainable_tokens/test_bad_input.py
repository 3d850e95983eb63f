"""Bad input is a clear ValueError and leaves the model exactly as it was."""

import copy

import pytest
import torch
from models import VOCAB, build

from tt_core import AdapterLayer, get_adapter_model
from tt_plugins.trainable_tokens import TrainableTokensConfig


def _snapshot(model):
    return (
        [type(m).__name__ for m in model.modules()],
        [(p.detach().clone(), p.requires_grad) for p in model.parameters()],
    )


def _assert_untouched(model, snapshot):
    modules, parameters = snapshot
    assert [type(m).__name__ for m in model.modules()] == modules
    for (expected, requires_grad), parameter in zip(parameters, model.parameters(), strict=True):
        assert torch.equal(parameter, expected) and parameter.requires_grad == requires_grad


@pytest.mark.parametrize(
    ("indices", "message"),
    [
        ([], "empty"),
        ([5, 6, 5], r"\[5\] more than once"),
        ([3, -1], r"negative ids \[-1\]"),
        ([1.5, 2], r"must be integers.*1.5"),
        (["<tok>"], r"must be integers"),
        ("abc", "must be a list of token ids"),
        ({"embed_tokens": []}, "empty"),
    ],
)
def test_config_rejects_bad_indices(indices, message):
    with pytest.raises(ValueError, match=message):
        TrainableTokensConfig(token_indices=indices)


def test_tensor_and_numpy_indices_are_accepted():
    import numpy as np

    assert TrainableTokensConfig(token_indices=torch.tensor([4, 5])).token_indices == [4, 5]
    assert TrainableTokensConfig(token_indices=np.array([4, 5])).token_indices == [4, 5]


@pytest.mark.parametrize("family", ["llama_tied", "t5"])
def test_out_of_range_indices_name_the_vocabulary_and_leave_the_model_untouched(family):
    model = build(family)
    snapshot = _snapshot(model)
    with pytest.raises(
        ValueError, match=rf"\[{VOCAB}, 500\] are out of range .* {VOCAB} rows .*resize_token_embeddings"
    ):
        get_adapter_model(model, TrainableTokensConfig(token_indices=[3, VOCAB, 500]))
    _assert_untouched(model, snapshot)


def test_padding_idx_in_indices_is_refused():
    model = build("opt")
    snapshot = _snapshot(model)
    with pytest.raises(ValueError, match="token index 1 is the padding_idx"):
        get_adapter_model(model, TrainableTokensConfig(token_indices=[1, 5]))
    _assert_untouched(model, snapshot)


def test_missing_target_lists_the_embedding_modules():
    model = build("llama")
    with pytest.raises(ValueError, match=r"'embed' does not exist.*\['model.embed_tokens'\]"):
        get_adapter_model(model, TrainableTokensConfig(token_indices=[3], target_modules=["embed"]))
    assert not any(isinstance(m, AdapterLayer) for m in model.modules())


def test_explicit_targets_match_full_names_and_suffixes():
    for target in ["model.embed_tokens", "embed_tokens"]:
        model = build("llama")
        adapter_model = get_adapter_model(
            model, TrainableTokensConfig(token_indices=[3], target_modules=[target])
        )
        assert isinstance(adapter_model.model.model.embed_tokens, AdapterLayer)


def test_dict_indices_adapt_several_targets_with_their_own_rows():
    model = build("llama")  # untied: embedding and head are separate weights
    config = TrainableTokensConfig(token_indices={"embed_tokens": [3, 4], "lm_head": [7]})
    adapter_model = get_adapter_model(model, config)
    embed_rows = adapter_model.model.model.embed_tokens.adapters["default"].trainable_tokens_rows
    head_rows = adapter_model.model.lm_head.adapters["default"].trainable_tokens_rows
    assert embed_rows.shape == (2, 16) and head_rows.shape == (1, 16)


def test_dict_indices_that_disagree_on_a_tied_weight_are_refused():
    model = build("llama_tied")
    snapshot = _snapshot(model)
    config = TrainableTokensConfig(token_indices={"embed_tokens": [3, 4], "lm_head": [7]})
    with pytest.raises(ValueError, match="lm_head shares its weight with model.embed_tokens"):
        get_adapter_model(model, config)
    _assert_untouched(model, snapshot)


def test_unknown_and_existing_adapter_names():
    model = build("llama")
    adapter_model = get_adapter_model(model, TrainableTokensConfig(token_indices=[3]))
    before = copy.deepcopy(adapter_model.model.state_dict())
    with pytest.raises(ValueError, match=r"unknown adapter\(s\) \['nope'\]; the model has \['default'\]"):
        adapter_model.set_adapter("nope")
    with pytest.raises(ValueError, match="unknown adapter"):
        adapter_model.delete_adapter("nope")
    with pytest.raises(ValueError, match="unknown adapter"):
        adapter_model.merge_adapter(["nope"])
    for bad_name in ["../escape", "a.b", "", "with space"]:
        with pytest.raises(ValueError, match="must be letters, digits"):
            adapter_model.add_adapter(bad_name, TrainableTokensConfig(token_indices=[4]))
    with pytest.raises(ValueError, match="'default' already exists"):
        adapter_model.add_adapter("default", TrainableTokensConfig(token_indices=[4]))
    assert adapter_model.active_adapters == ["default"]
    assert all(torch.equal(v, adapter_model.model.state_dict()[k]) for k, v in before.items())


def test_a_failed_add_adapter_leaves_earlier_adapters_working():
    model = build("llama")
    adapter_model = get_adapter_model(model, TrainableTokensConfig(token_indices=[3]))
    with pytest.raises(ValueError, match="out of range"):
        adapter_model.add_adapter("big", TrainableTokensConfig(token_indices=[VOCAB + 1]))
    assert adapter_model.adapters == ["default"]
    assert list(adapter_model.model.model.embed_tokens.adapters) == ["default"]
