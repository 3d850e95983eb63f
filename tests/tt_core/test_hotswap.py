"""``AdapterModel.hotswap_adapter``: another adapter's weights, in place, through the plugin contract.

After a hot-swap the adapter computes what the source computes (an adapter of
the model, a native or PEFT folder, a registry version), keeps its tensors
(so a compiled model does not recompile, even for another LoRA alpha), and
saves as the source. What cannot be swapped is refused with nothing changed.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from models import batch, build, logits
from numerics import assert_same_math
from safetensors.torch import load_file
from torch._dynamo.testing import CompileCounter

from tt_core import AdapterModel, AdapterState, Registry
from tt_core.api.errors import AdapterStateError, ArgumentTypeError, ConfigError
from tt_plugins.lora_embedding import LoraEmbeddingConfig
from tt_plugins.lora_linear import LoraLinearConfig
from tt_plugins.trainable_tokens import TrainableTokensConfig

FAMILY = "llama_tied"
# Per method: the adapter swapped into, and a source of the same shapes with other values.
PAIRS: dict[str, tuple[Any, Any]] = {
    "trainable_tokens": (
        TrainableTokensConfig(token_indices=[5, 17, 40], init_weights=False),
        TrainableTokensConfig(token_indices=[60, 9, 99], init_weights=False),  # other ids, as many
    ),
    "lora_embedding": (
        LoraEmbeddingConfig(r=2, lora_alpha=4, init_weights=False),
        LoraEmbeddingConfig(r=2, lora_alpha=16, init_weights=False),  # other scaling
    ),
    "lora_linear": (
        LoraLinearConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
        LoraLinearConfig(r=2, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    ),
}
INPUTS = batch(FAMILY, [5, 17, 40, 60, 9, 99])


def _model(method: str, family: str = FAMILY) -> AdapterModel:
    """Adapters "a" (active) and "b" (its source) of ``method`` on a fresh model."""
    adapter_model = AdapterModel(build(family))
    pair = PAIRS[method]
    if family == "custom" and method == "lora_linear":  # its one linear layer between embedding and head
        pair = tuple(dataclasses.replace(config, target_modules=["mix"]) for config in pair)
    for name, config in zip("ab", pair, strict=True):
        torch.manual_seed(ord(name))
        adapter_model.add_adapter(name, config)
    adapter_model.set_adapter("a")
    return adapter_model.eval()


def _tensors(adapter_model: AdapterModel, adapter: str) -> dict[str, torch.Tensor]:
    """The adapter's parameters and buffers by name, the tensors themselves."""
    found: dict[str, torch.Tensor] = {}
    for site in adapter_model.adapter_record(adapter).sites:
        for name, tensor in [*site.state.named_parameters(), *site.state.named_buffers()]:
            found[f"{site.modules[0]}.{name}"] = tensor
    return found


def _outputs(adapter_model: AdapterModel, stack: str) -> torch.Tensor:
    active = adapter_model.active_adapters
    adapter_model.set_adapter(stack)
    with torch.no_grad():
        out = logits(adapter_model, INPUTS)
    adapter_model.set_adapter(active)
    return out


def _files(folder: Path, adapter: str) -> tuple[dict, dict[str, torch.Tensor], dict]:
    """The saved config, tensors and base (what the manifest records of the base model)."""
    entry = json.loads((folder / "manifest.json").read_text())["adapters"][adapter]
    path = folder / entry["path"]
    config = json.loads((path / "adapter_config.json").read_text())
    return config, load_file(path / "adapter_model.safetensors"), entry["base"]


@pytest.mark.parametrize("method", list(PAIRS))
def test_a_hot_swap_from_another_adapter_computes_and_saves_as_that_adapter(method, tmp_path):
    adapter_model = _model(method)
    expected = _outputs(adapter_model, "b")
    kept = _tensors(adapter_model, "a")
    adapter_model.hotswap_adapter("a", "b")
    with torch.no_grad():
        assert_same_math(logits(adapter_model, INPUTS), expected)
    after = _tensors(adapter_model, "a")
    assert after.keys() == kept.keys() and all(after[k] is kept[k] for k in kept)  # the same tensors
    assert adapter_model.adapter_configs["a"] == adapter_model.adapter_configs["b"]
    adapter_model.save_pretrained(tmp_path)
    config_a, tensors_a, base_a = _files(tmp_path, "a")
    config_b, tensors_b, base_b = _files(tmp_path, "b")
    assert config_a == config_b and base_a == base_b
    assert tensors_a.keys() == tensors_b.keys()
    assert all(torch.equal(tensors_a[key], tensors_b[key]) for key in tensors_b)


