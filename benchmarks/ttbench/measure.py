"""Measuring: timing in alternating rounds, allocator and RSS memory, the profiler, checkpoint bytes.

:func:`bench_shape` runs them all on one shape for the named setups; it knows
setups only through :class:`ttbench.setups.Setup`, so a newly registered setup
is measured like the others.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import gc
import json
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
from torch import nn

from ttbench.device import DTYPES, cuda_peak_bytes, device_name, synchronize
from ttbench.setups import REFERENCE, Setup, added_bytes, make_setup, train_step, trainable_bytes
from ttbench.shapes import INFERENCE_TOKENS, Shape, build_base_model, make_input_ids

# The script that --memory rss starts once per setup (with --rss-worker).
ENTRY_SCRIPT = Path(__file__).resolve().parent.parent / "bench_trainable_tokens.py"


# --------------------------------------------------------------------- timing
def timed(function: Callable[[], Any], device: str = "cpu") -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one call; on cuda, from an idle device until the
    call's kernels are done."""
    synchronize(device)
    wall, cpu = time.perf_counter(), time.process_time()
    function()
    synchronize(device)
    return time.perf_counter() - wall, time.process_time() - cpu


def round_order(names: list[str], round_index: int) -> list[str]:
    """Rotated every other round and reversed in between, so each job follows each other
    job equally often: a job that leaves the allocator or the caches in some state does not
    always hand it to the same neighbour."""
    shift = (round_index // 2) % len(names)
    order = names[shift:] + names[:shift]
    return order[::-1] if round_index % 2 else order


def alternate(
    jobs: Mapping[str, Callable[[], Any]], rounds: int, collect: bool = False, device: str = "cpu"
) -> dict[str, dict[str, Any]]:
    """Time every job once per round, in a balanced order; medians of wall and CPU time."""
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in jobs}
    for round_index in range(rounds):
        for name in round_order(list(jobs), round_index):
            if collect:
                gc.collect()  # outside the timed call: no collector pause lands inside a step
            samples[name].append(timed(jobs[name], device))
    return {
        name: {
            "wall_s": [wall for wall, _ in times],
            "cpu_s": [cpu for _, cpu in times],
            "median_s": statistics.median(wall for wall, _ in times),
            "median_cpu_s": statistics.median(cpu for _, cpu in times),
        }
        for name, times in samples.items()
    }


def paired(
    reference: Callable[[], Any], job: Callable[[], Any], pairs: int, device: str = "cpu"
) -> dict[str, Any]:
    """``job`` against ``reference`` timed back to back, ``pairs`` times (which goes first alternates).

    Both calls of a pair share one moment of a noisy machine (a neighbour's
    burst, a slower memory phase), which a round over every setup does not:
    on a shared VM where a base call took 17-77 ms, the median of 333-400
    per-pair ratios of one setup moved by about 0.01 between runs.
    """
    ratios: list[float] = []
    for index in range(pairs):
        if index % 2:
            job_cpu, reference_cpu = timed(job, device)[1], timed(reference, device)[1]
        else:
            reference_cpu, job_cpu = timed(reference, device)[1], timed(job, device)[1]
        ratios.append(job_cpu / max(reference_cpu, 1e-9))
    return {"cpu_ratios": ratios, "median_cpu_ratio": statistics.median(ratios)}


# ------------------------------------------------------- memory and profiling
def profiled_peak_bytes(function: Callable[[], Any], device: str = "cpu") -> int:
    """Peak, over the call, of torch's live allocations above those live before it.

    On the CPU, counted from the allocator's alloc/free events (``profile_memory``),
    so it sees every tensor, is not blurred by malloc caching, and ignores the
    other setups living in the same process. On cuda, ``torch.cuda.max_memory_allocated``
    over the call, less what was allocated before it.
    """
    from torch.profiler import ProfilerActivity, profile

    if device == "cuda":
        return cuda_peak_bytes(function)

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


