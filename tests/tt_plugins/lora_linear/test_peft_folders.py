"""PEFT folders of LoRA on linear layers (with trainable_token_indices) both ways, against the real peft."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import peft
import pytest
import safetensors.torch
import torch
from models import batch, build, logits
from numerics import assert_same_math
from torch import nn

from tt_core import AdapterLayer, AdapterModel, Registry, get_adapter_model
from tt_plugins.lora_embedding import LoraEmbeddingConfig
from tt_plugins.lora_linear import LoraLinearConfig
from tt_plugins.trainable_tokens import TrainableTokensConfig, TrainableTokensLayer

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

IDS = [5, 7, 100]
EMBEDDING = {"llama": "embed_tokens", "llama_tied": "embed_tokens", "gpt2": "wte"}
TARGETS = {"llama": ["q_proj", "v_proj"], "llama_tied": "all-linear", "gpt2": r".*\.(c_attn|c_fc)"}


def peft_trained(family: str, config: Any, path: Path, seed: int = 3) -> Path:
    """A folder PEFT saved, its adapter moved off its initialisation as training would."""
    model = peft.get_peft_model(build(family), config)
    torch.manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn_like(parameter) * 0.1)
    model.save_pretrained(str(path))
    return path


def peft_logits(family: str, path: Path) -> torch.Tensor:
    return logits(peft.PeftModel.from_pretrained(build(family), str(path)).eval(), batch(family, IDS))


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.clone() for key, value in model.state_dict().items()}


def assert_unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert not any(isinstance(module, AdapterLayer) for module in model.modules())


def edit_config(path: Path, **changes: Any) -> None:
    config = json.loads((path / "adapter_config.json").read_text())
    config.update(changes)
    (path / "adapter_config.json").write_text(json.dumps(config))


# ----------------------------------------------------------------- PEFT -> tt
@pytest.mark.parametrize("family", ["llama", "llama_tied", "gpt2"])
@pytest.mark.parametrize("tokens", [None, "list", "dict"])
def test_peft_lora_on_linear_layers_loads_with_equal_outputs(tmp_path, family, tokens):
    indices = {None: None, "list": IDS, "dict": {EMBEDDING[family]: IDS}}[tokens]
    config = peft.LoraConfig(
        r=4,
        lora_alpha=6,
        target_modules=TARGETS[family],
        trainable_token_indices=indices,
        init_lora_weights=False,
    )
    path = peft_trained(family, config, tmp_path / "peft")
    expected = peft_logits(family, path)
    assert not torch.allclose(expected, logits(build(family), batch(family, IDS)))
    loaded = AdapterModel.from_pretrained(build(family), path)
    # one adapter, as in PEFT: its LoRA and its token rows
    assert loaded.adapters == loaded.active_adapters == ["default"]
    lora = loaded.adapter_configs["default"]
    assert isinstance(lora, LoraLinearConfig) and (lora.r, lora.lora_alpha) == (4, 6)
    assert lora.trainable_token_indices == indices
    assert lora.fan_in_fan_out is (family == "gpt2")
    assert_same_math(logits(loaded, batch(family, IDS)), expected)


@pytest.mark.parametrize("family", ["llama", "llama_tied", "gpt2"])
@pytest.mark.parametrize("tokens", ["list", "dict"])
def test_set_adapter_of_its_one_name_gives_peft_outputs(tmp_path, family, tokens):
    # What PEFT users do: load the adapter beside another under one name, activate that name.
    indices = {"list": IDS, "dict": {EMBEDDING[family]: IDS}}[tokens]
    config = peft.LoraConfig(r=4, target_modules=TARGETS[family], trainable_token_indices=indices)
    path = peft_trained(family, config, tmp_path / "peft")
    expected = peft_logits(family, path)
    into = get_adapter_model(build(family), TrainableTokensConfig(token_indices=[9]), adapter_name="other")
    into.load_adapter(path, "mine")
    into.set_adapter("mine")
    assert_same_math(logits(into, batch(family, IDS)), expected)
    with torch.no_grad():  # and per sample: adapter_names=["mine", ...] takes its rows too
        inputs = batch(family, IDS)
        names = ["mine"] * len(inputs["input_ids"])
        assert_same_math(into(**inputs, adapter_names=names).logits, expected)
    assert into.adapters == ["other", "mine"]


def test_token_rows_on_an_untied_head_with_lora_on_attention(tmp_path):
    config = peft.LoraConfig(r=4, target_modules=["k_proj"], trainable_token_indices={"lm_head": IDS})
    path = peft_trained("llama", config, tmp_path)
    loaded = AdapterModel.from_pretrained(build("llama"), path)
    assert loaded.adapters == ["default"]
    assert loaded.adapter_configs["default"].trainable_token_indices == {"lm_head": IDS}
    assert isinstance(loaded.model.lm_head, AdapterLayer)
    assert not isinstance(loaded.model.model.embed_tokens, AdapterLayer)
    assert_same_math(logits(loaded, batch("llama", IDS)), peft_logits("llama", path))
    loaded.save_pretrained(tmp_path / "again", format="peft")
    assert_same_math(peft_logits("llama", tmp_path / "again"), peft_logits("llama", path))


def test_rslora_dropout_and_init_are_carried_over(tmp_path):
    config = peft.LoraConfig(
        r=4,
        lora_alpha=3,
        target_modules=["o_proj"],
        use_rslora=True,
        lora_dropout=0.25,
        init_lora_weights="gaussian",
    )
    path = peft_trained("llama", config, tmp_path)
    loaded = AdapterModel.from_pretrained(build("llama"), path)
    ours = loaded.adapter_configs["default"]
    assert (ours.use_rslora, ours.lora_dropout, ours.init_lora_weights) == (True, 0.25, "gaussian")
    assert ours.target_modules == ["model.layers.0.self_attn.o_proj"]
    assert_same_math(logits(loaded, batch("llama", IDS)), peft_logits("llama", path))


def _dora(path: Path) -> Path:
    return peft_trained("llama", peft.LoraConfig(r=4, target_modules=["q_proj"], use_dora=True), path)


def _rank_pattern(path: Path) -> Path:
    config = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 2})
    return peft_trained("llama", config, path)


def _lora_bias(path: Path) -> Path:
    return peft_trained("llama", peft.LoraConfig(r=4, target_modules=["q_proj"], lora_bias=True), path)


def _option(**changes: Any) -> Any:
    def make(path: Path) -> Path:
        peft_trained("llama", peft.LoraConfig(r=4, target_modules=["q_proj"]), path)
        edit_config(path, **changes)
        return path

    return make


def _other_model(path: Path) -> Path:
    return peft_trained("gpt2", peft.LoraConfig(r=4, target_modules=["c_attn"]), path)


def _extra_key(path: Path) -> Path:
    _option()(path)
    tensors = safetensors.torch.load_file(path / "adapter_model.safetensors")
    tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_B.bias"] = torch.zeros(16)
    safetensors.torch.save_file(tensors, path / "adapter_model.safetensors")
    return path


def _rows_for_another_module(path: Path) -> Path:
    config = peft.LoraConfig(r=4, target_modules=["q_proj"], trainable_token_indices=IDS)
    peft_trained("llama", config, path)
    edit_config(path, trainable_token_indices={"lm_head": IDS})
    return path


@pytest.mark.parametrize(
    "make, match",
    [
        (_dora, "use_dora"),
        (_rank_pattern, "rank_pattern"),
        (_lora_bias, "lora_bias"),
        (_option(bias="all"), "bias='all'"),
        (_option(alpha_pattern={"q_proj": 3}), "alpha_pattern"),
        (_option(init_lora_weights="olora"), "init_lora_weights='olora'"),
        (_option(modules_to_save=["lm_head"]), "modules_to_save"),
        (_option(layer_replication=[[0, 1]]), "layer_replication"),
        (_option(some_future_option=3), "some_future_option"),
        (_other_model, r"transformer\.h\.0\.attn\.c_attn, which this model does not have"),
        (_extra_key, r"lora_B\.bias"),
        (_option(trainable_token_indices=IDS), "trainable_token_indices.*holds no token rows"),
        (_rows_for_another_module, r"token rows for model\.embed_tokens, which trainable_token_indices"),
    ],
    ids=[
        "dora",
        "rank_pattern",
        "lora_bias",
        "bias",
        "alpha_pattern",
        "olora",
        "modules_to_save",
        "layer_replication",
        "unknown",
        "other_model",
        "key",
        "no_rows",
        "rows_elsewhere",
    ],
)
def test_what_cannot_be_applied_is_refused_by_name_and_nothing_changes(tmp_path, make, match):
    path = make(tmp_path / "peft")
    model = build("llama")
    before = snapshot(model)
    with pytest.raises(ValueError, match=match):
        AdapterModel.from_pretrained(model, path)
    assert_unchanged(model, before)
    adapter_model = get_adapter_model(
        build("llama"), TrainableTokensConfig(token_indices=[9]), adapter_name="x"
    )
    with pytest.raises(ValueError, match=match):
        adapter_model.load_adapter(path, "mine")
    assert adapter_model.adapters == ["x"]


def test_lora_on_the_embedding_and_on_attention_at_once_is_still_refused(tmp_path):
    config = peft.LoraConfig(r=4, target_modules=["embed_tokens", "q_proj"])
    path = peft_trained("llama", config, tmp_path)
    model = build("llama")
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.q_proj"):
        AdapterModel.from_pretrained(model, path)
    assert_unchanged(model, before)


def test_registry_publishes_a_peft_lora_on_linear_layers(tmp_path):
    path = peft_trained("gpt2", peft.LoraConfig(r=4, target_modules=["c_attn"]), tmp_path / "peft")
    registry = Registry(tmp_path / "registry")
    assert registry.publish_folder(path, "attention") == 1
    served = registry.load(build("gpt2"), "attention")
    assert served.adapter_configs[served.active_adapters[0]].method == "lora_linear"
    assert_same_math(logits(served, batch("gpt2", IDS)), peft_logits("gpt2", path))


# ----------------------------------------------------------------- tt -> PEFT
def _ours(family: str, tokens_target: str | None) -> AdapterModel:
    indices: Any = {None: None, "embedding": IDS, "wte": {"wte": IDS}, "lm_head": {"lm_head": IDS}}
    config = LoraLinearConfig(
        r=4,
        lora_alpha=8,
        target_modules=TARGETS[family],
        init_lora_weights=False,
        trainable_token_indices=indices[tokens_target],
    )
    adapter_model = get_adapter_model(build(family), config)
    torch.manual_seed(4)
    with torch.no_grad():  # the rows start as the base's, as in PEFT: move them as training would
        for name, parameter in adapter_model.named_parameters():
            if "trainable_tokens_rows" in name:
                parameter.add_(torch.randn_like(parameter))
    return adapter_model.eval()


@pytest.mark.parametrize(
    "family, tokens_target",
    [
        ("llama", None),
        ("gpt2", None),
        ("llama", "embedding"),
        ("llama_tied", "embedding"),
        ("gpt2", "embedding"),
        ("gpt2", "wte"),
        ("llama", "lm_head"),
    ],
)
def test_saved_for_peft_loads_in_peft_with_equal_outputs(tmp_path, family, tokens_target):
    adapter_model = _ours(family, tokens_target)
    expected = logits(adapter_model, batch(family, IDS))
    if tokens_target is not None:  # the rows count: with the base rows back, the outputs differ
        lora_alone = copy.deepcopy(adapter_model)
        with torch.no_grad():
            for module in lora_alone.modules():
                if isinstance(module, AdapterLayer) and isinstance(
                    module.adapters["default"], TrainableTokensLayer
                ):
                    rows = module.adapters["default"]
                    rows.trainable_tokens_rows.copy_(module.base_layer.weight[rows.token_indices])
        assert not torch.allclose(logits(lora_alone, batch(family, IDS)), expected)
    adapter_model.save_pretrained(tmp_path, format="peft")
    # one PEFT adapter: a LoraConfig, with the token rows as trainable_token_indices
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"
    full = {"wte": "transformer.wte", "lm_head": "lm_head"}
    indices = {None: None, "embedding": IDS}.get(tokens_target, {full.get(tokens_target, ""): IDS})
    assert config.get("trainable_token_indices") == indices
    keys = safetensors.torch.load_file(tmp_path / "adapter_model.safetensors")
    rows = [key for key in keys if "token" in key]
    embedding = {"llama": "model.embed_tokens", "llama_tied": "model.embed_tokens", "gpt2": "transformer.wte"}
    module = {None: None, "lm_head": "lm_head"}.get(tokens_target, embedding[family])
    assert rows == (
        [] if module is None else [f"base_model.model.{module}.token_adapter.trainable_tokens_delta"]
    )
    assert_same_math(peft_logits(family, tmp_path), expected)
    again = AdapterModel.from_pretrained(build(family), tmp_path)
    assert again.adapters == again.active_adapters == ["default"]
    assert_same_math(logits(again, batch(family, IDS)), expected)


def test_the_two_adapter_form_still_saves_as_one_peft_adapter(tmp_path):
    # LoRA and trainable tokens as two adapters <name>, <name>_tokens (how tt-adapters held PEFT's combined
    # adapter before): one PEFT folder, which loads back as one adapter with the same outputs
    adapter_model = get_adapter_model(
        build("llama"), LoraLinearConfig(r=4, target_modules=["q_proj"], init_lora_weights=False)
    )
    tokens = TrainableTokensConfig(token_indices=IDS, init_weights=False)
    adapter_model.add_adapter("default_tokens", tokens)
    adapter_model.set_adapter(["default", "default_tokens"])
    expected = logits(adapter_model.eval(), batch("llama", IDS))
    adapter_model.save_pretrained(tmp_path, format="peft")
    assert json.loads((tmp_path / "adapter_config.json").read_text())["trainable_token_indices"] == IDS
    assert_same_math(peft_logits("llama", tmp_path), expected)
    again = AdapterModel.from_pretrained(build("llama"), tmp_path)
    assert again.adapters == ["default"]
    assert_same_math(logits(again, batch("llama", IDS)), expected)


@pytest.mark.parametrize(
    "family, targets, indices",
    [("llama_tied", ["lm_head"], IDS), ("llama", ["lm_head"], {"lm_head": IDS})],
    ids=["tied-head", "same-module"],
)
def test_lora_and_its_own_rows_on_one_weight_are_refused(family, targets, indices):
    model = build(family)
    before = snapshot(model)
    config = LoraLinearConfig(target_modules=targets, trainable_token_indices=indices)
    with pytest.raises(
        ValueError, match=r"one adapter cannot change one weight twice.*TrainableTokensConfig"
    ):
        get_adapter_model(model, config)
    assert_unchanged(model, before)


@pytest.mark.parametrize(
    "indices, match",
    [([5, 5], "more than once"), ([], "empty"), ([-1], "negative"), ({"embed_tokens": [1.5]}, "integers")],
)
def test_bad_trainable_token_indices_are_refused_by_name(indices, match):
    with pytest.raises(ValueError, match=f"trainable_token_indices: .*{match}"):
        LoraLinearConfig(target_modules=["q_proj"], trainable_token_indices=indices)


def test_token_ids_beyond_the_vocabulary_are_refused_and_nothing_changes():
    model = build("llama")
    before = snapshot(model)
    with pytest.raises(ValueError, match="out of range.*resize_token_embeddings"):
        get_adapter_model(
            model, LoraLinearConfig(target_modules=["q_proj"], trainable_token_indices=[5, 10**6])
        )
    assert_unchanged(model, before)


def test_lora_and_tokens_on_one_weight_are_refused_and_nothing_written(tmp_path):
    adapter_model = get_adapter_model(build("llama_tied"), LoraLinearConfig(target_modules=["lm_head"]))
    adapter_model.add_adapter("default_tokens", TrainableTokensConfig(token_indices=IDS))
    adapter_model.set_adapter(["default", "default_tokens"])
    with pytest.raises(ValueError, match=r"change one weight.*selected_adapters"):
        adapter_model.save_pretrained(tmp_path / "out", format="peft")
    assert not (tmp_path / "out").exists()


def test_lora_on_a_tied_head_and_a_projection_both_ways(tmp_path):
    # PEFT adapts the tied head alone (ensure_weight_tying off): lora_linear, its tie declined
    config = peft.LoraConfig(r=4, target_modules=["q_proj", "lm_head"], init_lora_weights=False)
    path = peft_trained("llama_tied", config, tmp_path / "peft")
    loaded = AdapterModel.from_pretrained(build("llama_tied"), path)
    assert loaded.adapter_configs["default"].method == "lora_linear"
    assert not isinstance(loaded.model.model.embed_tokens, AdapterLayer)
    expected = peft_logits("llama_tied", path)
    assert_same_math(logits(loaded, batch("llama_tied", IDS)), expected)
    loaded.save_pretrained(tmp_path / "again", format="peft")
    assert_same_math(peft_logits("llama_tied", tmp_path / "again"), expected)


def test_lora_on_the_embedding_with_rows_on_an_untied_head_is_saved_as_one_peft_adapter(tmp_path):
    adapter_model = get_adapter_model(build("llama"), LoraEmbeddingConfig(r=4, init_weights=False))
    tokens = TrainableTokensConfig(token_indices=IDS, init_weights=False, target_modules=["lm_head"])
    adapter_model.add_adapter("default_tokens", tokens)
    adapter_model.set_adapter(["default", "default_tokens"])
    expected = logits(adapter_model.eval(), batch("llama", IDS))
    adapter_model.save_pretrained(tmp_path, format="peft")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["trainable_token_indices"] == {"lm_head": IDS}
    assert_same_math(peft_logits("llama", tmp_path), expected)


def test_a_combined_adapter_beside_a_tokens_adapter_named_like_its_old_half_keeps_its_own_rows(tmp_path):
    # "<name>_tokens" beside a LoRA that holds rows of its own is not joined into it: two PEFT adapters
    adapter_model = _ours("llama", "embedding")
    expected = logits(adapter_model, batch("llama", IDS))
    adapter_model.add_adapter(
        "default_tokens", TrainableTokensConfig(token_indices=[9, 11], init_weights=False)
    )
    adapter_model.save_pretrained(tmp_path, format="peft")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (config["peft_type"], config["trainable_token_indices"]) == ("LORA", IDS)
    tokens = json.loads((tmp_path / "default_tokens" / "adapter_config.json").read_text())
    assert (tokens["peft_type"], tokens["token_indices"]) == ("TRAINABLE_TOKENS", [9, 11])
    assert_same_math(peft_logits("llama", tmp_path), expected)


@pytest.mark.parametrize("family", ["llama", "llama_tied"])
def test_rows_on_the_embedding_and_the_head_both_ways(tmp_path, family):
    # untied: each its own ids and rows; tied: the same ids, PEFT ties the head's rows to the embedding's
    head = IDS if family == "llama_tied" else [9, 11]
    indices = {"embed_tokens": IDS, "lm_head": head}
    path = peft_trained(
        family, peft.LoraConfig(r=4, target_modules=["q_proj"], trainable_token_indices=indices), tmp_path
    )
    inputs = batch(family, IDS + [9, 11])
    expected = logits(peft.PeftModel.from_pretrained(build(family), str(path)).eval(), inputs)
    loaded = AdapterModel.from_pretrained(build(family), path)
    assert loaded.adapters == ["default"]
    assert loaded.adapter_configs["default"].trainable_token_indices == indices
    assert_same_math(logits(loaded, inputs), expected)
    loaded.save_pretrained(tmp_path / "again", format="peft")
    again = peft.PeftModel.from_pretrained(build(family), str(tmp_path / "again")).eval()
    assert_same_math(logits(again, inputs), expected)