def test_a_hot_swap_from_a_merged_adapter_takes_its_weights_not_its_merge():
    adapter_model = _model("trainable_tokens")
    expected = _outputs(adapter_model, "b")
    adapter_model.set_adapter("b")
    adapter_model.merge_adapter()
    adapter_model.hotswap_adapter("a", "b")
    adapter_model.unmerge_adapter()
    assert_same_math(_outputs(adapter_model, "a"), expected)
    assert_same_math(_outputs(adapter_model, "b"), expected)


@pytest.mark.parametrize("form", ["native", "peft"])
@pytest.mark.parametrize("method", list(PAIRS))
def test_a_hot_swap_from_a_folder_equals_loading_it(method, form, tmp_path):
    adapter_model = _model(method)
    folder = tmp_path / "saved"
    adapter_model.save_pretrained(folder, selected_adapters=["b"], format={"native": "tt"}.get(form, form))
    name = "b" if form == "native" else None
    loaded = AdapterModel.from_pretrained(build(FAMILY), folder, adapter_name=name)
    with torch.no_grad():
        expected = logits(loaded, INPUTS)
    adapter_model.delete_adapter("b")
    adapter_model.hotswap_adapter("a", folder, source_name=name)
    with torch.no_grad():
        assert_same_math(logits(adapter_model, INPUTS), expected)
    assert adapter_model.adapter_configs["a"] == next(iter(loaded.adapter_configs.values()))


def test_a_hot_swap_from_a_registry_version(tmp_path):
    adapter_model = _model("trainable_tokens")
    registry = Registry(tmp_path / "registry")
    registry.publish(adapter_model, "markers", adapter="a")
    registry.publish(adapter_model, "markers", adapter="b")
    expected = _outputs(adapter_model, "b")
    adapter_model.delete_adapter("b")
    registry.hotswap("markers@2", adapter_model, "a")
    with torch.no_grad():
        assert_same_math(logits(adapter_model, INPUTS), expected)
    registry.hotswap("markers@1", adapter_model, "a")  # and back
    assert adapter_model.adapter_configs["a"] == PAIRS["trainable_tokens"][0]


@pytest.mark.parametrize("method", list(PAIRS))
def test_a_hot_swap_does_not_recompile(method):
    counter = CompileCounter()
    adapter_model = _model(method, "custom")  # a tiny graph: an embedding, one linear layer, a tied head
    inputs = batch("custom", [5, 17, 40, 60, 9, 99])
    adapter_model.set_adapter("b")
    with torch.no_grad():
        expected = logits(adapter_model, inputs)
    adapter_model.set_adapter("a")
    torch._dynamo.reset()
    compiled = torch.compile(adapter_model, fullgraph=True, backend=counter)
    with torch.no_grad():
        before = logits(compiled, inputs)
        adapter_model.hotswap_adapter("a", "b")  # another alpha (LoRA), other ids (tokens)
        after = logits(compiled, inputs)
    assert counter.frame_count == 1
    assert not torch.equal(before, after)
    assert_same_math(after, expected)


# Per method: a source with fewer token ids or a lower rank than the adapter "a" of PAIRS.
SMALLER = {
    "trainable_tokens": TrainableTokensConfig(token_indices=[60, 9], init_weights=False),
    "lora_embedding": LoraEmbeddingConfig(r=1, lora_alpha=8, init_weights=False),
    "lora_linear": LoraLinearConfig(r=1, lora_alpha=2, target_modules=["mix"], init_lora_weights=False),
}


@pytest.mark.parametrize("method", list(PAIRS))
def test_a_prepared_model_swaps_in_fewer_ids_or_a_lower_rank_without_recompiling(method, tmp_path):
    # Hot-swaps of other shapes were refused ("the ranks must match"); within the capacities of
    # prepare_for_compile the adapter tables take them in place.
    counter = CompileCounter()
    adapter_model = _model(method, "custom")
    adapter_model.add_adapter("small", SMALLER[method])
    inputs = batch("custom", [5, 17, 40, 60, 9, 99])
    adapter_model.set_adapter("small")
    with torch.no_grad():
        expected = logits(adapter_model, inputs)
    adapter_model.save_pretrained(tmp_path / "small", selected_adapters=["small"])
    adapter_model.set_adapter("a")
    adapter_model.prepare_for_compile()
    torch._dynamo.reset()
    compiled = torch.compile(adapter_model, fullgraph=True, backend=counter)
    with torch.no_grad():
        before = logits(compiled, inputs)
        adapter_model.hotswap_adapter("a", "small")
        after = logits(compiled, inputs)
    assert counter.frame_count == 1
    assert not torch.equal(before, after)
    assert_same_math(after, expected)
    assert adapter_model.adapter_configs["a"] == adapter_model.adapter_configs["small"]
    adapter_model.save_pretrained(tmp_path / "a", selected_adapters=["a"])
    config, tensors, _ = _files(tmp_path / "a", "a")
    source_config, source_tensors, _ = _files(tmp_path / "small", "small")
    assert config == source_config and tensors.keys() == source_tensors.keys()
    assert all(torch.equal(tensors[key], source_tensors[key]) for key in tensors)


