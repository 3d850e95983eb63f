"""Adapter names, one wrapper per model, configs copied on add, and requires_grad given back."""

import json

import pytest
import torch
from models import batch, build, logits

from tt_core import AdapterLayer, AdapterModel, get_adapter_model
from tt_plugins.trainable_tokens import TrainableTokensConfig

RESERVED = ["train", "update", "keys", "type", "forward", "to"]
BAD_CHARACTERS = ["tökens", "токены", "ｔｏｋｅｎｓ", "tokens\u200b", "a/b", "../up", "a.b", "two words", ""]


def _config(**kwargs):
    return TrainableTokensConfig(token_indices=kwargs.pop("token_indices", [10, 11]), **kwargs)


def _flags(model):
    return {name: p.requires_grad for name, p in model.named_parameters()}


def _unwrapped(model):
    return not any(isinstance(module, AdapterLayer) for module in model.modules())


def _frozen_one(model):
    """The model with one base weight already frozen by the user."""
    model.lm_head.weight.requires_grad_(False)
    return model


def _refused_everywhere(name, fragment, tmp_path):
    """``name`` is refused by add_adapter, get_adapter_model, load_adapter and from_pretrained, untouched."""
    model = build("llama")
    adapter_model = AdapterModel(model)
    with pytest.raises(ValueError, match=fragment):
        adapter_model.add_adapter(name, _config())
    assert adapter_model.adapters == [] and _unwrapped(model)

    model = _frozen_one(build("llama"))
    flags = _flags(model)
    with pytest.raises(ValueError, match=fragment):
        get_adapter_model(model, _config(), adapter_name=name)
    assert _unwrapped(model) and _flags(model) == flags

    get_adapter_model(build("llama"), _config()).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=fragment):
        AdapterModel.from_pretrained(model, tmp_path, adapter_name=name)
    assert _unwrapped(model) and _flags(model) == flags
    target = get_adapter_model(build("llama"), _config(token_indices=[20]), adapter_name="mine")
    with pytest.raises(ValueError, match=fragment):
        target.load_adapter(tmp_path, name)
    assert target.adapters == ["mine"] and list(target.model.model.embed_tokens.adapters) == ["mine"]


# ---------------------------------------------------------------- 10. names
@pytest.mark.parametrize("name", RESERVED)
def test_a_name_pytorch_uses_as_an_attribute_is_refused_before_anything_changes(name, tmp_path):
    _refused_everywhere(
        name,
        f"adapter name '{name}' is taken by a PyTorch module attribute; pick another, e.g. '{name}_adapter'",
        tmp_path,
    )


def test_a_name_over_64_characters_is_refused_with_the_limit(tmp_path):
    _refused_everywhere("a" * 65, "is 65 characters long; the limit is 64. Pick a shorter name.", tmp_path)


def test_a_name_of_64_characters_saves_and_loads(tmp_path):
    name = "a" * 64
    get_adapter_model(build("llama"), _config(), adapter_name=name).save_pretrained(tmp_path)
    assert AdapterModel.from_pretrained(build("llama"), tmp_path).adapters == [name]


@pytest.mark.parametrize("name", BAD_CHARACTERS)
def test_a_name_with_other_than_ascii_letters_digits_underscore_or_dash_is_refused(name, tmp_path):
    _refused_everywhere(name, r"must be letters, digits, '_' or '-' \(ASCII only", tmp_path)


# ------------------------------------------------------- 11. one wrapper only
def test_a_second_wrapper_on_a_wrapped_model_is_refused_and_the_first_is_unchanged(tmp_path):
    model = build("llama")
    first = get_adapter_model(model, _config(init_weights=False), adapter_name="first")
    first.save_pretrained(tmp_path)
    rows = first.model.model.embed_tokens.adapters["first"].trainable_tokens_rows.detach().clone()
    flags = _flags(first)
    inputs = batch("llama", [10, 11])
    with torch.no_grad():
        expected = logits(first, inputs)

    with pytest.raises(
        ValueError, match=r"LlamaForCausalLM already carries adapters \(at \['model.embed_tokens'\]\)"
    ):
        get_adapter_model(model, _config(token_indices=[20]), adapter_name="second")
    with pytest.raises(ValueError, match="already carries adapters"):
        AdapterModel.from_pretrained(model, tmp_path)

    assert first.adapters == ["first"] and first.active_adapters == ["first"]
    assert list(first.model.model.embed_tokens.adapters) == ["first"]
    assert _flags(first) == flags and flags["model.model.embed_tokens.adapters.first.trainable_tokens_rows"]
    assert torch.equal(first.model.model.embed_tokens.adapters["first"].trainable_tokens_rows, rows)
    with torch.no_grad():
        assert torch.equal(logits(first, inputs), expected)


