"""Several trainable-token adapters: switching, stacking, merging, disabling."""

import copy

import pytest
import torch
from models import batch, build, logits

from tt_core import AdapterLayer, AdapterModel, get_adapter_model
from tt_plugins.trainable_tokens import TrainableTokensConfig


def _rows(adapter_model: AdapterModel, adapter: str) -> torch.nn.Parameter:
    return adapter_model.model.model.embed_tokens.adapters[adapter].trainable_tokens_rows


def _with_rows(model, rows_by_token: dict[int, torch.Tensor]):
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for token, row in rows_by_token.items():
            reference.get_input_embeddings().weight[token] = row
    return reference


@pytest.fixture
def two_adapters():
    model = build("llama_tied")
    reference = copy.deepcopy(model)
    adapter_model = get_adapter_model(model, TrainableTokensConfig(token_indices=[10, 11]), adapter_name="a")
    adapter_model.add_adapter("b", TrainableTokensConfig(token_indices=[11, 12]))
    torch.manual_seed(3)
    with torch.no_grad():
        _rows(adapter_model, "a").normal_()
        _rows(adapter_model, "b").normal_()
    return adapter_model, reference


def test_switching_changes_rows_used_and_rows_trained(two_adapters):
    adapter_model, reference = two_adapters
    inputs = batch("llama_tied", [10, 11, 12])
    a, b = _rows(adapter_model, "a"), _rows(adapter_model, "b")
    assert adapter_model.active_adapters == ["a"]
    assert a.requires_grad and not b.requires_grad
    expected_a = logits(_with_rows(reference, {10: a[0], 11: a[1]}), inputs)
    torch.testing.assert_close(logits(adapter_model, inputs), expected_a, atol=1e-5, rtol=1e-5)

    adapter_model.set_adapter("b")
    assert adapter_model.active_adapters == ["b"]
    assert b.requires_grad and not a.requires_grad
    expected_b = logits(_with_rows(reference, {11: b[0], 12: b[1]}), inputs)
    torch.testing.assert_close(logits(adapter_model, inputs), expected_b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("order", [["a", "b"], ["b", "a"]])
def test_stacked_overlapping_rows_the_later_adapter_wins(two_adapters, order):
    adapter_model, reference = two_adapters
    inputs = batch("llama_tied", [10, 11, 12])
    adapter_model.set_adapter(order)
    a, b = _rows(adapter_model, "a"), _rows(adapter_model, "b")
    rows = {"a": {10: a[0], 11: a[1]}, "b": {11: b[0], 12: b[1]}}
    expected = logits(_with_rows(reference, {**rows[order[0]], **rows[order[1]]}), inputs)
    torch.testing.assert_close(logits(adapter_model, inputs), expected, atol=1e-5, rtol=1e-5)
    assert a.requires_grad and b.requires_grad


def test_merge_keeps_outputs_and_unmerge_restores_base_rows_bit_for_bit():
    model = build("llama_tied")
    original = model.get_input_embeddings().weight.detach().clone()
    inputs = batch("llama_tied", [10, 11])
    adapter_model = get_adapter_model(
        model, TrainableTokensConfig(token_indices=[10, 11], init_weights=False)
    )
    with torch.no_grad():
        before = logits(adapter_model, inputs)
        adapter_model.merge_adapter()
        assert adapter_model.merged_adapters == ["default"]
        torch.testing.assert_close(logits(adapter_model, inputs), before, atol=1e-5, rtol=1e-5)
    weight = model.get_input_embeddings().weight
    assert model.lm_head.weight is weight
    assert torch.equal(weight[10:12], _rows(adapter_model, "default").detach())
    adapter_model.unmerge_adapter()
    assert torch.equal(weight, original)


def test_merge_and_unload_returns_a_plain_model_with_the_rows_written_in():
    model = build("llama_tied")
    inputs = batch("llama_tied", [10, 11])
    adapter_model = get_adapter_model(
        model, TrainableTokensConfig(token_indices=[10, 11], init_weights=False)
    )
    with torch.no_grad():
        expected = logits(adapter_model, inputs)
    plain = adapter_model.merge_and_unload()
    assert not any(isinstance(m, AdapterLayer) for m in plain.modules())
    assert plain.lm_head.weight is plain.get_input_embeddings().weight
    assert all(p.requires_grad for p in plain.parameters())
    with torch.no_grad():
        torch.testing.assert_close(logits(plain, inputs), expected, atol=1e-5, rtol=1e-5)


def test_unload_gives_back_the_base_model_unchanged():
    model = build("llama")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    adapter_model = get_adapter_model(model, TrainableTokensConfig(token_indices=[10], init_weights=False))
    adapter_model.merge_adapter()
    plain = adapter_model.unload()
    assert plain is model
    assert not any(isinstance(m, AdapterLayer) for m in plain.modules())
    assert all(torch.equal(v, plain.state_dict()[k]) for k, v in state.items())


def test_disable_adapter_gives_base_outputs_and_restores_the_merge(two_adapters):
    adapter_model, reference = two_adapters
    inputs = batch("llama_tied", [10, 11, 12])
    with torch.no_grad():
        adapted = logits(adapter_model, inputs)
        adapter_model.merge_adapter()
        with adapter_model.disable_adapter():
            torch.testing.assert_close(logits(adapter_model, inputs), logits(reference, inputs))
        assert adapter_model.merged_adapters == ["a"]
        torch.testing.assert_close(logits(adapter_model, inputs), adapted, atol=1e-5, rtol=1e-5)


def test_delete_adapter_keeps_the_others_and_unwraps_when_none_is_left(two_adapters):
    adapter_model, reference = two_adapters
    adapter_model.set_adapter(["a", "b"])
    adapter_model.delete_adapter("a")
    assert adapter_model.adapters == ["b"] and adapter_model.active_adapters == ["b"]
    adapter_model.delete_adapter("b")
    assert not any(isinstance(m, AdapterLayer) for m in adapter_model.model.modules())
    inputs = batch("llama_tied", [10, 11, 12])
    torch.testing.assert_close(logits(adapter_model, inputs), logits(reference, inputs))


def test_only_the_chosen_rows_move_in_training():
    model = build("llama_tied")
    base_parameters = [(p, p.detach().clone()) for p in model.parameters()]
    adapter_model = get_adapter_model(model, TrainableTokensConfig(token_indices=[10, 11]))
    optimizer = torch.optim.SGD([p for p in adapter_model.parameters() if p.requires_grad], lr=1.0)
    inputs = batch("llama_tied", [10, 11])
    for _ in range(3):
        optimizer.zero_grad()
        adapter_model(**inputs, labels=inputs["input_ids"]).loss.backward()
        optimizer.step()
    assert all(torch.equal(p, copy) for p, copy in base_parameters), "a base weight moved"
    original = model.get_input_embeddings().weight.detach().clone()
    plain = adapter_model.merge_and_unload()
    weight = plain.get_input_embeddings().weight
    changed = (weight != original).any(dim=1).nonzero().flatten().tolist()
    assert changed == [10, 11]


def test_trainable_parameter_counts(capsys):
    model = build("llama_tied")
    total = sum(p.numel() for p in model.parameters())
    adapter_model = get_adapter_model(model, TrainableTokensConfig(token_indices=[10, 11, 12]))
    assert adapter_model.get_nb_trainable_parameters() == (3 * 16, total + 3 * 16)
    adapter_model.print_trainable_parameters()
    assert f"trainable params: 48 || all params: {total + 48:,}" in capsys.readouterr().out


def test_merging_rows_twice_is_refused_so_unmerge_still_gives_the_base_rows():
    from tt_core.api.errors import AdapterStateError
    from tt_plugins.trainable_tokens import TrainableTokensLayer

    weight = torch.randn(16, 4)
    base = weight.clone()
    state = TrainableTokensLayer(weight, [3, 5], init_weights=False)
    state.merge_into(weight)
    merged = weight.clone()
    with pytest.raises(AdapterStateError, match="already merged"):
        state.merge_into(weight)
    assert torch.equal(weight, merged)
    state.unmerge_from(weight)
    assert torch.equal(weight, base)
