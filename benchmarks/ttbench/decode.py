"""Greedy decode, eager against ``torch.compile``: the base model and one unmerged adapter.

Small-batch decoding is launch-bound, and compiling (with CUDA graphs,
``mode="reduce-overhead"``) is how users remove that cost. This times greedy
decoding of ``--new-tokens`` tokens after a prompt (the shape's batch x seq,
default 1 x 32) for:

* ``base eager``: the base model as it is;
* ``base compiled default``: ``torch.compile(base, mode="default")``;
* ``base compiled reduce-overhead``: ``mode="reduce-overhead"`` (CUDA graphs; cuda only);
* ``adapter eager`` / ``adapter compiled default`` / ``... reduce-overhead``: the same
  with one unmerged adapter (``--adapter tt``: trainable tokens on the shape's k
  ids; ``lora``: LoRA r=8 on the embedding and a tied head) active on an
  ``AdapterModel`` over the same weights, compiled whole (``torch.compile(adapter_model)``).

The decode is a loop written here, not ``generate``: a ``transformers.StaticCache``
sized to prompt + new tokens, the prompt run eagerly (it fills the cache; as in
transformers' own compiled generation, the prefill is not compiled), then one
call per new token with fixed shapes (1 token, the static cache, explicit
``position_ids``), the next token the argmax of the last logits. Only those
per-token calls go through the compiled module, so each compiled setup compiles
one graph and never recompiles while timed (the table shows both counts).
``generate(..., cache_implementation="static")`` compiles on its own terms
(transformers' auto-compile, on CUDA, of the base model's forward), which would
not compile the ``AdapterModel`` a user wraps, so it is not used.

A setup that fails to compile or run is reported as failed with its one-line
reason, and the others still run. Ratios: each setup's median decode time over
the base model's in the same mode (the target: one unmerged adapter compiled
<= 1.03x the compiled base), and over the eager base.

Run from benchmarks/: ``python -m ttbench.decode --quick`` (CPU) or
``python -m ttbench.decode --device cuda --dtype bfloat16``.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
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
from ttbench.shapes import Shape, build_base_model, make_input_ids

DEFAULT_SHAPE = "v128k-d4096-tied-k16-b1x32"  # the issue's: the Llama-3-8B head, 1 x 32 prompt
#: --quick: a small CPU run.
QUICK: dict[str, Any] = {"shape": "v32k-d256-tied-k16-b1x32", "new_tokens": 16, "repeats": 3}
LORA_RANK = 8
WARM_UPS = 3  # decodes before timing: compilation, then CUDA-graph recording


@dataclasses.dataclass
class Decoder:
    """One setup: ``prefill`` (eager) fills the cache, ``step`` (eager or compiled) adds one token."""

    name: str
    model: str  # "base" or "adapter"
    mode: str  # "eager" or a torch.compile mode
    prefill: Callable[..., Any]
    step: Callable[..., Any]
    cache: Any
    cudagraphs: bool = False


def cache_keyword(model: nn.Module) -> str:
    """The name the model's forward takes its cache under (``cache`` since transformers 5.2x,
    ``past_key_values`` before)."""
    parameters = inspect.signature(type(model).forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def build_adapter_model(base: nn.Module, shape: Shape, method: str) -> nn.Module:
    """An AdapterModel over the base weights with one active adapter of random (non-zero) weights."""
    from tt_core import AdapterModel
    from tt_plugins.lora_embedding import LoraEmbeddingConfig
    from tt_plugins.trainable_tokens import TrainableTokensConfig

    served = AdapterModel(sharing_copy(base))
    if method == "lora":
        served.add_adapter("adapter", LoraEmbeddingConfig(r=LORA_RANK, lora_alpha=2 * LORA_RANK))
    else:
        served.add_adapter("adapter", TrainableTokensConfig(token_indices=shape.token_indices))
    served.set_adapter("adapter")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in served.named_parameters():
            if ".adapters." in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.02)
    served.requires_grad_(False)
    served.eval()
    return served


def greedy(
    decoder: Decoder,
    input_ids: torch.Tensor,
    positions: list[torch.Tensor],
    keyword: str,
    cache_position: bool = False,
) -> torch.Tensor:
    """The new tokens (batch x len(positions) + 1): the prompt, then one call per token.

    ``positions``: each new token's position ids (batch x 1); ``keyword``: the name the forward
    takes the cache under; ``cache_position``: also pass the positions under that name
    (transformers versions whose forward takes it).
    """

    def call(model: Callable[..., Any], ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        extra = {"cache_position": position_ids[0]} if cache_position else {}
        inputs = {"input_ids": ids, "position_ids": position_ids, keyword: decoder.cache, **extra}
        logits = model(**inputs, use_cache=True, logits_to_keep=1).logits
        return logits[:, -1].argmax(-1, keepdim=True)  # a new tensor: a CUDA graph's output is reused

    decoder.cache.reset()
    prompt = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
    tokens = [call(decoder.prefill, input_ids, prompt)]
    for position in positions:
        if decoder.cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()
        tokens.append(call(decoder.step, tokens[-1], position))
    return torch.cat(tokens, dim=1)


def takes_cache_position(model: nn.Module) -> bool:
    """Whether the forward names ``cache_position`` (transformers before 5.2x: a static cache
    writes where it says); later versions count the tokens in the cache itself."""
    return "cache_position" in inspect.signature(type(model).forward).parameters


def setup_name(model: str, mode: str) -> str:
    """``base eager``, ``adapter compiled default``, ``base compiled reduce-overhead``..."""
    return f"{model} eager" if mode == "eager" else f"{model} compiled {mode}"


def one_line(error: BaseException) -> str:
    """The error's type and the first line of its message, shortened to 200 characters."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = f"{type(error).__name__}: {lines[0] if lines else ''}"
    return text if len(text) <= 200 else text[:197] + "..."