# ------------------------------------------------ 12. configs are copied on add
@pytest.mark.parametrize("how", ["get_adapter_model", "add_adapter"])
def test_editing_a_config_after_adding_it_changes_neither_the_model_nor_the_save(tmp_path, how):
    config = _config()
    if how == "get_adapter_model":
        adapter_model = get_adapter_model(build("llama"), config, adapter_name="tokens")
    else:
        adapter_model = AdapterModel(build("llama"))
        adapter_model.add_adapter("tokens", config)
    config.token_indices.append(99)
    config.init_weights = False
    config.target_modules = ["lm_head"]

    kept = adapter_model.adapter_configs["tokens"]
    assert (kept.token_indices, kept.init_weights, kept.target_modules) == ([10, 11], True, None)
    adapter_model.save_pretrained(tmp_path)
    path = tmp_path / json.loads((tmp_path / "manifest.json").read_text())["adapters"]["tokens"]["path"]
    assert json.loads((path / "adapter_config.json").read_text()) == {
        "token_indices": [10, 11],
        "target_modules": None,
        "init_weights": True,
        "method": "trainable_tokens",
    }
    loaded = AdapterModel.from_pretrained(build("llama"), tmp_path)
    assert loaded.model.model.embed_tokens.adapters["tokens"].trainable_tokens_rows.shape == (2, 16)


@pytest.mark.parametrize("attribute", ["adapter_configs", "peft_config"])
def test_editing_the_config_the_model_hands_out_changes_neither_the_model_nor_the_save(tmp_path, attribute):
    """Otherwise the save would hold 3 token ids for 2 trained rows, and could not be loaded."""
    adapter_model = get_adapter_model(build("llama"), _config(), adapter_name="tokens")
    handed_out = getattr(adapter_model, attribute)["tokens"]
    handed_out.token_indices.append(99)
    handed_out.init_weights = False
    assert adapter_model.adapter_configs["tokens"].token_indices == [10, 11]
    adapter_model.save_pretrained(tmp_path)
    loaded = AdapterModel.from_pretrained(build("llama"), tmp_path)
    assert loaded.adapter_configs["tokens"].to_dict() == _config().to_dict()


# ---------------------------------------- 13. a failed load gives the flags back
def _newer_format(root):
    document = json.loads((root / "manifest.json").read_text())
    document["format_version"] = 99
    (root / "manifest.json").write_text(json.dumps(document))


def _no_adapters(root):
    (root / "manifest.json").write_text(json.dumps({"format_version": 2, "adapters": {}, "active": []}))


def _damaged_weights(root):
    path = root / json.loads((root / "manifest.json").read_text())["adapters"]["default"]["path"]
    weights = path / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1])


@pytest.mark.parametrize("damage", [_newer_format, _no_adapters, _damaged_weights])
@pytest.mark.parametrize("frozen_before", [False, True])
@pytest.mark.parametrize("is_trainable", [False, True])
def test_a_failed_from_pretrained_gives_back_every_requires_grad_flag(
    tmp_path, damage, frozen_before, is_trainable
):
    get_adapter_model(build("llama"), _config()).save_pretrained(tmp_path)
    damage(tmp_path)
    model = _frozen_one(build("llama")) if frozen_before else build("llama")
    flags = _flags(model)
    assert flags["lm_head.weight"] is not frozen_before
    with pytest.raises(ValueError, match="manifest.json|adapter_model.safetensors"):
        AdapterModel.from_pretrained(model, tmp_path, is_trainable=is_trainable)
    assert _flags(model) == flags and _unwrapped(model)
