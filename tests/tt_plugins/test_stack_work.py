"""Stacks of trainable tokens and LoRA cost what their parts cost, on tied heads too.

A training step of a stack may allocate no tokens x vocabulary tensor beyond
what the frozen base model allocates by itself (the "floor": the same model
whose only trainable parameter is a zero bias on the embedding output). The
floor's own such tensors are named in :data:`FLOOR_TRAINING`. The methods'
inherent outputs are all smaller than tokens x vocabulary, so none is
allowed: trainable tokens compute tokens x k columns and their gradients;
LoRA's head update is ``left @ right`` with ``left`` tokens x r and ``right``
r x vocabulary, added in place, and its backward makes those two shapes. The
tokens x vocabulary logits are written in place, never copied, filled or
re-created for a later adapter (no ``clone``, ``new_zeros`` or
``new_empty_strided`` from autograd's handling of in-place writes into views).

The stacks also still compute the hand-folded weight ``a_n(... a_1(W))``,
outputs and gradients.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import models
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tt_core import AdapterLayer, AdapterModel, AdapterState
from tt_core.testing import LargeAllocations, OpRecorder
from tt_plugins.lora_embedding import LoraEmbeddingConfig, LoraEmbeddingLayer
from tt_plugins.trainable_tokens import TrainableTokensConfig, TrainableTokensLayer

TOKENS = [5, 100, 300, 511]
TOKENS2 = [100, 200, 511, 7]  # half of them shared with TOKENS: the later adapter wins there
RANK = 2

# name -> the stack, in order ("tokens" and "lora" name the kind; a second one gets a "2")
STACKS: dict[str, list[str]] = {
    "tokens": ["tokens"],
    "tokens+tokens": ["tokens", "tokens2"],
    "lora": ["lora"],
    "lora+lora": ["lora", "lora2"],
    "tokens+lora": ["tokens", "lora"],
    "lora+tokens": ["lora", "tokens"],
    "tokens+lora+tokens+lora": ["tokens", "lora", "tokens2", "lora2"],
}

# The floor's own tokens x vocabulary tensors per training step: the logits (mm, or
# addmm for a head with a bias), their log-softmax (cross-entropy), and the gradients of both.
FLOOR_TRAINING = {
    "aten.mm.default",
    "aten.addmm.default",
    "aten._log_softmax.default",
    "aten.nll_loss_backward.default",
    "aten._log_softmax_backward_data.default",
}


# ---------------------------------------------------------------- models
class Family:
    """A tiny model where tokens x vocabulary is larger than vocabulary x width (so that
    counting tensors of at least tokens x vocabulary elements finds nothing else)."""

    def __init__(self, name: str) -> None:
        self.name = name

    @property
    def vocab(self) -> int:
        return 512 if self.name.startswith("llama") else models.VOCAB

    def build(self) -> nn.Module:
        torch.manual_seed(0)
        if self.name == "custom":  # a tied head with a bias: F.linear returns a view of its addmm
            model = models.BiasedTiedLM()
        else:
            model = models.llama(self.name == "llama_tied", vocab=self.vocab, width=16)
        model.train()
        return model

    def input_ids(self) -> torch.Tensor:
        generator = torch.Generator().manual_seed(1)
        ids = torch.randint(0, self.vocab, (4, 8), generator=generator)
        ids.view(-1)[::3][: len(TOKENS + TOKENS2)] = torch.tensor([t % self.vocab for t in TOKENS + TOKENS2])
        return ids

    def tokens(self, second: bool) -> list[int]:
        return sorted({t % self.vocab for t in (TOKENS2 if second else TOKENS)})

    def logits(self, model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
        out = model(input_ids=ids)
        return out if isinstance(out, torch.Tensor) else out.logits

    def loss(self, logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids.reshape(-1))


FAMILIES = ["llama", "llama_tied", "custom"]
TIED = {"llama_tied", "custom"}


def _stacked(family: Family, stack: list[str], init_weights: bool = True) -> AdapterModel:
    adapter_model = AdapterModel(family.build())
    for name in stack:
        if name.startswith("tokens"):
            config: Any = TrainableTokensConfig(
                token_indices=family.tokens(name == "tokens2"), init_weights=init_weights
            )
        else:
            config = LoraEmbeddingConfig(r=RANK, lora_alpha=2 * RANK, init_weights=init_weights)
        adapter_model.add_adapter(name, config)
    adapter_model.set_adapter(stack)
    return adapter_model


def _floor(family: Family) -> nn.Module:
    model = family.build()
    model.requires_grad_(False)
    bias = nn.Parameter(torch.zeros(model.get_input_embeddings().weight.shape[1]))
    model.get_input_embeddings().register_forward_hook(lambda _m, _a, output: output + bias)
    model.floor_bias = bias
    return model


# ---------------------------------------------------------------- counting
# tt_core.testing's detector: fresh op outputs of at least ``threshold`` elements.
TokensByVocab = LargeAllocations


def _allocations(family: Family, model: nn.Module) -> tuple[Counter, Counter]:
    """Tokens x vocabulary allocations of (one training step, one inference call), after a warm-up."""
    ids = family.input_ids()
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable
    optimizer = torch.optim.AdamW(trainable, lr=1e-3)
    threshold = ids.numel() * family.vocab
    weight = model.get_input_embeddings().weight
    assert ids.numel() * family.vocab > weight.numel(), "tokens x vocabulary must be the largest size"

    def step() -> None:
        family.loss(family.logits(model, ids), ids).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    model.train()
    step()  # gradients and optimizer state are created once, not per step
    with TokensByVocab(threshold) as training:
        step()
    assert any("backward" in op for op in training.ops), "the backward pass was not observed"
    assert any("addcdiv" in op for op in training.ops), "the optimizer step was not observed"
    model.eval()
    with torch.no_grad():
        family.logits(model, ids)
        with TokensByVocab(threshold) as inference:
            family.logits(model, ids)
    return training.found, inference.found


@pytest.fixture(scope="module", params=FAMILIES)
def floor(request: pytest.FixtureRequest) -> tuple[Family, Counter, Counter]:
    family = Family(request.param)
    training, inference = _allocations(family, _floor(family))
    return family, training, inference


def test_the_floor_allocates_only_the_named_tokens_by_vocabulary_tensors(floor):
    family, training, inference = floor
    assert {op for op, _ in training} <= FLOOR_TRAINING, dict(training)
    assert {"aten._log_softmax.default", "aten._log_softmax_backward_data.default"} <= {
        op for op, _ in training
    }
    assert sum(inference.values()) == 1, dict(inference)  # the logits


@pytest.mark.parametrize("stack", list(STACKS))
def test_a_training_step_of_a_stack_allocates_no_tokens_by_vocabulary_tensor_beyond_the_floor(floor, stack):
    family, floor_training, floor_inference = floor
    training, inference = _allocations(family, _stacked(family, STACKS[stack]))
    assert not training - floor_training, f"per training step: {dict(training - floor_training)}"
    assert not inference - floor_inference, f"per inference call: {dict(inference - floor_inference)}"


class _WriteColumns(torch.autograd.Function):
    """Columns written in place (marked dirty), the gradient passed through: the old stack's tokens."""

    @staticmethod
    def forward(ctx, output, columns, ids):
        ctx.mark_dirty(output)
        return output.index_copy_(-1, ids, columns)

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None


