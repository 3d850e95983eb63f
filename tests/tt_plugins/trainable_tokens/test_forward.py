"""Trainable tokens compute what the base model computes with the new rows written in."""

import copy

import pytest
import torch
from models import FAMILIES, adapter_state, batch, build, logits, reference_logits

from tt_core import AdapterLayer, get_adapter_model
from tt_plugins.trainable_tokens import TrainableTokensConfig

TOKENS = [3, 17, 64, 127]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_targets_the_input_embedding_and_every_module_tied_to_it(family):
    model = build(family)
    adapter_model = get_adapter_model(model, TrainableTokensConfig(token_indices=TOKENS))
    _, embedding, tied = FAMILIES[family]
    wrapped = {name for name, module in model.named_modules() if isinstance(module, AdapterLayer)}
    assert wrapped == {embedding, *tied}
    states = {id(model.get_submodule(name).adapters["default"]) for name in wrapped}
    assert len(states) == 1, "tied modules must share one adapter state"
    trainable = [name for name, p in adapter_model.named_parameters() if p.requires_grad]
    assert len(trainable) == 1 and "trainable_tokens_" in trainable[0] and "default" in trainable[0]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_outputs_and_gradients_equal_the_base_model_with_the_rows_written_in(family):
    model = build(family)
    reference = copy.deepcopy(model)
    inputs = batch(family, TOKENS)
    adapter_model = get_adapter_model(model, TrainableTokensConfig(token_indices=TOKENS))
    state = adapter_state(adapter_model, family)
    with torch.no_grad():
        state.trainable_tokens_rows.add_(torch.randn_like(state.trainable_tokens_rows))

    out = logits(adapter_model, inputs)
    out.square().mean().backward()

    rows = state.trainable_tokens_rows.detach().clone().requires_grad_(True)
    base_weight = reference.get_input_embeddings().weight.detach()
    effective = base_weight.index_copy(0, torch.tensor(TOKENS), rows)
    expected = reference_logits(reference, family, effective, inputs)
    expected.square().mean().backward()

    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(state.trainable_tokens_rows.grad, rows.grad, atol=1e-6, rtol=1e-4)
    assert rows.grad.abs().sum() > 0


@pytest.mark.parametrize("family", ["llama", "llama_tied", "t5", "custom"])
def test_a_new_adapter_starts_as_a_no_op(family):
    model = build(family)
    inputs = batch(family, TOKENS)
    with torch.no_grad():
        before = logits(model, inputs)
    adapter_model = get_adapter_model(model, TrainableTokensConfig(token_indices=TOKENS))
    torch.testing.assert_close(logits(adapter_model, inputs), before, atol=1e-5, rtol=1e-5)


def test_scaled_embedding_scales_the_new_rows():
    model = build("gemma3")
    embedding = model.get_input_embeddings()
    adapter_model = get_adapter_model(model, TrainableTokensConfig(token_indices=[5]))
    with torch.no_grad():
        adapter_state(adapter_model, "gemma3").trainable_tokens_rows.fill_(1.0)
        out = adapter_model.get_input_embeddings()(torch.tensor([[5, 6]]))
    assert float(embedding.embed_scale) != 1.0
    torch.testing.assert_close(out[0, 0], torch.full((16,), float(embedding.embed_scale)))
    torch.testing.assert_close(out[0, 1], embedding.weight[6] * embedding.embed_scale)


def test_head_bias_is_kept_for_the_new_columns():
    model = build("custom")
    adapter_model = get_adapter_model(model, TrainableTokensConfig(token_indices=[7]))
    hidden = torch.randn(3, 16)
    with torch.no_grad():
        adapter_state(adapter_model, "custom").trainable_tokens_rows.zero_()
        out = adapter_model.model.head(hidden)
    torch.testing.assert_close(out[:, 7], model.head.base_layer.bias[7].expand(3))


def test_padding_positions_look_up_the_base_padding_row():
    model = build("opt")  # padding_idx = 1
    adapter_model = get_adapter_model(model, TrainableTokensConfig(token_indices=[5]))
    embedding = adapter_model.get_input_embeddings()
    with torch.no_grad():
        out = embedding(torch.tensor([[1, 5, 1]]))
    torch.testing.assert_close(out[0, 0], embedding.weight[1])
    torch.testing.assert_close(out[0, 2], embedding.weight[1])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_base_keeps_fp32_rows_and_returns_base_dtype(dtype):
    model = build("llama_tied").to(dtype)
    inputs = batch("llama_tied", TOKENS)
    adapter_model = get_adapter_model(model, TrainableTokensConfig(token_indices=TOKENS))
    state = adapter_state(adapter_model, "llama_tied")
    assert state.trainable_tokens_rows.dtype == torch.float32
    out = logits(adapter_model, inputs)
    assert out.dtype == dtype
    out.float().square().mean().backward()
    assert state.trainable_tokens_rows.grad is not None
    assert state.trainable_tokens_rows.grad.dtype == torch.float32


def test_generate_runs_through_the_adapter():
    model = build("llama_tied")
    adapter_model = get_adapter_model(model, TrainableTokensConfig(token_indices=[9]))
    with torch.no_grad():
        adapter_state(adapter_model, "llama_tied").trainable_tokens_rows.fill_(5.0)
    out = adapter_model.generate(torch.tensor([[3, 4]]), max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out.tolist()[0][2:] == [9, 9, 9]
