"""adapter_names=: every sample of a batch with its own adapter stack, equal to that sample run alone."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import pytest
import torch
from models import build, llama, logits
from torch import nn

import tt_core
from tt_core import AdapterConfig, AdapterModel, AdapterState, Registry, get_adapter_model, hookimpl
from tt_plugins.lora_embedding import LoraEmbeddingConfig
from tt_plugins.trainable_tokens import TrainableTokensConfig

ATOL = 1e-5
# Overlapping rows: 7 and 9 belong to both trainable-tokens adapters.
TT_A, TT_B = [5, 7, 9], [7, 9, 11, 40]


def _randomize(adapter_model: AdapterModel, seed: int = 3) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in adapter_model.named_parameters():
            if ".adapters." in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)


def _inputs(samples: int, seed: int = 1, length: int = 8) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(2, 128, (samples, length), generator=generator)
    hot = TT_A + TT_B
    for sample in range(samples):  # every sample holds adapted ids
        input_ids[sample, 2] = hot[sample % len(hot)]
        input_ids[sample, 5] = hot[(sample + 3) % len(hot)]
    return {"input_ids": input_ids}


def _alone(adapter_model: AdapterModel, entry: str | list[str], inputs: dict[str, torch.Tensor], sample: int):
    one = {key: value[sample : sample + 1] for key, value in inputs.items()}
    if entry == "__base__":
        with adapter_model.disable_adapter():
            return logits(adapter_model, one)[0]
    adapter_model.set_adapter(entry)
    return logits(adapter_model, one)[0]


def _check_mixed(adapter_model: AdapterModel, names: list, inputs: dict[str, torch.Tensor]) -> None:
    active = adapter_model.active_adapters
    mixed = logits(adapter_model, {**inputs, "adapter_names": names})
    for sample, entry in enumerate(names):
        torch.testing.assert_close(
            mixed[sample], _alone(adapter_model, entry, inputs, sample), rtol=0, atol=ATOL
        )
    adapter_model.set_adapter(active)


def _tt_model(family: str) -> AdapterModel:
    adapter_model = get_adapter_model(build(family), TrainableTokensConfig(token_indices=TT_A), "a")
    adapter_model.add_adapter("b", TrainableTokensConfig(token_indices=TT_B))
    _randomize(adapter_model)
    return adapter_model


@pytest.mark.parametrize("family", ["llama", "llama_tied", "custom", "gpt2", "gemma3", "opt"])
def test_trainable_tokens_per_sample_equal_each_sample_alone(family):
    adapter_model = _tt_model(family)
    names = ["a", "b", "__base__", ["a", "b"], ["b", "a"], "a"]
    _check_mixed(adapter_model, names, _inputs(len(names)))


@pytest.mark.parametrize("family", ["llama", "llama_tied"])
def test_lora_and_stacks_with_trainable_tokens_per_sample(family):
    adapter_model = _tt_model(family)
    adapter_model.add_adapter("lora", LoraEmbeddingConfig(r=4))
    adapter_model.add_adapter("lora2", LoraEmbeddingConfig(r=2))
    _randomize(adapter_model, seed=5)
    names = [
        "lora",
        ["a", "lora"],
        ["lora", "b"],
        "__base__",
        ["b", "lora", "a", "lora2"],
        "a",
        ["lora", "lora2"],
    ]
    _check_mixed(adapter_model, names, _inputs(len(names), seed=2))


@pytest.mark.parametrize("family", ["llama", "llama_tied", "custom", "gemma3"])
def test_stacks_through_the_adapter_tables_equal_each_sample_alone(family):
    # Untied and tied heads, a head with a bias (custom), a scaled embedding (Gemma3's embed_scale).
    adapter_model = _tt_model(family)
    adapter_model.add_adapter("lora", LoraEmbeddingConfig(r=3))
    _randomize(adapter_model, seed=11)
    names = [["a", "lora", "b"], "__base__", ["lora", "b", "a"], "lora", ["b", "a"], "b"]
    inputs = _inputs(len(names), seed=3)
    _check_mixed(adapter_model, names, inputs)
    entries = adapter_model.adapter_entries(names)  # the tensor form gives the same logits
    assert entries.shape == (len(names), 3) and entries.dtype == torch.long
    torch.testing.assert_close(
        logits(adapter_model, {**inputs, "adapter_names": entries}),
        logits(adapter_model, {**inputs, "adapter_names": names}),
        rtol=0,
        atol=0,
    )


# ------------------------------------------------- a method from an outside plugin
@dataclasses.dataclass
class ScaleRowsConfig(AdapterConfig):
    """Multiplies chosen rows by a trainable vector: neither low-rank nor a declared row replacement."""

    method: ClassVar[str] = "scale_rows_ps"
    token_indices: list[int] = dataclasses.field(default_factory=list)
    target_modules: list[str] | None = None


class ScaleRowsState(AdapterState):
    def __init__(self, weight: torch.Tensor, token_indices: list[int]) -> None:
        super().__init__()
        self.register_buffer("token_indices", torch.tensor(token_indices), persistent=False)
        self.scale = nn.Parameter(torch.ones(len(token_indices), weight.shape[1]))

    def touched_rows(self) -> torch.Tensor:
        return self.token_indices

    def embed(self, input_ids, output, base_layer):
        hit = (input_ids.unsqueeze(-1) == self.token_indices).to(output.dtype)
        factor = 1 + hit @ (self.scale - 1)
        return output * factor

    def adapt_rows(self, token_ids, rows):
        hit = (token_ids.unsqueeze(-1) == self.token_indices).to(rows.dtype)
        return rows * (1 + hit @ (self.scale - 1))

    def project(self, hidden, output, base_layer, earlier):
        rows = base_layer.weight[self.token_indices]
        for state in earlier:
            rows = state.adapt_rows(self.token_indices, rows)
        return output.index_copy(-1, self.token_indices, hidden @ (rows * self.scale).T)


class ScaleRowsPlugin:
    @hookimpl
    def register_methods(self, register):
        register(ScaleRowsConfig)

    @hookimpl
    def create_layer(self, config, adapter_name, target_name, base_layer):
        return ScaleRowsState(base_layer.weight, config.token_indices)


@pytest.fixture
def scale_rows():
    manager = tt_core.get_plugin_manager()
    manager.register(ScaleRowsPlugin(), name="scale_rows_ps")
    yield
    manager.unregister(name="scale_rows_ps")


def test_a_method_from_an_outside_plugin_is_served_per_sample_by_the_default(scale_rows):
    adapter_model = _tt_model("llama_tied")
    adapter_model.add_adapter("scale", ScaleRowsConfig(token_indices=[7, 11, 60]))
    _randomize(adapter_model, seed=7)
    names = ["scale", ["a", "scale"], "__base__", ["scale", "b"], "b"]
    _check_mixed(adapter_model, names, _inputs(len(names), seed=4))


class AddRowsState(ScaleRowsState):
    """Declares row replacement, but its new rows depend on the rows before it: rows + delta."""

    head_replaces_rows = True

    def embed(self, input_ids, output, base_layer):
        hit = (input_ids.unsqueeze(-1) == self.token_indices).to(output.dtype)
        return output + hit @ self.scale

    def adapt_rows(self, token_ids, rows):
        hit = (token_ids.unsqueeze(-1) == self.token_indices).to(rows.dtype)
        return rows + hit @ self.scale

    def project(self, hidden, output, base_layer, earlier):
        rows = base_layer.weight[self.token_indices]
        for state in earlier:
            rows = state.adapt_rows(self.token_indices, rows)
        return output.index_copy(-1, self.token_indices, hidden @ (rows + self.scale).T)


class AddRowsPlugin(ScaleRowsPlugin):
    @hookimpl
    def create_layer(self, config, adapter_name, target_name, base_layer):
        return AddRowsState(base_layer.weight, config.token_indices)


def test_a_row_replacing_method_whose_rows_depend_on_the_rows_before_is_served_per_stack():
    manager = tt_core.get_plugin_manager()
    manager.register(AddRowsPlugin(), name="scale_rows_ps")
    try:
        adapter_model = _tt_model("llama_tied")
        adapter_model.add_adapter("add", ScaleRowsConfig(token_indices=[7, 11, 60]))
        _randomize(adapter_model, seed=8)
        names = [["a", "add"], "add", "__base__", ["add", "b", "a"], "b"]
        _check_mixed(adapter_model, names, _inputs(len(names), seed=5))
    finally:
        manager.unregister(name="scale_rows_ps")


# ------------------------------------------------------------------- generate
@pytest.mark.parametrize(("num_beams", "sequences"), [(1, 1), (2, 1), (2, 2)])
def test_generate_with_mixed_adapters_on_a_tied_model_equals_each_sample_alone(num_beams, sequences):
    adapter_model = _tt_model("llama_tied")
    adapter_model.add_adapter("lora", LoraEmbeddingConfig(r=4))
    _randomize(adapter_model, seed=9)
    names = ["a", "__base__", ["b", "lora"], "lora"]
    inputs = _inputs(len(names), seed=6)
    options = {
        "max_new_tokens": 6,
        "do_sample": False,
        "num_beams": num_beams,
        "num_return_sequences": sequences,
        "pad_token_id": 0,
    }
    mixed = adapter_model.generate(**inputs, adapter_names=names, **options)
    entries = adapter_model.adapter_entries(names)  # the tensor form (compiled serving) generates the same
    assert torch.equal(adapter_model.generate(**inputs, adapter_names=entries, **options), mixed)
    for sample, entry in enumerate(names):
        one = inputs["input_ids"][sample : sample + 1]
        if entry == "__base__":
            with adapter_model.disable_adapter():
                alone = adapter_model.generate(input_ids=one, **options)
        else:
            adapter_model.set_adapter(entry)
            alone = adapter_model.generate(input_ids=one, **options)
        assert torch.equal(mixed[sample * sequences : (sample + 1) * sequences], alone), (sample, entry)


# ------------------------------------------------------------------- refusals
def _snapshot(adapter_model: AdapterModel) -> tuple:
    tensors = {
        name: value.clone() for name, value in adapter_model.state_dict().items() if "extra_state" not in name
    }
    plans = [module.sample_plan for module in adapter_model.modules() if hasattr(module, "sample_plan")]
    return adapter_model.active_adapters, adapter_model.merged_adapters, tensors, plans


def _assert_unchanged(before: tuple, adapter_model: AdapterModel) -> None:
    after = _snapshot(adapter_model)
    assert after[:2] == before[:2]
    assert after[2].keys() == before[2].keys()
    assert all(torch.equal(after[2][key], before[2][key]) for key in before[2])
    assert all(plan is None for plan in after[3])


@pytest.mark.parametrize(
    ("names", "error", "match"),
    [
        (["a", "a", "a"], ValueError, "3 entries for a batch of 2"),
        (["a"], ValueError, "1 entries for a batch of 2"),
        (["a", "nope"], ValueError, "unknown adapter"),
        (["a", ["b", "nope"]], ValueError, "unknown adapter"),
        (["a", 3], TypeError, r"adapter_names\[1\]"),
        (["a", ["a", "__base__"]], ValueError, "stands alone"),
        (["a", ["a", "a"]], ValueError, "more than once"),
        ("a", TypeError, "one entry per sample"),
    ],
)
def test_bad_adapter_names_are_refused_and_change_nothing(names, error, match):
    adapter_model = _tt_model("llama_tied")
    inputs = _inputs(2)
    before = _snapshot(adapter_model)
    with pytest.raises(error, match=match):
        adapter_model(**inputs, adapter_names=names)
    with pytest.raises(error, match=match):
        adapter_model.generate(**inputs, adapter_names=names, max_new_tokens=2, pad_token_id=0)
    _assert_unchanged(before, adapter_model)


def test_refused_while_merged_while_training_and_while_disabled():
    adapter_model = _tt_model("llama_tied")
    inputs = _inputs(2)
    adapter_model.merge_adapter()
    before = _snapshot(adapter_model)
    with pytest.raises(RuntimeError, match="merged"):
        adapter_model(**inputs, adapter_names=["a", "b"])
    _assert_unchanged(before, adapter_model)
    adapter_model.unmerge_adapter()
    adapter_model.train()
    before = _snapshot(adapter_model)
    with pytest.raises(RuntimeError, match="training"):
        adapter_model(**inputs, adapter_names=["a", "b"])
    _assert_unchanged(before, adapter_model)
    adapter_model.eval()
    with adapter_model.disable_adapter(), pytest.raises(RuntimeError, match="disable_adapter"):
        adapter_model(**inputs, adapter_names=["a", "b"])
    # and afterwards it works, with the active stack untouched
    assert logits(adapter_model, {**inputs, "adapter_names": ["a", "b"]}).shape[0] == 2
    assert adapter_model.active_adapters == ["a"]


def test_a_call_without_adapter_names_still_uses_the_active_stack():
    adapter_model = _tt_model("llama_tied")
    inputs = _inputs(2)
    expected = logits(adapter_model, inputs)
    torch.testing.assert_close(
        logits(adapter_model, {**inputs, "adapter_names": None}), expected, rtol=0, atol=0
    )
    torch.testing.assert_close(
        logits(adapter_model, {**inputs, "adapter_names": ["a", "a"]}), expected, rtol=0, atol=ATOL
    )


# ------------------------------------------------------------- the registry
def test_adapters_loaded_from_the_registry_stay_inactive_and_are_served_per_sample(tmp_path):
    registry = Registry(tmp_path / "registry")
    for index, tokens in enumerate([TT_A, TT_B, [3, 7, 90]]):
        published = get_adapter_model(build("llama_tied"), TrainableTokensConfig(token_indices=tokens))
        _randomize(published, seed=index)
        registry.publish(published, f"r{index}")
    serving = AdapterModel(build("llama_tied"))
    registry.load(serving.model, ["r0", "r1", "r2"], into=serving)
    assert serving.active_adapters == [] and serving.adapters == ["r0", "r1", "r2"]
    names = ["r2", "__base__", "r0", ["r1", "r2"]]
    _check_mixed(serving, names, _inputs(len(names), seed=8))


# ------------------------------------------------------------------- memory
def _tensor_bytes(module: nn.Module) -> int:
    seen: dict[int, int] = {}
    for tensor in [*module.parameters(), *module.buffers()]:
        seen[tensor.data_ptr()] = tensor.numel() * tensor.element_size()
    return sum(seen.values())


@pytest.mark.parametrize("tied", [False, True])
def test_a_trainable_tokens_adapter_costs_its_rows_whatever_the_vocabulary(tied):
    k, width = 16, 32
    grown = []
    for vocab in (256, 8192):
        torch.manual_seed(0)
        adapter_model = get_adapter_model(
            llama(tied, vocab=vocab, width=width), TrainableTokensConfig(token_indices=list(range(3, 3 + k)))
        )
        before = _tensor_bytes(adapter_model)
        for index in range(4):
            adapter_model.add_adapter(
                f"x{index}", TrainableTokensConfig(token_indices=list(range(50, 50 + k)))
            )
        grown.append((_tensor_bytes(adapter_model) - before) / 4)
    rows = k * width * 4
    assert grown[0] == grown[1]  # independent of the vocabulary
    assert rows <= grown[0] <= rows + 3 * k * 8  # the rows, and k-sized id tables
