"""PEFT's folder format, both ways, against the real peft: outputs equal up to float32 rounding."""

from __future__ import annotations

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

from tt_core import AdapterModel, Registry, get_adapter_model
from tt_core.tensors.wrapper import AdapterLayer
from tt_plugins.lora_embedding import LoraEmbeddingConfig
from tt_plugins.trainable_tokens import TrainableTokensConfig

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

FAMILIES = ["llama", "llama_tied", "gpt2", "t5"]
IDS = [5, 7, 100]
# What a PEFT user targets with LoRA on each family's token embedding (T5: every module using it).
LORA_TARGETS = {
    "llama": ["embed_tokens"],
    "llama_tied": ["embed_tokens"],
    "gpt2": ["wte"],
    "t5": ["shared", "embed_tokens", "lm_head"],
}


def ours(family: str, config: Any, seed: int = 3) -> AdapterModel:
    """Our adapter, with every trainable parameter moved off its initial value."""
    adapter_model = get_adapter_model(build(family), config)
    torch.manual_seed(seed)
    with torch.no_grad():
        for parameter in adapter_model.parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn_like(parameter) * 0.1)
    return adapter_model.eval()


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


def peft_logits(family: str, path: Path, ids: list[int] = IDS) -> torch.Tensor:
    return logits(peft.PeftModel.from_pretrained(build(family), str(path)).eval(), batch(family, ids))


def snapshot(model: nn.Module) -> tuple[Any, ...]:
    return (
        {key: value.clone() for key, value in model.state_dict().items()},
        [(name, type(module)) for name, module in model.named_modules()],
        {name: p.requires_grad for name, p in model.named_parameters()},
    )


def assert_unchanged(model: nn.Module, before: tuple[Any, ...]) -> None:
    state, modules, flags = snapshot(model)
    assert modules == before[1] and flags == before[2]
    assert state.keys() == before[0].keys()
    assert all(torch.equal(state[key], before[0][key]) for key in state)
    assert not any(isinstance(module, AdapterLayer) for module in model.modules())


def edit_config(path: Path, **changes: Any) -> None:
    config = json.loads((path / "adapter_config.json").read_text())
    config.update(changes)
    (path / "adapter_config.json").write_text(json.dumps(config))


# ----------------------------------------------------------------- tt -> PEFT
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["trainable_tokens", "lora_embedding"])
def test_saved_for_peft_loads_in_peft_with_equal_outputs(tmp_path, family, method):
    config = (
        TrainableTokensConfig(token_indices=IDS, init_weights=False)
        if method == "trainable_tokens"
        else LoraEmbeddingConfig(r=4, lora_alpha=8, init_weights=False)
    )
    adapter_model = ours(family, config)
    expected = logits(adapter_model, batch(family, IDS))
    assert not torch.allclose(expected, logits(build(family), batch(family, IDS)))
    adapter_model.save_pretrained(tmp_path, format="peft")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    peft_type = json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"]
    assert peft_type == {"trainable_tokens": "TRAINABLE_TOKENS", "lora_embedding": "LORA"}[method]
    assert_same_math(peft_logits(family, tmp_path), expected)
    # and back: the same adapter, tied the same way
    again = AdapterModel.from_pretrained(build(family), tmp_path)
    assert_same_math(logits(again, batch(family, IDS)), expected)
    back = again.adapter_configs["default"]
    assert back.method == config.method and getattr(back, "adapt_tied_modules", True)  # one tied state again


# ----------------------------------------------------------------- PEFT -> tt
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kind", ["TRAINABLE_TOKENS", "LORA"])
def test_peft_folder_loads_with_equal_outputs(tmp_path, family, kind):
    config = (
        peft.TrainableTokensConfig(token_indices=IDS, init_weights=False)
        if kind == "TRAINABLE_TOKENS"
        else peft.LoraConfig(r=4, target_modules=LORA_TARGETS[family], init_lora_weights=False)
    )
    path = peft_trained(family, config, tmp_path / "peft")
    expected = peft_logits(family, path)
    loaded = AdapterModel.from_pretrained(build(family), path)
    assert loaded.active_adapters == ["default"]
    assert_same_math(logits(loaded, batch(family, IDS)), expected)
    into = get_adapter_model(build(family), TrainableTokensConfig(token_indices=[9]), adapter_name="other")
    into.load_adapter(path, "mine")
    into.set_adapter("mine")
    assert_same_math(logits(into, batch(family, IDS)), expected)


