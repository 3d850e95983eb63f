"""add_weighted_adapter: what the core checks and records, and that the result is an ordinary adapter."""

import json
import math

import pytest
import torch
from models import batch, build, logits
from numerics import assert_same_math

from tt_core import (
    AdapterModel,
    AdapterStateError,
    ArgumentTypeError,
    ConfigError,
    Registry,
    SavedFolderError,
    get_plugin_manager,
    hookimpl,
)
from tt_plugins.lora_embedding import LoraEmbeddingConfig
from tt_plugins.trainable_tokens import TrainableTokensConfig
from tt_plugins.trainable_tokens import plugin as tokens_plugin

MEDICAL, LEGAL = [100, 101, 102], [102, 110]
TOKENS = [100, 101, 102, 110]


def _model(family="llama", seed=0):
    adapter_model = AdapterModel(build(family, seed))
    torch.manual_seed(seed + 1)
    adapter_model.add_adapter("medical", TrainableTokensConfig(token_indices=MEDICAL, init_weights=False))
    adapter_model.add_adapter("legal", TrainableTokensConfig(token_indices=LEGAL, init_weights=False))
    adapter_model.add_adapter("style", LoraEmbeddingConfig(r=2, init_weights=False))
    return adapter_model


def _snapshot(adapter_model):
    """Everything a refused call must leave as it was: adapters, stack, merges, tensors, outputs."""
    with torch.no_grad():
        out = logits(adapter_model, batch("llama", TOKENS))
    tensors = {
        key: value.clone() for key, value in adapter_model.state_dict().items() if torch.is_tensor(value)
    }
    return adapter_model.adapters, adapter_model.active_adapters, adapter_model.merged_adapters, tensors, out


def _assert_unchanged(adapter_model, before):
    adapters, active, merged, tensors, out = _snapshot(adapter_model)
    assert (adapters, active, merged) == before[:3]
    assert tensors.keys() == before[3].keys()
    assert all(torch.equal(tensors[key], before[3][key]) for key in tensors)
    assert torch.equal(out, before[4])


def _linear(weights):
    return {"weights": weights, "combination_type": "linear"}


REFUSALS = [
    (
        "methods",
        {"adapters": ["medical", "style"]},
        ConfigError,
        r"'medical' \(trainable_tokens\) and 'style' \(lora",
    ),
    (
        "targets",
        {"adapters": ["medical", "head"]},
        ConfigError,
        r"'medical' and 'head' adapt different modules",
    ),
    ("unknown", {"adapters": ["medical", "nope"]}, AdapterStateError, r"unknown adapter\(s\) \['nope'\]"),
    ("twice", {"adapters": ["medical", "medical"]}, AdapterStateError, "named more than once"),
    ("taken", {"adapter_name": "legal"}, AdapterStateError, "'legal' already exists"),
    ("bad name", {"adapter_name": "a b"}, ConfigError, "letters, digits"),
    ("empty", {"adapters": [], "weights": []}, ConfigError, "adapters is empty"),
    ("a string", {"adapters": "medical"}, ArgumentTypeError, "list of adapter names"),
    ("counts", {"weights": [1.0]}, ConfigError, r"2 adapters .* but 1 weights"),
    ("nan", {"weights": [1.0, math.nan]}, ConfigError, "weight of 'legal' is nan; give a finite"),
    ("inf", {"weights": [math.inf, 1.0]}, ConfigError, "weight of 'medical' is inf"),
    ("not a number", {"weights": [1.0, "1"]}, ArgumentTypeError, "weights are numbers"),
    (
        "type",
        {"combination_type": "average"},
        ConfigError,
        r"'average' is not a combination type; .*'dare_ties'",
    ),
    (
        "negative ties",
        {"weights": [1.0, -0.5], "combination_type": "ties", "density": 0.5},
        ConfigError,
        "weight of 'legal' is -0.5, but 'ties' elects",
    ),
    ("no density", {"combination_type": "dare_linear"}, ConfigError, "needs density"),
    (
        "density 0",
        {"combination_type": "ties", "density": 0.0},
        ConfigError,
        r"density=0.0 is outside \(0, 1\]",
    ),
    ("density 1.5", {"combination_type": "ties", "density": 1.5}, ConfigError, "outside"),
    (
        "unused density",
        {"density": 0.5},
        ConfigError,
        "density=0.5 does nothing with combination_type='linear'",
    ),
    ("unused seed", {"seed": 1}, ConfigError, "seed=1 does nothing"),
    ("sign method", {"majority_sign_method": "median"}, ConfigError, "majority_sign_method='median'"),
    ("svd_rank 0", {"combination_type": "svd", "svd_rank": 0}, ConfigError, "svd_rank=0 is not a rank"),
    (
        "tokens svd",
        {"combination_type": "svd"},
        ConfigError,
        r"'trainable_tokens' cannot combine .*\['linear'",
    ),
]


