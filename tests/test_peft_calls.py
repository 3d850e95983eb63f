"""PEFT's calls, answered as PEFT answers them (checked against the real peft where it can answer)."""

from __future__ import annotations

import inspect
import warnings

import peft
import pytest
import torch
from models import batch, build, logits
from numerics import assert_same_math

from tt_core import AdapterModel, get_adapter_model
from tt_plugins.lora_embedding import LoraEmbeddingConfig
from tt_plugins.trainable_tokens import TrainableTokensConfig


def _positional(function) -> list[str]:
    return [
        name
        for name, parameter in inspect.signature(function).parameters.items()
        if parameter.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD and name != "self"
    ]


@pytest.mark.parametrize(
    ("ours", "theirs"),
    [
        (AdapterModel.merge_and_unload, peft.tuners.lora.LoraModel.merge_and_unload),
        (
            AdapterModel.merge_adapter,
            peft.tuners.tuners_utils.BaseTuner.merge_adapter,
        ),
        (AdapterModel.set_adapter, peft.PeftModel.set_adapter),
        (AdapterModel.delete_adapter, peft.PeftModel.delete_adapter),
        (AdapterModel.set_requires_grad, peft.PeftModel.set_requires_grad),
        (AdapterModel.add_adapter, peft.PeftModel.add_adapter),
        (AdapterModel.load_adapter, peft.PeftModel.load_adapter),
        (AdapterModel.from_pretrained, peft.PeftModel.from_pretrained),
        (AdapterModel.save_pretrained, peft.PeftModel.save_pretrained),
    ],
)
def test_the_verbs_take_peft_arguments_in_peft_order(ours, theirs):
    mine = _positional(ours)
    reference = _positional(theirs)
    assert mine == reference[: len(mine)], f"{ours.__name__}: ours {mine}, PEFT's {reference}"


def test_merge_and_unload_takes_peft_positional_arguments():
    adapter_model = get_adapter_model(
        build("llama_tied"), TrainableTokensConfig(token_indices=[5], init_weights=False)
    )
    inputs = batch("llama", [5])
    with torch.no_grad():
        expected = logits(adapter_model, inputs)
    merged = adapter_model.merge_and_unload(True, True, ["default"])  # progressbar, safe_merge, adapter_names
    with torch.no_grad():
        assert_same_math(logits(merged, inputs), expected)


def test_active_adapter_peft_config_and_status_answer_like_peft():
    model = build("llama")
    ours = get_adapter_model(model, TrainableTokensConfig(token_indices=[5]))
    theirs = peft.get_peft_model(build("llama"), peft.TrainableTokensConfig(token_indices=[5]))
    assert ours.active_adapter == theirs.active_adapter == "default"
    assert ours.active_adapters == theirs.active_adapters == ["default"]
    assert set(ours.peft_config) == set(theirs.peft_config) == {"default"}
    assert ours.peft_config["default"].token_indices == [5]

    layer = ours.get_layer_status()
    assert [status.name for status in layer] == ["model.embed_tokens"]
    assert layer[0].active_adapters == ["default"] and layer[0].requires_grad == {"default": True}
    status = ours.get_model_status()
    reference = theirs.get_model_status()
    for field in ("active_adapters", "merged_adapters", "requires_grad", "available_adapters", "enabled"):
        assert getattr(status, field) == getattr(reference, field), field
    assert status.trainable_params == reference.trainable_params == 16
    assert status.peft_types == {"default": "trainable_tokens"}


def test_set_requires_grad_and_set_adapter_inference_mode():
    adapter_model = get_adapter_model(build("llama"), TrainableTokensConfig(token_indices=[5]))
    rows = adapter_model.model.model.embed_tokens.adapters["default"].trainable_tokens_rows
    adapter_model.set_requires_grad("default", False)
    assert not rows.requires_grad
    adapter_model.set_requires_grad(["default"])
    assert rows.requires_grad
    adapter_model.set_adapter("default", inference_mode=True)
    assert not rows.requires_grad
    with pytest.raises(TypeError, match="requires_grad must be True or False"):
        adapter_model.set_requires_grad("default", "yes")