def unique_graphs() -> int:
    """Graphs dynamo has compiled in this process so far."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def run(
    shape: Shape,
    new_tokens: int = 32,
    repeats: int = 5,
    device: str = "cpu",
    dtype: str = "float32",
    method: str = "tt",
    modes: list[str] | None = None,
    backend: str = "inductor",
    fullgraph: bool = True,
    prepare: bool = False,
) -> dict[str, Any]:
    """Every setup's decode, timed in alternating rounds; failed setups carry their reason."""
    from transformers import StaticCache

    if modes is None:
        modes = ["default", "reduce-overhead"] if device == "cuda" else ["default"]
    torch._dynamo.reset()  # graphs compiled by an earlier run in this process would be reused, uncounted
    base = build_base_model(shape, device=device, dtype=DTYPES[dtype])
    base.eval()
    adapter_model = build_adapter_model(base, shape, method)
    if prepare:  # compiled calls then read the adapter banks, as a server switching adapters would
        adapter_model.prepare_for_compile()  # type: ignore[operator]
    input_ids = make_input_ids(shape, shape.batch, shape.seq, seed=2).to(device)
    positions = [
        torch.tensor([[shape.seq + index]], device=device).expand(shape.batch, 1)
        for index in range(new_tokens - 1)
    ]
    keyword, cache_position = cache_keyword(base), takes_cache_position(base)
    config: Any = base.config

    decoders: list[Decoder] = []
    failed: dict[str, tuple[str, str, str]] = {}  # name: (model, mode, reason)
    for model_name, model in (("base", base), ("adapter", adapter_model)):
        for mode in ["eager", *modes]:
            name = setup_name(model_name, mode)
            cache = StaticCache(config=config, max_cache_len=shape.seq + new_tokens)
            if mode == "eager":
                step: Callable[..., Any] = model
            else:
                try:
                    step = torch.compile(
                        model, mode=mode, backend=backend, fullgraph=fullgraph, dynamic=False
                    )
                except Exception as error:  # noqa: BLE001 - any failure is reported, the others still run
                    failed[name] = (model_name, mode, one_line(error))
                    continue
            decoders.append(Decoder(name, model_name, mode, model, step, cache, mode == "reduce-overhead"))

    result: dict[str, Any] = {
        "shape": shape.label,
        "device": device_name(device),
        "dtype": dtype,
        "adapter": method,
        "new_tokens": new_tokens,
        "backend": backend,
        "fullgraph": fullgraph,
        "prepared": prepare,
        "setups": {},
    }
    tokens: dict[str, torch.Tensor] = {}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        running = []
        for decoder in decoders:
            graphs_before = unique_graphs()
            started = time.perf_counter()
            try:
                for _ in range(WARM_UPS):
                    tokens[decoder.name] = greedy(decoder, input_ids, positions, keyword, cache_position)
                synchronize(device)
            except Exception as error:  # noqa: BLE001 - any failure is reported, the others still run
                failed[decoder.name] = (decoder.model, decoder.mode, one_line(error))
                continue
            result["setups"][decoder.name] = {
                "model": decoder.model,
                "mode": decoder.mode,
                "warm_up_s": time.perf_counter() - started,
                "graphs_compiled": unique_graphs() - graphs_before,
            }
            running.append(decoder)
        times: dict[str, list[float]] = {decoder.name: [] for decoder in running}
        recompiles = {decoder.name: 0 for decoder in running}
        for round_index in range(repeats):
            for decoder in running if round_index % 2 == 0 else running[::-1]:
                before = unique_graphs()
                synchronize(device)
                started = time.perf_counter()
                greedy(decoder, input_ids, positions, keyword, cache_position)
                synchronize(device)
                times[decoder.name].append(time.perf_counter() - started)
                recompiles[decoder.name] += unique_graphs() - before
    for decoder in running:
        entry = result["setups"][decoder.name]
        entry["decode_s"] = times[decoder.name]
        entry["median_s"] = statistics.median(times[decoder.name])
        entry["recompiles_timed"] = recompiles[decoder.name]
        eager = tokens.get(setup_name(decoder.model, "eager"))
        entry["same_tokens_as_eager"] = eager is not None and bool(torch.equal(tokens[decoder.name], eager))
    for name, (model_name, mode, reason) in failed.items():
        result["setups"][name] = {"model": model_name, "mode": mode, "failed": reason}
    order = [setup_name(model, mode) for model in ("base", "adapter") for mode in ["eager", *modes]]
    result["setups"] = {name: result["setups"][name] for name in order if name in result["setups"]}
    return result