def test_peft_lora_on_the_embedding_only_leaves_a_tied_head_alone(tmp_path):
    path = peft_trained("llama_tied", peft.LoraConfig(r=4, target_modules=["embed_tokens"]), tmp_path)
    loaded = AdapterModel.from_pretrained(build("llama_tied"), path)
    config = loaded.adapter_configs["default"]
    assert config.adapt_tied_modules is False and config.target_modules == ["model.embed_tokens"]
    assert not isinstance(loaded.model.lm_head, AdapterLayer)
    with pytest.raises(ValueError, match="lm_head"):
        loaded.merge_adapter()  # merging into the shared weight would change the head too


def test_peft_lora_with_weight_tying_loads_as_one_tied_mergeable_adapter(tmp_path):
    config = peft.LoraConfig(r=4, target_modules=["embed_tokens"], ensure_weight_tying=True)
    path = peft_trained("llama_tied", config, tmp_path)
    keys = safetensors.torch.load_file(path / "adapter_model.safetensors")
    assert "base_model.model.lm_head.lora_A.weight" in keys  # PEFT saves the tied head's factors again
    expected = peft_logits("llama_tied", path)
    loaded = AdapterModel.from_pretrained(build("llama_tied"), path)
    assert loaded.adapter_configs["default"].adapt_tied_modules is True
    assert_same_math(logits(loaded, batch("llama_tied", IDS)), expected)
    loaded.merge_adapter()
    assert_same_math(logits(loaded, batch("llama_tied", IDS)), expected)


@pytest.mark.parametrize("family", ["llama_tied", "gpt2", "t5"])
def test_tied_head_duplicate_rows_are_checked_and_loaded_once(tmp_path, family):
    config = peft.TrainableTokensConfig(token_indices=IDS, init_weights=False)
    path = peft_trained(family, config, tmp_path)
    tensors = safetensors.torch.load_file(path / "adapter_model.safetensors")
    assert "base_model.model.lm_head.trainable_tokens_delta" in tensors  # PEFT's duplicate
    loaded = AdapterModel.from_pretrained(build(family), path)
    wrappers = [m for m in loaded.model.modules() if isinstance(m, AdapterLayer)]
    assert len(wrappers) > 1 and len({id(m.adapters["default"]) for m in wrappers}) == 1  # one state, tied
    state = wrappers[0].adapters["default"]
    assert state.trainable_tokens_rows.shape == (len(IDS), 16)
    # a duplicate that disagrees with the embedding's rows is refused, and the model is left as it was
    tensors["base_model.model.lm_head.trainable_tokens_delta"] += 1
    safetensors.torch.save_file(tensors, path / "adapter_model.safetensors")
    model = build(family)
    before = snapshot(model)
    with pytest.raises(ValueError, match="different token rows"):
        AdapterModel.from_pretrained(model, path)
    assert_unchanged(model, before)


# ----------------------------------------------------------- several adapters
def test_several_adapters_saved_in_peft_layout_and_stacked_in_peft(tmp_path):
    # untied: PEFT 0.21 cannot hold two TRAINABLE_TOKENS adapters on a tied model at all
    adapter_model = ours("llama", TrainableTokensConfig(token_indices=[5, 7], init_weights=False))
    adapter_model.add_adapter("second", TrainableTokensConfig(token_indices=[9, 100], init_weights=False))
    adapter_model.set_adapter(["default", "second"])
    expected = logits(adapter_model, batch("llama", IDS))
    adapter_model.save_pretrained(tmp_path, format="peft")
    assert (tmp_path / "adapter_config.json").is_file() and (
        tmp_path / "second/adapter_config.json"
    ).is_file()
    model = peft.PeftModel.from_pretrained(build("llama"), str(tmp_path))
    model.load_adapter(str(tmp_path / "second"), adapter_name="second")
    model.base_model.set_adapter(["default", "second"])
    assert_same_math(logits(model.eval(), batch("llama", IDS)), expected)
    loaded = AdapterModel.from_pretrained(build("llama"), tmp_path)
    assert loaded.adapters == ["default", "second"] and loaded.active_adapters == ["default"]
    loaded.set_adapter(["default", "second"])
    assert_same_math(logits(loaded, batch("llama", IDS)), expected)