def test_deleting_the_active_adapter_activates_another_with_a_warning_as_peft_does():
    adapter_model = AdapterModel(build("llama"))
    adapter_model.add_adapter("first", TrainableTokensConfig(token_indices=[5]))
    adapter_model.add_adapter("second", TrainableTokensConfig(token_indices=[6]))
    adapter_model.set_adapter("second")
    with pytest.warns(UserWarning, match="'second' was active and is now deleted; 'first' is active now"):
        adapter_model.delete_adapter("second")
    assert adapter_model.active_adapters == ["first"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        adapter_model.delete_adapter("first")  # the last one: nothing left to activate
    assert adapter_model.active_adapters == []


def test_lora_defaults_equal_peft_and_a_string_target_is_a_full_match_regex():
    ours, theirs = LoraEmbeddingConfig(), peft.LoraConfig()
    assert (ours.r, ours.lora_alpha) == (theirs.r, theirs.lora_alpha) == (8, 8)
    model = build("llama_tied")
    adapter_model = get_adapter_model(model, LoraEmbeddingConfig(target_modules=r"model\.embed_tokens"))
    assert type(adapter_model.model.model.embed_tokens).__name__ == "AdapterLayer"
    with pytest.raises(ValueError, match="matches no module"):
        get_adapter_model(build("llama"), LoraEmbeddingConfig(target_modules="embed"))  # full match only
    with pytest.raises(ValueError, match="not a valid one"):
        LoraEmbeddingConfig(target_modules="embed[")


def test_adapter_names_in_forward_or_generate_serves_each_sample_and_checks_the_length():
    adapter_model = get_adapter_model(build("llama"), TrainableTokensConfig(token_indices=[5]))
    inputs = batch("llama", [5])
    mixed = logits(adapter_model, {**inputs, "adapter_names": ["default", "__base__"]})
    assert torch.allclose(mixed[0], logits(adapter_model, inputs)[0], atol=1e-5)
    with adapter_model.disable_adapter():
        assert torch.allclose(mixed[1], logits(adapter_model, inputs)[1], atol=1e-5)
    with pytest.raises(ValueError, match="3 entries for a batch of 2"):
        adapter_model(**inputs, adapter_names=["default", "default", "default"])
    with pytest.raises(ValueError, match="3 entries for a batch of 2"):
        adapter_model.generate(**inputs, adapter_names=["default"] * 3, max_new_tokens=2)
    out = adapter_model.generate(
        **inputs, adapter_names=["default", "__base__"], max_new_tokens=2, do_sample=False
    )
    assert out.shape == (2, 12)


def test_own_arguments_are_keyword_only():
    adapter_model = AdapterModel(build("llama"))
    with pytest.raises(TypeError):
        adapter_model.add_adapter("x", TrainableTokensConfig(token_indices=[5]), False)


def _requires_grad(model: torch.nn.Module, names: list[str]) -> dict[str, bool]:
    """Whether each adapter's parameters require a gradient (all of them must agree)."""
    found: dict[str, set[bool]] = {name: set() for name in names}
    for key, parameter in model.named_parameters():
        for name in names:
            # ours: ...adapters.<name>.trainable_tokens_rows; PEFT's: ...trainable_tokens_delta.<name>
            if f".adapters.{name}." in key or key.endswith(f"trainable_tokens_delta.{name}"):
                found[name].add(parameter.requires_grad)
    assert all(len(flags) == 1 for flags in found.values()), found
    return {name: flags.pop() for name, flags in found.items()}


def test_set_adapter_and_set_requires_grad_set_requires_grad_as_peft_does(tmp_path):
    ours = get_adapter_model(build("llama"), TrainableTokensConfig(token_indices=[5]))
    theirs = peft.get_peft_model(build("llama"), peft.TrainableTokensConfig(token_indices=[5]))

    def same(*names: str) -> dict[str, bool]:
        flags = _requires_grad(ours, list(names))
        assert flags == _requires_grad(theirs, list(names))
        return flags

    for model in (ours, theirs):
        model.set_adapter("default", inference_mode=True)
    assert same("default") == {"default": False}
    for model in (ours, theirs):
        model.set_adapter("default")  # inference_mode=False: trainable again
    assert same("default") == {"default": True}

    ours.add_adapter("second", TrainableTokensConfig(token_indices=[6]))
    theirs.add_adapter("second", peft.TrainableTokensConfig(token_indices=[6]))
    assert same("default", "second") == {"default": True, "second": False}
    for model in (ours, theirs):
        model.set_requires_grad("second")  # inactive, yet trainable at once
    assert same("default", "second") == {"default": True, "second": True}
    assert ours.active_adapters == theirs.active_adapters == ["default"]
    for model in (ours, theirs):
        model.set_requires_grad(["default", "second"], False)
    assert same("default", "second") == {"default": False, "second": False}
    for model in (ours, theirs):
        model.set_adapter("second")  # the one activated trains; every other is frozen
    assert same("default", "second") == {"default": False, "second": True}
    for model in (ours, theirs):
        model.set_requires_grad("default")
        model.set_adapter("default", inference_mode=True)
    assert same("default", "second") == {"default": False, "second": False}

    ours.save_pretrained(tmp_path / "ours", selected_adapters=["second"], format="peft")
    for model in (ours, theirs):  # is_trainable=True: ready to train at once, though inactive
        model.load_adapter(str(tmp_path / "ours" / "second"), "third", is_trainable=True)
    assert same("third") == {"third": True}
    assert ours.active_adapters == theirs.active_adapters == ["default"]


def test_an_adapter_loaded_for_inference_stays_frozen_until_set_requires_grad(tmp_path):
    # The one deliberate difference (docs/peft.md): PEFT's set_adapter unfreezes it.
    ours = get_adapter_model(build("llama"), TrainableTokensConfig(token_indices=[5]))
    ours.save_pretrained(tmp_path)
    ours.load_adapter(tmp_path, "loaded")
    ours.set_adapter("loaded")
    assert _requires_grad(ours, ["default", "loaded"]) == {"default": False, "loaded": False}
    ours.set_requires_grad("loaded")
    assert _requires_grad(ours, ["loaded"]) == {"loaded": True}
    ours.set_adapter("default")
    ours.set_adapter("loaded")  # no longer held for inference: activating trains it, as in PEFT
    assert _requires_grad(ours, ["default", "loaded"]) == {"default": False, "loaded": True}
    loaded = AdapterModel.from_pretrained(build("llama"), tmp_path)  # is_trainable=False
    loaded.set_adapter("default")
    assert _requires_grad(loaded, ["default"]) == {"default": False}


def test_disable_adapter_freezes_inside_and_gives_back_each_flag_after():
    ours = AdapterModel(build("llama"))
    ours.add_adapter("first", TrainableTokensConfig(token_indices=[5]))
    ours.add_adapter("second", TrainableTokensConfig(token_indices=[6]))
    ours.set_adapter("first")
    ours.set_requires_grad("first", False)
    ours.set_requires_grad("second")
    with ours.disable_adapter():
        assert _requires_grad(ours, ["first", "second"]) == {"first": False, "second": False}
    # PEFT re-runs set_adapter here (first trains, second is frozen); the flags the user set stay
    assert _requires_grad(ours, ["first", "second"]) == {"first": False, "second": True}


def _lora_with_token_rows() -> peft.LoraConfig:
    return peft.LoraConfig(
        target_modules=["embed_tokens"], trainable_token_indices={"lm_head": [5, 6]}, init_lora_weights=False
    )


def test_peft_serves_token_rows_per_sample_when_a_lora_carries_them_and_so_do_we(tmp_path):
    # What docs/peft.md says of PEFT's adapter_names=: its TrainableTokensWrapper (the rows of
    # LoraConfig(trainable_token_indices=...)) splits the batch by adapter, one name per sample.
    theirs = peft.get_peft_model(build("llama"), _lora_with_token_rows())
    theirs.add_adapter("b", _lora_with_token_rows())
    with torch.no_grad():
        for name, parameter in theirs.named_parameters():
            if "trainable_tokens_delta" in name:
                parameter.normal_()
    theirs.eval()
    inputs = batch("llama", [5, 6])
    with torch.no_grad():
        mixed = logits(theirs, {**inputs, "adapter_names": ["default", "b"]})
        theirs.set_adapter("b")
        assert_same_math(mixed[1], logits(theirs, inputs)[1])  # sample 1 got b's token rows
    theirs.save_pretrained(tmp_path)
    ours = AdapterModel.from_pretrained(build("llama"), tmp_path)
    stacks = [["default", "default_tokens"], ["b", "b_tokens"]]
    with torch.no_grad():
        torch.testing.assert_close(logits(ours, {**inputs, "adapter_names": stacks}), mixed)


def test_peft_trainable_tokens_alone_ignore_adapter_names():
    # docs/peft.md: a TRAINABLE_TOKENS model of peft 0.21 accepts adapter_names= and gives every
    # sample the active adapter; ours serves each sample its own.
    theirs = peft.get_peft_model(
        build("llama"), peft.TrainableTokensConfig(token_indices=[5, 6], init_weights=False)
    )
    theirs.add_adapter("b", peft.TrainableTokensConfig(token_indices=[5, 6], init_weights=False))
    theirs.eval()
    inputs = batch("llama", [5, 6])
    with torch.no_grad():
        mixed = logits(theirs, {**inputs, "adapter_names": ["default", "b"]})
        assert torch.equal(mixed, logits(theirs, inputs))  # "default" for both samples
        theirs.set_adapter("b")
        assert not torch.allclose(mixed[1], logits(theirs, inputs)[1])
