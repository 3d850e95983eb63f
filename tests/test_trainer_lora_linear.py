"""transformers.Trainer on LoRA on linear layers, alone and with token rows as PEFT's combined adapter loads.

The sibling of tests/test_trainer.py (trainable tokens): the same Trainer
defaults (save_strategy="steps"), the same claims (checkpoints hold the
adapters only, resuming continues exactly, save_model writes a folder that
loads), for

* ``lora``: ``LoraLinearConfig(target_modules="all-linear", lora_dropout=0.1)``
  (dropout draws from the RNG state Trainer saves and restores);
* ``combined``: a PEFT ``LoraConfig(target_modules=[...],
  trainable_token_indices=[...])`` folder loaded with
  ``AdapterModel.from_pretrained(..., is_trainable=True)``: one adapter, a LoRA
  and its token rows, as in PEFT.
"""

from __future__ import annotations

import copy
from pathlib import Path

import peft
import pytest
import safetensors.torch
import torch
import transformers
from models import llama

from tt_core import AdapterLayer, AdapterModel, get_adapter_model
from tt_plugins.lora_linear import LoraLinearConfig

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

NEW_TOKENS = [120, 121, 122]
KINDS = ["lora", "combined"]
TIES = [pytest.param(True, id="tied"), pytest.param(False, id="untied")]


class _Sentences(torch.utils.data.Dataset):
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


def _peft_folder(tied: bool, folder: Path) -> Path:
    """PEFT's combined adapter as PEFT starts it (B zero, rows the embedding's), saved by PEFT."""
    if not (folder / "adapter_config.json").exists():
        config = peft.LoraConfig(
            r=4,
            lora_alpha=8,
            target_modules=["q_proj", "v_proj", "down_proj"],
            trainable_token_indices=NEW_TOKENS,
        )
        torch.manual_seed(1)
        peft.get_peft_model(_base(tied), config).save_pretrained(str(folder))
    return folder


def _adapter_model(kind: str, tied: bool, tmp_path: Path, dropout: float = 0.1) -> AdapterModel:
    if kind == "lora":
        torch.manual_seed(1)
        config = LoraLinearConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=dropout)
        return get_adapter_model(_base(tied), config)
    folder = _peft_folder(tied, tmp_path / f"peft-{'tied' if tied else 'untied'}")
    return AdapterModel.from_pretrained(_base(tied), folder, is_trainable=True)


def _trainable(adapter_model: AdapterModel) -> dict[str, torch.Tensor]:
    return {name: p for name, p in adapter_model.named_parameters() if p.requires_grad}


def _args(output_dir: Path, **overrides: object) -> transformers.TrainingArguments:
    settings: dict[str, object] = dict(
        output_dir=str(output_dir),
        max_steps=6,
        save_steps=3,
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


def _trainer(adapter_model: AdapterModel, args: transformers.TrainingArguments) -> transformers.Trainer:
    return transformers.Trainer(model=adapter_model, args=args, train_dataset=_Sentences())


def _optimizer_tensors(trainer: transformers.Trainer) -> list[torch.Tensor]:
    state = trainer.optimizer.state_dict()["state"]
    return [torch.as_tensor(value) for key in sorted(state) for value in state[key].values()]


@pytest.mark.parametrize("tied", TIES)
@pytest.mark.parametrize("kind", KINDS)
def test_trains_and_checkpoints_hold_the_adapters_only(tmp_path, kind, tied):
    adapter_model = _adapter_model(kind, tied, tmp_path)
    if kind == "combined":
        assert adapter_model.adapters == adapter_model.active_adapters == ["default"]
    trainable = _trainable(adapter_model)
    names = {name.rsplit(".", 1)[-1] for name in trainable}
    assert names == ({"lora_A", "lora_B"} | ({"trainable_tokens_rows"} if kind == "combined" else set()))
    before = {name: p.detach().clone() for name, p in trainable.items()}
    _trainer(adapter_model, _args(tmp_path / "run")).train()
    assert all(not torch.equal(p, before[name]) for name, p in trainable.items())  # every tensor trained

    adapter_bytes = sum(p.numel() * 4 for p in trainable.values())
    for step in (3, 6):
        folder = tmp_path / "run" / f"checkpoint-{step}"
        weights = safetensors.torch.load_file(folder / "model.safetensors")
        assert set(weights) == {*trainable, "_extra_state"}  # no base weight; a tied head's rows once
        assert (folder / "model.safetensors").stat().st_size < adapter_bytes + 4096
        assert (folder / "optimizer.pt").stat().st_size < 3 * adapter_bytes + 8192  # Adam's two moments
    last = safetensors.torch.load_file(tmp_path / "run" / "checkpoint-6" / "model.safetensors")
    assert all(torch.equal(last[name], p.detach()) for name, p in trainable.items())


@pytest.mark.parametrize("tied", TIES)
@pytest.mark.parametrize("kind", KINDS)
def test_resume_from_checkpoint_continues_exactly(tmp_path, kind, tied):
    straight = _adapter_model(kind, tied, tmp_path)
    straight_trainer = _trainer(straight, _args(tmp_path / "straight"))
    straight_trainer.train()

    # A new process builds the same model; its adapters start elsewhere and must be loaded.
    resumed = _adapter_model(kind, tied, tmp_path)
    with torch.no_grad():
        for parameter in _trainable(resumed).values():
            parameter.normal_()
    resumed_trainer = _trainer(resumed, _args(tmp_path / "resumed"))
    resumed_trainer.train(resume_from_checkpoint=str(tmp_path / "straight" / "checkpoint-3"))

    assert resumed_trainer.state.global_step == 6
    mine, theirs = _trainable(resumed), _trainable(straight)
    assert list(mine) == list(theirs)
    for name in mine:
        torch.testing.assert_close(mine[name], theirs[name], rtol=0, atol=1e-7, msg=name)
    for a, b in zip(_optimizer_tensors(resumed_trainer), _optimizer_tensors(straight_trainer), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-7)
    # The optimizer still updates the model's own parameters (loading copied into them).
    held = {id(p) for group in resumed_trainer.optimizer.param_groups for p in group["params"]}
    assert held == {id(p) for p in mine.values()}


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_resuming_with_dropout_needs_the_rng_state_trainer_restores(tmp_path, dropout):
    """Resume without the checkpoint's RNG state: exact without dropout, not with it. So the exact
    resume of the dropout run above is Trainer restoring the RNG that LoRA's dropout draws from."""
    straight = _adapter_model("lora", False, tmp_path, dropout)
    _trainer(straight, _args(tmp_path / "straight")).train()
    checkpoint = tmp_path / "straight" / "checkpoint-3"
    (checkpoint / "rng_state.pth").unlink()
    resumed = _adapter_model("lora", False, tmp_path, dropout)
    _trainer(resumed, _args(tmp_path / "resumed")).train(resume_from_checkpoint=str(checkpoint))
    differences = [
        float((a - b).abs().max())
        for a, b in zip(_trainable(resumed).values(), _trainable(straight).values(), strict=True)
    ]
    if dropout:
        assert max(differences) > 1e-4
    else:
        assert max(differences) <= 1e-7


@pytest.mark.parametrize("kind", KINDS)
def test_save_model_writes_a_folder_from_pretrained_loads_with_equal_outputs(tmp_path, kind):
    base = _base(True)
    fresh = copy.deepcopy(base)
    adapter_model = _adapter_model(kind, True, tmp_path)
    trainer = _trainer(adapter_model, _args(tmp_path / "run", max_steps=3))
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    loaded = AdapterModel.from_pretrained(fresh, tmp_path / "final")
    assert loaded.active_adapters == adapter_model.active_adapters
    assert any(isinstance(m, AdapterLayer) for m in loaded.model.modules())
    inputs = _Sentences()[0]["input_ids"][None]
    adapter_model.eval()
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(input_ids=inputs).logits, adapter_model(input_ids=inputs).logits, rtol=0, atol=0
        )