@pytest.mark.parametrize("case,arguments,error,message", REFUSALS, ids=[case[0] for case in REFUSALS])
def test_bad_input_is_refused_and_nothing_changes(case, arguments, error, message):
    adapter_model = _model()
    adapter_model.add_adapter("head", TrainableTokensConfig(token_indices=[5], target_modules=["lm_head"]))
    adapter_model.set_adapter(["medical", "legal"])
    before = _snapshot(adapter_model)
    call = {"adapters": ["medical", "legal"], "adapter_name": "mixed", **_linear([0.5, 0.5]), **arguments}
    with pytest.raises(error, match=message):
        adapter_model.add_weighted_adapter(**call)
    _assert_unchanged(adapter_model, before)


def test_an_adapter_merged_into_the_weight_is_refused_until_unmerged():
    adapter_model = _model()
    adapter_model.set_adapter(["medical", "legal"])
    adapter_model.merge_adapter(["medical"])
    before = _snapshot(adapter_model)
    with pytest.raises(AdapterStateError, match=r"'medical' is merged .*unmerge_adapter\(\) first"):
        adapter_model.add_weighted_adapter(["medical", "legal"], [1, 1], "mixed", "linear")
    _assert_unchanged(adapter_model, before)
    adapter_model.unmerge_adapter()
    adapter_model.add_weighted_adapter(["medical", "legal"], [1, 1], "mixed", "linear")
    assert adapter_model.adapters[-1] == "mixed"


class PlainTokensConfig(TrainableTokensConfig):
    method = "plain_tokens"


class PlainTokensPlugin:
    """A method implementing the required hooks only: no combine."""

    @hookimpl
    def register_methods(self, register):
        register(PlainTokensConfig)

    @hookimpl
    def create_layer(self, config, adapter_name, target_name, base_layer):
        return tokens_plugin.create_layer(config, adapter_name, target_name, base_layer)


def test_a_method_without_a_combine_hook_is_refused_by_the_default():
    manager = get_plugin_manager()
    manager.register(PlainTokensPlugin(), name="plain_tokens")
    try:
        adapter_model = AdapterModel(build("llama"))
        adapter_model.add_adapter("one", PlainTokensConfig(token_indices=[5]))
        adapter_model.add_adapter("two", PlainTokensConfig(token_indices=[6]))
        with pytest.raises(ConfigError, match="method 'plain_tokens' does not implement combining"):
            adapter_model.add_weighted_adapter(["one", "two"], [1, 1], "mixed", "linear")
        assert adapter_model.adapters == ["one", "two"]
    finally:
        manager.unregister(name="plain_tokens")


def test_the_combination_trains_stacks_and_merges_like_an_added_adapter():
    adapter_model = _model("llama_tied")
    adapter_model.add_weighted_adapter(["medical", "legal"], [0.5, 0.5], "mixed", "linear")
    assert "mixed" not in adapter_model.active_adapters
    mixed = adapter_model.model.model.embed_tokens.adapters["mixed"]
    assert adapter_model.model.lm_head.adapters["mixed"] is mixed  # the tie shares the one state
    assert not mixed.trainable_tokens_rows.requires_grad  # added inactive and frozen, as add_adapter does
    adapter_model.set_adapter(["mixed", "style"])
    assert mixed.trainable_tokens_rows.requires_grad
    medical = adapter_model.model.model.embed_tokens.adapters["medical"]
    assert not medical.trainable_tokens_rows.requires_grad
    inputs = batch("llama_tied", TOKENS)
    logits(adapter_model, inputs).square().mean().backward()
    assert mixed.trainable_tokens_rows.grad.abs().sum() > 0
    adapter_model.eval()
    with torch.no_grad():
        stacked = logits(adapter_model, inputs)
        weight = adapter_model.model.model.embed_tokens.base_layer.weight
        base = weight.detach().clone()
        adapter_model.merge_adapter()
        assert_same_math(logits(adapter_model, inputs), stacked)
        adapter_model.unmerge_adapter()
        assert_same_math(weight.detach(), base)


