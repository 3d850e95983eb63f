"""Per-sample adapters (``adapter_names=``): one mixed batch against the base model and against groups.

One batch of ``--samples`` samples spread evenly over ``--adapters`` adapters
(trainable tokens, k rows each; or, with ``--mix``, half of them LoRA r=8 on
the embedding), on the benchmark's random Llama. Timed, inference, no grad:

* ``base``: the base model's forward on the whole batch (no adapter layer);
* ``mixed``: the same batch with ``adapter_names=`` (one stack per sample);
* ``groups``: the groups run one after another with ``set_adapter``;
* ``peft``: PEFT's own ``adapter_names=``, timed for ``--mix lora`` only (PEFT serves
  token rows per sample only as part of a LoRA, ``trainable_token_indices``).

and the same three for ``generate`` of ``--new-tokens`` tokens (greedy).
Memory: the bytes of tensors each trainable-tokens adapter adds.

Run from benchmarks/: ``python -m ttbench.per_sample --shape v128k-d1024-tied-k16-b32x64``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ttbench.setups import sharing_copy
from ttbench.shapes import Shape, build_base_model

LORA_RANK = 8


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


def timed(jobs: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    """Median seconds of each job; the jobs alternate within each round, after one warm-up each."""
    for job in jobs.values():
        job()
    times: dict[str, list[float]] = {name: [] for name in jobs}
    for round_index in range(repeats):
        order = list(jobs) if round_index % 2 == 0 else list(reversed(jobs))
        for name in order:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            start = time.perf_counter()
            jobs[name]()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def run(
    shape: Shape,
    adapters: int = 8,
    mix: str = "tt",
    new_tokens: int = 32,
    repeats: int = 5,
    device: str = "cpu",
) -> dict[str, Any]:
    """Every measurement for one shape; ``shape.batch`` samples, ``shape.seq`` prompt tokens each."""
    base = build_base_model(shape).to(device)
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
        peft_times = _peft_times(base, input_ids, adapters, per_group, options, repeats)

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
        times = {**timed(jobs, repeats), **peft_times}
    result: dict[str, Any] = {
        "shape": shape.label,
        "adapters": adapters,
        "mix": mix,
        "samples": shape.batch,
        "new_tokens": new_tokens,
        "device": device,
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
        return timed(jobs, repeats)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", type=Shape.parse, default=Shape.parse("v128k-d1024-tied-k16-b32x64"))
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--mix", choices=["tt", "tt+lora", "lora"], default="tt")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    result = run(args.shape, args.adapters, args.mix, args.new_tokens, args.repeats, args.device)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
