"""Per-sample adapters (``adapter_names=``): one mixed batch against the base model and against groups.

One batch (the shape's batch x seq) spread evenly over ``--adapters`` adapters
(trainable tokens, k rows each; or, with ``--mix``, half of them or all LoRA r=8 on
the embedding), on the benchmark's random Llama; ``--adapters 1,8,64`` (the
default) measures each count in turn. A batch smaller than the adapter count
grows to one sample per adapter (32 x 128 over 64 adapters runs 64 x 128), so
that every adapter is in the batch. Timed, inference, no grad:

* ``base``: the base model's forward on the whole batch (no adapter layer);
* ``mixed``: the same batch with ``adapter_names=`` (one stack per sample);
* ``groups``: the groups run one after another with ``set_adapter``;
* ``peft``: PEFT's own ``adapter_names=``, timed for ``--mix lora`` only (PEFT serves
  token rows per sample only as part of a LoRA, ``trainable_token_indices``).

and the same three for ``generate`` of ``--new-tokens`` tokens (greedy).
Memory: the bytes of tensors each trainable-tokens adapter adds.

Run from benchmarks/: ``python -m ttbench.per_sample --shape v128k-d1024-tied-k16-b32x64``;
``--quick`` is a small CPU run; ``--device cuda --dtype bfloat16`` runs on a GPU.
It prints one table row per adapter count; ``--json`` writes every number.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ttbench.device import DTYPES, add_device_arguments, check_device, device_name, synchronize
from ttbench.report import markdown_table
from ttbench.setups import sharing_copy
from ttbench.shapes import Shape, build_base_model

LORA_RANK = 8
DEFAULT_SHAPE = "v128k-d1024-tied-k16-b32x64"
DEFAULT_ADAPTERS = "1,8,64"
DEFAULTS: dict[str, Any] = {
    "shape": DEFAULT_SHAPE,
    "adapters": DEFAULT_ADAPTERS,
    "new_tokens": 32,
    "repeats": 5,
}
#: --quick: a small CPU run (about 15 s on 2 cores).
QUICK: dict[str, Any] = {
    "shape": "v32k-d256-tied-k16-b8x16",
    "adapters": "1,8",
    "new_tokens": 8,
    "repeats": 2,
}


def tensor_bytes(module: nn.Module) -> int:
    """Bytes of the distinct parameter and buffer tensors of ``module``."""
    seen: dict[int, int] = {}
    for tensor in [*module.parameters(), *module.buffers()]:
        seen[tensor.data_ptr()] = tensor.numel() * tensor.element_size()
    return sum(seen.values())


def adapter_tokens(shape: Shape, index: int) -> list[int]:
    """k ids per adapter among the last rows, overlapping the next adapter's by half."""
    start = shape.vocab - 4 * shape.rows + index * (shape.rows // 2)
    return [(start + offset) % shape.vocab for offset in range(shape.rows)]


def build_served(base: nn.Module, shape: Shape, adapters: int, mix: str) -> tuple[Any, list[str], list[int]]:
    """The AdapterModel with ``adapters`` inactive adapters, their names, and the bytes each TT one added."""
    from tt_core import AdapterModel
    from tt_plugins.lora_embedding import LoraEmbeddingConfig
    from tt_plugins.trainable_tokens import TrainableTokensConfig

    served = AdapterModel(base)
    names, grown = [], []
    generator = torch.Generator().manual_seed(0)
    for index in range(adapters):
        name = f"a{index}"
        before = tensor_bytes(served)
        if mix == "lora" or (mix == "tt+lora" and index % 2):
            served.add_adapter(name, LoraEmbeddingConfig(r=LORA_RANK))
        else:
            served.add_adapter(name, TrainableTokensConfig(token_indices=adapter_tokens(shape, index)))
            grown.append(tensor_bytes(served) - before)
        names.append(name)
    with torch.no_grad():
        for parameter_name, parameter in served.named_parameters():
            if ".adapters." in parameter_name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.02)
    served.eval()
    return served, names, grown


