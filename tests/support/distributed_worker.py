"""DDP and FSDP2 against one process, run by tests/test_distributed.py under torchrun (gloo, CPU).

    python -m torch.distributed.run --nproc_per_node 2 --standalone distributed_worker.py RESULT WORKDIR

For an untied and a tied Llama, every rank first trains a one-process
reference on the whole global batch (no communication), then the same steps
with DDP and with FSDP2 (``fully_shard`` on the decoder layer, the embedding
and the model: the embedding's weight is sharded across the ranks), each rank
on its half of the batch. Rank 0 writes RESULT (JSON): the differences from the
reference, what each step sent (bytes the process wrote to its gloo sockets,
from /proc/self/io, and DDP's gradient buckets from a comm hook), and FSDP2's
merge and save. The same runs follow for LoRA on every linear layer stacked with
token rows (PEFT's combined adapter as tt-adapters holds it), whose factors
FSDP2 shards with their decoder layer. The test asserts on it;
docs/distributed.md quotes it.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import transformers
from models import llama  # this script's own folder, tests/support, is on sys.path
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.nn.parallel import DistributedDataParallel

from tt_core import AdapterModel, get_adapter_model
from tt_plugins.lora_linear import LoraLinearConfig
from tt_plugins.trainable_tokens import TrainableTokensConfig

torch.set_num_threads(1)

VOCAB, WIDTH, TOKENS = 2048, 32, [2040, 2041, 2042, 2043]
STEPS, GLOBAL_BATCH, LENGTH = 3, 4, 8


def base_model(tied: bool) -> transformers.LlamaForCausalLM:
    torch.manual_seed(0)
    return llama(tied, vocab=VOCAB, width=WIDTH, intermediate=64)


def adapter_model(tied: bool) -> AdapterModel:
    base = base_model(tied)
    torch.manual_seed(1)
    return get_adapter_model(base, TrainableTokensConfig(token_indices=TOKENS, init_weights=False))


def lora_model(tied: bool) -> AdapterModel:
    """PEFT's combined adapter as tt-adapters holds it: LoRA on every projection, then the new rows."""
    base = base_model(tied)
    torch.manual_seed(1)
    config = LoraLinearConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    model = get_adapter_model(base, config)
    model.add_adapter("default_tokens", TrainableTokensConfig(token_indices=TOKENS, init_weights=False))
    model.set_adapter(["default", "default_tokens"])
    return model


def trained(model: AdapterModel) -> dict[str, torch.Tensor]:
    """Every trainable tensor of the adapters, whole (gathered from FSDP2's shards)."""
    return {name: whole(p) for name, p in model.named_parameters() if p.requires_grad}


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert list(a) == list(b), (list(a), list(b))
    return max(float((a[name] - b[name]).abs().max()) for name in a)


def global_batches() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(2)
    batches = []
    for _ in range(STEPS):
        ids = torch.randint(0, VOCAB - len(TOKENS), (GLOBAL_BATCH, LENGTH), generator=generator)
        ids[:, 1::3] = torch.tensor(TOKENS)[torch.arange(ids[:, 1::3].shape[1]) % len(TOKENS)]
        batches.append(ids)
    return batches


def rows_of(model: AdapterModel) -> torch.Tensor:
    return model.model.model.embed_tokens.adapters["default"].trainable_tokens_rows


def whole(tensor: torch.Tensor) -> torch.Tensor:
    full = getattr(tensor, "full_tensor", None)
    return (full() if full is not None else tensor).detach().clone()


