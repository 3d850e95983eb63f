"""DTensor and FSDP2 helpers for adapter states and the weights they merge into."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from tt_core.tensors.state import AdapterState


def is_dtensor(tensor: object) -> bool:
    """Whether ``tensor`` is a DTensor (a parameter FSDP2 sharded, say)."""
    # No DTensor exists before its module is imported; importing it here would cost seconds.
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(tensor, module.DTensor)


def held_rows(weight: torch.Tensor, token_indices: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """This rank's part of the DTensor ``weight``, the positions in it of the ids it holds, and which.

    For merging into a sharded weight in place. FSDP2 shards dim 0 on a 1-D
    mesh as ``torch.chunk`` does: rank r holds rows ``[r * c, (r + 1) * c)``
    with ``c = ceil(vocabulary / ranks)``.
    """
    from torch.distributed.tensor import Replicate, Shard

    local: torch.Tensor = weight.to_local()  # type: ignore[attr-defined]
    placements = weight.placements  # type: ignore[attr-defined]
    if all(isinstance(placement, Replicate) for placement in placements):
        start = 0
    elif len(placements) == 1 and isinstance(placements[0], Shard) and placements[0].dim == 0:
        mesh = weight.device_mesh  # type: ignore[attr-defined]
        chunk = -(-weight.shape[0] // mesh.size())
        start = min(mesh.get_local_rank() * chunk, weight.shape[0])
    else:
        raise NotImplementedError(
            f"adapters merge into a weight sharded by rows on one mesh dimension (FSDP2's Shard(0)) "
            f"or replicated; this one is placed as {placements}"
        )
    held = (token_indices >= start) & (token_indices < start + local.shape[0])
    return local, token_indices[held] - start, held


def reshard_fsdp(model: nn.Module) -> None:
    """Register FSDP2's sharded parameters again wherever it left gathered ones.

    After a forward without backward, FSDP2 keeps the root's parameters
    gathered (reshard_after_forward does not apply to the root). A merge
    written into that gathered copy would be lost at the next reshard, and the
    copy is no place to save from: merges and saves reshard first (no
    communication: the shards are still there). Without FSDP2 this does nothing.
    """
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch built without distributed
        return
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


@contextlib.contextmanager
def whole_adapter_tensors(model: nn.Module, states: Iterable[AdapterState]) -> Iterator[None]:
    """Inside the block, the adapters' sharded parameters (FSDP2's DTensors) are whole tensors.

    Gathering them is a collective: every rank must enter the block, in the
    same order. Without sharded parameters this does nothing. The sharded
    parameters are put back when the block ends.
    """
    swapped: list[tuple[nn.Module, str, nn.Parameter]] = []
    seen: set[int] = set()
    reshard_fsdp(model)
    try:
        for state in states:
            if id(state) in seen:
                continue
            seen.add(id(state))
            for module in state.modules():
                for name, parameter in list(module.named_parameters(recurse=False)):
                    if is_dtensor(parameter):
                        with torch.no_grad():
                            whole = parameter.detach().full_tensor()  # type: ignore[attr-defined]
                        swapped.append((module, name, parameter))
                        setattr(module, name, nn.Parameter(whole, requires_grad=parameter.requires_grad))
        yield
    finally:
        for module, name, parameter in reversed(swapped):
            setattr(module, name, parameter)
