"""Per call, the adapters build no index tables and create no tensors from Python data."""

import pytest
import torch
from models import batch, build

from tt_core import get_adapter_model
from tt_core.testing import TABLE_BUILDING, OpRecorder
from tt_plugins.lora_embedding import LoraEmbeddingConfig
from tt_plugins.trainable_tokens import TrainableTokensConfig


def _ops(module, inputs, train: bool) -> list[str]:
    with OpRecorder() as recorder:
        if train:
            module(**inputs).logits.square().mean().backward()
        else:
            with torch.no_grad():
                module(**inputs)
    return recorder.ops


@pytest.mark.parametrize("train", [False, True])
def test_the_adapter_forward_builds_no_tables_the_base_model_does_not(train):
    inputs = batch("llama_tied", [10, 11])
    base = build("llama_tied")
    base_ops = set(_ops(base, inputs, train=False))
    adapter_model = get_adapter_model(build("llama_tied"), TrainableTokensConfig(token_indices=[10, 11]))
    adapter_model.add_adapter("style", LoraEmbeddingConfig(r=2))
    adapter_model.set_adapter(["default", "style"])
    _ops(adapter_model, inputs, train)  # warm-up
    extra = {op for op in _ops(adapter_model, inputs, train) if op in TABLE_BUILDING and op not in base_ops}
    assert extra == set()


def test_the_recorder_sees_a_table_built_per_call():
    with OpRecorder() as recorder:
        torch.full((4,), -1)[torch.tensor([1, 2])] = torch.arange(2)
    assert {"aten.full.default", "aten.lift_fresh.default", "aten.arange.default"} <= set(recorder.ops)
