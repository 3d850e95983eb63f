"""An output handed to a forward hook is never changed afterwards.

Hooks that keep their output (a clone taken inside the hook, and the tensor
itself) are registered on the wrappers, on the base modules inside them, and
globally; after the forward the kept tensors must still equal their clones.
Every forward path is run: folded (eval, no grad), in order (training mode,
no grad), with a gradient, and per sample (``adapter_names=``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest
import torch
from models import batch, build, logits
from torch import nn

from tt_core import AdapterLayer, AdapterModel
from tt_plugins.lora_embedding import LoraEmbeddingConfig
from tt_plugins.trainable_tokens import TrainableTokensConfig

TOKENS = [3, 17, 64]
STACKS = [["tokens"], ["style"], ["tokens", "style"], ["style", "tokens"]]


def _adapter_model(family: str) -> AdapterModel:
    adapter_model = AdapterModel(build(family))
    adapter_model.add_adapter("tokens", TrainableTokensConfig(token_indices=TOKENS, init_weights=False))
    adapter_model.add_adapter("style", LoraEmbeddingConfig(r=2, lora_alpha=4, init_weights=False))
    return adapter_model


class Keeper:
    """Forward hooks that keep each output and a clone of it taken when the hook ran."""

    def __init__(self) -> None:
        self.kept: list[tuple[str, torch.Tensor, torch.Tensor]] = []

    def hook(self, name: str):
        def keep(module: nn.Module, args: object, output: object) -> None:
            if isinstance(output, torch.Tensor):
                self.kept.append((name, output, output.detach().clone()))

        return keep

    def assert_unchanged(self) -> None:
        assert self.kept, "no hook ran"
        for name, output, clone in self.kept:
            assert torch.equal(output.detach(), clone), f"the output handed to {name}'s hook changed after it"


@contextlib.contextmanager
def _hooks(adapter_model: AdapterModel, where: str) -> Iterator[Keeper]:
    keeper = Keeper()
    handles = []
    wrappers = [(name, m) for name, m in adapter_model.model.named_modules() if isinstance(m, AdapterLayer)]
    assert len(wrappers) == 2  # the embedding and the tied head
    if where == "global":
        bases = {id(wrapper.base_layer): name for name, wrapper in wrappers}

        def keep_bases(module: nn.Module, args: object, output: object) -> None:
            if id(module) in bases:
                keeper.hook(bases[id(module)] + ".base_layer (global)")(module, args, output)

        handles.append(nn.modules.module.register_module_forward_hook(keep_bases))
    for name, wrapper in wrappers:
        module = wrapper if where == "wrapper" else wrapper.base_layer
        if where != "global":
            handles.append(module.register_forward_hook(keeper.hook(f"{name} ({where})")))
    try:
        yield keeper
    finally:
        for handle in handles:
            handle.remove()


@pytest.mark.parametrize("family", ["llama_tied", "custom"])
@pytest.mark.parametrize("where", ["wrapper", "base", "global"])
@pytest.mark.parametrize("mode", ["folded", "train_no_grad", "grad"])
@pytest.mark.parametrize("stack", STACKS, ids="+".join)
def test_hooks_keep_the_outputs_they_were_given(family, where, mode, stack):
    adapter_model = _adapter_model(family)
    adapter_model.set_adapter(stack)
    inputs = batch(family, TOKENS)
    adapter_model.train(mode == "train_no_grad")
    expected = logits(adapter_model, inputs).detach()  # no hooks
    grad = torch.enable_grad() if mode == "grad" else torch.no_grad()
    with _hooks(adapter_model, where) as keeper, grad:
        result = logits(adapter_model, inputs)
    keeper.assert_unchanged()
    torch.testing.assert_close(result.detach(), expected)


@pytest.mark.parametrize("where", ["wrapper", "base", "global"])
def test_hooks_keep_the_outputs_of_a_per_sample_call(where):
    adapter_model = _adapter_model("llama_tied")
    adapter_model.eval()
    inputs = batch("llama_tied", TOKENS)
    names = [["tokens", "style"], "style"]
    expected = adapter_model(**inputs, adapter_names=names).logits
    with _hooks(adapter_model, where) as keeper:
        result = adapter_model(**inputs, adapter_names=names).logits
    keeper.assert_unchanged()
    torch.testing.assert_close(result, expected)
