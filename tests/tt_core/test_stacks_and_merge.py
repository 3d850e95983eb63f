"""Mixed stacks (trainable tokens + LoRA) compute the fold, and merges keep outputs or are refused."""

import copy

import pytest
import torch
import transformers
from models import (
    FAMILIES,
    adapter_state,
    assert_grads_like_reference,
    batch,
    build,
    logits,
    reference_logits,
)
from numerics import assert_same_math
from torch import nn

from tt_core import AdapterLayer, AdapterModel
from tt_plugins.lora_embedding import LoraEmbeddingConfig, LoraEmbeddingLayer
from tt_plugins.trainable_tokens import TrainableTokensConfig, TrainableTokensLayer

TOKENS = [3, 17, 64, 127]
BOTH_ORDERS = [["tokens", "style"], ["style", "tokens"]]
STACK_FAMILIES = ["llama", "llama_tied", "gpt2", "t5"]


# ---------------------------------------------------------------- helpers


def _embedding_weight(adapter_model: AdapterModel) -> nn.Parameter:
    return adapter_model.get_input_embeddings().weight


def _with_adapters(family: str, first: str = "tokens"):
    """A model holding a random trainable-tokens adapter "tokens" and a random LoRA "style".

    Returns (adapter model, untouched copy of the base model, inputs).
    """
    model = build(family)
    reference = copy.deepcopy(model)
    adapter_model = AdapterModel(model)
    configs = {
        "tokens": TrainableTokensConfig(token_indices=TOKENS, init_weights=False),
        "style": LoraEmbeddingConfig(r=4, lora_alpha=8, init_weights=False),
    }
    second = "style" if first == "tokens" else "tokens"
    adapter_model.add_adapter(first, configs[first])
    adapter_model.add_adapter(second, configs[second])
    return adapter_model, reference, batch(family, TOKENS)


def _fold(base_weight: torch.Tensor, stack: list[tuple[str, object]]) -> torch.Tensor:
    """``W_eff = a_n(... a_1(W))`` from (kind, tensors) pairs: TT replaces rows, LoRA adds."""
    weight = base_weight
    for kind, tensors in stack:
        if kind == "tokens":
            weight = weight.index_copy(0, torch.tensor(TOKENS), tensors)
        else:
            lora_a, lora_b, scaling = tensors
            weight = weight + scaling * (lora_b @ lora_a).T
    return weight


def _leaves(adapter_model: AdapterModel, family: str, names: list[str]) -> list[tuple[str, object]]:
    """Detached copies of the adapters' tensors (requiring grad), ready for :func:`_fold`."""
    stack: list[tuple[str, object]] = []
    for name in names:
        state = adapter_state(adapter_model, family, name)
        if isinstance(state, TrainableTokensLayer):
            stack.append(("tokens", state.trainable_tokens_rows.detach().clone().requires_grad_(True)))
        else:
            lora_a = state.lora_embedding_A.detach().clone().requires_grad_(True)
            lora_b = state.lora_embedding_B.detach().clone().requires_grad_(True)
            stack.append(("style", (lora_a, lora_b, state.scaling)))
    return stack


def _expected(adapter_model, reference, family, inputs, names) -> torch.Tensor:
    base_weight = reference.get_input_embeddings().weight.detach()
    with torch.no_grad():
        return reference_logits(
            reference, family, _fold(base_weight, _leaves(adapter_model, family, names)), inputs
        )


def _run(adapter_model: AdapterModel, inputs) -> torch.Tensor:
    with torch.no_grad():
        return logits(adapter_model, inputs)


def _snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    tensors = dict(module.named_parameters(remove_duplicate=False))
    tensors.update(module.named_buffers(remove_duplicate=False))
    return {name: tensor.detach().clone() for name, tensor in tensors.items()}