@pytest.mark.parametrize("kind", KINDS)
def test_gradient_checkpointing_gives_the_same_gradients(tmp_path, kind):
    """The LoRA runs inside the checkpointed decoder layer; its recomputation (dropout masks included,
    from the RNG state checkpointing saves) gives the gradients of the plain run. Recorded at the second
    step: at the first, B is still zero and gives A no gradient."""
    seen = {}

    class RecordGradients(transformers.TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            layers = model.model.model.layers
            seen[args.gradient_checkpointing] = (
                [layer.gradient_checkpointing for layer in layers],
                {name: p.grad.clone() for name, p in _trainable(model).items()},
            )

    for checkpointing in (False, True):
        trainer = transformers.Trainer(
            model=_adapter_model(kind, False, tmp_path),
            args=_args(tmp_path / str(checkpointing), max_steps=2, gradient_checkpointing=checkpointing),
            train_dataset=_Sentences(),
            callbacks=[RecordGradients()],
        )
        trainer.train()
    assert seen[True][0] == [True] and seen[False][0] == [False]  # it really checkpointed
    plain, checkpointed = seen[False][1], seen[True][1]
    assert list(plain) == list(checkpointed)
    for name in plain:
        assert plain[name].abs().sum() > 0, name
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=0, atol=1e-7, msg=name)


def test_load_best_model_at_end_restores_the_best_checkpoints_adapters(tmp_path):
    adapter_model = _adapter_model("combined", False, tmp_path)
    scores = iter([1.0, 3.0, 2.0])  # the second evaluation (step 4) is the best
    saved: dict[int, dict[str, torch.Tensor]] = {}

    class RecordAdapters(transformers.TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            saved[state.global_step] = {n: p.detach().clone() for n, p in _trainable(adapter_model).items()}

    trainer = transformers.Trainer(
        model=adapter_model,
        args=_args(
            tmp_path,
            save_steps=2,
            eval_strategy="steps",
            eval_steps=2,
            load_best_model_at_end=True,
            metric_for_best_model="score",
            greater_is_better=True,
        ),
        train_dataset=_Sentences(),
        eval_dataset=_Sentences(4, seed=1),
        compute_metrics=lambda prediction: {"score": next(scores)},
        callbacks=[RecordAdapters()],
    )
    trainer.train()
    assert trainer.state.best_model_checkpoint == str(tmp_path / "checkpoint-4")
    now = _trainable(adapter_model)
    assert any(not torch.equal(saved[4][name], saved[6][name]) for name in now)
    assert all(torch.equal(now[name].detach(), saved[4][name]) for name in now)
