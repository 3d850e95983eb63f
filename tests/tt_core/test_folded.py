"""Calls without a gradient in eval mode run a stack folded once (tt_core/tensors/folded.py).

The folded stack must give the hand-folded weight's outputs on every model
family, be built once and reused (one low-rank pass, no per-call folding), and
be rebuilt whenever any weight it was built from changes, however it changes.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import models
import pytest
import torch
from models import FAMILIES, adapter_state, batch, build, logits, reference_logits
from numerics import assert_same_math
from torch import nn

from tt_core import AdapterLayer, AdapterModel, AdapterState
from tt_core.testing import OpRecorder
from tt_plugins.lora_embedding import LoraEmbeddingConfig
from tt_plugins.trainable_tokens import TrainableTokensConfig, TrainableTokensLayer

TOKENS = [5, 17, 40, 99]
TOKENS2 = [17, 60, 99, 120]  # half shared with TOKENS: the later adapter wins there
STACK = ["tokens", "lora", "tokens2", "lora2"]


def _stacked(family: str, stack: list[str] = STACK, dtype: torch.dtype = torch.float32) -> AdapterModel:
    adapter_model = AdapterModel(build(family).to(dtype))
    for name in stack:
        if name.startswith("tokens"):
            ids = TOKENS2 if name == "tokens2" else TOKENS
            config: Any = TrainableTokensConfig(token_indices=ids, init_weights=False)
        else:
            config = LoraEmbeddingConfig(r=2, lora_alpha=4, init_weights=False)
        adapter_model.add_adapter(name, config)
    adapter_model.set_adapter(stack)
    return adapter_model.eval()


def _hand_folded(adapter_model: AdapterModel, family: str, stack: list[str]) -> torch.Tensor:
    """``a_n(... a_1(W))`` from the base weight and each adapter's tensors, by hand."""
    weight = adapter_model.model.get_submodule(FAMILIES[family][1]).weight.detach().float()
    for name in stack:
        state = adapter_state(adapter_model, family, name)
        if isinstance(state, TrainableTokensLayer):
            weight = weight.index_copy(0, state.token_indices, state.trainable_tokens_rows.detach().float())
        else:
            delta = (state.lora_embedding_B @ state.lora_embedding_A).T * state.scaling
            weight = weight + delta.detach()
    return weight


