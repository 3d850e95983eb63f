"""The wrapper hosts transformers' Conv1D only for states that declare it, and never row-replacing ones."""

from __future__ import annotations

import pytest
import transformers
from torch import nn

from tt_core import AdapterLayer, AdapterState
from tt_core.tensors.state import is_conv1d


class _Declares(AdapterState):
    adapts_conv1d = True


class _DeclaresRows(AdapterState):
    adapts_conv1d = True
    head_replaces_rows = True


def test_conv1d_is_told_apart_from_linear_layers():
    conv1d = transformers.pytorch_utils.Conv1D(8, 4)
    assert is_conv1d(conv1d) and not is_conv1d(nn.Linear(4, 8)) and not is_conv1d(nn.Embedding(4, 8))


@pytest.mark.parametrize(
    "state, accepted",
    [(None, True), (_Declares(), True), (AdapterState(), False), (_DeclaresRows(), False)],
    ids=["no state", "declares", "does not declare", "replaces rows"],
)
def test_a_conv1d_is_wrapped_only_for_states_that_declare_it(state, accepted):
    conv1d = transformers.pytorch_utils.Conv1D(8, 4)
    if accepted:
        AdapterLayer.check_wrappable("h.0.attn.c_attn", conv1d, state)
    else:
        with pytest.raises(ValueError, match=r"h\.0\.attn\.c_attn is a transformers Conv1D"):
            AdapterLayer.check_wrappable("h.0.attn.c_attn", conv1d, state)


def test_other_modules_are_refused_naming_what_is_wrapped():
    with pytest.raises(ValueError, match="nn.Embedding, nn.Linear and transformers' Conv1D"):
        AdapterLayer.check_wrappable("conv", nn.Conv2d(1, 1, 1), _Declares())