def test_the_combination_saves_with_its_provenance_and_loads_back(tmp_path):
    adapter_model = _model("llama_tied")
    adapter_model.add_weighted_adapter(["medical", "legal"], [0.7, 0.3], "mixed", "ties", density=0.5)
    adapter_model.set_adapter("mixed")
    inputs = batch("llama_tied", TOKENS)
    with torch.no_grad():
        expected = logits(adapter_model, inputs)
    adapter_model.save_pretrained(tmp_path / "tt")
    entries = json.loads((tmp_path / "tt" / "manifest.json").read_text())["adapters"]
    recorded = {
        "combination_type": "ties",
        "sources": [{"adapter": "medical", "weight": 0.7}, {"adapter": "legal", "weight": 0.3}],
        "density": 0.5,
        "majority_sign_method": "total",
    }
    assert entries["mixed"]["combined_from"] == recorded
    assert "combined_from" not in entries["medical"]  # and a manifest without it loads as before
    loaded = AdapterModel.from_pretrained(build("llama_tied"), tmp_path / "tt")
    assert loaded.adapter_record("mixed").combined_from == recorded
    assert loaded.adapter_record("medical").combined_from is None
    loaded.set_adapter("mixed")
    with torch.no_grad():
        assert torch.equal(logits(loaded, inputs), expected)
    # PEFT's format holds the rows too (without tt's provenance).
    adapter_model.save_pretrained(tmp_path / "peft", selected_adapters=["mixed"], format="peft")
    from_peft = AdapterModel.from_pretrained(build("llama_tied"), tmp_path / "peft")
    with torch.no_grad():
        assert torch.equal(logits(from_peft, inputs), expected)


def test_a_malformed_provenance_is_refused_on_load(tmp_path):
    adapter_model = _model()
    adapter_model.add_weighted_adapter(["medical", "legal"], [1, 1], "mixed", "linear")
    adapter_model.save_pretrained(tmp_path, selected_adapters=["mixed"])
    document = json.loads((tmp_path / "manifest.json").read_text())
    document["adapters"]["mixed"]["combined_from"]["sources"] = [{"adapter": "medical"}]
    (tmp_path / "manifest.json").write_text(json.dumps(document))
    with pytest.raises(SavedFolderError, match=r"combined_from.sources holds .* an 'adapter' and a 'weight'"):
        AdapterModel.from_pretrained(build("llama"), tmp_path)


def test_registry_sources_are_recorded_with_their_versions_and_the_combination_round_trips(tmp_path):
    registry = Registry(tmp_path / "registry")
    trained = _model("gemma3")
    registry.publish(trained, "medical", adapter="medical")
    registry.publish(trained, "legal", adapter="legal")
    registry.publish(trained, "legal", adapter="legal")  # version 2
    loaded = registry.load(build("gemma3"), ["medical", "legal@2"])
    loaded.add_weighted_adapter(
        ["medical", "legal"], [0.6, 0.4], "clinic_law", "dare_linear", density=0.5, seed=7
    )
    version = registry.publish(loaded, "clinic_law", adapter="clinic_law", description="medical + legal")
    info = registry.info(f"clinic_law@{version}")
    assert info.combined_from == {
        "combination_type": "dare_linear",
        "sources": [
            {"adapter": "medical", "weight": 0.6, "registry": {"name": "medical", "version": 1}},
            {"adapter": "legal", "weight": 0.4, "registry": {"name": "legal", "version": 2}},
        ],
        "density": 0.5,
        "seed": 7,
    }
    assert registry.info("medical").combined_from is None
    loaded.set_adapter("clinic_law")
    inputs = batch("gemma3", TOKENS)
    again = registry.load(build("gemma3"), "clinic_law")
    with torch.no_grad():
        assert torch.equal(logits(again, inputs), logits(loaded, inputs))
    assert again.adapter_record("clinic_law").combined_from == info.combined_from