def _assert_bitwise_equal(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> None:
    assert before.keys() == after.keys()
    for name, tensor in before.items():
        # compare the bytes, so NaN equals NaN and -0.0 differs from 0.0
        same = torch.equal(tensor.reshape(-1).view(torch.uint8), after[name].reshape(-1).view(torch.uint8))
        assert same, f"{name} changed"


def _assert_tied(adapter_model: AdapterModel, family: str) -> None:
    _, embedding, tied = FAMILIES[family]
    weight = adapter_model.model.get_submodule(embedding).weight
    assert isinstance(weight, nn.Parameter)
    for name in tied:
        assert adapter_model.model.get_submodule(name).weight is weight


# ---------------------------------------------------------------- stacks
@pytest.mark.parametrize("family", STACK_FAMILIES)
def test_stack_outputs_and_gradients_equal_the_fold_in_both_orders(family):
    adapter_model, reference, inputs = _with_adapters(family)
    base_weight = reference.get_input_embeddings().weight.detach()
    outputs = []
    for order in BOTH_ORDERS:
        adapter_model.set_adapter(order)
        for name in order:
            adapter_state(adapter_model, family, name).zero_grad()
        out = logits(adapter_model, inputs)
        out.square().mean().backward()

        leaves = _leaves(adapter_model, family, order)
        expected = reference_logits(reference, family, _fold(base_weight, leaves), inputs)
        expected.square().mean().backward()

        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
        for name, (_, tensors) in zip(order, leaves, strict=True):
            assert_grads_like_reference(name, adapter_state(adapter_model, family, name), tensors)
        outputs.append(out.detach())
    assert (outputs[0] - outputs[1]).abs().max() > 1e-3, "the two orders must really differ"


@pytest.mark.parametrize("family", ["llama_tied", "t5"])
def test_lora_rows_overwritten_by_later_tokens_get_no_gradient_from_the_head(family):
    # Stack ["style", "tokens"]: the TT rows replace the LoRA-updated rows, so the loss
    # on those logits columns must not reach LoRA through the tied head.
    adapter_model, reference, inputs = _with_adapters(family)
    adapter_model.set_adapter(["style", "tokens"])
    hidden = torch.randn(2, 5, reference.get_input_embeddings().weight.shape[1])
    head = adapter_model.model.get_submodule(FAMILIES[family][2][-1])
    head(hidden)[..., TOKENS].sum().backward()
    lora = adapter_state(adapter_model, family, "style")
    tokens = adapter_state(adapter_model, family, "tokens")
    assert tokens.trainable_tokens_rows.grad.abs().sum() > 0
    torch.testing.assert_close(lora.lora_embedding_A.grad, torch.zeros_like(lora.lora_embedding_A))
    torch.testing.assert_close(lora.lora_embedding_B.grad, torch.zeros_like(lora.lora_embedding_B))


@pytest.mark.parametrize("first", ["tokens", "style"])
@pytest.mark.parametrize("family", ["llama", "llama_tied", "t5"])
def test_second_adapter_on_the_same_module_and_deleting_each(family, first):
    adapter_model, reference, inputs = _with_adapters(family, first=first)
    _, embedding, tied = FAMILIES[family]
    second = "style" if first == "tokens" else "tokens"
    for name in [embedding, *tied]:
        wrapper = adapter_model.model.get_submodule(name)
        assert isinstance(wrapper, AdapterLayer) and list(wrapper.adapters) == [first, second]
    adapter_model.set_adapter(["tokens", "style"])
    torch.testing.assert_close(
        _run(adapter_model, inputs), _expected(adapter_model, reference, family, inputs, ["tokens", "style"])
    )
    adapter_model.delete_adapter(first)
    assert adapter_model.active_adapters == [second]
    torch.testing.assert_close(
        _run(adapter_model, inputs), _expected(adapter_model, reference, family, inputs, [second])
    )
    _assert_tied(adapter_model, family)
    adapter_model.delete_adapter(second)
    for name in [embedding, *tied]:
        assert not isinstance(adapter_model.model.get_submodule(name), AdapterLayer)
    assert not any(isinstance(module, AdapterLayer) for module in adapter_model.modules())
    _assert_tied(adapter_model, family)
    torch.testing.assert_close(_run(adapter_model, inputs), _run(reference, inputs))


# ---------------------------------------------------------------- merge
@pytest.mark.parametrize("family", ["llama", "llama_tied", "t5"])
@pytest.mark.parametrize("order", BOTH_ORDERS)
def test_merging_a_prefix_then_the_rest_keeps_outputs(family, order):
    adapter_model, _, inputs = _with_adapters(family)
    adapter_model.set_adapter(order)
    stacked = _run(adapter_model, inputs)
    adapter_model.merge_adapter(adapter_names=[order[0]])
    assert adapter_model.merged_adapters == [order[0]]
    torch.testing.assert_close(_run(adapter_model, inputs), stacked, atol=1e-5, rtol=1e-5)
    _assert_tied(adapter_model, family)
    adapter_model.merge_adapter(adapter_names=[order[1]])
    assert adapter_model.merged_adapters == order
    torch.testing.assert_close(_run(adapter_model, inputs), stacked, atol=1e-5, rtol=1e-5)
    _assert_tied(adapter_model, family)
    adapter_model.unmerge_adapter()
    assert adapter_model.merged_adapters == []
    torch.testing.assert_close(_run(adapter_model, inputs), stacked, atol=1e-5, rtol=1e-5)
    _assert_tied(adapter_model, family)


@pytest.mark.parametrize("family", ["llama_tied", "t5"])
def test_merging_everything_named_in_any_order_merges_in_stack_order(family):
    adapter_model, _, inputs = _with_adapters(family)
    adapter_model.set_adapter(["style", "tokens"])
    stacked = _run(adapter_model, inputs)
    adapter_model.merge_adapter(adapter_names=["tokens", "style"])
    assert adapter_model.merged_adapters == ["style", "tokens"]
    torch.testing.assert_close(_run(adapter_model, inputs), stacked, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("stack", "alone", "suggestion"),
    [
        (["tokens", "style"], "style", "merge_adapter(['tokens', 'style'])"),
        (["style", "tokens"], "tokens", "merge_adapter(['style', 'tokens'])"),
    ],
)
@pytest.mark.parametrize("family", ["llama", "llama_tied"])
def test_merging_a_later_adapter_alone_is_refused_and_nothing_changes(family, stack, alone, suggestion):
    adapter_model, _, inputs = _with_adapters(family)
    adapter_model.set_adapter(stack)
    stacked = _run(adapter_model, inputs)
    before = _snapshot(adapter_model)
    with pytest.raises(ValueError, match=r"would change the outputs") as error:
        adapter_model.merge_adapter(adapter_names=[alone])
    message = str(error.value)
    assert "'tokens'" in message and "'style'" in message
    assert suggestion in message
    _assert_bitwise_equal(before, _snapshot(adapter_model))
    assert adapter_model.merged_adapters == []
    assert not any(adapter_state(adapter_model, family, name).merged for name in stack)
    torch.testing.assert_close(_run(adapter_model, inputs), stacked)


@pytest.mark.parametrize("family", ["llama", "llama_tied"])
def test_merging_the_first_adapter_alone_is_legal_in_either_order(family):
    # _check_merge_order: merged adapters act first; moving the first one of the stack
    # there changes nothing, moving a later one in front of a non-commuting one does.
    for stack in BOTH_ORDERS:
        adapter_model, _, inputs = _with_adapters(family)
        adapter_model.set_adapter(stack)
        stacked = _run(adapter_model, inputs)
        adapter_model.merge_adapter(adapter_names=[stack[0]])
        assert adapter_model.merged_adapters == [stack[0]]
        torch.testing.assert_close(_run(adapter_model, inputs), stacked, atol=1e-5, rtol=1e-5)


def test_additive_adapters_merge_in_any_subset():
    adapter_model, _, inputs = _with_adapters("llama_tied")
    adapter_model.add_adapter("style2", LoraEmbeddingConfig(r=2, lora_alpha=3, init_weights=False))
    adapter_model.set_adapter(["style", "style2"])
    stacked = _run(adapter_model, inputs)
    adapter_model.merge_adapter(adapter_names=["style2"])  # LoRAs commute: a later one alone is fine
    assert adapter_model.merged_adapters == ["style2"]
    torch.testing.assert_close(_run(adapter_model, inputs), stacked, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["llama_tied", "t5"])
def test_a_tied_merge_is_applied_once(family):
    adapter_model, reference, inputs = _with_adapters(family)
    adapter_model.set_adapter(["tokens", "style"])
    base_weight = reference.get_input_embeddings().weight.detach()
    expected = _fold(base_weight, _leaves(adapter_model, family, ["tokens", "style"])).detach()
    weight = _embedding_weight(adapter_model)
    adapter_model.merge_adapter()
    # the shared weight holds the fold exactly once, not the LoRA update once per tied module
    assert_same_math(weight, expected)
    _assert_tied(adapter_model, family)
    assert _embedding_weight(adapter_model) is weight


@pytest.mark.parametrize("family", ["llama", "llama_tied", "t5"])
def test_unmerge_restores_the_token_rows_bit_for_bit(family):
    adapter_model, reference, inputs = _with_adapters(family)
    base_weight = reference.get_input_embeddings().weight.detach()
    weight = _embedding_weight(adapter_model)
    adapter_model.set_adapter(["tokens", "style"])
    adapter_model.merge_adapter(adapter_names=["tokens"])
    assert not torch.equal(weight, base_weight)
    adapter_model.unmerge_adapter()
    assert torch.equal(weight, base_weight)  # trainable tokens alone: the whole weight, exactly
    adapter_model.merge_adapter()
    adapter_model.unmerge_adapter()
    # LoRA subtracts its update again (exact up to rounding); the TT rows are put back exactly
    assert torch.equal(weight[TOKENS], base_weight[TOKENS])
    torch.testing.assert_close(weight, base_weight, atol=1e-6, rtol=0)
    _assert_tied(adapter_model, family)


@pytest.mark.parametrize("family", ["llama_tied", "t5"])
def test_unmerge_after_lora_then_tokens_comes_back_close(family):
    # Unmerging runs newest first: the TT rows come back as LoRA left them, then LoRA
    # subtracts its update, so here the rows are exact only up to float rounding.
    adapter_model, reference, _ = _with_adapters(family)
    base_weight = reference.get_input_embeddings().weight.detach()
    weight = _embedding_weight(adapter_model)
    adapter_model.set_adapter(["style", "tokens"])
    adapter_model.merge_adapter()
    assert (weight[TOKENS] - base_weight[TOKENS]).abs().max() > 1e-3
    adapter_model.unmerge_adapter()
    torch.testing.assert_close(weight, base_weight, atol=1e-6, rtol=0)
    _assert_tied(adapter_model, family)


# ---------------------------------------------------------------- merge_and_unload
@pytest.mark.parametrize("family", ["llama", "llama_tied", "t5"])
@pytest.mark.parametrize("order", BOTH_ORDERS)
def test_merge_and_unload_gives_a_plain_model_that_saves_and_loads(family, order, tmp_path):
    adapter_model, _, inputs = _with_adapters(family)
    adapter_model.set_adapter(order)
    stacked = _run(adapter_model, inputs)
    model = adapter_model.merge_and_unload()
    assert isinstance(model, transformers.PreTrainedModel)
    assert not any(isinstance(module, AdapterLayer) for module in model.modules())
    assert not any(
        isinstance(module, (LoraEmbeddingLayer, TrainableTokensLayer)) for module in model.modules()
    )
    assert all(p.requires_grad for p in model.parameters()), "base requires_grad flags come back"
    _, embedding, tied = FAMILIES[family]
    for name in tied:
        assert model.get_submodule(name).weight is model.get_submodule(embedding).weight
    torch.testing.assert_close(_run(model, inputs), stacked, atol=1e-5, rtol=1e-5)
    model.save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path).eval()
    torch.testing.assert_close(_run(loaded, inputs), stacked, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["llama_tied", "t5"])
