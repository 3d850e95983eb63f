"""``torch.compile(adapter_model, fullgraph=True)`` on the normal forward paths, and no host syncs there.

Every shipped method, and a stack whose head is folded ([tokens, LoRA, tokens],
two of them replacing one row), compile into one graph whose outputs and
adapter gradients equal eager ones: training (forward and backward), eval with
a gradient, eval without. ``aot_eager`` runs dynamo and AOTAutograd (where
in-place autograd functions and data-dependent sizes fail); one test runs
inductor itself. No forward or backward path asks the host to read a device
value, recorded op by op with a dispatch mode.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from host_reads import host_reads
from models import WIDTH, batch, build, logits, reference_logits
from numerics import assert_same_math

from tt_core import AdapterModel
from tt_core.testing import OpRecorder
from tt_plugins.lora_embedding import LoraEmbeddingConfig
from tt_plugins.lora_linear import LoraLinearConfig
from tt_plugins.trainable_tokens import TrainableTokensConfig

FAMILY = "custom"  # an embedding tied to a biased head, one linear layer between: small graphs
TOKENS = [5, 17, 40]
TOKENS2 = [17, 60]  # 17 is in both: the later adapter's row wins, and its gradient counts once
CONFIGS: dict[str, Any] = {
    "tokens": lambda: TrainableTokensConfig(token_indices=TOKENS, init_weights=False),
    "tokens2": lambda: TrainableTokensConfig(token_indices=TOKENS2, init_weights=False),
    "lora": lambda: LoraEmbeddingConfig(r=2, lora_alpha=4, init_weights=False),
    "linear": lambda: LoraLinearConfig(
        r=2, lora_alpha=4, target_modules=["mix"], init_lora_weights=False
    ),
}
STACKS = {
    "trainable_tokens": ["tokens"],
    "lora_embedding": ["lora"],
    "lora_linear": ["linear"],
    "in_order": ["tokens", "lora"],  # the head runs adapter by adapter
    "folded": ["tokens", "lora", "tokens2"],  # the head: one low-rank pass, one column replacement
}


def _model(stack: list[str], family: str = FAMILY) -> AdapterModel:
    adapter_model = AdapterModel(build(family))
    for name in stack:
        torch.manual_seed(len(name))
        adapter_model.add_adapter(name, CONFIGS[name]())
    adapter_model.set_adapter(stack)
    return adapter_model


def _inputs(family: str = FAMILY) -> dict[str, torch.Tensor]:
    return batch(family, TOKENS + TOKENS2)


def _run(adapter_model: Any, inputs: dict[str, torch.Tensor], grad: bool) -> tuple[torch.Tensor, dict]:
    """The logits, and with ``grad`` the adapters' gradients of a loss on them."""
    if not grad:
        with torch.no_grad():
            return logits(adapter_model, inputs), {}
    out = logits(adapter_model, inputs)
    out.square().mean().backward()
    model = getattr(adapter_model, "_orig_mod", adapter_model)
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out.detach(), grads


def _assert_same_run(actual: tuple[torch.Tensor, dict], expected: tuple[torch.Tensor, dict]) -> None:
    assert_same_math(actual[0], expected[0])
    assert sorted(actual[1]) == sorted(expected[1])
    for name, grad in expected[1].items():
        assert grad.abs().sum() > 0, f"{name} got no gradient"
        assert_same_math(actual[1][name], grad)


MODES = {"train": (True, True), "eval_grad": (False, True), "eval_no_grad": (False, False)}


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("setup", list(STACKS))
def test_a_compiled_model_gives_eager_outputs_and_gradients(setup, mode):
    training, grad = MODES[mode]
    adapter_model = _model(STACKS[setup])
    adapter_model.train(training)
    if training:
        adapter_model.set_adapter(STACKS[setup])  # trainable
    inputs = _inputs()
    torch._dynamo.reset()
    compiled = torch.compile(adapter_model, fullgraph=True, backend="aot_eager")
    expected = _run(adapter_model, inputs, grad)
    _assert_same_run(_run(compiled, inputs, grad), expected)
    _assert_same_run(_run(compiled, inputs, grad), expected)  # the compiled graph again, with its state


