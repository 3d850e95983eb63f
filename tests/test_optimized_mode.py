"""Invariants hold under ``python -O``, which strips ``assert``: each is an explicit error.

The cases run in one subprocess started with ``-O``; each prints what it
raised, and the test checks the class and the message.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]

CASES = r"""
import json
import torch
from torch import nn

from tt_core.tensors.folded import FoldedStack
from tt_plugins.trainable_tokens import TrainableTokensConfig, TrainableTokensLayer
from tt_plugins.trainable_tokens import plugin, tokens

assert False, "asserts must be stripped here"  # noqa: B011 (python -O drops this line)


def outcome(call):
    try:
        call()
    except Exception as error:
        return [type(error).__name__, [c.__name__ for c in type(error).__mro__], str(error)]
    return None


results = {}
weight = torch.randn(8, 4)
before = weight.clone()
state = TrainableTokensLayer(weight, [1, 2], init_weights=False)
results["unmerge_without_merge"] = outcome(lambda: state.unmerge_from(weight))
results["unmerge_left_the_weight"] = bool(torch.equal(weight, before))

tied = nn.Module()
tied.embed = nn.Embedding(8, 4)
tied.head = nn.Linear(4, 8, bias=False)
tied.head.weight = tied.embed.weight
config = TrainableTokensConfig(token_indices={"embed": [1, 2]})
results["tie_handler_without_ids"] = outcome(
    lambda: plugin.tie_handler(model=tied, config=config, target_name="head", base_layer=tied.head)
)

head = nn.Linear(4, 8, bias=False)
rows = TrainableTokensLayer(head.weight, [1], init_weights=False)
rows_only = FoldedStack((), head, [rows], [], torch.float32)
results["fused_head_without_low_rank"] = outcome(
    lambda: rows_only.project_fused(torch.randn(2, 4), head.weight, None)
)

no_weight = nn.Module()
no_weight.weight = None
results["token_weight_not_a_tensor"] = outcome(lambda: tokens._weight(no_weight))
print(json.dumps(results))
"""


def _run_optimized() -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [sys.executable, "-O", "-c", CASES], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_invariants_are_explicit_errors_under_python_O():
    results = _run_optimized()
    name, bases, message = results["unmerge_without_merge"]
    assert name == "AdapterStateError" and "TTError" in bases
    assert "not merged" in message and "merge_into" in message
    assert results["unmerge_left_the_weight"]

    name, bases, message = results["tie_handler_without_ids"]
    assert name == "ConfigError" and "TTError" in bases
    assert "head" in message and "token_indices" in message

    name, bases, message = results["fused_head_without_low_rank"]
    assert name == "AdapterStateError" and "low-rank" in message

    name, bases, message = results["token_weight_not_a_tensor"]
    assert name == "ArgumentTypeError" and "weight" in message