def test_the_counter_finds_the_copies_of_an_in_place_write_into_a_view():
    # What a stack on a tied head cost before: LoRA returned a view of its out-of-place
    # addmm, trainable tokens wrote their columns into it in place, and autograd copied
    # the whole logits (a fresh tokens x vocabulary tensor from addmm, then clone,
    # new_empty_strided and new_zeros in the backward).
    hidden = torch.randn(32, 16, requires_grad=True)
    weight, low_rank = torch.randn(512, 16), torch.randn(2, 512)
    with TokensByVocab(32 * 512) as found:
        flat = torch.addmm(hidden @ weight.T, hidden[:, :2], low_rank)
        logits = _WriteColumns.apply(flat.view(4, 8, 512), torch.zeros(4, 8, 4), torch.tensor([1, 5, 9, 300]))
        logits.sum().backward()
    copies = {op for op, _ in found.found}
    assert {"aten.addmm.default", "aten.clone.default", "aten.new_empty_strided.default"} <= copies, copies


# ---------------------------------------------------------------- the fold
def _fold(family: Family, base_weight: torch.Tensor, leaves: list[tuple[str, Any]]) -> torch.Tensor:
    weight = base_weight
    for name, tensors in leaves:
        if name.startswith("tokens"):
            weight = weight.index_copy(0, torch.tensor(family.tokens(name == "tokens2")), tensors)
        else:
            lora_a, lora_b, scaling = tensors
            weight = weight + scaling * (lora_b @ lora_a).T
    return weight


def _states(adapter_model: AdapterModel, stack: list[str]) -> list[AdapterState]:
    embedding = adapter_model.model.get_input_embeddings()
    return [embedding.adapters[name] for name in stack]