def test_inductor_compiles_a_training_step_of_every_method_in_one_stack():
    stack = ["tokens", "lora", "linear", "tokens2"]  # the head folded: tokens, LoRA, tokens
    adapter_model = _model(stack).train()
    inputs = _inputs()
    torch._dynamo.reset()
    compiled = torch.compile(adapter_model, fullgraph=True)
    expected = _run(adapter_model, inputs, True)
    _assert_same_run(_run(compiled, inputs, True), expected)


def test_a_transformers_model_with_a_stack_compiles_into_one_graph():
    adapter_model = _model(["tokens", "lora", "tokens2"], "llama_tied").train()
    inputs = _inputs("llama_tied")
    torch._dynamo.reset()
    compiled = torch.compile(adapter_model, fullgraph=True, backend="aot_eager")
    _assert_same_run(_run(compiled, inputs, True), _run(adapter_model, inputs, True))


def test_two_token_adapters_sharing_an_id_give_the_reference_gradients():
    """The folded head writes a row two adapters replace twice; its gradient must count once."""
    adapter_model = _model(["tokens", "tokens2"]).train()
    inputs = _inputs()
    out, grads = _run(adapter_model, inputs, True)
    weight = adapter_model.model.get_input_embeddings().weight.detach()
    rows = [
        adapter_model.model.get_input_embeddings().adapters[name].trainable_tokens_rows.detach().clone()
        for name in ("tokens", "tokens2")
    ]
    for row in rows:
        row.requires_grad_(True)
    effective = weight.index_copy(0, torch.tensor(TOKENS), rows[0])
    effective = effective.index_copy(0, torch.tensor(TOKENS2), rows[1])
    reference = reference_logits(build(FAMILY), FAMILY, effective, inputs)
    reference.square().mean().backward()
    assert_same_math(out, reference.detach())
    prefix = "model.emb.adapters"
    for name, row in zip(("tokens", "tokens2"), rows, strict=True):
        assert_same_math(grads[f"{prefix}.{name}.trainable_tokens_rows"], row.grad)
    assert rows[0].grad[TOKENS.index(17)].abs().sum() == 0  # overwritten by tokens2: no gradient


@pytest.mark.parametrize("target", ["linear", "lora"])
def test_a_lora_scaling_is_a_float32_number_whatever_the_models_dtype(target):
    """Kept in a buffer (a compiled graph's input), it multiplies as the Python float alpha / r would."""
    adapter_model = AdapterModel(build(FAMILY))
    config = CONFIGS[target]()
    config.lora_alpha, config.r = 1, 3  # scaling 1/3: not a bfloat16 number
    adapter_model.add_adapter("third", config)
    adapter_model.set_adapter("third")
    adapter_model.to(torch.bfloat16)
    layer = adapter_model.model.get_submodule("mix" if target == "linear" else "head")
    state = layer.adapters["third"]
    assert state.scaling.dtype == torch.float32 and float(state.scaling) == torch.tensor(1 / 3).item()
    hidden = torch.randn(5, WIDTH, dtype=torch.bfloat16)
    left, _ = state.low_rank_factors(hidden, torch.bfloat16)
    weight = state.lora_A if target == "linear" else state.lora_embedding_B.T
    assert torch.equal(left, (hidden @ weight.T.to(torch.bfloat16)) * (1 / 3))


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("setup", list(STACKS))
def test_no_forward_or_backward_path_reads_a_device_value_on_the_host(setup, mode):
    training, grad = MODES[mode]
    adapter_model = _model(STACKS[setup])
    adapter_model.train(training)
    adapter_model.set_adapter(STACKS[setup])
    inputs = _inputs()
    with OpRecorder() as recorded:
        _run(adapter_model, inputs, grad)
        _run(adapter_model, inputs, grad)  # without a gradient: built once, then reused (folded.py)
    found = host_reads(recorded.ops)
    assert len(recorded.ops) > 0
    assert found == [], f"{setup}, {mode}: ops reading a device value on the host: {found}"
