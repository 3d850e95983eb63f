"""Each usage example of PEFT's TrainableTokensModel page, done with tt-adapters.

The base model is a tiny OPT built from a config and the tokenizer a word-level
one built with the ``tokenizers`` library, so nothing is downloaded.
"""

import pytest
import torch
import transformers
from models import VOCAB, word_tokenizer

from tt_core import AdapterLayer, AdapterModel, get_adapter_model
from tt_plugins.trainable_tokens import TrainableTokensConfig


def _opt() -> transformers.OPTForCausalLM:
    torch.manual_seed(0)
    config = transformers.OPTConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        ffn_dim=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        word_embed_proj_dim=16,
        max_position_embeddings=64,
        pad_token_id=0,
    )
    return transformers.OPTForCausalLM(config).eval()


@pytest.fixture
def opt_with_new_tokens():
    """Basic model creation: add tokens, resize, take their ids."""
    model, tokenizer = _opt(), word_tokenizer()
    new_tokens = ["<special1>", "<special2>"]
    tokenizer.add_tokens(new_tokens)
    model.resize_token_embeddings(len(tokenizer))
    token_indices = [tokenizer.convert_tokens_to_ids(t) for t in new_tokens]
    assert token_indices == [VOCAB, VOCAB + 1]
    return model, tokenizer, token_indices


def test_basic_model_creation_and_auto_detection(opt_with_new_tokens, capsys):
    model, _, token_indices = opt_with_new_tokens
    adapter_model = get_adapter_model(model, TrainableTokensConfig(token_indices=token_indices))
    adapter_model.print_trainable_parameters()
    assert "trainable params: 32 ||" in capsys.readouterr().out
    assert isinstance(adapter_model.get_input_embeddings(), AdapterLayer)


def test_explicit_target_modules_and_weight_tying(opt_with_new_tokens):
    model, _, token_indices = opt_with_new_tokens
    config = TrainableTokensConfig(token_indices=token_indices, target_modules=["model.decoder.embed_tokens"])
    adapter_model = get_adapter_model(model, config)
    # Both input embeddings and the tied lm_head are adapted, with one set of rows.
    embedding, head = adapter_model.get_input_embeddings(), adapter_model.get_output_embeddings()
    assert isinstance(embedding, AdapterLayer) and isinstance(head, AdapterLayer)
    assert embedding.adapters["default"] is head.adapters["default"]


def test_training_new_domain_vocabulary_with_trainer(opt_with_new_tokens, tmp_path):
    model, tokenizer, token_indices = opt_with_new_tokens
    adapter_model = get_adapter_model(
        model, TrainableTokensConfig(token_indices=token_indices, init_weights=False)
    )
    encoded = tokenizer(["w1 <special1> w2 <special2> w3"] * 8)["input_ids"]
    dataset = [{"input_ids": torch.tensor(ids), "labels": torch.tensor(ids)} for ids in encoded]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        num_train_epochs=2,
        per_device_train_batch_size=4,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        logging_strategy="no",
    )
    rows = adapter_model.get_input_embeddings().adapters["default"].trainable_tokens_rows
    before = rows.detach().clone()
    transformers.Trainer(model=adapter_model, args=args, train_dataset=dataset).train()
    assert not torch.equal(rows, before)


def test_multiple_adapters_for_different_tasks():
    base_model = _opt()
    model = get_adapter_model(
        base_model, TrainableTokensConfig(token_indices=[100, 101, 102]), adapter_name="task1"
    )
    model.add_adapter("task2", TrainableTokensConfig(token_indices=[20, 21, 22], init_weights=False))
    input_ids = torch.tensor([[20, 21, 22, 5]])
    with torch.no_grad():
        model.set_adapter("task1")
        output1 = model(input_ids).logits
        model.set_adapter("task2")
        output2 = model(input_ids).logits
    assert not torch.allclose(output1, output2)


def test_save_load_merge_and_unload(opt_with_new_tokens, tmp_path):
    model, tokenizer, token_indices = opt_with_new_tokens
    adapter_model = get_adapter_model(
        model, TrainableTokensConfig(token_indices=token_indices, init_weights=False)
    )
    input_ids = tokenizer(["w1 <special1> <special2>"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected = adapter_model(input_ids).logits
    adapter_model.save_pretrained(tmp_path / "trainable_tokens_adapter")

    base_model = _opt()
    base_model.resize_token_embeddings(len(tokenizer))
    loaded = AdapterModel.from_pretrained(base_model, tmp_path / "trainable_tokens_adapter")
    merged = loaded.merge_and_unload()
    merged.save_pretrained(tmp_path / "merged_model")
    reloaded = transformers.OPTForCausalLM.from_pretrained(tmp_path / "merged_model")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids).logits, expected, atol=1e-5, rtol=1e-5)


def test_checking_trainable_parameters_by_hand(opt_with_new_tokens):
    model, _, token_indices = opt_with_new_tokens
    adapter_model = get_adapter_model(model, TrainableTokensConfig(token_indices=token_indices))
    trainable = [(n, p.shape) for n, p in adapter_model.named_parameters() if p.requires_grad]
    assert trainable == [("model.model.decoder.embed_tokens.adapters.default.trainable_tokens_rows", (2, 16))]
    all_params = sum(p.numel() for p in adapter_model.parameters())
    assert adapter_model.get_nb_trainable_parameters() == (32, all_params)
