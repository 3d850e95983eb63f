"""The command line: ``python benchmarks/bench_trainable_tokens.py [options]``."""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch
import transformers

from ttbench import report as reporting
from ttbench.device import add_device_arguments, check_device, device_name
from ttbench.measure import bench_shape, quiet, rss_and_peak, rss_worker
from ttbench.setups import LINEAR_SETUPS, REFERENCE, STACK_SETUPS, setup_names
from ttbench.shapes import FULL_SHAPES, QUICK_SHAPES, Shape

DESCRIPTION = (
    "Trainable tokens side by side: a frozen-base floor, tt-adapters, PEFT (and full embedding tuning)."
)
DEFAULT_SETUPS = ["tt", "peft"]


#: Names --setups expands to a group of setups.
SETUP_GROUPS = {"stacks": STACK_SETUPS, "linear": LINEAR_SETUPS}


def _setup_list(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    names = [member for name in names for member in SETUP_GROUPS.get(name, [name])]
    unknown = [name for name in names if name not in setup_names()]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown setup(s) {', '.join(unknown)}; known: {', '.join(setup_names())}"
        )
    return names


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=DESCRIPTION)
    parser.add_argument("--quick", action="store_true", help="a short run (under 2 minutes on 2 cores)")
    parser.add_argument(
        "--shapes",
        type=lambda text: [Shape.parse(spec) for spec in text.split(",") if spec.strip()],
        help="comma-separated shapes, e.g. v128k-d1024-tied-k16,v256k-d1024-untied-k1024",
    )
    parser.add_argument("--full", action="store_true", help="also time full embedding fine-tuning")
    parser.add_argument(
        "--setups",
        type=_setup_list,
        default=DEFAULT_SETUPS,
        help=f"comma-separated setups to compare with the floor, which always runs (default "
        f"{','.join(DEFAULT_SETUPS)}; known: {', '.join(setup_names())}; 'stacks' means "
        f"{','.join(STACK_SETUPS)}; 'linear' means {','.join(LINEAR_SETUPS)})",
    )
    parser.add_argument(
        "--repeats", type=int, help="timed training rounds per shape, after a warm-up (default 3, quick 2)"
    )
    parser.add_argument(
        "--infer-seconds",
        type=float,
        help="time given to inference rounds per shape (default 6, quick 4)",
    )
    parser.add_argument(
        "--paired-seconds",
        type=float,
        default=0.0,
        help="also time each inferring setup back to back with the base model for this long, and "
        "report the median of the per-pair ratios (default 0: off)",
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
    add_device_arguments(parser)
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--report", type=Path, metavar="JSON", help="print the tables of a saved --json run")
    parser.add_argument("--rss-worker", choices=setup_names(), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory == "rss" and args.device != "cpu":
        parser.error("--memory rss measures host memory: use it with --device cpu")
    if args.shapes is None:
        args.shapes = [Shape.parse(spec) for spec in (QUICK_SHAPES if args.quick else FULL_SHAPES)]
    args.repeats = args.repeats or (2 if args.quick else 3)
    args.infer_seconds = args.infer_seconds or (4.0 if args.quick else 6.0)
    return args


def setups_to_run(args: argparse.Namespace) -> list[str]:
    """The floor first, then --setups, then full (--full); each once."""
    names = [REFERENCE, *args.setups] + (["full"] if args.full else [])
    return list(dict.fromkeys(names))


def _load() -> str:
    # Other work on the machine shows up as noise in every setup alike (rounds
    # alternate), but it is worth knowing when reading the numbers.
    try:
        return " ".join(f"{value:.2f}" for value in os.getloadavg())
    except OSError:
        return "?"


def machine(device: str = "cpu") -> dict[str, Any]:
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
        "device": device_name(device),
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
    # The profiler (kineto, read once per process at its first use) logs at levels 0-5; 5 is its
    # "USDT profiler_start/stop" pair per profiled call, on stderr. 6 keeps the output to the tables.
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")
    if args.report:
        print(reporting.report(reporting.read_results(args.report)))
        return 0
    if args.rss_worker:
        with quiet():
            rss_worker(args.shapes[0], args.rss_worker, args.dtype)
        return 0
    check_device(args.device)
    setups = setups_to_run(args)
    info = machine(args.device)
    on = "" if args.device == "cpu" else f" on {info['device']} ({args.device})"
    print(
        f"# {info['cpu']}, {info['cpus']} cpus{on}, {args.dtype}, torch {info['torch']} "
        f"({info['torch_threads']} threads), "
        f"transformers {info['transformers']}, peft {info['peft']}; load average {_load()}",
        flush=True,
    )
    started = time.perf_counter()
    results = []
    for shape in args.shapes:
        with quiet():
            result = bench_shape(shape, setups, args)
        results.append(result)
        print(f"{shape.label}: {reporting.train_ratios(result)} ({result['wall_s']:.0f} s)", flush=True)
    wall = time.perf_counter() - started
    command = "python benchmarks/bench_trainable_tokens.py " + " ".join(
        sys.argv[1:] if argv is None else argv
    )
    print()
    print(reporting.report(results))
    peak_rss = rss_and_peak()[1]
    print(f"\nwall time {wall:.0f} s; peak RSS of this process {peak_rss / 2**30:.1f} GiB; ", end="")
    print(f"load average at the end {_load()}; command: {command}")
    if args.json:
        reporting.write_json(args.json, reporting.summary(info, command, wall, _load(), peak_rss, results))
    return 0