def test_merge_and_unload_of_chosen_adapters_bakes_in_only_those(family):
    adapter_model, reference, inputs = _with_adapters(family)
    adapter_model.set_adapter(["tokens", "style"])
    expected = _expected(adapter_model, reference, family, inputs, ["style"])
    model = adapter_model.merge_and_unload(adapter_names=["style"])
    assert not any(isinstance(module, AdapterLayer) for module in model.modules())
    torch.testing.assert_close(_run(model, inputs), expected, atol=1e-5, rtol=1e-5)
    _, embedding, tied = FAMILIES[family]
    for name in tied:
        assert model.get_submodule(name).weight is model.get_submodule(embedding).weight


# ---------------------------------------------------------------- safe merge
@pytest.mark.parametrize("bad", ["tokens", "style"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_safe_merge_refuses_non_finite_adapters_and_changes_nothing(bad, value):
    adapter_model, _, inputs = _with_adapters("llama_tied")
    adapter_model.set_adapter(["tokens", "style"])
    state = adapter_state(adapter_model, "llama_tied", bad)
    with torch.no_grad():
        parameter = state.trainable_tokens_rows if bad == "tokens" else state.lora_embedding_B
        parameter[0, 0] = value
    before = _snapshot(adapter_model)
    with pytest.raises(ValueError, match=rf"merging adapter '{bad}' would write NaN or inf"):
        adapter_model.merge_adapter(safe_merge=True)
    _assert_bitwise_equal(before, _snapshot(adapter_model))
    assert adapter_model.merged_adapters == []
    with pytest.raises(ValueError, match=rf"merging adapter '{bad}' would write NaN or inf"):
        adapter_model.merge_and_unload(safe_merge=True)
    _assert_bitwise_equal(before, _snapshot(adapter_model))
    assert isinstance(adapter_model.get_input_embeddings(), AdapterLayer)


def test_safe_merge_of_finite_adapters_merges():
    adapter_model, _, inputs = _with_adapters("llama_tied")
    adapter_model.set_adapter(["tokens", "style"])
    stacked = _run(adapter_model, inputs)
    adapter_model.merge_adapter(safe_merge=True)
    assert adapter_model.merged_adapters == ["tokens", "style"]
    torch.testing.assert_close(_run(adapter_model, inputs), stacked, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- disable
@pytest.mark.parametrize("family", ["llama", "llama_tied", "t5"])
@pytest.mark.parametrize("merged", [["tokens"], ["tokens", "style"]])
def test_disable_adapter_while_merged_gives_the_base_model_then_the_merge_comes_back(family, merged):
    adapter_model, reference, inputs = _with_adapters(family)
    adapter_model.set_adapter(["tokens", "style"])
    stacked = _run(adapter_model, inputs)
    adapter_model.merge_adapter(adapter_names=merged)
    merged_weight = _embedding_weight(adapter_model).detach().clone()
    with adapter_model.disable_adapter():
        torch.testing.assert_close(_run(adapter_model, inputs), _run(reference, inputs), atol=1e-5, rtol=1e-5)
        assert adapter_model.merged_adapters == []
    assert adapter_model.merged_adapters == merged
    assert adapter_model.active_adapters == ["tokens", "style"]
    torch.testing.assert_close(_embedding_weight(adapter_model), merged_weight, atol=1e-6, rtol=0)
    torch.testing.assert_close(_run(adapter_model, inputs), stacked, atol=1e-5, rtol=1e-5)
    _assert_tied(adapter_model, family)


# ---------------------------------------------------------------- save / load of a stack
@pytest.mark.parametrize("family", ["llama_tied", "t5"])
def test_a_saved_mixed_stack_loads_back_in_its_order(family, tmp_path):
    adapter_model, _, inputs = _with_adapters(family)
    adapter_model.set_adapter(["style", "tokens"])
    stacked = _run(adapter_model, inputs)
    adapter_model.save_pretrained(tmp_path)
    loaded = AdapterModel.from_pretrained(build(family), tmp_path)
    assert loaded.active_adapters == ["style", "tokens"]
    torch.testing.assert_close(_run(loaded, inputs), stacked)