def test_several_peft_adapters_load_from_subfolders(tmp_path):
    model = peft.get_peft_model(build("gpt2"), peft.LoraConfig(r=4, target_modules=["wte"]))
    model.add_adapter("second", peft.LoraConfig(r=2, lora_alpha=5, target_modules=["wte"], use_rslora=True))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_" in name:
                parameter.add_(torch.randn_like(parameter) * 0.1)
    model.save_pretrained(str(tmp_path))
    model.base_model.set_adapter(["default", "second"])
    expected = logits(model.eval(), batch("gpt2", IDS))
    loaded = AdapterModel.from_pretrained(build("gpt2"), tmp_path)
    assert loaded.adapters == ["default", "second"] and loaded.active_adapters == ["default"]
    loaded.set_adapter(["default", "second"])
    assert_same_math(logits(loaded, batch("gpt2", IDS)), expected)
    alone = get_adapter_model(build("gpt2"), TrainableTokensConfig(token_indices=[9]), adapter_name="x")
    alone.load_adapter(tmp_path, "second")
    assert alone.adapters == ["x", "second"]


@pytest.mark.parametrize(
    "second, match",
    [
        (LoraEmbeddingConfig(r=2, init_weights=False), "mixes PEFT adapter types"),
        (TrainableTokensConfig(token_indices=[7, 9], init_weights=False), "order decides the outputs"),
    ],
)
def test_a_stack_peft_cannot_express_is_refused_and_nothing_written(tmp_path, second, match):
    adapter_model = ours("llama", TrainableTokensConfig(token_indices=[5, 7], init_weights=False))
    adapter_model.add_adapter("second", second)
    adapter_model.set_adapter(["default", "second"])
    with pytest.raises(ValueError, match=match):
        adapter_model.save_pretrained(tmp_path / "out", format="peft")
    assert not (tmp_path / "out").exists()
    adapter_model.save_pretrained(tmp_path / "one", selected_adapters=["second"], format="peft")
    assert (tmp_path / "one/second/adapter_config.json").is_file()


def test_format_is_checked_and_folders_are_not_mixed(tmp_path):
    adapter_model = ours("llama", TrainableTokensConfig(token_indices=IDS))
    with pytest.raises(ValueError, match="format='safetensors'"):
        adapter_model.save_pretrained(tmp_path, format="safetensors")
    adapter_model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="manifest.json"):
        adapter_model.save_pretrained(tmp_path, format="peft")


# ------------------------------------------------- LoRA + trainable_token_indices
def test_lora_with_trainable_token_indices_loads_as_two_adapters(tmp_path):
    # gpt2: LoRA on the position embedding, the token rows on wte (and its tied head), as PEFT applies them
    config = peft.LoraConfig(r=4, target_modules=["wpe"], trainable_token_indices=IDS)
    path = peft_trained("gpt2", config, tmp_path)
    expected = peft_logits("gpt2", path)
    loaded = AdapterModel.from_pretrained(build("gpt2"), path)
    assert loaded.active_adapters == ["default", "default_tokens"]
    assert loaded.adapter_configs["default_tokens"].method == "trainable_tokens"
    assert_same_math(logits(loaded, batch("gpt2", IDS)), expected)
    # an untied head named in a dict: LoRA on the embedding, rows on the head
    config = peft.LoraConfig(r=4, target_modules=["embed_tokens"], trainable_token_indices={"lm_head": IDS})
    path = peft_trained("llama", config, tmp_path / "head")
    loaded = AdapterModel.from_pretrained(build("llama"), path)
    assert_same_math(logits(loaded, batch("llama", IDS)), peft_logits("llama", path))


def test_token_rows_on_a_tied_head_alone_are_refused(tmp_path):
    config = peft.LoraConfig(r=4, target_modules=["embed_tokens"], trainable_token_indices={"lm_head": IDS})
    path = peft_trained("llama_tied", config, tmp_path)
    model = build("llama_tied")
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"lm_head.*model\.embed_tokens.*share"):
        AdapterModel.from_pretrained(model, path)
    assert_unchanged(model, before)


# ------------------------------------------------------------------- refusals
def _lora_folder(path: Path) -> Path:
    return peft_trained("llama", peft.LoraConfig(r=4, target_modules=["embed_tokens"]), path)