def timed(jobs: dict[str, Callable[[], Any]], repeats: int, device: str = "cpu") -> dict[str, float]:
    """Median seconds of each job; the jobs alternate within each round, after one warm-up each."""
    for job in jobs.values():
        job()
    times: dict[str, list[float]] = {name: [] for name in jobs}
    for round_index in range(repeats):
        order = list(jobs) if round_index % 2 == 0 else list(reversed(jobs))
        for name in order:
            synchronize(device)
            start = time.perf_counter()
            jobs[name]()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def run(
    shape: Shape,
    adapters: int = 8,
    mix: str = "tt",
    new_tokens: int = 32,
    repeats: int = 5,
    device: str = "cpu",
    dtype: str = "float32",
) -> dict[str, Any]:
    """Every measurement for one shape; ``shape.batch`` samples (at least one per adapter),
    ``shape.seq`` prompt tokens each."""
    if adapters > shape.batch:
        shape = dataclasses.replace(shape, batch=adapters)
    base = build_base_model(shape, device=device, dtype=DTYPES[dtype])
    base.eval()
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, shape.vocab, (shape.batch, shape.seq), generator=generator).to(device)
    options = {
        "max_new_tokens": new_tokens,
        "min_new_tokens": new_tokens,
        "do_sample": False,
        "pad_token_id": 0,
    }

    # The base model without adapter layers (a module tree sharing the weights), timed with the rest.
    plain = sharing_copy(base)
    plain.eval()

    peft_times: dict[str, float] = {}
    per_group = shape.batch // adapters
    if shape.batch % adapters:
        raise ValueError(f"{shape.batch} samples do not spread evenly over {adapters} adapters")
    if mix == "lora":
        peft_times = _peft_times(base, input_ids, adapters, per_group, options, repeats, device)

    served, names, grown = build_served(base, shape, adapters, mix)
    adapter_names = [names[sample // per_group] for sample in range(shape.batch)]

    def groups(call: Callable[..., Any]) -> None:
        for index, name in enumerate(names):
            served.set_adapter(name)
            call(input_ids=input_ids[index * per_group : (index + 1) * per_group])

    jobs = {
        "base_forward": lambda: plain(input_ids=input_ids),
        "base_generate": lambda: plain.generate(input_ids=input_ids, **options),
        "mixed_forward": lambda: served(input_ids=input_ids, adapter_names=adapter_names),
        "groups_forward": lambda: groups(served),
        "mixed_generate": lambda: served.generate(
            input_ids=input_ids, adapter_names=adapter_names, **options
        ),
        "groups_generate": lambda: groups(lambda **kw: served.generate(**kw, **options)),
    }
    with torch.no_grad():
        times = {**timed(jobs, repeats, device), **peft_times}
    result: dict[str, Any] = {
        "shape": shape.label,
        "adapters": adapters,
        "mix": mix,
        "samples": shape.batch,
        "new_tokens": new_tokens,
        "device": device_name(device),
        "dtype": dtype,
        "seconds": times,
        "ratios": {
            "mixed/base forward": times["mixed_forward"] / times["base_forward"],
            "groups/base forward": times["groups_forward"] / times["base_forward"],
            "mixed/base generate": times["mixed_generate"] / times["base_generate"],
            "groups/base generate": times["groups_generate"] / times["base_generate"],
        },
        "tt_adapter_bytes": grown,
        "k x width x 4": shape.rows * shape.width * 4,
    }
    if peft_times:
        result["ratios"]["peft/base forward"] = times["peft_forward"] / times["base_forward"]
        result["ratios"]["peft/base generate"] = times["peft_generate"] / times["base_generate"]
    return result


def _peft_times(
    base: nn.Module,
    input_ids: torch.Tensor,
    adapters: int,
    per_group: int,
    options: dict[str, Any],
    repeats: int,
    device: str = "cpu",
) -> dict[str, float]:
    """PEFT's own mixed batch (LoRA on the embedding), on a copy of the module tree sharing the weights."""
    import peft

    with warnings.catch_warnings():
        # Not about what is measured: PEFT asks transformers' deprecated is_gradient_checkpointing,
        # and suggests ensure_weight_tying for a tied model (its LoRA here never merges).
        warnings.simplefilter("ignore", FutureWarning)
        warnings.filterwarnings("ignore", message=".*ensure_weight_tying", category=UserWarning)
        config = peft.LoraConfig(r=LORA_RANK, target_modules=["embed_tokens"])
        model = peft.get_peft_model(sharing_copy(base), config, adapter_name="a0")
        for index in range(1, adapters):
            model.add_adapter(f"a{index}", peft.LoraConfig(r=LORA_RANK, target_modules=["embed_tokens"]))
    model.eval()
    names = [f"a{sample // per_group}" for sample in range(input_ids.shape[0])]
    jobs = {
        "peft_forward": lambda: model(input_ids=input_ids, adapter_names=names),
        "peft_generate": lambda: model.generate(input_ids=input_ids, adapter_names=names, **options),
    }
    with torch.no_grad():
        return timed(jobs, repeats, device)


def _count_list(text: str) -> list[int]:
    try:
        counts = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give adapter counts as positive integers, e.g. 1,8,64")
    return counts


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"a small CPU run: {QUICK['shape']}, adapters {QUICK['adapters']}, "
        f"{QUICK['new_tokens']} new tokens, {QUICK['repeats']} rounds (each option given still wins)",
    )
    parser.add_argument("--shape", type=Shape.parse, help=f"default {DEFAULT_SHAPE}")
    parser.add_argument(
        "--adapters",
        type=_count_list,
        help=f"comma-separated adapter counts, each run in turn (default {DEFAULT_ADAPTERS})",
    )
    parser.add_argument("--mix", choices=["tt", "tt+lora", "lora"], default="tt")
    parser.add_argument("--new-tokens", type=int, help="tokens generated (default 32)")
    parser.add_argument("--repeats", type=int, help="timed rounds after a warm-up (default 5)")
    add_device_arguments(parser)
    parser.add_argument("--json", type=Path, help="write the results (a list, one per adapter count) here")
    args = parser.parse_args(argv)
    defaults = QUICK if args.quick else DEFAULTS
    args.shape = args.shape or Shape.parse(defaults["shape"])
    args.adapters = args.adapters or _count_list(defaults["adapters"])
    args.new_tokens = args.new_tokens or defaults["new_tokens"]
    args.repeats = args.repeats or defaults["repeats"]
    return args


def _ratio(result: dict[str, Any], key: str) -> str:
    value = result["ratios"].get(key)
    return "-" if value is None else f"{value:.3f}"


def table(results: list[dict[str, Any]]) -> str:
    """One markdown row per run: the base model's times, and each way of serving over the base."""
    head = [
        "shape",
        "device",
        "dtype",
        "mix",
        "adapters",
        "samples",
        "base fwd ms",
        "mixed/base fwd",
        "groups/base fwd",
        "peft/base fwd",
        "base gen s",
        "mixed/base gen",
        "groups/base gen",
        "peft/base gen",
    ]
    rows: list[list[str]] = []
    for r in results:
        seconds = r["seconds"]
        row = [r["shape"], r["device"], r["dtype"], r["mix"], str(r["adapters"]), str(r["samples"])]
        row += [f"{1e3 * seconds['base_forward']:.1f}"]
        row += [_ratio(r, f"{way}/base forward") for way in ("mixed", "groups", "peft")]
        row += [f"{seconds['base_generate']:.3f}"]
        row += [_ratio(r, f"{way}/base generate") for way in ("mixed", "groups", "peft")]
        rows.append(row)
    return "\n".join(markdown_table(head, rows))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    check_device(args.device)
    results = [
        run(args.shape, count, args.mix, args.new_tokens, args.repeats, args.device, args.dtype)
        for count in args.adapters
    ]
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