def _leaves(states: list[AdapterState], stack: list[str]) -> list[tuple[str, Any]]:
    leaves: list[tuple[str, Any]] = []
    for name, state in zip(stack, states, strict=True):
        if isinstance(state, TrainableTokensLayer):
            leaves.append((name, state.trainable_tokens_rows.detach().clone().requires_grad_(True)))
        else:
            assert isinstance(state, LoraEmbeddingLayer)
            lora_a = state.lora_embedding_A.detach().clone().requires_grad_(True)
            lora_b = state.lora_embedding_B.detach().clone().requires_grad_(True)
            leaves.append((name, (lora_a, lora_b, state.scaling)))
    return leaves


def _reference_logits(family: Family, reference: nn.Module, weight: torch.Tensor, ids: torch.Tensor):
    names = ["emb.weight", "head.weight"] if family.name == "custom" else ["model.embed_tokens.weight"]
    if family.name == "llama_tied":
        names.append("lm_head.weight")
    out = torch.func.functional_call(reference, dict.fromkeys(names, weight), (), {"input_ids": ids})
    return out if isinstance(out, torch.Tensor) else out.logits


@pytest.mark.parametrize("stack", list(STACKS))
@pytest.mark.parametrize("family_name", FAMILIES)
def test_every_stack_computes_the_hand_folded_weight_outputs_and_gradients(family_name, stack):
    family = Family(family_name)
    names = STACKS[stack]
    adapter_model = _stacked(family, names, init_weights=False)
    reference = family.build()
    ids = family.input_ids()
    out = family.logits(adapter_model, ids)
    family.loss(out, ids).backward()

    states = _states(adapter_model, names)
    leaves = _leaves(states, names)
    base_weight = reference.get_input_embeddings().weight.detach()
    expected = _reference_logits(family, reference, _fold(family, base_weight, leaves), ids)
    family.loss(expected, ids).backward()

    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    for name, state, (_, tensors) in zip(names, states, leaves, strict=True):
        models.assert_grads_like_reference(name, state, tensors)

    # Inference gives the same logits (in place, no graph).
    with torch.no_grad():
        torch.testing.assert_close(family.logits(adapter_model, ids), expected, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- the opt-in paths
class _ScaleColumns(torch.autograd.Function):
    """``output * scale`` (out of place) that saves its *result* for the backward."""

    @staticmethod
    def forward(ctx, output, scale):
        result = output * scale
        ctx.save_for_backward(result, scale)
        return result

    @staticmethod
    def backward(ctx, grad):
        result, scale = ctx.saved_tensors
        grad_scale = (grad * result / scale).reshape(-1, scale.shape[0]).sum(0)
        return grad * scale, grad_scale


class _SavesItsOutput(AdapterState):
    """A plugin written before the opt-in flags: it scales the rows of the weight (the head's
    columns), and its backward reads the result it returned, so no one may write into it."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.rand(vocab) + 0.5)

    def adapt_rows(self, token_ids, rows):
        return rows * self.scale[token_ids].unsqueeze(-1)

    def project(self, hidden, output, base_layer, earlier):
        return _ScaleColumns.apply(output, self.scale)


class _AddsRows(AdapterState):
    """An additive plugin without low_rank_factors: the core calls its project."""

    additive = True

    def __init__(self, width: int, rows: list[int]) -> None:
        super().__init__()
        self.register_buffer("rows", torch.tensor(rows))
        self.delta = nn.Parameter(torch.randn(len(rows), width))

    def adapt_rows(self, token_ids, rows):
        return rows + (token_ids.unsqueeze(-1) == self.rows).to(rows.dtype) @ self.delta

    def project(self, hidden, output, base_layer, earlier):
        return output.index_add(-1, self.rows, hidden @ self.delta.T)


class _ScalesRows(AdapterState):
    """Like the tt-row-scale example: scales the rows ``ids``; opts in to the folded head."""

    head_replaces_rows = True

    def __init__(self, ids: list[int]) -> None:
        super().__init__()
        self.register_buffer("ids", torch.tensor(ids))
        self.scale = nn.Parameter(torch.rand(len(ids)) + 0.5)

    def touched_rows(self):
        return self.ids

    def adapt_rows(self, token_ids, rows):
        hit = token_ids.unsqueeze(-1) == self.ids
        factor = torch.where(hit.any(-1), (hit.to(rows.dtype) * self.scale).sum(-1), 1.0)
        return rows * factor.unsqueeze(-1)

    def project(self, hidden, output, base_layer, earlier):
        bias = 0 if base_layer.bias is None else base_layer.bias[self.ids]
        columns = (output.index_select(-1, self.ids) - bias) * self.scale + bias
        return output.index_copy(-1, self.ids, columns)


def _head_layer(bias: bool, stack: list[tuple[str, AdapterState]]) -> AdapterLayer:
    torch.manual_seed(0)
    head = nn.Linear(16, 64, bias=bias).requires_grad_(False)
    layer = AdapterLayer(head)
    for name, state in stack:
        layer.adapters[name] = state
    layer.active_adapters = [name for name, _ in stack]
    return layer


def _lora(weight: torch.Tensor, seed: int) -> LoraEmbeddingLayer:
    torch.manual_seed(seed)
    return LoraEmbeddingLayer(weight, r=RANK, scaling=1.5, init_weights=False)


def _by_hand(layer: AdapterLayer, hidden: torch.Tensor) -> torch.Tensor:
    """Each state's rule applied out of place, in order."""
    head: nn.Linear = layer.base_layer  # type: ignore[assignment]
    out = F.linear(hidden, head.weight, head.bias)
    for name in layer.active_adapters:
        state = layer.adapters[name]
        if isinstance(state, LoraEmbeddingLayer):
            out = out + state.scaling * (hidden @ state.lora_embedding_B) @ state.lora_embedding_A
        elif isinstance(state, TrainableTokensLayer):
            bias = 0 if head.bias is None else head.bias[state.token_indices]
            columns = hidden @ state.trainable_tokens_rows.T + bias
            out = out.index_copy(-1, state.token_indices, columns)
        elif isinstance(state, _AddsRows):
            out = out.index_add(-1, state.rows, hidden @ state.delta.T)
        elif isinstance(state, _ScalesRows):
            bias = 0 if head.bias is None else head.bias[state.ids]
            out = out.index_copy(-1, state.ids, (out[..., state.ids] - bias) * state.scale + bias)
        else:
            assert isinstance(state, _SavesItsOutput) and head.bias is None
            out = out * state.scale
    return out


def _check_against_by_hand(layer: AdapterLayer) -> None:
    hidden = torch.randn(3, 5, 16, requires_grad=True)
    params = [p for p in layer.parameters() if p.requires_grad]
    out = layer(hidden)
    grads = torch.autograd.grad(out.square().sum(), [hidden, *params])
    expected = _by_hand(layer, hidden)
    expected_grads = torch.autograd.grad(expected.square().sum(), [hidden, *params])
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    for grad, expected_grad in zip(grads, expected_grads, strict=True):
        # Rows a later adapter replaces get +g - g from the sparse backward: zero up to rounding.
        scale = float(expected_grad.abs().max())
        torch.testing.assert_close(grad, expected_grad, atol=1e-6 * scale, rtol=1e-4)


def test_after_a_plugin_that_saved_its_output_the_next_adapters_write_into_a_copy():
    weight = torch.randn(64, 16)
    tokens = TrainableTokensLayer(weight, [3, 9, 40], init_weights=False)
    for stack in (
        [("saver", _SavesItsOutput(64)), ("lora", _lora(weight, 1)), ("tokens", tokens)],
        [("saver", _SavesItsOutput(64)), ("tokens", tokens), ("lora", _lora(weight, 2))],
    ):
        # an in-place write into the saved result would fail its backward
        _check_against_by_hand(_head_layer(False, stack))


@pytest.mark.parametrize("bias", [False, True])
def test_consecutive_low_rank_adapters_share_one_pass_and_others_keep_their_project(bias):
    weight = torch.randn(64, 16)
    tokens = TrainableTokensLayer(weight, [3, 9, 40], init_weights=False)
    stack = [
        ("lora", _lora(weight, 1)),
        ("lora2", _lora(weight, 2)),
        ("rows", _AddsRows(16, [1, 2, 3])),
        ("lora3", _lora(weight, 3)),
        ("tokens", tokens),
        ("lora4", _lora(weight, 4)),
    ]
    layer = _head_layer(bias, stack)
    _check_against_by_hand(layer)

    with OpRecorder() as seen:
        layer(torch.randn(3, 5, 16, requires_grad=True))
    # lora+lora2 in one pass, lora3 and lora4 each in theirs; never an out-of-place addmm
    assert seen.ops.count("aten.addmm_.default") == 3, seen.ops
    assert "aten.addmm.default" not in seen.ops or bias  # a biased head's own F.linear is an addmm
    assert seen.ops.count("aten.clone.default") == 1  # after _AddsRows, which promised nothing


@pytest.mark.parametrize("opted_in", [True, False])
@pytest.mark.parametrize("bias", [False, True])
def test_low_rank_and_row_adapters_in_any_order_take_one_pass_each(bias, opted_in, monkeypatch):
    # [tokens, lora, scale, tokens2, lora2, lora3]: the core adds the three low-rank updates in one
    # pass and writes the union of touched columns once, with the rows folded through the stack.
    weight = torch.randn(64, 16)
    scale = _ScalesRows([9, 12, 50])
    scale.head_replaces_rows = opted_in  # type: ignore[misc]
    stack = [
        ("tokens", TrainableTokensLayer(weight, [3, 9, 40], init_weights=False)),
        ("lora", _lora(weight, 1)),
        ("scale", scale),
        ("tokens2", TrainableTokensLayer(weight, [40, 41, 3, 60], init_weights=False)),
        ("lora2", _lora(weight, 2)),
        ("lora3", _lora(weight, 3)),
    ]
    layer = _head_layer(bias, stack)
    _check_against_by_hand(layer)
    hidden = torch.randn(2, 3, 16)
    for fold_from in (AdapterLayer.fold_min_elements_without_grad, 0):  # inference: in order, then folded
        monkeypatch.setattr(AdapterLayer, "fold_min_elements_without_grad", fold_from)
        with torch.no_grad(), OpRecorder() as seen:
            torch.testing.assert_close(layer(hidden), _by_hand(layer, hidden), atol=1e-5, rtol=1e-5)
        passes = seen.ops.count("aten.addmm_.default")
        assert passes == (1 if opted_in and fold_from == 0 else 2), seen.ops
    with OpRecorder() as seen:
        layer(torch.randn(3, 5, 16, requires_grad=True)).sum().backward()
    passes = seen.ops.count("aten.addmm_.default")
    writes = seen.ops.count("aten.index_copy_.default") + seen.ops.count("aten.index_copy.default")
    assert (passes, writes) == ((1, 1) if opted_in else (2, 3)), seen.ops
    assert "aten.clone.default" not in seen.ops or not opted_in


def test_a_caller_of_project_with_a_plain_list_gets_its_output_left_alone():
    from tt_core.tensors.state import AppliedAdapters

    weight = torch.randn(64, 16)
    lora, tokens = _lora(weight, 1), TrainableTokensLayer(weight, [3, 9], init_weights=False)
    head = nn.Linear(16, 64, bias=False).requires_grad_(False)
    hidden = torch.randn(2, 16, requires_grad=True)
    output = head(hidden)
    before = output.detach().clone()
    lora.project(hidden, output, head, [])
    tokens.project(hidden, output, head, [])
    assert torch.equal(output, before)
    writable = AppliedAdapters()
    writable.output_writable = True
    changed = lora.project(hidden, output, head, writable)
    assert changed is output and not torch.equal(output, before)


def test_add_low_rank_keeps_a_non_contiguous_output_correct():
    from tt_core.tensors.kernels import add_low_rank

    output = torch.randn(64, 6).T  # (6, 64), not contiguous
    left, right = torch.randn(6, 2, requires_grad=True), torch.randn(2, 64, requires_grad=True)
    expected = output + left @ right
    result = add_low_rank(output, [left], [right], writable=True)
    torch.testing.assert_close(result, expected)
    result.sum().backward()
    torch.testing.assert_close(right.grad, left.detach().T @ torch.ones(6, 64))


@pytest.mark.parametrize("tokens", [31, 32, 33, 100])
def test_the_shared_pass_gradients_equal_the_plain_products_for_any_number_of_tokens(tokens):
    # On the CPU the backward takes the output gradient block of rows by block of rows.
    from tt_core.tensors.kernels import add_low_rank

    torch.manual_seed(0)
    base = torch.randn(tokens, 16, requires_grad=True)
    lefts = [torch.randn(tokens, r, requires_grad=True) for r in (2, 3)]
    rights = [torch.randn(r, 16, requires_grad=True) for r in (2, 3)]
    weights = torch.randn(tokens, 16)
    output = base * 1.0
    result = add_low_rank(output, lefts, rights, writable=True)
    assert result is output
    grads = torch.autograd.grad((result * weights).sum(), [base, *lefts, *rights])
    expected = base + lefts[0] @ rights[0] + lefts[1] @ rights[1]
    expected_grads = torch.autograd.grad((expected * weights).sum(), [base, *lefts, *rights])
    for grad, expected_grad in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(grad, expected_grad, atol=1e-5, rtol=1e-5)
