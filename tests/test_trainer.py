"""transformers.Trainer with its defaults on an AdapterModel: checkpoints, resume, best model, save_model.

Trainer saves a model that is neither a PreTrainedModel nor a PeftModel as
``model.safetensors`` = ``state_dict()`` and resumes it with
``load_state_dict(state, False)``; AdapterModel answers both with its adapters
only (tt_core/formats/trainer.py). Every run here keeps Trainer's default
checkpointing (save_strategy="steps"), on a tied and an untied model.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import safetensors.torch
import torch
import transformers
from models import llama

from tt_core import AdapterModel, Registry, get_adapter_model
from tt_plugins.trainable_tokens import TrainableTokensConfig

NEW_TOKENS = [120, 121, 122]
ROWS_KEY = "model.model.embed_tokens.adapters.default.trainable_tokens_rows"


class _Sentences(torch.utils.data.Dataset):
    """Sentences in which the new tokens follow a pattern the model can learn."""

    def __init__(self, count: int = 8, seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.input_ids = torch.randint(2, 100, (count, 8), generator=generator)
        self.input_ids[:, 2::3] = torch.tensor(NEW_TOKENS)[torch.arange(2) % 3]

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids[i], "labels": self.input_ids[i]}


def _base(tied: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    return llama(tied)


def _adapter_model(base: torch.nn.Module) -> AdapterModel:
    torch.manual_seed(1)
    return get_adapter_model(base, TrainableTokensConfig(token_indices=NEW_TOKENS, init_weights=False))


def _rows(adapter_model: AdapterModel) -> torch.Tensor:
    return adapter_model.model.model.embed_tokens.adapters["default"].trainable_tokens_rows


def _args(output_dir: Path, **overrides: object) -> transformers.TrainingArguments:
    settings: dict[str, object] = dict(
        output_dir=str(output_dir),
        max_steps=6,
        save_steps=3,  # save_strategy stays Trainer's default, "steps"
        per_device_train_batch_size=2,
        learning_rate=0.05,
        report_to=[],
        logging_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    settings.update(overrides)
    return transformers.TrainingArguments(**settings)  # type: ignore[arg-type]


def _trainer(adapter_model: AdapterModel, args: transformers.TrainingArguments, **kwargs: object):
    return transformers.Trainer(model=adapter_model, args=args, train_dataset=_Sentences(), **kwargs)


def _optimizer_tensors(trainer: transformers.Trainer) -> list[torch.Tensor]:
    state = trainer.optimizer.state_dict()["state"]
    return [torch.as_tensor(value) for key in sorted(state) for value in state[key].values()]


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_checkpoints_hold_the_adapters_only(tmp_path, tied):
    adapter_model = _adapter_model(_base(tied))
    _trainer(adapter_model, _args(tmp_path)).train()  # used to crash on a tied model (shared tensors)

    rows_bytes = _rows(adapter_model).numel() * 4
    base_bytes = sum(p.numel() * p.element_size() for p in adapter_model.model.parameters())
    for step in (3, 6):
        folder = tmp_path / f"checkpoint-{step}"
        weights = safetensors.torch.load_file(folder / "model.safetensors")
        assert set(weights) == {ROWS_KEY, "_extra_state"}  # no base weight, tied rows once
        assert (folder / "model.safetensors").stat().st_size < rows_bytes + 4096 < base_bytes / 4
        assert (folder / "optimizer.pt").stat().st_size < 3 * rows_bytes + 4096  # Adam's two moments
    # The last checkpoint holds the trained rows.
    last = safetensors.torch.load_file(tmp_path / "checkpoint-6" / "model.safetensors")
    assert torch.equal(last[ROWS_KEY], _rows(adapter_model).detach())


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_resume_from_checkpoint_continues_exactly(tmp_path, tied):
    straight = _adapter_model(_base(tied))
    straight_trainer = _trainer(straight, _args(tmp_path / "straight"))
    straight_trainer.train()

    # A new process would build the same model; its rows start elsewhere and must be loaded.
    resumed = _adapter_model(_base(tied))
    with torch.no_grad():
        _rows(resumed).zero_()
    resumed_trainer = _trainer(resumed, _args(tmp_path / "resumed"))
    resumed_trainer.train(resume_from_checkpoint=str(tmp_path / "straight" / "checkpoint-3"))

    assert resumed_trainer.state.global_step == 6
    torch.testing.assert_close(_rows(resumed), _rows(straight), rtol=0, atol=1e-7)
    for mine, theirs in zip(
        _optimizer_tensors(resumed_trainer), _optimizer_tensors(straight_trainer), strict=True
    ):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-7)
    # The optimizer still updates the model's own rows (loading copied into them).
    assert _rows(resumed) is resumed_trainer.optimizer.param_groups[0]["params"][0]


def test_resume_refuses_a_checkpoint_of_other_tokens(tmp_path):
    _trainer(_adapter_model(_base(False)), _args(tmp_path / "a", max_steps=3)).train()
    other = get_adapter_model(_base(False), TrainableTokensConfig(token_indices=[5, 6, 7]))
    with pytest.raises(ValueError, match="was saved with config"):
        trainer = _trainer(other, _args(tmp_path / "b"))
        trainer.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-3"))


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_load_best_model_at_end_restores_the_best_checkpoints_rows(tmp_path, tied):
    adapter_model = _adapter_model(_base(tied))
    scores = iter([1.0, 3.0, 2.0])  # the second evaluation (step 4) is the best

    class RecordRows(transformers.TrainerCallback):
        saved: dict[int, torch.Tensor] = {}

        def on_save(self, args, state, control, **kwargs):
            self.saved[state.global_step] = _rows(adapter_model).detach().clone()

    trainer = _trainer(
        adapter_model,
        _args(
            tmp_path,
            save_steps=2,
            eval_strategy="steps",
            eval_steps=2,
            load_best_model_at_end=True,
            metric_for_best_model="score",
            greater_is_better=True,
        ),
        eval_dataset=_Sentences(4, seed=1),
        compute_metrics=lambda prediction: {"score": next(scores)},
        callbacks=[RecordRows()],
    )
    trainer.train()
    assert trainer.state.best_model_checkpoint == str(tmp_path / "checkpoint-4")
    assert not torch.equal(RecordRows.saved[4], RecordRows.saved[6])
    assert torch.equal(_rows(adapter_model).detach(), RecordRows.saved[4])
    # Trainer finds the labels column, so evaluation reports a loss (the default best metric).
    assert any("eval_loss" in entry for entry in trainer.state.log_history)


def test_save_model_writes_a_folder_from_pretrained_and_the_registry_load(tmp_path):
    base = _base(True)
    fresh_base, pristine = copy.deepcopy(base), copy.deepcopy(base)
    adapter_model = _adapter_model(base)
    trainer = _trainer(adapter_model, _args(tmp_path / "run", max_steps=3))
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))

    loaded = AdapterModel.from_pretrained(fresh_base, tmp_path / "final")
    assert loaded.active_adapters == ["default"]
    assert torch.equal(_rows(loaded), _rows(adapter_model))
    inputs = _Sentences()[0]["input_ids"][None]
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=inputs).logits, adapter_model(input_ids=inputs).logits)
    # Under another name, as one adapter of a model.
    loaded.load_adapter(tmp_path / "final", "again")
    assert torch.equal(loaded.model.model.embed_tokens.adapters["again"].trainable_tokens_rows, _rows(loaded))

    registry = Registry(tmp_path / "registry")
    version = registry.publish(loaded, "chat-markers", adapter="default")
    from_registry = registry.load(pristine, "chat-markers")
    assert version == 1
    assert torch.equal(
        from_registry.model.model.embed_tokens.adapters["chat-markers"].trainable_tokens_rows,
        _rows(adapter_model),
    )


def test_a_checkpoint_of_a_model_with_several_adapters_loads_them_all(tmp_path):
    adapter_model = _adapter_model(_base(False))
    adapter_model.add_adapter("other", TrainableTokensConfig(token_indices=[7, 8]))
    adapter_model.set_adapter(["default", "other"])
    _trainer(adapter_model, _args(tmp_path, max_steps=3)).train()
    state = safetensors.torch.load_file(tmp_path / "checkpoint-3" / "model.safetensors")
    assert json.loads(bytes(state["_extra_state"].tolist()))["active"] == ["default", "other"]
    loaded = AdapterModel.from_pretrained(_base(False), tmp_path / "checkpoint-3")
    assert loaded.active_adapters == ["default", "other"]
    assert torch.equal(_rows(loaded), _rows(adapter_model))


def test_state_dict_round_trips_strictly_and_says_what_it_holds():
    adapter_model = _adapter_model(_base(True))
    state = adapter_model.state_dict()
    assert list(state) == [ROWS_KEY, "_extra_state"]
    with torch.no_grad():
        _rows(adapter_model).zero_()
    result = adapter_model.load_state_dict(state)
    assert not result.missing_keys and not result.unexpected_keys
    assert torch.equal(_rows(adapter_model), state[ROWS_KEY])
    with pytest.raises(RuntimeError, match="holds its adapters only"):
        adapter_model.load_state_dict(adapter_model.model.state_dict())


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_gradient_checkpointing_gives_the_same_gradients(tmp_path, tied):
    seen = {}

    class RecordGradients(transformers.TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            layers = model.model.model.layers
            seen[args.gradient_checkpointing] = (
                [layer.gradient_checkpointing for layer in layers],
                _rows(model).grad.clone(),
            )

    for checkpointing in (False, True):
        trainer = _trainer(
            _adapter_model(_base(tied)),
            _args(tmp_path, max_steps=1, gradient_checkpointing=checkpointing),
            callbacks=[RecordGradients()],
        )
        trainer.train()
    assert seen[True][0] == [True] and seen[False][0] == [False]  # it really checkpointed
    assert seen[False][1].abs().sum() > 0
    torch.testing.assert_close(seen[True][1], seen[False][1], rtol=0, atol=1e-7)
