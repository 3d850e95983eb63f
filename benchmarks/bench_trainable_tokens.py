"""Trainable tokens side by side: a frozen-base floor, tt-adapters, PEFT (and full embedding tuning).

For each shape (vocabulary, width, tied or not, trainable rows k, batch) one
process builds a random 2-layer Llama once and gives every setup its own module
tree over the *same* frozen weight tensors, so holding all setups costs one
model, not three (256k x 2048 untied is 4 GiB per copy). Setups:

* ``floor``: the frozen base model; the only trainable parameter is a zero bias
  added to the embedding output, so the gradient still flows through the whole
  network back to the embedding. No trainable-tokens method can do less.
* ``tt``: ``tt_core.get_adapter_model`` with ``TrainableTokensConfig``.
* ``peft``: ``peft.get_peft_model`` with ``peft.TrainableTokensConfig``.
* ``full`` (``--full``): the input embedding (and a head tied to it) fully trained.

Per setup: the median train step (forward, LlamaForCausalLM loss with
labels = input ids, backward, AdamW step on the trainable parameters), timed in
rounds that alternate the setups so machine noise hits all of them alike; the
training memory over the built model (see ``--memory``); the median unmerged
inference call (1 x 32 tokens, eval, no_grad) against the plain base model; and
the bytes of the saved adapter's weight files.

    python benchmarks/bench_trainable_tokens.py --quick             # under 2 minutes
    python benchmarks/bench_trainable_tokens.py                     # full grid, under 10
    python benchmarks/bench_trainable_tokens.py --shapes v256k-d2048-tied-k16 --json out.json
    python benchmarks/bench_trainable_tokens.py --report out.json   # the tables again

``--full`` adds full embedding tuning, ``--profile`` prints the ops each setup
runs beyond the floor, ``--memory rss`` cross-checks memory as peak RSS with one
subprocess per setup. docs/performance.md explains the choices and the results.

A shape reads ``v<vocab>-d<width>-<tied|untied>-k<rows>[-b<batch>x<seq>]``;
``32k``, ``128k`` and ``256k`` mean the vocabularies of Llama 2 (32,000),
Llama 3 (128,256) and Gemma (256,000); other sizes are given as integers.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import functools
import gc
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
import transformers
from torch import nn

VOCAB_ALIASES = {"32k": 32_000, "128k": 128_256, "256k": 256_000}
SETUPS = ("floor", "tt", "peft", "full")
INFERENCE_TOKENS = 32
TOKEN_EVERY = 8  # one position in TOKEN_EVERY holds a trainable token id

# Sized for one thread of a 2-core machine: quick under 2 minutes, full under 10.
QUICK_SHAPES = [
    "v32k-d512-tied-k16",
    "v32k-d512-untied-k16",
    "v128k-d512-tied-k16",
    "v128k-d512-untied-k16",
]
FULL_SHAPES = [
    # vocabulary
    "v32k-d512-tied-k16",
    "v32k-d512-untied-k16",
    "v128k-d512-tied-k16",
    "v128k-d512-untied-k16",
    "v256k-d512-tied-k16",
    "v256k-d512-untied-k16",
    # rows, where they weigh most (smallest vocabulary)
    "v32k-d512-tied-k1024",
    "v32k-d512-untied-k1024",
    # width
    "v32k-d1024-tied-k16",
    "v32k-d2048-tied-k16",
]


# --------------------------------------------------------------------- shapes
@dataclasses.dataclass(frozen=True)
class Shape:
    vocab: int
    width: int
    tied: bool
    rows: int
    batch: int = 4
    seq: int = 128

    @classmethod
    def parse(cls, spec: str) -> Shape:
        match = re.fullmatch(r"v(\w+)-d(\d+)-(tied|untied)-k(\d+)(?:-b(\d+)x(\d+))?", spec.strip())
        if not match:
            raise argparse.ArgumentTypeError(
                f"shape {spec!r} should read v<vocab>-d<width>-<tied|untied>-k<rows>[-b<batch>x<seq>], "
                "e.g. v128k-d1024-tied-k16"
            )
        vocab_text, width, tied, rows, batch, seq = match.groups()
        vocab = VOCAB_ALIASES.get(vocab_text.lower())
        if vocab is None:
            if not vocab_text.isdigit():
                raise argparse.ArgumentTypeError(
                    f"vocabulary {vocab_text!r}: use 32k, 128k, 256k or a number"
                )
            vocab = int(vocab_text)
        shape = cls(vocab, int(width), tied == "tied", int(rows), int(batch or 4), int(seq or 128))
        if shape.rows >= shape.vocab:
            raise argparse.ArgumentTypeError(f"{spec}: k must be smaller than the vocabulary")
        return shape

    @property
    def label(self) -> str:
        vocab = next((alias for alias, size in VOCAB_ALIASES.items() if size == self.vocab), str(self.vocab))
        tie = "tied" if self.tied else "untied"
        return f"v{vocab}-d{self.width}-{tie}-k{self.rows}-b{self.batch}x{self.seq}"

    @property
    def token_indices(self) -> list[int]:
        # New tokens sit at the end of a resized vocabulary.
        return list(range(self.vocab - self.rows, self.vocab))


# --------------------------------------------------------------------- models
def build_base_model(shape: Shape, seed: int = 0) -> nn.Module:
    """A frozen random 2-layer Llama, fp32. Built on meta, then filled: transformers' own
    init takes 9-15 s at 128k x 1024 on 2 cores; this takes about one second."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    config = transformers.LlamaConfig(
        vocab_size=shape.vocab,
        hidden_size=shape.width,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=max(512, shape.seq),
        tie_word_embeddings=shape.tied,
        pad_token_id=None,
    )
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config)
    model.to_empty(device="cpu")
    model.tie_weights()  # to_empty gives a tied parameter one new tensor per module
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("norm.weight"):
                parameter.fill_(1.0)
            else:
                parameter.normal_(0.0, 0.02)
    model.model.rotary_emb = LlamaRotaryEmbedding(config)  # its buffers were left empty on meta
    model.requires_grad_(False)
    if shape.tied != (model.lm_head.weight is model.get_input_embeddings().weight):
        raise RuntimeError(f"{shape.label}: the model's tie is not what the shape asks for")
    return model