def test_inductor_runs_the_swapped_weights_without_recompiling():
    counter = CompileCounter()
    adapter_model = _model("lora_embedding", "custom")
    inputs = batch("custom", [5, 17, 40])
    adapter_model.set_adapter("b")
    with torch.no_grad():
        expected = logits(adapter_model, inputs)
    adapter_model.set_adapter("a")
    torch._dynamo.reset()

    def inductor(graph: Any, example_inputs: Any) -> Any:
        counter(graph, example_inputs)
        from torch._inductor.compile_fx import compile_fx

        return compile_fx(graph, example_inputs)

    compiled = torch.compile(adapter_model, fullgraph=True, backend=inductor)
    with torch.no_grad():
        logits(compiled, inputs)
        adapter_model.hotswap_adapter("a", "b")
        assert_same_math(logits(compiled, inputs), expected)
    assert counter.frame_count == 1


def _snapshot(adapter_model: AdapterModel) -> tuple[Any, ...]:
    tensors = {
        name: tensor.detach().clone()
        for name in adapter_model.adapters
        for name, tensor in _tensors(adapter_model, name).items()
    }
    model = adapter_model
    return tensors, model.adapter_configs, model.active_adapters, model.merged_adapters


def _assert_unchanged(adapter_model: AdapterModel, before: tuple[Any, ...]) -> None:
    tensors, configs, active, merged = _snapshot(adapter_model)
    assert (configs, active, merged) == before[1:]
    assert tensors.keys() == before[0].keys()
    assert all(torch.equal(tensors[key], before[0][key]) for key in tensors)


def test_bad_hot_swaps_are_refused_and_change_nothing(tmp_path):
    adapter_model = _model("trainable_tokens")
    adapter_model.add_adapter("lora", LoraEmbeddingConfig(r=2, init_weights=False))
    adapter_model.add_adapter("linear", LoraLinearConfig(r=2, target_modules=["q_proj", "v_proj"]))
    adapter_model.add_adapter("q_only", LoraLinearConfig(r=2, target_modules=["q_proj"]))
    before = _snapshot(adapter_model)
    bad = [
        (("missing", "b"), AdapterStateError, "unknown adapter"),
        (("a", "missing"), ConfigError, "neither an adapter of this model"),
        (("a", "lora"), ConfigError, "'lora_embedding' adapter"),
        (("linear", "q_only"), ConfigError, r"adapts \[\['model.layers.0.self_attn.q_proj'\]\]"),
        (("a", str(tmp_path)), ValueError, "holds neither"),  # a folder holding no adapter
        (("a", 3), ArgumentTypeError, "source must be"),
    ]
    for (name, source), error, message in bad:
        with pytest.raises(error, match=message):
            adapter_model.hotswap_adapter(name, source)
        _assert_unchanged(adapter_model, before)
    adapter_model.merge_adapter(["a"])
    merged = _snapshot(adapter_model)
    with pytest.raises(AdapterStateError, match="unmerge_adapter"):
        adapter_model.hotswap_adapter("a", "b")
    _assert_unchanged(adapter_model, merged)


def test_a_hot_swap_failing_part_way_puts_back_the_weights_it_already_swapped(monkeypatch):
    # lora_linear adapts q_proj and v_proj: the swap of the second fails after the first was done.
    adapter_model = _model("lora_linear")
    before = _snapshot(adapter_model)
    outputs = _outputs(adapter_model, "a")
    real = AdapterState.copy_tensors_from
    calls = []

    def second_fails(self: AdapterState, *args: Any, **kwargs: Any) -> None:
        calls.append(self)
        if len(calls) == 2:
            raise OSError("injected: the second weight's copy failed")
        real(self, *args, **kwargs)

    monkeypatch.setattr(AdapterState, "copy_tensors_from", second_fails)
    with pytest.raises(OSError, match="injected"):
        adapter_model.hotswap_adapter("a", "b")
    assert len(calls) > 2  # the first site was swapped, then swapped back
    _assert_unchanged(adapter_model, before)
    assert torch.equal(_outputs(adapter_model, "a"), outputs)