def op_times(function: Callable[[], Any], calls: int, device: str = "cpu") -> dict[str, float]:
    """Self seconds per call of each aten op (by name and input shapes), from the profiler:
    CPU time on the CPU, the time of the op's kernels on cuda."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities, record_shapes=True) as prof:
        for _ in range(calls):
            function()
        synchronize(device)
    return {
        f"{event.key} {event.input_shapes}": (
            event.self_device_time_total if device == "cuda" else event.self_cpu_time_total
        )
        / 1e6
        / calls
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


# ------------------------------------------------------------------ one shape
def bench_shape(shape: Shape, setups: list[str], args: argparse.Namespace) -> dict[str, Any]:
    """Every measurement of one shape for the named setups (``floor`` among them: the reference).

    ``args`` gives ``repeats``, ``infer_seconds``, ``paired_seconds``, ``profile``, ``memory``,
    ``threads``, ``device`` and ``dtype``.
    """
    started = time.perf_counter()
    device = args.device
    base = build_base_model(shape, device=device, dtype=DTYPES[args.dtype])
    train_ids = make_input_ids(shape, shape.batch, shape.seq, seed=1).to(device)
    infer_ids = make_input_ids(shape, 1, INFERENCE_TOKENS, seed=2).to(device)
    built = {name: make_setup(name, base, shape) for name in setups}
    result: dict[str, Any] = {
        "shape": shape.label,
        **dataclasses.asdict(shape),
        "device": device_name(device),
        "dtype": args.dtype,
        "setups": {},
    }
    for name, setup in built.items():
        result["setups"][name] = {
            "added_bytes": added_bytes(setup, base),
            "trainable_bytes": trainable_bytes(setup),
        }
        if setup.without_tokens is not None:
            result["setups"][name]["without_tokens"] = setup.without_tokens
        if setup.versus is not None:
            result["setups"][name]["versus"] = setup.versus

    # Training. The first step of each setup is its warm-up and its memory
    # measurement (it creates the gradients and the optimizer state).
    for setup in built.values():
        setup.model.train()
    for name, setup in built.items():
        entry = result["setups"][name]
        step = functools.partial(train_step, setup, train_ids)
        entry["first_step_peak_bytes"] = profiled_peak_bytes(step, device)
        entry["memory_bytes"] = entry["added_bytes"] + entry["first_step_peak_bytes"]
    train_jobs = {name: functools.partial(train_step, setup, train_ids) for name, setup in built.items()}
    train = alternate(train_jobs, args.repeats, collect=True, device=device)
    for name, timing in train.items():
        result["setups"][name]["train"] = timing
        built[name].optimizer = None

    # Unmerged inference, against the plain base model. Calls are short, so
    # they get as many rounds as fit in --infer-seconds (5 to 200).
    infer_jobs = inference_jobs(built, base, infer_ids)
    with torch.no_grad():
        for model in infer_jobs.models:
            model.eval()
        warm_up = alternate(infer_jobs.calls, 1, device=device)
        round_s = sum(timing["median_s"] for timing in warm_up.values())
        rounds = max(5, min(200, int(args.infer_seconds / max(round_s, 1e-6))))
        result["inference"] = alternate(infer_jobs.calls, rounds, device=device)
        if args.paired_seconds:
            # Each setup back to back with the base model, for as many pairs as fit (5 to 400).
            result["inference_paired"] = {}
            base_s = result["inference"]["base"]["median_s"]
            for name, call in infer_jobs.calls.items():
                if name == "base":
                    continue
                pair_s = base_s + result["inference"][name]["median_s"]
                pairs = max(5, min(400, int(args.paired_seconds / max(pair_s, 1e-6))))
                result["inference_paired"][name] = paired(infer_jobs.calls["base"], call, pairs, device)

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
        result["profile"] = profile_shape(built, base, train_ids, infer_ids, device)

    if args.memory == "rss":
        for name in setups:
            result["setups"][name]["rss_peak_bytes"] = rss_in_subprocess(shape, name, args)

    del built, base
    gc.collect()
    result["wall_s"] = time.perf_counter() - started
    return result


@dataclasses.dataclass
class InferenceJobs:
    models: list[nn.Module]
    calls: dict[str, Callable[[], Any]]


def inference_jobs(built: dict[str, Setup], base: nn.Module, input_ids: torch.Tensor) -> InferenceJobs:
    """One unmerged call on ``input_ids`` for the base model ("base") and each setup that infers."""
    models: dict[str, tuple[nn.Module, dict[str, Any]]] = {"base": (base, {"input_ids": input_ids})}
    models.update(
        {name: (setup.model, setup.inputs(input_ids)) for name, setup in built.items() if setup.infer}
    )
    return InferenceJobs(
        [model for model, _ in models.values()],
        {name: functools.partial(model, **inputs) for name, (model, inputs) in models.items()},
    )


def profile_shape(
    built: dict[str, Setup],
    base: nn.Module,
    train_ids: torch.Tensor,
    infer_ids: torch.Tensor,
    device: str = "cpu",
) -> dict[str, Any]:
    """Where each setup spends time beyond the floor (training) and the base model (inference).

    Per op (name and input shapes): the least self time (CPU time; on cuda, the
    op's kernel time) over three profiled calls, so that noise does not pass for work.
    """
    found: dict[str, Any] = {}
    for setup in built.values():
        setup.model.train()
    train = {
        name: [op_times(functools.partial(train_step, setup, train_ids), 1, device) for _ in range(3)]
        for name, setup in built.items()
    }
    jobs = inference_jobs(built, base, infer_ids)
    with torch.no_grad():
        for model in jobs.models:
            model.eval()
        infer = {name: [op_times(call, 3, device) for _ in range(3)] for name, call in jobs.calls.items()}
    for phase, runs, reference in (("train", train, REFERENCE), ("inference", infer, "base")):
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


# ------------------------------------------------------------------------ RSS
def rss_in_subprocess(shape: Shape, setup: str, args: argparse.Namespace) -> int | None:
    command = [sys.executable, str(ENTRY_SCRIPT), "--rss-worker", setup, "--shapes", shape.label]
    command += ["--threads", str(args.threads), "--dtype", args.dtype]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode or not lines:
        print(f"  rss worker for {setup} failed:\n{done.stderr[-2000:]}", file=sys.stderr)
        return None
    return int(json.loads(lines[-1])["rss_peak_bytes"])


def rss_worker(shape: Shape, setup_name: str, dtype: str = "float32") -> None:
    """In a fresh process: peak RSS of one setup's first training step over the built model (CPU)."""
    base = build_base_model(shape, dtype=DTYPES[dtype])
    train_ids = make_input_ids(shape, shape.batch, shape.seq, seed=1)
    gc.collect()
    reset = clear_rss_peak()
    before, _ = rss_and_peak()
    setup = make_setup(setup_name, base, shape)
    setup.model.train()
    train_step(setup, train_ids)
    _, peak = rss_and_peak()
    print(json.dumps({"rss_peak_bytes": peak - before, "peak_was_reset": reset}))