def make_input_ids(shape: Shape, batch: int, seq: int, seed: int) -> torch.Tensor:
    """Random ids with a trainable token at one position in TOKEN_EVERY."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, shape.vocab - shape.rows, (batch, seq), generator=generator)
    flat = ids.view(-1)
    positions = torch.arange(0, flat.numel(), TOKEN_EVERY)
    picks = torch.randint(0, shape.rows, (positions.numel(),), generator=generator)
    flat[positions] = torch.tensor(shape.token_indices)[picks]
    return ids


def sharing_copy(model: nn.Module) -> nn.Module:
    """A new module tree over the same parameters and buffers (ties kept: one memo entry per tensor)."""
    return copy.deepcopy(model, memo={id(t): t for t in [*model.parameters(), *model.buffers()]})


@dataclasses.dataclass
class Setup:
    name: str
    model: nn.Module
    trainable: list[nn.Parameter]
    save: Callable[[Path], None] | None
    optimizer: torch.optim.Optimizer | None = None

    def __post_init__(self) -> None:
        if not self.trainable or not all(p.requires_grad for p in self.trainable):
            raise RuntimeError(f"{self.name}: the setup has no trainable parameters, or frozen ones")


def make_setup(name: str, base: nn.Module, shape: Shape) -> Setup:
    model = sharing_copy(base)
    embedding: nn.Module = model.get_input_embeddings()  # type: ignore[operator]
    if name == "floor":
        bias = nn.Parameter(torch.zeros(shape.width))
        embedding.register_forward_hook(lambda _module, _args, output: output + bias)
        model.floor_bias = bias  # keeps it alive with the model
        return Setup(name, model, [bias], None)
    if name == "tt":
        from tt_core import get_adapter_model
        from tt_plugins.trainable_tokens import TrainableTokensConfig

        adapter_model = get_adapter_model(model, TrainableTokensConfig(token_indices=shape.token_indices))
        trainable = [p for p in adapter_model.parameters() if p.requires_grad]
        return Setup(name, adapter_model, trainable, lambda path: adapter_model.save_pretrained(path))
    if name == "peft":
        import peft

        peft_model = peft.get_peft_model(model, peft.TrainableTokensConfig(token_indices=shape.token_indices))
        trainable = [p for p in peft_model.parameters() if p.requires_grad]
        return Setup(name, peft_model, trainable, lambda path: peft_model.save_pretrained(str(path)))
    if name == "full":
        weight = nn.Parameter(embedding.weight.detach().clone())  # type: ignore[operator]
        embedding.weight = weight
        if shape.tied:
            model.get_submodule("lm_head").weight = weight
        return Setup(name, model, [weight], None)
    raise ValueError(f"unknown setup {name!r}")


def added_bytes(setup: Setup, base: nn.Module) -> int:
    """Bytes of the parameters and buffers a setup holds beyond the base model's."""
    base_pointers = {t.data_ptr() for t in [*base.parameters(), *base.buffers()]}
    seen: set[int] = set()
    total = 0
    for tensor in [*setup.model.parameters(), *setup.model.buffers()]:
        pointer = tensor.data_ptr()
        if pointer in base_pointers or pointer in seen or tensor.device.type == "meta":
            continue
        seen.add(pointer)
        total += tensor.numel() * tensor.element_size()
    return total


