"""Smoke test of benchmarks/ttbench/per_sample.py (adapter_names= against base and groups) on a tiny shape."""

from __future__ import annotations

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
    assert '"mixed/base forward"' in out
    assert (err, [str(warning.message) for warning in caught]) == ("", [])  # the JSON and nothing else
