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
subprocess per setup, ``--setups`` picks the setups compared with the floor.
``--device cuda --dtype bfloat16`` runs every setup on a GPU in bf16 (timing
synchronised, memory from ``torch.cuda.max_memory_allocated``);
``benchmarks/gpu_run.sh OUT_DIR`` runs every GPU measurement of the package.
docs/performance.md explains the choices and the results.

A shape reads ``v<vocab>-d<width>-<tied|untied>-k<rows>[-b<batch>x<seq>]``;
``32k``, ``128k`` and ``256k`` mean the vocabularies of Llama 2 (32,000),
Llama 3 (128,256) and Gemma (256,000); other sizes are given as integers.

The code is the package ``benchmarks/ttbench`` (shapes, setups, measure,
report, cli); this file is its entry point. A new setup is one function in
``ttbench/setups.py`` registered with ``register_setup``.
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = str(Path(__file__).resolve().parent)
if HERE not in sys.path:
    sys.path.insert(0, HERE)

from ttbench.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
