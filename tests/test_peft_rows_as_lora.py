"""Trainable tokens written as a PEFT LoRA (one-hot selector x row deltas): peft computes their outputs."""

from __future__ import annotations

import json

import peft
import pytest
import safetensors.torch
import torch
from models import batch, build, logits
from numerics import assert_same_math

from tt_core import AdapterModel, get_adapter_model
from tt_plugins.lora_embedding import LoraEmbeddingConfig
from tt_plugins.trainable_tokens import TrainableTokensConfig

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

IDS = [5, 7, 100]


def tokens_model(family: str) -> AdapterModel:
    adapter_model = get_adapter_model(
        build(family), TrainableTokensConfig(token_indices=IDS, init_weights=False)
    )
    return adapter_model.eval()


# bert: a tied head with a bias, which PEFT's own trainable tokens leave out; gemma3: a scaled embedding
@pytest.mark.parametrize("family", ["llama", "llama_tied", "gpt2", "t5", "bert", "gemma3"])
def test_peft_computes_the_adapter_s_outputs_from_its_lora_form(tmp_path, family):
    adapter_model = tokens_model(family)
    inputs = batch(family, IDS)
    expected = logits(adapter_model, inputs)
    assert not torch.allclose(expected, logits(build(family), inputs))
    adapter_model.save_pretrained(tmp_path, format="peft-lora")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"]) == ("LORA", 3, 3)
    tensors = safetensors.torch.load_file(tmp_path / "adapter_model.safetensors")
    embedding = [key for key in tensors if key.endswith("lora_embedding_A")]
    assert embedding, "the input embedding gets a LoRA"
    selector = tensors[embedding[0]]
    assert selector.shape == (3, 128) and torch.equal(selector.nonzero()[:, 1], torch.tensor(IDS))
    assert torch.equal(selector.sum(), torch.tensor(3.0))  # one-hot rows
    in_peft = peft.PeftModel.from_pretrained(build(family), str(tmp_path)).eval()
    assert_same_math(logits(in_peft, inputs), expected)
    # and back into tt-adapters, as LoRA on the embedding (one tied state where PEFT adapts every holder)
    loaded = AdapterModel.from_pretrained(build(family), tmp_path)
    assert isinstance(loaded.adapter_configs["default"], LoraEmbeddingConfig)
    assert_same_math(logits(loaded, inputs), expected)


def test_another_adapter_goes_into_its_subfolder(tmp_path):
    adapter_model = tokens_model("llama")
    adapter_model.add_adapter("chat", TrainableTokensConfig(token_indices=[9, 11], init_weights=False))
    adapter_model.set_adapter("chat")
    expected = logits(adapter_model, batch("llama", [9, 11]))
    adapter_model.save_pretrained(tmp_path, format="peft-lora", selected_adapters=["chat"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chat"]
    model = peft.PeftModel.from_pretrained(build("llama"), str(tmp_path / "chat"), adapter_name="chat").eval()
    assert_same_math(logits(model, batch("llama", [9, 11])), expected)


def test_what_has_no_such_form_is_refused_and_nothing_written(tmp_path):
    adapter_model = tokens_model("llama")
    adapter_model.add_adapter("lora", LoraEmbeddingConfig(r=2))
    with pytest.raises(ValueError, match="changes every row"):
        adapter_model.save_pretrained(tmp_path / "lora", format="peft-lora", selected_adapters=["lora"])
    with pytest.raises(ValueError, match="unknown adapter.*'nope'"):
        adapter_model.save_pretrained(tmp_path / "nope", format="peft-lora", selected_adapters=["nope"])
    adapter_model.merge_adapter()
    with pytest.raises(ValueError, match="merged"):
        adapter_model.save_pretrained(tmp_path / "merged", format="peft-lora", selected_adapters=["default"])
    assert not any(tmp_path.iterdir())
