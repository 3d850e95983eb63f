"""Smoke test of benchmarks/: the whole benchmark, in-process, on a tiny shape."""

from __future__ import annotations

import gc
import json
import os
import runpy
import sys
from pathlib import Path

import pytest
import torch
import transformers

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
ENTRY = BENCHMARKS / "bench_trainable_tokens.py"
SHAPES = ["v512-d32-tied-k4-b2x16", "v512-d32-untied-k4-b2x16"]
TABLES = {
    "Train step": [
        "shape",
        "floor s",
        "tt s",
        "peft s",
        "tt/floor",
        "per round",
        "min/min",
        "peft/floor",
        "tt/peft",
    ],
    "Training memory": ["shape", "floor MiB", "tt MiB", "peft MiB", "tt/floor", "peft/floor"],
    "Unmerged inference": ["shape", "base ms", "tt ms", "peft ms", "tt/base", "peft/base", "tt/peft"],
    "Checkpoint weight files": [
        "shape",
        "k x d x 4",
        "tt file bytes",
        "peft file bytes",
        "tt row copies",
        "peft row copies",
    ],
}


@pytest.fixture
def ttbench(monkeypatch):
    """The benchmark package, with the process state its main() sets put back afterwards."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    monkeypatch.delenv("KINETO_LOG_LEVEL", raising=False)  # the benchmark sets the level it needs
    had_level = "KINETO_LOG_LEVEL" in os.environ
    threads, verbosity = torch.get_num_threads(), transformers.logging.get_verbosity()
    from ttbench import cli, report

    # The benchmark runs gc.collect() before each timed step (outside the timing). In a
    # test process holding torch, transformers, peft and the suite, each takes ~0.5 s
    # over objects that live on anyway; frozen, they are skipped.
    gc.freeze()
    try:
        yield cli, report
    finally:
        gc.unfreeze()
        if not had_level:
            os.environ.pop("KINETO_LOG_LEVEL", None)
        torch.set_num_threads(threads)
        transformers.logging.set_verbosity(verbosity)


def tables(text: str) -> dict[str, tuple[list[str], list[list[str]]]]:
    """{title start: (head, rows)} of the markdown tables in a report."""
    found = {}
    lines = text.splitlines()
    for index, line in enumerate(lines):
        title = next((key for key in TABLES if line.startswith(key)), None)
        if title is None:
            continue
        body = []
        for row in lines[index + 2 :]:
            if not row.startswith("|"):
                break
            body.append([cell.strip() for cell in row.strip("|").split("|")])
        found[title] = (body[0], body[2:])
    return found


def numbers(value: object) -> list[float]:
    if isinstance(value, bool):
        return []
    if isinstance(value, (int, float)):
        return [float(value)]
    if isinstance(value, dict):
        return [n for v in value.values() for n in numbers(v)]
    if isinstance(value, list):
        return [n for v in value for n in numbers(v)]
    return []


def test_tiny_run_end_to_end(ttbench, tmp_path, capfd, monkeypatch):
    cli, report = ttbench
    out = tmp_path / "run.json"
    argv = ["--shapes", ",".join(SHAPES), "--repeats", "2", "--infer-seconds", "0.05", "--json", str(out)]
    assert cli.main(argv) == 0
    printed, err = capfd.readouterr()  # what the process wrote, the profiler's C++ logging included
    assert "USDT" not in printed + err and "profiler_start" not in printed + err

    found = tables(printed)
    assert list(found) == list(TABLES)
    for title, (head, rows) in found.items():
        assert head == TABLES[title], title
        assert [row[0] for row in rows] == SHAPES, title
        assert all(len(row) == len(head) and "-" not in row for row in rows), title
    for _, rows in found.values():
        for row in rows:
            assert all(float(cell.split("-")[0]) > 0 for cell in row[1:]), row
    for shape in SHAPES:
        assert f"{shape}: train tt/floor " in printed
    _, checkpoint_rows = found["Checkpoint weight files"]
    tied, untied = checkpoint_rows
    assert tied[1] == untied[1] == str(4 * 32 * 4)  # k x d x 4
    assert tied[4] == untied[4] == "1"  # tt stores a tied row once
    assert tied[5] == "2"  # peft stores it twice

    saved = json.loads(out.read_text())
    assert saved["command"].startswith("python benchmarks/bench_trainable_tokens.py --shapes")
    assert [r["shape"] for r in saved["results"]] == SHAPES
    for result in saved["results"]:
        assert list(result["setups"]) == ["floor", "tt", "peft"]
        assert list(result["inference"]) == ["base", "tt", "peft"]
        for name, entry in result["setups"].items():
            assert len(entry["train"]["wall_s"]) == 2
            assert entry["memory_bytes"] > 0 and entry["train"]["median_s"] > 0
            values = numbers({k: v for k, v in entry.items() if k != "added_bytes"})
            assert values and all(v > 0 for v in values), name
        assert len(result["inference"]["base"]["wall_s"]) >= 5
        assert all(v > 0 for v in numbers(result["inference"]))
    assert saved["wall_s"] > 0 and saved["process_peak_rss_bytes"] > 0

    # The saved run prints the same tables again, through the script's entry point.
    monkeypatch.setattr(sys, "argv", [str(ENTRY), "--report", str(out)])
    with pytest.raises(SystemExit) as done:
        runpy.run_path(str(ENTRY), run_name="__main__")
    assert done.value.code == 0
    assert capfd.readouterr().out.strip() == report.report(saved["results"]).strip()
    assert report.report(saved["results"]) in printed


def test_a_new_setup_adds_columns_without_changing_the_others(ttbench):
    """A setup beyond floor/tt/peft gets columns at the end; the usual ones stay as they are."""
    _, report = ttbench

    def timing(seconds: float) -> dict[str, object]:
        return {"wall_s": [seconds, seconds], "median_s": seconds}

    def setup(seconds: float, memory: int, checkpoint: int | None) -> dict[str, object]:
        entry = {"train": timing(seconds), "memory_bytes": memory, "checkpoint_bytes": checkpoint}
        return entry | ({"checkpoint_data_bytes": checkpoint - 100} if checkpoint else {})

    result = {
        "shape": "v512-d32-tied-k4-b2x16",
        "expected_checkpoint_data_bytes": 512,
        "setups": {
            "floor": setup(1.0, 2**20, None),
            "tt": setup(1.0, 2**20, 612),
            "peft": setup(2.0, 2**21, 1124),
            "stack": setup(1.5, 3 * 2**19, 1124),
        },
        "inference": {
            "base": timing(0.001),
            "tt": timing(0.001),
            "peft": timing(0.002),
            "stack": timing(0.0015),
        },
    }
    without = {
        **result,
        "setups": {k: v for k, v in result["setups"].items() if k != "stack"},
        "inference": {k: v for k, v in result["inference"].items() if k != "stack"},
    }
    found, usual = tables(report.report([result])), tables(report.report([without]))
    for title, (head, rows) in found.items():
        width = len(usual[title][0])
        assert head[:width] == usual[title][0] and rows[0][:width] == usual[title][1][0], title
    assert found["Train step"][0][-1] == "stack/floor" and found["Train step"][1][0][-1] == "1.500"
    assert found["Training memory"][0][-1] == "stack MiB" and found["Training memory"][1][0][-1] == "1.5"
    assert found["Unmerged inference"][0][-2:] == ["stack ms", "stack/base"]
    assert found["Unmerged inference"][1][0][-2:] == ["1.5", "1.500"]
    head, rows = found["Checkpoint weight files"]
    assert head[-2:] == ["stack file bytes", "stack row copies"] and rows[0][-2:] == ["1124", "2"]


def test_the_stack_setups_run_on_a_tiny_shape(ttbench, tmp_path, capsys):
    """``--setups stacks``: trainable tokens and LoRA stacked, and PEFT's LoRA, beside the floor."""
    cli, report = ttbench
    out = tmp_path / "stacks.json"
    argv = ["--shapes", SHAPES[0], "--setups", "stacks", "--repeats", "2", "--infer-seconds", "0.05"]
    argv += ["--paired-seconds", "0.02"]
    assert cli.main([*argv, "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    (result,) = json.loads(out.read_text())["results"]
    stacks = ["tt2", "lora", "lora2", "tt_lora", "lora_tt", "stack4", "peft_lora"]
    assert list(result["setups"]) == ["floor", *stacks]
    assert list(result["inference"]) == ["base", *stacks]
    assert result["setups"]["stack4"]["without_tokens"] == "lora2"
    for name in stacks:
        entry = result["setups"][name]
        assert entry["trainable_bytes"] > 0 and entry["memory_bytes"] > 0, name
        assert len(entry["train"]["cpu_s"]) == 2, name
        assert f"| {SHAPES[0]} | {name} |" in printed, name
    assert "lora2: " in printed  # stack4 over the same stack less its tokens
    assert list(result["inference_paired"]) == stacks
    assert all(len(entry["cpu_ratios"]) >= 5 for entry in result["inference_paired"].values())


def test_the_linear_setups_run_beside_peft_on_a_tiny_shape(ttbench, tmp_path, capsys):
    """``--setups linear``: LoRA on every projection with tt-adapters and with PEFT, side by side."""
    cli, _ = ttbench
    out = tmp_path / "linear.json"
    argv = ["--shapes", SHAPES[1], "--setups", "linear", "--repeats", "2", "--infer-seconds", "0.05"]
    assert cli.main([*argv, "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    (result,) = json.loads(out.read_text())["results"]
    assert list(result["setups"]) == ["floor", "lora_linear", "peft_lora_linear"]
    assert list(result["inference"]) == ["base", "lora_linear", "peft_lora_linear"]
    ours, theirs = result["setups"]["lora_linear"], result["setups"]["peft_lora_linear"]
    assert ours["versus"] == "peft_lora_linear" and "versus" not in theirs
    # The same projections at the same rank: the same trainable bytes, and the checkpoints hold just those.
    assert ours["trainable_bytes"] == theirs["trainable_bytes"] > 0
    assert ours["checkpoint_data_bytes"] == theirs["checkpoint_data_bytes"] == ours["trainable_bytes"]
    assert f"{SHAPES[1]}: train tt/floor -, peft/floor -, lora_linear/peft_lora_linear " in printed
    (row,) = [line for line in printed.splitlines() if line.startswith(f"| {SHAPES[1]} | lora_linear / ")]
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    assert len(cells) == 11 and all(cell not in {"", "-"} for cell in cells)
    assert float(cells[2]) > 0 and float(cells[6]) > 0 and float(cells[9]) > 0


def test_a_bfloat16_run_of_the_stack_of_four_beside_the_floor(ttbench, tmp_path, capsys):
    """``--dtype bfloat16``: the base in bf16, the stack [tt, LoRA, tt, LoRA] trained beside the floor."""
    cli, _ = ttbench
    out = tmp_path / "bf16.json"
    argv = ["--shapes", SHAPES[0], "--setups", "tt,stack4", "--repeats", "2", "--infer-seconds", "0.05"]
    assert cli.main([*argv, "--device", "cpu", "--dtype", "bfloat16", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    (result,) = json.loads(out.read_text())["results"]
    assert (result["device"], result["dtype"]) == ("cpu", "bfloat16")
    assert list(result["setups"]) == ["floor", "tt", "stack4"]
    assert all(entry["train"]["median_s"] > 0 for entry in result["setups"].values())
    assert "Measured on: cpu, bfloat16" in printed and f"| {SHAPES[0]} | stack4 |" in printed
    assert ", bfloat16, torch " in printed.splitlines()[0]


def test_the_device_and_dtype_flags_parse(ttbench):
    cli, _ = ttbench
    args = cli.parse_args(["--quick", "--device", "cuda", "--dtype", "float16"])
    assert (args.device, args.dtype) == ("cuda", "float16")
    assert (cli.parse_args([]).device, cli.parse_args([]).dtype) == ("cpu", "float32")  # as before


@pytest.mark.skipif(torch.cuda.is_available(), reason="the error is for a machine without a GPU")
@pytest.mark.parametrize("command", ["main", "per_sample", "decode"])
def test_device_cuda_without_a_gpu_is_one_clear_line(ttbench, capfd, command):
    cli, _ = ttbench
    from ttbench import decode, per_sample

    main = {"main": cli.main, "per_sample": per_sample.main, "decode": decode.main}[command]
    with pytest.raises(SystemExit) as done:
        main(["--device", "cuda", "--dtype", "bfloat16"])
    assert done.value.code == 2
    out, err = capfd.readouterr()
    assert out == "" and err.count("\n") == 1
    assert err.startswith("error: --device cuda: no CUDA device is available to torch ")
    assert "use --device cpu" in err


def test_the_rss_cross_check_is_refused_on_cuda(ttbench, capsys):
    cli, _ = ttbench
    with pytest.raises(SystemExit):
        cli.parse_args(["--device", "cuda", "--memory", "rss"])
    assert "--memory rss measures host memory: use it with --device cpu" in capsys.readouterr().err


DECODE_HEAD = [
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


@pytest.mark.parametrize("prepare", [False, True])
def test_compiled_against_eager_decode_reports_every_setup(ttbench, tmp_path, capsys, prepare):
    """Greedy decode, eager and compiled (dynamo's 'eager' backend: tracing without inductor's
    build time), for the base model and one unmerged trainable-tokens adapter (its banks with --prepare)."""
    from ttbench import decode

    out = tmp_path / "decode.json"
    argv = ["--shape", "v512-d32-tied-k4-b1x8", "--new-tokens", "3", "--repeats", "2", "--backend", "eager"]
    argv += ["--prepare"] if prepare else []
    assert decode.main([*argv, "--json", str(out)]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert [cell.strip() for cell in printed[0].strip("|").split("|")] == DECODE_HEAD
    rows = {row[3]: row for row in ([c.strip() for c in line.strip("|").split("|")] for line in printed[2:])}
    assert list(rows) == ["base eager", "base compiled default", "tt eager", "tt compiled default"]
    for name in ["base eager", "base compiled default", "tt eager"]:
        row = rows[name]
        assert float(row[4]) > 0 and float(row[6]) > 0 and row[10] == "yes", row
    assert rows["base compiled default"][6] == "1.000" and rows["base compiled default"][8] == "1"
    assert rows["base compiled default"][9] == "0"  # the per-token graph, compiled once, reused
    # The adapter compiles into one graph, reused for every token, with the eager model's tokens.
    adapter = rows["tt compiled default"]
    assert float(adapter[4]) > 0 and adapter[8:] == ["1", "0", "yes"], adapter
    result = json.loads(out.read_text())
    assert result["prepared"] is prepare
    assert (result["device"], result["dtype"], result["new_tokens"]) == ("cpu", "float32", 3)
    for entry in result["setups"].values():
        assert ("failed" in entry) != ("median_s" in entry)
        assert "failed" not in entry or "\n" not in entry["failed"]
    assert len(result["setups"]["base eager"]["decode_s"]) == 2


def test_the_decode_benchmark_refuses_cuda_graphs_on_the_cpu(ttbench, capsys):
    from ttbench import decode

    with pytest.raises(SystemExit):
        decode.parse_args(["--modes", "default,reduce-overhead"])
    assert "reduce-overhead records CUDA graphs: use it with --device cuda" in capsys.readouterr().err
    assert decode.parse_args(["--device", "cuda", "--modes", "default,reduce-overhead"]).modes == [
        "default",
        "reduce-overhead",
    ]