# ------------------------------------------------------------------ measuring
def train_step(setup: Setup, input_ids: torch.Tensor) -> None:
    if setup.optimizer is None:
        setup.optimizer = torch.optim.AdamW(setup.trainable, lr=1e-4)
    loss = setup.model(input_ids=input_ids, labels=input_ids).loss
    loss.backward()
    setup.optimizer.step()
    setup.optimizer.zero_grad(set_to_none=True)


def timed(function: Callable[[], Any]) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    function()
    return time.perf_counter() - wall, time.process_time() - cpu


def round_order(names: list[str], round_index: int) -> list[str]:
    """Rotated every other round and reversed in between, so each job follows each other
    job equally often: a job that leaves the allocator or the caches in some state does not
    always hand it to the same neighbour."""
    shift = (round_index // 2) % len(names)
    order = names[shift:] + names[:shift]
    return order[::-1] if round_index % 2 else order


def alternate(
    jobs: Mapping[str, Callable[[], Any]], rounds: int, collect: bool = False
) -> dict[str, dict[str, Any]]:
    """Time every job once per round, in a balanced order; medians of wall and CPU time."""
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in jobs}
    for round_index in range(rounds):
        for name in round_order(list(jobs), round_index):
            if collect:
                gc.collect()  # outside the timed call: no collector pause lands inside a step
            samples[name].append(timed(jobs[name]))
    return {
        name: {
            "wall_s": [wall for wall, _ in times],
            "cpu_s": [cpu for _, cpu in times],
            "median_s": statistics.median(wall for wall, _ in times),
            "median_cpu_s": statistics.median(cpu for _, cpu in times),
        }
        for name, times in samples.items()
    }


def profiled_peak_bytes(function: Callable[[], Any]) -> int:
    """Peak, over the call, of torch's live CPU allocations above those live before it.

    Counted from the allocator's alloc/free events (``profile_memory``), so it
    sees every tensor, is not blurred by malloc caching, and ignores the other
    setups living in the same process.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        function()
    events = sorted(
        (event.start_ns(), event.nbytes())
        for event in prof.profiler.kineto_results.events()
        if event.name() == "[memory]"
    )
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def op_times(function: Callable[[], Any], calls: int) -> dict[str, float]:
    """Self CPU seconds per call of each aten op (by name and input shapes), from the profiler."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(calls):
            function()
    return {
        f"{event.key} {event.input_shapes}": event.self_cpu_time_total / 1e6 / calls
        for event in prof.key_averages(group_by_input_shape=True)
    }