def _ratio(numerator: float | None, denominator: float | None) -> str:
    if numerator is None or not denominator:
        return "-"
    return f"{numerator / denominator:.3f}"


def table(results: list[dict[str, Any]]) -> str:
    """One markdown row per setup: the median decode, per token, and over the base model."""
    head = [
        "shape",
        "device",
        "dtype",
        "setup",
        "decode ms",
        "ms / token",
        "over base, same mode",
        "over base eager",
        "graphs compiled",
        "recompiles timed",
        "tokens = eager",
    ]
    rows: list[list[str]] = []
    for r in results:
        setups = r["setups"]
        base_eager = setups.get(setup_name("base", "eager"), {}).get("median_s")
        for name, entry in setups.items():
            row = [r["shape"], r["device"], r["dtype"], f"{name.replace('adapter', r['adapter'])}"]
            if "failed" in entry:
                row += [f"failed: {entry['failed'].replace('|', '/')}"] + ["-"] * (len(head) - 5)
            else:
                seconds = entry["median_s"]
                same_mode = setups.get(setup_name("base", entry["mode"]), {}).get("median_s")
                row += [f"{1e3 * seconds:.1f}", f"{1e3 * seconds / r['new_tokens']:.2f}"]
                row += [_ratio(seconds, same_mode), _ratio(seconds, base_eager)]
                row += [str(entry["graphs_compiled"]), str(entry["recompiles_timed"])]
                row += ["yes" if entry["same_tokens_as_eager"] else "no"]
            rows.append(row)
    return "\n".join(markdown_table(head, rows))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"a small CPU run: {QUICK['shape']}, {QUICK['new_tokens']} new tokens, "
        f"{QUICK['repeats']} rounds (each option given still wins)",
    )
    parser.add_argument(
        "--shape", type=Shape.parse, help=f"batch x prompt as -b<batch>x<seq> (default {DEFAULT_SHAPE})"
    )
    parser.add_argument("--new-tokens", type=int, help="tokens decoded (default 32)")
    parser.add_argument("--repeats", type=int, help="timed rounds after the warm-up (default 10)")
    parser.add_argument(
        "--adapter", choices=["tt", "lora"], default="tt", help="the adapter's method (default tt)"
    )
    parser.add_argument(
        "--modes",
        type=lambda text: [mode.strip() for mode in text.split(",") if mode.strip()],
        help="torch.compile modes besides eager (default: default, and reduce-overhead on cuda)",
    )
    parser.add_argument(
        "--backend",
        default="inductor",
        help="torch.compile backend (default inductor; 'eager' checks tracing alone, quickly)",
    )
    parser.add_argument(
        "--fullgraph",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="torch.compile(fullgraph=...) (default on: a graph break fails the setup instead of slowing it)",
    )
    parser.add_argument(
        "--prepare",
        action="store_true",
        help="call the AdapterModel's prepare_for_compile() first: compiled calls read its adapter banks, so "
        "switching adapters does not recompile (docs/serving.md)",
    )
    add_device_arguments(parser)
    parser.add_argument("--json", type=Path, help="write the result here")
    args = parser.parse_args(argv)
    args.shape = args.shape or Shape.parse(QUICK["shape"] if args.quick else DEFAULT_SHAPE)
    args.new_tokens = args.new_tokens or (QUICK["new_tokens"] if args.quick else 32)
    args.repeats = args.repeats or (QUICK["repeats"] if args.quick else 10)
    if args.new_tokens < 2:
        parser.error("--new-tokens must be at least 2 (the prompt's token, then the decoded ones)")
    if args.modes and "reduce-overhead" in args.modes and args.device != "cuda":
        parser.error("--modes reduce-overhead records CUDA graphs: use it with --device cuda")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    check_device(args.device)
    result = run(
        args.shape,
        args.new_tokens,
        args.repeats,
        args.device,
        args.dtype,
        args.adapter,
        args.modes,
        args.backend,
        args.fullgraph,
        args.prepare,
    )
    print(table([result]))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