def bytes_written() -> int:
    """What this process has written so far, sockets included (gloo sends with write/writev)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("wchar:"):
            return int(line.split()[1])
    raise RuntimeError("/proc/self/io has no wchar")


def train(model: AdapterModel, module: torch.nn.Module, local: slice) -> list[int]:
    """STEPS Adam steps on this rank's part of each global batch; the bytes written by each step."""
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.01)
    written = []
    for ids in global_batches():
        inputs = ids[local]
        before = bytes_written()
        loss = module(input_ids=inputs, labels=inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        written.append(bytes_written() - before)
    return written


def param_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def scenario(tied: bool, rank: int, world: int, workdir: Path) -> dict[str, Any]:
    local = slice(rank * GLOBAL_BATCH // world, (rank + 1) * GLOBAL_BATCH // world)
    result: dict[str, Any] = {
        "sizes": {
            "rows_gradient": len(TOKENS) * WIDTH * 4,
            "embedding_gradient": VOCAB * WIDTH * 4,
            "row_of_token_table": VOCAB * 8,
        }
    }

    # One process, the whole global batch: the reference.
    reference = adapter_model(tied)
    train(reference, reference, slice(None))
    expected = whole(rows_of(reference))

    # DDP: only the adapter's parameters require grad, so only they are bucketed.
    model = adapter_model(tied)
    ddp = DistributedDataParallel(model)
    buckets: list[int] = []

    def recording_allreduce(state, bucket):  # type: ignore[no-untyped-def]  (DDP checks real annotations)
        buckets.append(bucket.buffer().numel() * bucket.buffer().element_size())
        return allreduce_hook(state, bucket)

    ddp.register_comm_hook(None, recording_allreduce)
    written = train(model, ddp, local)
    result["ddp"] = {
        "max_diff": float((whole(rows_of(model)) - expected).abs().max()),
        "bucket_bytes": buckets,
        "written": written,
        "buffers_broadcast": sum(b.numel() * b.element_size() for b in ddp.modules_buffers),
        "ignored": sorted(ddp.parameters_to_ignore),
    }
    ddp_rows = whole(rows_of(model))
    del ddp

    # FSDP2: the decoder layer, the embedding (with the adapter's rows) and the rest, each sharded.
    model = adapter_model(tied)
    mesh = init_device_mesh("cpu", (world,))
    groups = list(model.model.model.layers)
    if not tied:  # a tied head shares the embedding's weight: both stay in the root group
        groups += [model.model.model.embed_tokens, model.model.lm_head]
    for group in groups:
        fully_shard(group, mesh=mesh)
    fully_shard(model, mesh=mesh)
    embedding_weight = model.model.model.embed_tokens.base_layer.weight
    written = train(model, model, local)
    rows = whole(rows_of(model))
    resharded = sum(param_bytes(group) for group in groups)  # gathered again for the backward
    result["fsdp"] = {
        "embedding_weight": type(embedding_weight).__name__,
        "embedding_local_rows": int(embedding_weight.to_local().shape[0]),  # type: ignore[attr-defined]
        "max_diff": float((rows - expected).abs().max()),
        "max_diff_from_ddp": float((rows - ddp_rows).abs().max()),
        "written": written,
        "model_bytes": param_bytes(model),
        "resharded_bytes": resharded,
    }

    inputs = global_batches()[0][local]
    result["fsdp"]["merge"] = guarded(lambda: merge(model, inputs, rows))
    folder = workdir / f"fsdp-{'tied' if tied else 'untied'}"
    saved = guarded(lambda: model.save_pretrained(folder, is_main_process=rank == 0) or {})
    dist.barrier()
    if rank == 0 and "error" not in saved:
        saved = guarded(lambda: load_saved(tied, folder, rows, reference))
    result["fsdp"]["saved"] = saved
    return result


def lora_scenario(tied: bool, rank: int, world: int, workdir: Path) -> dict[str, Any]:
    """LoRA on linear layers with token rows (the combined adapter): DDP and FSDP2 against one process."""
    local = slice(rank * GLOBAL_BATCH // world, (rank + 1) * GLOBAL_BATCH // world)
    reference = lora_model(tied)
    train(reference, reference, slice(None))
    expected = trained(reference)
    gradient_bytes = sum(t.numel() * t.element_size() for t in expected.values())
    result: dict[str, Any] = {"sizes": {"adapter_gradient": gradient_bytes, "tensors": len(expected)}}

    model = lora_model(tied)
    ddp = DistributedDataParallel(model)
    buckets: list[int] = []

    def recording_allreduce(state, bucket):  # type: ignore[no-untyped-def]  (DDP checks real annotations)
        buckets.append(bucket.buffer().numel() * bucket.buffer().element_size())
        return allreduce_hook(state, bucket)

    ddp.register_comm_hook(None, recording_allreduce)
    written = train(model, ddp, local)
    ddp_tensors = trained(model)
    result["ddp"] = {
        "max_diff": max_diff(ddp_tensors, expected),
        "bucket_bytes": buckets,
        "written": written,
        "buffers_broadcast": sum(b.numel() * b.element_size() for b in ddp.modules_buffers),
    }
    del ddp

    model = lora_model(tied)
    mesh = init_device_mesh("cpu", (world,))
    groups = list(model.model.model.layers)  # the LoRA factors of every projection are sharded with them
    if not tied:
        groups += [model.model.model.embed_tokens, model.model.lm_head]
    for group in groups:
        fully_shard(group, mesh=mesh)
    fully_shard(model, mesh=mesh)
    lora_a = model.model.model.layers[0].self_attn.q_proj.adapters["default"].lora_A
    written = train(model, model, local)
    fsdp_tensors = trained(model)
    result["fsdp"] = {
        "lora_A": type(lora_a).__name__,
        "lora_A_local_rows": int(lora_a.to_local().shape[0]) if hasattr(lora_a, "to_local") else None,
        "max_diff": max_diff(fsdp_tensors, expected),
        "max_diff_from_ddp": max_diff(fsdp_tensors, ddp_tensors),
        "written": written,
    }
    inputs = global_batches()[0][local]
    result["fsdp"]["merge"] = guarded(lambda: merge_lora(model, inputs))
    folder = workdir / f"fsdp-lora-{'tied' if tied else 'untied'}"
    saved = guarded(lambda: model.save_pretrained(folder, is_main_process=rank == 0) or {})
    dist.barrier()
    if rank == 0 and "error" not in saved:
        saved = guarded(lambda: load_saved_lora(tied, folder, fsdp_tensors, reference))
    result["fsdp"]["saved"] = saved
    return result


def merge_lora(model: AdapterModel, inputs: torch.Tensor) -> dict[str, Any]:
    """Merge the LoRA and the rows into the sharded weights and back, on every rank."""
    q_proj = model.model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        unmerged_logits = model(input_ids=inputs).logits
        weight_before = whole(q_proj.base_layer.weight)
        model.merge_adapter()
        merged_logits = model(input_ids=inputs).logits
        for module in model.modules():
            if isinstance(module, FSDPModule):
                module.reshard()
        merged_again = model(input_ids=inputs).logits
        weight_merged = whole(q_proj.base_layer.weight)
        state = q_proj.adapters["default"]
        delta = whole(state.lora_B) @ whole(state.lora_A) * state.scaling
        model.unmerge_adapter()
        weight_after = whole(q_proj.base_layer.weight)
    return {
        "logits_diff": float((merged_logits - unmerged_logits).abs().max()),
        "logits_diff_after_reshard": float((merged_again - unmerged_logits).abs().max()),
        "delta_in_weight": float((weight_merged - weight_before - delta).abs().max()),
        "unmerge_diff": float((weight_after - weight_before).abs().max()),
    }


def load_saved_lora(
    tied: bool, folder: Path, tensors: dict[str, torch.Tensor], reference: AdapterModel
) -> dict[str, Any]:
    loaded = AdapterModel.from_pretrained(base_model(tied), folder)
    everything = global_batches()[0]
    with torch.no_grad():
        logits_diff = (loaded(input_ids=everything).logits - reference(input_ids=everything).logits).abs()
    mine = {name: p.detach() for name, p in loaded.named_parameters() if name in tensors}
    return {
        "active": loaded.active_adapters,
        "tensors_equal": len(mine) == len(tensors) and all(torch.equal(mine[n], tensors[n]) for n in tensors),
        "logits_diff_from_reference": float(logits_diff.max()),
    }


def guarded(check: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """What ``check`` measured, or the error it raised (so the test names the step that broke)."""
    try:
        return check()
    except Exception:
        return {"error": traceback.format_exc(limit=-4)}


def merge(model: AdapterModel, inputs: torch.Tensor, rows: torch.Tensor) -> dict[str, Any]:
    """Merge into the sharded weight and back, on every rank."""
    embedding = model.model.model.embed_tokens
    with torch.no_grad():
        unmerged_logits = model(input_ids=inputs).logits
        weight_before = whole(embedding.base_layer.weight)
        model.merge_adapter()
        merged_logits = model(input_ids=inputs).logits
        for module in model.modules():  # what FSDP2 does after a backward: the merge must be in the shards
            if isinstance(module, FSDPModule):
                module.reshard()
        merged_again = model(input_ids=inputs).logits
        weight_merged = whole(embedding.base_layer.weight)
        model.unmerge_adapter()
        weight_after = whole(embedding.base_layer.weight)
    untouched = torch.ones(VOCAB, dtype=torch.bool)
    untouched[TOKENS] = False
    return {
        "logits_diff": float((merged_logits - unmerged_logits).abs().max()),
        "logits_diff_after_reshard": float((merged_again - unmerged_logits).abs().max()),
        "rows_in_weight": bool(torch.equal(weight_merged[TOKENS], rows)),
        "others_untouched": bool(torch.equal(weight_merged[untouched], weight_before[untouched])),
        "unmerge_exact": bool(torch.equal(weight_after, weight_before)),
    }


def load_saved(tied: bool, folder: Path, rows: torch.Tensor, reference: AdapterModel) -> dict[str, Any]:
    """What rank 0 saved, loaded by one process onto a fresh base."""
    loaded = AdapterModel.from_pretrained(base_model(tied), folder)
    everything = global_batches()[0]
    with torch.no_grad():
        logits_diff = (loaded(input_ids=everything).logits - reference(input_ids=everything).logits).abs()
    return {
        "rows_equal": bool(torch.equal(rows_of(loaded), rows)),
        "logits_diff_from_reference": float(logits_diff.max()),
    }


def main() -> None:
    result_path, workdir = Path(sys.argv[1]), Path(sys.argv[2])
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    results: dict[str, Any] = {"world_size": world}
    for tied in (False, True):
        results["tied" if tied else "untied"] = scenario(tied, rank, world, workdir)
    for tied in (False, True):
        results["lora_tied" if tied else "lora_untied"] = lora_scenario(tied, rank, world, workdir)
    runs = [
        (name, kind) for name in ("untied", "tied", "lora_untied", "lora_tied") for kind in ("ddp", "fsdp")
    ]
    mine = {f"{name}.{kind}": results[name][kind]["written"] for name, kind in runs}
    written: list[Any] = [None] * world
    dist.all_gather_object(written, mine)
    if rank == 0:
        results["written_by_rank"] = written
        result_path.write_text(json.dumps(results, indent=2))
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
