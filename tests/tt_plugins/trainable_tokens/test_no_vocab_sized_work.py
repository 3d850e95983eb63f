"""Per training step and per inference call, trainable tokens allocate no vocabulary x width tensor.

Every aten op run during the step (forward, loss, backward, optimizer) is seen
by a dispatch mode, which notes each freshly allocated output (not a view or an
in-place result) of at least ``VOCAB * WIDTH`` elements. Whatever the frozen
base model allocates by itself (the "floor": the same model whose only
trainable parameter is a zero bias on the embedding output) is allowed; the
adapter may add nothing to it. PEFT's trainable tokens, which copy the whole
weight on every forward, are the proof that the detector finds such tensors.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import models
import pytest
import torch
from torch import nn

from tt_core import get_adapter_model
from tt_core.testing import LargeAllocations
from tt_plugins.trainable_tokens import TrainableTokensConfig

VOCAB, WIDTH = 4096, 64
BATCH, SEQ = 2, 8  # tokens x width and tokens x vocabulary stay far below VOCAB x WIDTH
TOKENS = [5, 100, 2047, 4095]


def _llama(tied: bool) -> nn.Module:
    torch.manual_seed(0)
    model = models.llama(tied, vocab=VOCAB, width=WIDTH)
    assert (model.lm_head.weight is model.get_input_embeddings().weight) == tied
    return model


def _floor(model: nn.Module) -> tuple[nn.Module, list[nn.Parameter]]:
    model.requires_grad_(False)
    bias = nn.Parameter(torch.zeros(WIDTH))
    embedding: nn.Module = model.get_input_embeddings()  # type: ignore[operator]
    embedding.register_forward_hook(lambda _module, _args, output: output + bias)
    return model, [bias]


def _tt(model: nn.Module) -> tuple[nn.Module, list[nn.Parameter]]:
    adapter_model = get_adapter_model(model, TrainableTokensConfig(token_indices=TOKENS))
    return adapter_model, [p for p in adapter_model.parameters() if p.requires_grad]


def _peft(model: nn.Module) -> tuple[nn.Module, list[nn.Parameter]]:
    peft = pytest.importorskip("peft")
    peft_model = peft.get_peft_model(model, peft.TrainableTokensConfig(token_indices=TOKENS))
    return peft_model, [p for p in peft_model.parameters() if p.requires_grad]


def _allocations(
    setup: Callable[[nn.Module], tuple[nn.Module, list[nn.Parameter]]], tied: bool
) -> tuple[Counter[tuple[str, tuple[int, ...]]], Counter[tuple[str, tuple[int, ...]]]]:
    """Large allocations of (one training step, one inference call), after a warm-up of each."""
    model, trainable = setup(_llama(tied))
    assert trainable
    optimizer = torch.optim.AdamW(trainable, lr=1e-3)
    input_ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(1))
    input_ids[:, ::2] = torch.tensor(TOKENS).repeat(BATCH)[: BATCH * SEQ // 2].view(BATCH, -1)

    def step() -> None:
        model(input_ids=input_ids, labels=input_ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def infer() -> None:
        with torch.no_grad():
            model(input_ids=input_ids)

    model.train()
    step()  # warm-up: gradients and optimizer state are created once, not per step
    with LargeAllocations(VOCAB * WIDTH) as training:
        step()
    assert any("backward" in op for op in training.ops), "the backward pass was not observed"
    assert any("addcdiv" in op for op in training.ops), "the optimizer step was not observed"

    model.eval()
    infer()
    with LargeAllocations(VOCAB * WIDTH) as inference:
        infer()
    return training.found, inference.found


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def floor(request: pytest.FixtureRequest) -> tuple[bool, tuple[Counter, Counter]]:
    return request.param, _allocations(_floor, request.param)


def test_trainable_tokens_allocate_nothing_vocabulary_sized_beyond_the_floor(floor):
    tied, (floor_training, floor_inference) = floor
    training, inference = _allocations(_tt, tied)
    assert not training - floor_training, f"per training step: {dict(training - floor_training)}"
    assert not inference - floor_inference, f"per inference call: {dict(inference - floor_inference)}"


def test_the_detector_finds_the_weight_copies_peft_makes(floor):
    tied, (floor_training, floor_inference) = floor
    training, inference = _allocations(_peft, tied)
    extra_training, extra_inference = training - floor_training, inference - floor_inference
    assert any(shape == (VOCAB, WIDTH) for _, shape in extra_training), dict(training)
    assert any(shape == (VOCAB, WIDTH) for _, shape in extra_inference), dict(inference)