def _attention(path: Path) -> Path:
    return peft_trained("llama", peft.LoraConfig(r=4, target_modules=["embed_tokens", "q_proj"]), path)


def _ia3(path: Path) -> Path:
    config = peft.IA3Config(target_modules=["q_proj"], feedforward_modules=[])
    return peft_trained("llama", config, path)


def _option(**changes: Any) -> Any:
    def make(path: Path) -> Path:
        _lora_folder(path)
        edit_config(path, **changes)
        return path

    return make


def _unknown_key(path: Path) -> Path:
    _lora_folder(path)
    tensors = safetensors.torch.load_file(path / "adapter_model.safetensors")
    tensors["base_model.model.model.embed_tokens.lora_magnitude_vector"] = torch.ones(16)
    safetensors.torch.save_file(tensors, path / "adapter_model.safetensors")
    return path


@pytest.mark.parametrize(
    "make, match",
    [
        (_attention, r"model\.layers\.0\.self_attn\.q_proj"),
        (_ia3, "'IA3'"),
        (_option(use_dora=True), "use_dora"),
        (_option(modules_to_save=["lm_head"]), "modules_to_save"),
        (_option(bias="all"), "bias='all'"),
        (_option(init_lora_weights="pissa"), "init_lora_weights='pissa'"),
        (_option(rank_pattern={"embed_tokens": 2}), "rank_pattern"),
        (_option(some_future_option=3), "some_future_option"),
        (_unknown_key, "lora_magnitude_vector"),
    ],
    ids=["attention", "ia3", "dora", "modules_to_save", "bias", "pissa", "rank_pattern", "unknown", "key"],
)
def test_unsupported_content_is_refused_naming_it_and_nothing_changes(tmp_path, make, match):
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
    assert adapter_model.adapters == ["x"] and adapter_model.active_adapters == ["x"]


def test_a_saved_embedding_copy_must_be_this_models(tmp_path):
    path = _lora_folder(tmp_path)  # PEFT saves the embedding beside a LoRA on embed_tokens
    assert "base_model.model.model.embed_tokens.base_layer.weight" in safetensors.torch.load_file(
        path / "adapter_model.safetensors"
    )
    other = build("llama", seed=1)
    before = snapshot(other)
    with pytest.raises(ValueError, match="differs from this model's"):
        AdapterModel.from_pretrained(other, path)
    assert_unchanged(other, before)
    with pytest.warns(UserWarning, match="differs from this model's"):
        AdapterModel.from_pretrained(other, path, strict=False)


# ------------------------------------------------------------------- registry
@pytest.mark.parametrize(
    "family, config",
    [
        ("llama_tied", peft.TrainableTokensConfig(token_indices=IDS, init_weights=False)),
        ("t5", peft.TrainableTokensConfig(token_indices=IDS, init_weights=False)),
        ("llama", peft.LoraConfig(r=4, target_modules=["embed_tokens"])),
        ("gpt2", peft.LoraConfig(r=4, target_modules=["wte"])),
    ],
    ids=["tokens", "tokens-t5", "lora", "lora-gpt2"],
)
def test_registry_publishes_a_peft_folder(tmp_path, family, config):
    path = peft_trained(family, config, tmp_path / "peft")
    registry = Registry(tmp_path / "registry")
    assert registry.publish_folder(path, "from-peft") == 1
    loaded = registry.load(build(family), "from-peft")
    assert_same_math(logits(loaded, batch(family, IDS)), peft_logits(family, path))
    if family == "llama":  # the embedding PEFT saved beside the LoRA became the recorded base
        with pytest.raises(ValueError, match="trained on another base"):
            registry.load(build(family, seed=1), "from-peft")


def test_registry_needs_the_model_to_tell_a_tied_head_from_attention(tmp_path):
    path = peft_trained("t5", peft.LoraConfig(r=4, target_modules=LORA_TARGETS["t5"]), tmp_path / "peft")
    registry = Registry(tmp_path / "registry")
    with pytest.raises(ValueError, match=r"LoRA on lm_head.*AdapterModel\.from_pretrained"):
        registry.publish_folder(path, "from-peft")
    assert registry.names() == []
    loaded = AdapterModel.from_pretrained(build("t5"), path)
    registry.publish(loaded, "from-peft")
    served = registry.load(build("t5"), "from-peft")
    assert_same_math(logits(served, batch("t5", IDS)), peft_logits("t5", path))