def extra_ops(mine: dict[str, float], reference: dict[str, float], top: int) -> list[tuple[str, float]]:
    """The ops where ``mine`` spends the most time beyond ``reference``."""
    extra = {op: seconds - reference.get(op, 0.0) for op, seconds in mine.items()}
    return sorted(extra.items(), key=lambda item: -item[1])[:top]


def weight_file_bytes(folder: Path) -> tuple[int, int]:
    """(file bytes, tensor-data bytes) of the weight files under ``folder``."""
    total = data = 0
    for path in folder.rglob("*"):
        if path.suffix not in {".safetensors", ".bin", ".pt"}:
            continue
        size = path.stat().st_size
        total += size
        if path.suffix == ".safetensors":
            with path.open("rb") as handle:
                header = int.from_bytes(handle.read(8), "little")
            data += size - 8 - header
        else:
            data += size
    return total, data


def clear_rss_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (Linux >= 4.0)
        return True
    except OSError:
        return False


def rss_and_peak() -> tuple[int, int]:
    """(current RSS, peak RSS) in bytes, from /proc (peak falls back to getrusage)."""
    values = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in {"VmRSS", "VmHWM"}:
                values[key] = int(rest.split()[0]) * 1024
    if "VmHWM" not in values:
        import resource

        import psutil

        values["VmRSS"] = psutil.Process().memory_info().rss
        values["VmHWM"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return values["VmRSS"], values["VmHWM"]


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


# --------------------------------------------------------------- one shape
def bench_shape(shape: Shape, setups: list[str], args: argparse.Namespace) -> dict[str, Any]:
    started = time.perf_counter()
    base = build_base_model(shape)
    train_ids = make_input_ids(shape, shape.batch, shape.seq, seed=1)
    infer_ids = make_input_ids(shape, 1, INFERENCE_TOKENS, seed=2)
    built = {name: make_setup(name, base, shape) for name in setups}
    result: dict[str, Any] = {"shape": shape.label, **dataclasses.asdict(shape), "setups": {}}
    for name, setup in built.items():
        result["setups"][name] = {"added_bytes": added_bytes(setup, base)}

    # Training. The first step of each setup is its warm-up and its memory
    # measurement (it creates the gradients and the optimizer state).
    for setup in built.values():
        setup.model.train()
    for name, setup in built.items():
        entry = result["setups"][name]
        entry["first_step_peak_bytes"] = profiled_peak_bytes(functools.partial(train_step, setup, train_ids))
        entry["memory_bytes"] = entry["added_bytes"] + entry["first_step_peak_bytes"]
    train_jobs = {name: functools.partial(train_step, setup, train_ids) for name, setup in built.items()}
    train = alternate(train_jobs, args.repeats, collect=True)
    for name, timing in train.items():
        result["setups"][name]["train"] = timing
        built[name].optimizer = None

    # Unmerged inference, against the plain base model. Calls are short, so
    # they get as many rounds as fit in --infer-seconds (5 to 200).
    infer_models: dict[str, nn.Module] = {"base": base}
    infer_models.update({name: built[name].model for name in built if name in {"tt", "peft"}})
    infer_jobs = {name: functools.partial(model, input_ids=infer_ids) for name, model in infer_models.items()}
    with torch.no_grad():
        for model in infer_models.values():
            model.eval()
        warm_up = alternate(infer_jobs, 1)
        round_s = sum(timing["median_s"] for timing in warm_up.values())
        rounds = max(5, min(200, int(args.infer_seconds / max(round_s, 1e-6))))
        result["inference"] = alternate(infer_jobs, rounds)

    # Checkpoints.
    for name, setup in built.items():
        entry = result["setups"][name]
        if setup.save is None:
            entry["checkpoint_bytes"] = None
            continue
        with tempfile.TemporaryDirectory() as folder:
            setup.save(Path(folder))
            entry["checkpoint_bytes"], entry["checkpoint_data_bytes"] = weight_file_bytes(Path(folder))
    result["expected_checkpoint_data_bytes"] = shape.rows * shape.width * 4

    if args.profile:
        result["profile"] = profile_shape(built, base, train_ids, infer_ids)

    if args.memory == "rss":
        for name in setups:
            result["setups"][name]["rss_peak_bytes"] = rss_in_subprocess(shape, name, args)

    del built, base
    gc.collect()
    result["wall_s"] = time.perf_counter() - started
    return result


def profile_shape(
    built: dict[str, Setup], base: nn.Module, train_ids: torch.Tensor, infer_ids: torch.Tensor
) -> dict[str, Any]:
    """Where each setup spends time beyond the floor (training) and the base model (inference).

    Per op (name and input shapes): the least self CPU time over three profiled
    calls, so that noise does not pass for work.
    """
    found: dict[str, Any] = {}
    for setup in built.values():
        setup.model.train()
    train = {
        name: [op_times(functools.partial(train_step, setup, train_ids), 1) for _ in range(3)]
        for name, setup in built.items()
    }
    models = {"base": base, **{name: built[name].model for name in built if name in {"tt", "peft"}}}
    with torch.no_grad():
        for model in models.values():
            model.eval()
        infer = {
            name: [op_times(functools.partial(model, input_ids=infer_ids), 3) for _ in range(3)]
            for name, model in models.items()
        }
    for phase, runs, reference in (("train", train, "floor"), ("inference", infer, "base")):
        least = {
            name: {op: min(run.get(op, 0.0) for run in samples) for op in set().union(*samples)}
            for name, samples in runs.items()
        }
        found[phase] = {
            name: {
                "total_s": sum(ops.values()),
                # Ops (name and shapes) the reference never runs: extra work that noise cannot fake.
                "own_ops_s": sum(t for op, t in ops.items() if op not in least[reference]),
                "extra_ops": extra_ops(ops, least[reference], 8),
            }
            for name, ops in least.items()
        }
    return found


def rss_in_subprocess(shape: Shape, setup: str, args: argparse.Namespace) -> int | None:
    command = [sys.executable, __file__, "--rss-worker", setup, "--shapes", shape.label]
    command += ["--threads", str(args.threads)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode or not lines:
        print(f"  rss worker for {setup} failed:\n{done.stderr[-2000:]}", file=sys.stderr)
        return None
    return int(json.loads(lines[-1])["rss_peak_bytes"])


def rss_worker(shape: Shape, setup_name: str) -> None:
    """In a fresh process: peak RSS of one setup's first training step over the built model."""
    base = build_base_model(shape)
    train_ids = make_input_ids(shape, shape.batch, shape.seq, seed=1)
    gc.collect()
    reset = clear_rss_peak()
    before, _ = rss_and_peak()
    setup = make_setup(setup_name, base, shape)
    setup.model.train()
    train_step(setup, train_ids)
    _, peak = rss_and_peak()
    print(json.dumps({"rss_peak_bytes": peak - before, "peak_was_reset": reset}))


# ------------------------------------------------------------------- report
def _ratio(numerator: float | None, denominator: float | None) -> str:
    if numerator is None or not denominator:
        return "-"
    return f"{numerator / denominator:.3f}"


def _mib(value: float | None) -> str:
    return "-" if value is None else f"{value / 2**20:.1f}"


def _table(title: str, head: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["", title, "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def report(results: list[dict[str, Any]]) -> str:
    have_full = any("full" in r["setups"] for r in results)
    rows = []
    for r in results:
        wall = {name: v["train"]["median_s"] for name, v in r["setups"].items()}
        # tt/floor within each round: how far machine noise moves the ratio.
        tt_s, floor_s = r["setups"]["tt"]["train"]["wall_s"], r["setups"]["floor"]["train"]["wall_s"]
        pairs = [t / f for t, f in zip(tt_s, floor_s, strict=True)]
        row = [r["shape"], *(f"{wall[name]:.3f}" for name in ("floor", "tt", "peft"))]
        row += [_ratio(wall["tt"], wall["floor"]), f"{min(pairs):.2f}-{max(pairs):.2f}"]
        row += [_ratio(min(tt_s), min(floor_s))]
        row += [_ratio(wall["peft"], wall["floor"]), _ratio(wall["tt"], wall["peft"])]
        row += [_ratio(wall.get("full"), wall["floor"])] if have_full else []
        rows.append(row)
    head = ["shape", "floor s", "tt s", "peft s", "tt/floor", "per round", "min/min", "peft/floor", "tt/peft"]
    head += ["full/floor"] if have_full else []
    title = (
        "Train step (median wall time; per round: tt/floor within each round; min/min: fastest over fastest)"
    )
    lines = _table(title, head, rows)

    have_rss = any("rss_peak_bytes" in v for r in results for v in r["setups"].values())
    rows = []
    for r in results:
        memory = {name: v["memory_bytes"] for name, v in r["setups"].items()}
        row = [r["shape"], *(_mib(memory[name]) for name in ("floor", "tt", "peft"))]
        row += [_ratio(memory["tt"], memory["floor"]), _ratio(memory["peft"], memory["floor"])]
        row += [_mib(memory.get("full"))] if have_full else []
        if have_rss:
            rss = [r["setups"][name].get("rss_peak_bytes") for name in ("floor", "tt", "peft")]
            row += [" / ".join(_mib(value) for value in rss), _ratio(rss[1], rss[0])]
        rows.append(row)
    head = ["shape", "floor MiB", "tt MiB", "peft MiB", "tt/floor", "peft/floor"]
    head += (["full MiB"] if have_full else []) + (
        ["RSS floor / tt / peft MiB", "RSS tt/floor"] if have_rss else []
    )
    lines += _table(
        "Training memory over the built model (adapter tensors + peak of the first step)", head, rows
    )

    rows = []
    for r in results:
        i = {name: v["median_s"] for name, v in r["inference"].items()}
        row = [r["shape"], *(f"{1e3 * i[name]:.1f}" for name in ("base", "tt", "peft"))]
        row += [_ratio(i["tt"], i["base"]), _ratio(i["peft"], i["base"]), _ratio(i["tt"], i["peft"])]
        rows.append(row)
    head = ["shape", "base ms", "tt ms", "peft ms", "tt/base", "peft/base", "tt/peft"]
    lines += _table(f"Unmerged inference, 1 x {INFERENCE_TOKENS} tokens (median wall time)", head, rows)

    rows = []
    for r in results:
        expected = r["expected_checkpoint_data_bytes"]
        sizes = [r["setups"][name]["checkpoint_bytes"] for name in ("tt", "peft")]
        data = [r["setups"][name]["checkpoint_data_bytes"] for name in ("tt", "peft")]
        row = [r["shape"], str(expected), *(str(size) for size in sizes)]
        row += [f"{value / expected:g}" for value in data]
        rows.append(row)
    head = ["shape", "k x d x 4", "tt file bytes", "peft file bytes", "tt row copies", "peft row copies"]
    lines += _table("Checkpoint weight files", head, rows)

    for r in results:
        if "profile" not in r:
            continue
        for phase, reference in (("train", "floor"), ("inference", "base")):
            found = r["profile"][phase]
            lines += ["", f"Profile, {r['shape']}, {phase}: self CPU ms per call beyond {reference}"]
            for name, entry in found.items():
                if name == reference:
                    continue
                lines.append(
                    f"  {name}: {1e3 * entry['own_ops_s']:.2f} ms in ops the {reference} does not run; "
                    f"all ops {1e3 * entry['total_s']:.1f} ms vs {1e3 * found[reference]['total_s']:.1f} ms"
                )
                lines += [f"    {1e3 * seconds:+9.3f}  {op[:110]}" for op, seconds in entry["extra_ops"]]
    return "\n".join(lines)


# --------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="a short run (under 2 minutes on 2 cores)")
    parser.add_argument(
        "--shapes",
        type=lambda text: [Shape.parse(spec) for spec in text.split(",") if spec.strip()],
        help="comma-separated shapes, e.g. v128k-d1024-tied-k16,v256k-d1024-untied-k1024",
    )
    parser.add_argument("--full", action="store_true", help="also time full embedding fine-tuning")
    parser.add_argument(
        "--repeats", type=int, help="timed training rounds per shape, after a warm-up (default 3, quick 2)"
    )
    parser.add_argument(
        "--infer-seconds",
        type=float,
        help="time given to inference rounds per shape (default 6, quick 4)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch.set_num_threads, the same for every setup (default 1: on a shared machine one "
        "thread keeps other processes' load from stalling a parallel region)",
    )
    parser.add_argument(
        "--memory",
        choices=["alloc", "rss"],
        default="alloc",
        help="alloc: torch allocator events in-process (default); rss: also peak RSS, one subprocess "
        "per setup",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="also profile one step per setup and print the ops that cost more than the floor's",
    )
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--report", type=Path, metavar="JSON", help="print the tables of a saved --json run")
    parser.add_argument("--rss-worker", choices=SETUPS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.shapes is None:
        args.shapes = [Shape.parse(spec) for spec in (QUICK_SHAPES if args.quick else FULL_SHAPES)]
    args.repeats = args.repeats or (2 if args.quick else 3)
    args.infer_seconds = args.infer_seconds or (4.0 if args.quick else 6.0)
    return args


def _load() -> str:
    # Other work on the machine shows up as noise in every setup alike (rounds
    # alternate), but it is worth knowing when reading the numbers.
    try:
        return " ".join(f"{value:.2f}" for value in os.getloadavg())
    except OSError:
        return "?"


def machine() -> dict[str, Any]:
    model = platform.processor()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    import peft

    return {
        "cpu": model,
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    os.environ.setdefault("KINETO_LOG_LEVEL", "5")
    if args.report:
        print(report(json.loads(args.report.read_text())["results"]))
        return 0
    if args.rss_worker:
        with quiet():
            rss_worker(args.shapes[0], args.rss_worker)
        return 0
    setups = ["floor", "tt", "peft"] + (["full"] if args.full else [])
    info = machine()
    print(
        f"# {info['cpu']}, {info['cpus']} cpus, torch {info['torch']} ({info['torch_threads']} threads), "
        f"transformers {info['transformers']}, peft {info['peft']}; load average {_load()}",
        flush=True,
    )
    started = time.perf_counter()
    results = []
    for shape in args.shapes:
        with quiet():
            result = bench_shape(shape, setups, args)
        results.append(result)
        t = {name: v["train"]["median_s"] for name, v in result["setups"].items()}
        print(
            f"{shape.label}: train tt/floor {_ratio(t['tt'], t['floor'])}, peft/floor "
            f"{_ratio(t['peft'], t['floor'])} ({result['wall_s']:.0f} s)",
            flush=True,
        )
    wall = time.perf_counter() - started
    command = "python benchmarks/bench_trainable_tokens.py " + " ".join(
        sys.argv[1:] if argv is None else argv
    )
    print()
    print(report(results))
    peak_rss = rss_and_peak()[1]
    print(f"\nwall time {wall:.0f} s; peak RSS of this process {peak_rss / 2**30:.1f} GiB; ", end="")
    print(f"load average at the end {_load()}; command: {command}")
    if args.json:
        summary = {
            "machine": info,
            "command": command,
            "wall_s": wall,
            "load_end": _load(),
            "process_peak_rss_bytes": peak_rss,
            "results": results,
        }
        args.json.write_text(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
