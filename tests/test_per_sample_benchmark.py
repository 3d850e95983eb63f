"""Smoke test of benchmarks/ttbench/per_sample.py (adapter_names= against base and groups) on a tiny shape."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.mark.parametrize("mix", ["tt", "tt+lora", "lora"])
def test_the_per_sample_benchmark_runs_on_a_tiny_shape(monkeypatch, mix, capfd):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    from ttbench import per_sample
    from ttbench.shapes import Shape

    shape = Shape.parse("v512-d32-tied-k4-b8x8")
    result = per_sample.run(shape, adapters=4, mix=mix, new_tokens=3, repeats=1)
    expected = {"base_forward", "mixed_forward", "groups_forward", "base_generate", "mixed_generate"}
    assert expected <= set(result["seconds"])
    assert all(seconds > 0 for seconds in result["seconds"].values())
    assert ("peft/base forward" in result["ratios"]) == (mix == "lora")
    tt_adapters = {"tt": 4, "tt+lora": 2, "lora": 0}[mix]
    # Each trainable-tokens adapter adds its k x width fp32 rows and three k-sized int64 id tables.
    assert result["tt_adapter_bytes"] == [4 * 32 * 4 + 3 * 4 * 8] * tt_adapters
    capfd.readouterr()
    argv = ["--shape", "v512-d32-tied-k4-b4x4", "--adapters", "2", "--new-tokens", "2", "--repeats", "1"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert per_sample.main([*argv, "--mix", mix]) == 0
    out, err = capfd.readouterr()  # what the process wrote, C++ logging included
    assert out.startswith(
        "| shape | device | dtype | mix | adapters | samples | base fwd ms | mixed/base fwd |"
    )
    assert f"| v512-d32-tied-k4-b4x4 | cpu | float32 | {mix} | 2 | 4 |" in out
    assert (err, [str(warning.message) for warning in caught]) == ("", [])  # the table and nothing else


def test_the_per_sample_benchmark_runs_each_adapter_count_in_bfloat16(monkeypatch, tmp_path, capsys):
    """``--adapters 1,4`` on a batch of 2: one row per count; the batch grows to one sample per adapter."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    from ttbench import per_sample

    out = tmp_path / "per_sample.json"
    argv = ["--shape", "v512-d32-tied-k4-b2x4", "--adapters", "1,4", "--new-tokens", "2", "--repeats", "1"]
    assert per_sample.main([*argv, "--dtype", "bfloat16", "--json", str(out)]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| v512")]
    results = json.loads(out.read_text())
    assert [(r["adapters"], r["samples"], r["dtype"]) for r in results] == [
        (1, 2, "bfloat16"),
        (4, 4, "bfloat16"),
    ]
    assert len(rows) == 2 and all(value > 0 for r in results for value in r["seconds"].values())


def test_the_per_sample_defaults_are_one_eight_and_sixty_four_adapters(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    from ttbench import per_sample

    default, quick = per_sample.parse_args([]), per_sample.parse_args(["--quick"])
    assert (default.adapters, default.device, default.dtype) == ([1, 8, 64], "cpu", "float32")
    assert quick.adapters == [1, 8] and quick.shape.vocab == 32_000
    with pytest.raises(SystemExit):
        per_sample.parse_args(["--adapters", "0,8"])
