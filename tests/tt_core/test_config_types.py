"""A config loads back as its fields declare: Optional, unions, Literal, nested lists, tuples and dicts.

The method here is an outside one, registered at run time, written with
``from __future__ import annotations`` as plugin authors do, so every hint
is a string until the core resolves it.
"""

from __future__ import annotations

import dataclasses
import enum
import json
from typing import ClassVar, Literal, Optional, Union

import pytest
import torch
from torch import nn

import tt_core
from tt_core import AdapterConfig, AdapterModel, AdapterState, ConfigError, hookimpl, testing


class Mode(str, enum.Enum):
    ADD = "add"
    OFF = "off"


@dataclasses.dataclass
class TypedConfig(AdapterConfig):
    """Adds a trainable vector to rows ``token_indices``; the other fields are there for their types."""

    method: ClassVar[str] = "typed_rows"
    token_indices: list[int] = dataclasses.field(default_factory=list)
    target_modules: list[str] | None = None
    groups: Optional[list[list[int]]] = None  # noqa: UP045 (the typing spelling, on purpose)
    by_module: dict[str, list[int]] | None = None
    weights_by_id: dict[int, float] | None = None
    offsets: tuple[int, ...] = (0, 1)
    kind: Literal["add", "none"] = "add"
    mode: Mode = Mode.ADD
    alpha: Union[int, float] = 1  # noqa: UP007
    init_weights: bool = True


class TypedState(AdapterState):
    additive = True

    def __init__(self, weight: torch.Tensor, token_indices: list[int], init_weights: bool) -> None:
        super().__init__()
        ids = torch.tensor(token_indices, device=weight.device)
        self.register_buffer("token_indices", ids, persistent=False)
        delta = torch.zeros(len(token_indices), weight.shape[1], device=weight.device)
        if not init_weights:
            delta.normal_()
        self.delta = nn.Parameter(delta)

    def touched_rows(self) -> torch.Tensor:
        return self.token_indices

    def adapt_rows(self, token_ids: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        hit = (token_ids.unsqueeze(-1) == self.token_indices).to(rows.dtype)
        return rows + hit @ self.delta.to(rows.dtype)

    def embed(self, input_ids: torch.Tensor, output: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        return self.adapt_rows(input_ids, output)

    def project(self, hidden, output, base_layer, earlier):
        return output.index_add(-1, self.token_indices, hidden @ self.delta.T.to(hidden.dtype))

    @torch.no_grad()
    def merge_into(self, weight: torch.Tensor) -> None:
        weight.index_add_(0, self.token_indices, self.delta.to(weight.dtype))

    @torch.no_grad()
    def unmerge_from(self, weight: torch.Tensor) -> None:
        weight.index_add_(0, self.token_indices, -self.delta.to(weight.dtype))


class TypedPlugin:
    @hookimpl
    def register_methods(self, register):
        register(TypedConfig)

    @hookimpl
    def create_layer(self, config, adapter_name, target_name, base_layer):
        return TypedState(base_layer.weight, config.token_indices, config.init_weights)


@pytest.fixture
def typed_method():
    manager = tt_core.get_plugin_manager()
    plugin = TypedPlugin()
    manager.register(plugin, name="typed_rows")
    yield
    manager.unregister(plugin)


def _make_config(vocab: int) -> TypedConfig:
    return TypedConfig(token_indices=[3, vocab - 1], init_weights=False)


def _fold(state: AdapterState, weight: torch.Tensor) -> torch.Tensor:
    return weight.index_add(0, state.token_indices, state.delta)


FILLED = TypedConfig(
    token_indices=[3, 5],
    target_modules=["embed_tokens"],
    groups=[[3], [5]],
    by_module={"embed_tokens": [3, 5]},
    weights_by_id={3: 0.5, 5: 2.0},
    offsets=(4, 5, 6),
    kind="none",
    mode=Mode.OFF,
    alpha=0.25,
)


@pytest.mark.parametrize("config", [TypedConfig(token_indices=[3]), FILLED], ids=["defaults", "filled"])
def test_a_config_comes_back_equal_through_json(config):
    data = json.loads(json.dumps(config.to_dict()))
    assert data["target_modules"] is None or data["target_modules"] == ["embed_tokens"]
    assert TypedConfig.from_dict(data) == config


@pytest.mark.parametrize("family", testing.FAMILIES)
def test_the_kit_saves_and_loads_an_outside_method_with_optional_fields(typed_method, family):
    testing.run_check("save_load", family, _make_config, _fold)


def test_save_and_load_keep_none_tuples_and_int_keys(typed_method, tmp_path):
    model = AdapterModel(testing.tiny_model("llama_tied"))
    model.add_adapter("plain", TypedConfig(token_indices=[3]))
    model.add_adapter("filled", dataclasses.replace(FILLED, target_modules=None))
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "manifest.json").read_text())
    assert set(saved["adapters"]) == {"plain", "filled"}
    loaded = AdapterModel.from_pretrained(testing.tiny_model("llama_tied"), tmp_path)
    assert loaded.adapter_configs["plain"] == TypedConfig(token_indices=[3])
    assert loaded.adapter_configs["plain"].target_modules is None
    assert loaded.adapter_configs["filled"] == dataclasses.replace(FILLED, target_modules=None)


@pytest.mark.parametrize(
    ("key", "value", "declared"),
    [
        ("target_modules", 3, "a list[str] | None"),
        ("target_modules", ["embed_tokens", 7], "a list[str] | None"),
        ("groups", [[1, "2"]], "an Optional[list[list[int]]]"),
        ("groups", [1, 2], "an Optional[list[list[int]]]"),
        ("by_module", {"embed_tokens": [True]}, "a dict[str, list[int]] | None"),
        ("weights_by_id", {"three": 0.5}, "a dict[int, float] | None"),
        ("offsets", ["4"], "a tuple[int, ...]"),
        ("kind", "multiply", "a Literal['add', 'none']"),
        ("mode", "sideways", "a Mode"),
        ("alpha", "0.25", "a Union[int, float]"),
        ("init_weights", 1, "a bool"),
        ("token_indices", None, "a list[int]"),
    ],
)
def test_a_value_of_the_wrong_type_is_refused_naming_key_value_and_type(key, value, declared):
    data = {**TypedConfig(token_indices=[3]).to_dict(), key: value}
    with pytest.raises(ConfigError) as caught:
        TypedConfig.from_dict(json.loads(json.dumps(data)))
    message = str(caught.value)
    assert f"key {key!r} is {value!r}" in message
    assert f"which is not {declared} (the type of TypedConfig.{key});" in message
    assert "save the adapter again" in message


def test_a_config_whose_hints_name_local_classes_still_loads():
    class Local:  # a name only this function holds: its string annotation cannot be resolved
        pass

    @dataclasses.dataclass
    class LocalConfig(AdapterConfig):
        method: ClassVar[str] = "local"
        target_modules: list[str] | None = None
        extra: Local | None = None
        count: int = 1

    assert LocalConfig.from_dict({"target_modules": None, "count": 2}) == LocalConfig(count=2)
    expected = r"key 'count' is 'two', which is not an int \(the type of LocalConfig.count\);"
    with pytest.raises(ConfigError, match=expected):
        LocalConfig.from_dict({"count": "two"})