def _expected(adapter_model: AdapterModel, family: str, stack: list[str], inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return reference_logits(build(family), family, _hand_folded(adapter_model, family, stack), inputs)


def _layers(adapter_model: AdapterModel) -> list[AdapterLayer]:
    return [module for module in adapter_model.modules() if isinstance(module, AdapterLayer)]


@pytest.mark.parametrize("family", ["llama", "llama_tied", "gpt2", "t5", "gemma3", "bert", "custom"])
def test_a_folded_stack_gives_the_hand_folded_weights_outputs(family):
    adapter_model = _stacked(family)
    inputs = batch(family, TOKENS + TOKENS2)
    ran: list[AdapterLayer] = []
    for layer in _layers(adapter_model):
        layer.register_forward_hook(lambda module, _args, _output: ran.append(module))
    with torch.no_grad():
        first, second = logits(adapter_model, inputs), logits(adapter_model, inputs)
    expected = _expected(adapter_model, family, STACK, inputs)
    torch.testing.assert_close(first, expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(first, second)
    assert ran and all(layer.folded is not None for layer in ran)
    # With a gradient the stack runs in order, adapter by adapter: the same outputs.
    torch.testing.assert_close(logits(adapter_model, inputs).detach(), first, atol=1e-5, rtol=1e-5)


def test_the_fold_is_built_once_then_each_call_makes_one_low_rank_pass(monkeypatch):
    adapter_model = _stacked("llama_tied")
    inputs = batch("llama_tied", TOKENS)
    folds = Counter[str]()
    for cls in {type(adapter_state(adapter_model, "llama_tied", name)) for name in STACK}:
        original = cls.adapt_rows

        def counted(self, token_ids, rows, _original=original):  # type: ignore[no-untyped-def]
            folds[type(self).__name__] += 1
            return _original(self, token_ids, rows)

        monkeypatch.setattr(cls, "adapt_rows", counted)
    with torch.no_grad():
        logits(adapter_model, inputs)
        assert sum(folds.values()) == 2 * len(STACK)  # once per module: the embedding and the tied head
        with OpRecorder() as recorder:
            logits(adapter_model, inputs)
    calls = Counter(recorder.calls)
    assert sum(folds.values()) == 2 * len(STACK), "the second call folded the rows again"
    logit_count = inputs["input_ids"].numel() * models.VOCAB
    # Both LoRAs in one pass over the logits; every replaced column written once.
    assert calls["aten.addmm_.default", logit_count] == 1, calls
    assert calls["aten.index_copy_.default", logit_count] == 1, calls


def _rows(adapter_model: AdapterModel, name: str = "tokens") -> nn.Parameter:
    return adapter_state(adapter_model, "llama_tied", name).trainable_tokens_rows


def _lora_a(adapter_model: AdapterModel) -> nn.Parameter:
    return adapter_state(adapter_model, "llama_tied", "lora2").lora_embedding_A


def _optimizer_step(adapter_model: AdapterModel) -> None:
    parameters = [p for p in adapter_model.parameters() if p.requires_grad]
    for parameter in parameters:
        parameter.grad = torch.randn_like(parameter)
    torch.optim.AdamW(parameters, lr=0.1).step()


def _edit_in_place(adapter_model: AdapterModel) -> None:
    with torch.no_grad():
        _rows(adapter_model, "tokens2")[0] += 1.0
        _lora_a(adapter_model).mul_(2.0)


def _load_state_dict(adapter_model: AdapterModel) -> None:
    state = adapter_state(adapter_model, "llama_tied", "lora")
    state.load_state_dict({key: value + 0.5 for key, value in state.state_dict().items()})


def _assign_new_parameters(adapter_model: AdapterModel) -> None:
    state = adapter_state(adapter_model, "llama_tied", "tokens")
    state.load_state_dict({key: value * 3 for key, value in state.state_dict().items()}, assign=True)


def _edit_the_base_weight(adapter_model: AdapterModel) -> None:
    with torch.no_grad():
        adapter_model.model.get_input_embeddings().weight[:50] *= -1.0


def _replace_data(adapter_model: AdapterModel) -> None:
    _lora_a(adapter_model).data = torch.randn_like(_lora_a(adapter_model))


def _write_through_data_then_clear(adapter_model: AdapterModel) -> None:
    _rows(adapter_model).data.add_(5.0)  # no version counter sees this ...
    adapter_model.clear_inference_cache()  # ... so the documented call is needed


CHANGES = {
    "optimizer step": _optimizer_step,
    "in-place edit under no_grad": _edit_in_place,
    "load_state_dict": _load_state_dict,
    "load_state_dict(assign=True)": _assign_new_parameters,
    "base weight edited": _edit_the_base_weight,
    ".data replaced": _replace_data,
    ".data written, then clear_inference_cache()": _write_through_data_then_clear,
}


@pytest.mark.parametrize("change", list(CHANGES))
def test_the_fold_follows_every_change_of_a_weight(change):
    adapter_model = _stacked("llama_tied")
    inputs = batch("llama_tied", TOKENS + TOKENS2)
    with torch.no_grad():
        before = logits(adapter_model, inputs)
    CHANGES[change](adapter_model)
    with torch.no_grad():
        after = logits(adapter_model, inputs)
    expected = _expected(adapter_model, "llama_tied", STACK, inputs)
    assert not torch.allclose(before, expected, atol=1e-3), "the change changed nothing"
    torch.testing.assert_close(after, expected, atol=1e-5, rtol=1e-5)


def test_the_fold_follows_switching_merging_and_deleting():
    adapter_model = _stacked("llama_tied")
    inputs = batch("llama_tied", TOKENS + TOKENS2)
    for step, stack in [
        (lambda: adapter_model.set_adapter(["lora", "tokens2"]), ["lora", "tokens2"]),
        (lambda: adapter_model.set_adapter(STACK), STACK),
        (lambda: adapter_model.merge_adapter(["tokens"]), STACK),
        (lambda: adapter_model.unmerge_adapter(), STACK),
        (lambda: adapter_model.delete_adapter("lora2"), STACK[:3]),
    ]:
        step()
        with torch.no_grad():
            out = logits(adapter_model, inputs)
        torch.testing.assert_close(
            out, _expected(adapter_model, "llama_tied", stack, inputs), atol=1e-5, rtol=1e-5
        )
    with adapter_model.disable_adapter(), torch.no_grad():
        assert torch.equal(logits(adapter_model, inputs), logits(build("llama_tied"), inputs))


def test_train_and_eval_forget_the_fold_and_training_mode_never_folds():
    adapter_model = _stacked("llama_tied")
    inputs = batch("llama_tied", TOKENS)
    with torch.no_grad():
        logits(adapter_model, inputs)
    assert all(layer.folded is not None for layer in _layers(adapter_model))
    adapter_model.train()
    assert all(layer.folded is None for layer in _layers(adapter_model))
    with torch.no_grad():
        logits(adapter_model, inputs)  # a no-grad call while training (a probe, an eval loop under FSDP)
    assert all(layer.folded is None for layer in _layers(adapter_model))
    adapter_model.eval()
    logits(adapter_model, inputs).sum().backward()  # with a gradient: never folded
    assert all(layer.folded is None for layer in _layers(adapter_model))
    assert _rows(adapter_model).grad is not None


def test_inference_mode_and_no_grad_calls_agree():
    adapter_model = _stacked("llama_tied")
    inputs = batch("llama_tied", TOKENS + TOKENS2)
    expected = _expected(adapter_model, "llama_tied", STACK, inputs)
    with torch.inference_mode():
        torch.testing.assert_close(logits(adapter_model, inputs), expected, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(logits(adapter_model, inputs), expected, atol=1e-5, rtol=1e-5)
    _optimizer_step(adapter_model)
    with torch.inference_mode():
        after = logits(adapter_model, inputs)
    torch.testing.assert_close(
        after, _expected(adapter_model, "llama_tied", STACK, inputs), atol=1e-5, rtol=1e-5
    )


def test_a_bfloat16_model_folds_in_bfloat16():
    adapter_model = _stacked("llama_tied", dtype=torch.bfloat16)
    inputs = batch("llama_tied", TOKENS + TOKENS2)
    with torch.no_grad():
        folded = logits(adapter_model, inputs)
        adapter_model.train()
        in_order = logits(adapter_model, inputs)
    assert folded.dtype == torch.bfloat16
    torch.testing.assert_close(folded, in_order, atol=2e-2, rtol=2e-2)


class _ScaleRows(AdapterState):
    """An additive-looking method that opts in to nothing: its stack is never folded."""

    additive = True

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.rand(vocab) + 0.5)

    def embed(self, input_ids, output, base_layer):  # type: ignore[no-untyped-def]
        return output * self.scale[input_ids].unsqueeze(-1)

    def project(self, hidden, output, base_layer, earlier):  # type: ignore[no-untyped-def]
        return output * self.scale


def test_a_stack_with_a_method_that_does_not_opt_in_runs_in_order():
    torch.manual_seed(0)
    head = AdapterLayer(nn.Linear(8, 32, bias=True))
    tokens = TrainableTokensLayer(head.base_layer.weight, [3, 7], init_weights=False)
    scale = _ScaleRows(32)
    head.adapters.update({"tokens": tokens, "scale": scale})
    head.active_adapters = ["tokens", "scale"]
    head.eval()
    hidden = torch.randn(2, 5, 8)
    weight = head.base_layer.weight.detach().index_copy(0, tokens.token_indices, tokens.trainable_tokens_rows)
    expected = (hidden @ weight.T + head.base_layer.bias) * scale.scale
    with torch.no_grad():
        assert_same_math(head(hidden), expected.detach(), terms=8)
    assert head.folded is None


def test_under_autocast_the_fold_takes_the_autocast_dtype():
    adapter_model = _stacked("llama_tied")
    inputs = batch("llama_tied", TOKENS + TOKENS2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        in_order = logits(adapter_model, inputs).detach()  # with a gradient: adapter by adapter
        with torch.no_grad():
            folded = logits(adapter_model, inputs)
    head = adapter_model.model.get_output_embeddings()
    assert head.folded is not None and head.folded.dtype == torch.bfloat16
    assert folded.dtype == in_order.dtype
    torch.testing.assert_close(folded.float(), in_order.float(), atol=3e-2, rtol=3e-2)
