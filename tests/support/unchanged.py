"""What a refused load must leave as it was: every parameter of the model, and no wrapper."""

from __future__ import annotations

import torch

from tt_core import AdapterLayer


def untouched(model: torch.nn.Module) -> dict:
    """What a failed load must leave as it was: every parameter, its requires_grad, no wrapper."""
    assert not [m for m in model.modules() if isinstance(m, AdapterLayer)]
    return {
        name: (parameter.detach().clone(), parameter.requires_grad)
        for name, parameter in model.named_parameters()
    }


def assert_same(before: dict, model: torch.nn.Module) -> None:
    after = untouched(model)
    assert list(after) == list(before)
    for name, (value, requires_grad) in before.items():
        assert torch.equal(after[name][0], value), name
        assert after[name][1] == requires_grad, name
