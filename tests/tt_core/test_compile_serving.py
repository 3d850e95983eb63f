"""Compiled inference: the adapter tables let a compiled model switch adapters without recompiling.

After ``prepare_for_compile()`` a compiled model in eval mode applies the
active stack (and per-sample stacks given by ``adapter_entries``) from each
layer's adapter bank; switching, loading one more adapter within capacity and
new per-sample assignments only write into tensors the graph already reads.
Recompiles are counted with dynamo's ``CompileCounter`` backend (no code
generation); inductor compiles one tiny model.
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from functorch.compile import make_boxed_func
from host_reads import host_reads
from models import build, llama
from numerics import assert_same_math
from torch._dynamo.backends.common import aot_autograd
from torch._dynamo.testing import CompileCounter

from tt_core import AdapterModel
from tt_core.api.errors import AdapterStateError
from tt_plugins.lora_embedding import LoraEmbeddingConfig
from tt_plugins.lora_linear import LoraLinearConfig
from tt_plugins.trainable_tokens import TrainableTokensConfig

VOCAB = 200
HOT = [3, 9, 40, 41, 77]  # ids the trainable-tokens adapters below replace


def _model(tied: bool = True, width: int = 16) -> AdapterModel:
    torch.manual_seed(0)
    adapter_model = AdapterModel(llama(tied, vocab=VOCAB, width=width, intermediate=2 * width))
    adapter_model.add_adapter("t1", TrainableTokensConfig(token_indices=[3, 9, 40], init_weights=False))
    adapter_model.add_adapter("t2", TrainableTokensConfig(token_indices=[9, 41], init_weights=False))
    adapter_model.add_adapter("l1", LoraEmbeddingConfig(r=2, init_weights=False))
    adapter_model.add_adapter(
        "q", LoraLinearConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    adapter_model.set_adapter("t1")
    return adapter_model.eval()


def _inputs(samples: int = 2, vocab: int = VOCAB) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, vocab, (samples, 8), generator=generator)
    for sample in range(samples):
        input_ids[sample, 1:6] = torch.tensor(HOT).roll(sample)
    return input_ids


def _eager(adapter_model: AdapterModel, input_ids: torch.Tensor, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return adapter_model(input_ids=input_ids, **kwargs).logits


def _counted(adapter_model: AdapterModel):
    """``adapter_model`` compiled whole from a fresh dynamo cache, and the counter of its graphs."""
    torch._dynamo.reset()
    counter = CompileCounter()
    return torch.compile(adapter_model, backend=counter, fullgraph=True), counter


def _compiled(compiled, input_ids: torch.Tensor, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return compiled(input_ids=input_ids, **kwargs).logits


STACKS = ["t2", ["t1", "l1", "t2"], "l1", ["l1", "q", "t1"], "q", []]


def test_switching_stacks_and_loading_an_adapter_within_capacity_do_not_recompile(tmp_path):
    adapter_model = _model()
    adapter_model.prepare_for_compile(max_stack=3, max_rows=4, max_rank=4, max_adapters=6)
    input_ids = _inputs()
    compiled, counter = _counted(adapter_model)
    assert_same_math(_compiled(compiled, input_ids), _eager(adapter_model, input_ids))
    assert counter.frame_count == 1
    for stack in STACKS:
        adapter_model.set_adapter(stack) if stack else adapter_model.set_adapter([])
        assert_same_math(_compiled(compiled, input_ids), _eager(adapter_model, input_ids))
    # One more adapter, saved elsewhere and loaded within the capacities; then a deletion.
    source = _model()
    source.add_adapter("t3", TrainableTokensConfig(token_indices=[41, 77, 150, 151], init_weights=False))
    source.add_adapter("l2", LoraEmbeddingConfig(r=4, init_weights=False))
    source.save_pretrained(tmp_path, selected_adapters=["t3", "l2"])
    adapter_model.load_adapter(tmp_path / "t3", "t3")
    adapter_model.load_adapter(tmp_path / "l2", "l2")
    for stack in (["t3"], ["l2", "t3", "t1"], ["t1", "l2"]):
        adapter_model.set_adapter(stack)
        assert_same_math(_compiled(compiled, input_ids), _eager(adapter_model, input_ids))
    adapter_model.delete_adapter("t2")
    assert_same_math(_compiled(compiled, input_ids), _eager(adapter_model, input_ids))
    with adapter_model.disable_adapter():
        assert_same_math(_compiled(compiled, input_ids), _eager(adapter_model, input_ids))
    adapter_model.merge_adapter(["t1"])  # a prefix of ["t1", "l2"]: in the weight, out of the tables
    assert_same_math(_compiled(compiled, input_ids), _eager(adapter_model, input_ids))
    adapter_model.unmerge_adapter()
    assert_same_math(_compiled(compiled, input_ids), _eager(adapter_model, input_ids))
    assert counter.frame_count == 1


def test_deleting_every_adapter_of_a_kind_does_not_recompile():
    adapter_model = _model()
    adapter_model.set_adapter(["t1", "l1"])
    adapter_model.prepare_for_compile()
    input_ids = _inputs()
    compiled, counter = _counted(adapter_model)
    _compiled(compiled, input_ids)
    for name in ("t1", "t2"):  # no row-replacing adapter left: their tables stay, empty
        adapter_model.delete_adapter(name)
        assert_same_math(_compiled(compiled, input_ids), _eager(adapter_model, input_ids))
    adapter_model.set_adapter(["q", "l1"])
    assert_same_math(_compiled(compiled, input_ids), _eager(adapter_model, input_ids))
    assert counter.frame_count == 1


def test_new_per_sample_assignments_do_not_recompile():
    adapter_model = _model()
    adapter_model.prepare_for_compile(max_stack=3)
    input_ids = _inputs(4)
    compiled, counter = _counted(adapter_model)
    assignments = [
        ["t1", "l1", "__base__", ["t1", "l1", "t2"]],
        [["q", "t2"], "t2", "t1", "l1"],
        ["__base__", "__base__", ["l1", "t1"], "q"],
    ]
    for names in assignments:
        entries = adapter_model.adapter_entries(names)
        got = _compiled(compiled, input_ids, adapter_names=entries)
        assert_same_math(got, _eager(adapter_model, input_ids, adapter_names=names))
        for sample, entry in enumerate(names):  # and each sample as if run alone
            adapter_model.set_adapter([] if entry == "__base__" else entry)
            assert_same_math(got[sample], _eager(adapter_model, input_ids[sample : sample + 1])[0])
    assert counter.frame_count == 1


def test_weights_changed_by_hand_reach_the_compiled_model_after_refresh_adapter_tables():
    adapter_model = _model()
    adapter_model.set_adapter(["t1", "l1"])
    adapter_model.prepare_for_compile()
    input_ids = _inputs()
    compiled, counter = _counted(adapter_model)
    before = _compiled(compiled, input_ids)
    state = adapter_model.model.model.embed_tokens.adapters["t1"]
    state.trainable_tokens_rows.data.mul_(3)  # through .data: nothing can notice it
    assert torch.equal(_compiled(compiled, input_ids), before)  # the tables are a snapshot
    adapter_model.refresh_adapter_tables()
    after = _compiled(compiled, input_ids)
    assert not torch.equal(after, before)
    assert_same_math(after, _eager(adapter_model, input_ids))
    # A checkpoint loaded into the adapters (Trainer's resume) refreshes the tables itself.
    checkpoint = {
        key: value * 2 if key.endswith(("_rows", "_A")) else value
        for key, value in adapter_model.state_dict().items()
    }
    adapter_model.load_state_dict(checkpoint)
    resumed = _compiled(compiled, input_ids)
    assert not torch.equal(resumed, after)
    assert_same_math(resumed, _eager(adapter_model, input_ids))
    assert counter.frame_count == 1


def test_going_beyond_a_capacity_rebuilds_the_tables_with_a_warning_naming_it():
    adapter_model = _model()
    adapter_model.prepare_for_compile()
    with pytest.warns(UserWarning, match=r"rows \(10 > 3\).*prepare_for_compile"):
        adapter_model.add_adapter("wide", TrainableTokensConfig(token_indices=list(range(100, 110))))
    adapter_model.set_adapter("wide")
    input_ids = _inputs()
    torch._dynamo.reset()
    compiled = torch.compile(adapter_model, backend=CompileCounter(), fullgraph=True)
    assert_same_math(_compiled(compiled, input_ids), _eager(adapter_model, input_ids))


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"max_rows": 2}, ValueError, r"max_rows=2\).*needs 3.*max_rows=3 or more"),
        ({"max_rank": 1}, ValueError, r"max_rank=1\).*max_rank=2 or more"),
        ({"max_adapters": 2}, ValueError, r"has 4 adapters.*max_adapters=4 or more"),
        ({"max_stack": 0}, ValueError, "at least 1"),
        ({"max_rows": "8"}, TypeError, "positive int"),
    ],
)
def test_capacities_too_small_are_refused_and_change_nothing(options, error, match):
    adapter_model = _model()
    with pytest.raises(error, match=match):
        adapter_model.prepare_for_compile(**options)
    assert all(getattr(module, "bank", None) is None for module in adapter_model.modules())


def test_a_compiled_per_sample_call_without_prepared_tables_is_refused():
    adapter_model = _model()
    entries = adapter_model.adapter_entries(["t1", "l1"])
    torch._dynamo.reset()
    compiled = torch.compile(adapter_model, backend=CompileCounter(), fullgraph=True)
    with pytest.raises(Exception, match="prepare_for_compile"):
        _compiled(compiled, _inputs(), adapter_names=entries)


def test_bad_entries_are_refused():
    adapter_model = _model()
    with pytest.raises(TypeError, match="adapter_entries"):
        _eager(adapter_model, _inputs(), adapter_names=torch.zeros(2, 1))
    with pytest.raises(ValueError, match="3 rows for a batch of 2"):
        _eager(adapter_model, _inputs(), adapter_names=torch.zeros(3, 1, dtype=torch.long))


# ------------------------------------------------------- no host reads in the graph
def test_the_compiled_bank_path_reads_no_device_value_on_the_host():
    adapter_model = _model()
    adapter_model.set_adapter(["t1", "l1", "t2"])
    adapter_model.prepare_for_compile()
    graphs: list[list[str]] = []

    def record(graph, example_inputs):
        graphs.append([str(node.target) for node in graph.graph.nodes if node.op == "call_function"])
        return make_boxed_func(graph.forward)

    torch._dynamo.reset()
    compiled = torch.compile(adapter_model, backend=aot_autograd(fw_compiler=record), fullgraph=True)
    input_ids = _inputs()
    assert_same_math(_compiled(compiled, input_ids), _eager(adapter_model, input_ids))
    entries = adapter_model.adapter_entries(["t2", ["l1", "t1"]])
    _compiled(compiled, input_ids, adapter_names=entries)
    assert len(graphs) == 2
    ops = [op for graph in graphs for op in graph]
    assert any("searchsorted" in op for op in ops)  # the bank's row look-up is in the graphs
    assert host_reads(ops) == []


# ------------------------------------------------------------------- inductor
def test_inductor_compiles_the_bank_paths_with_outputs_equal_to_eager():
    # The smallest model with an adapted embedding and a tied head with a bias: inductor's C++
    # compiles cost seconds per kernel on two cores.
    adapter_model = AdapterModel(build("custom"))
    adapter_model.add_adapter("t1", TrainableTokensConfig(token_indices=[3, 9, 40], init_weights=False))
    adapter_model.add_adapter("t2", TrainableTokensConfig(token_indices=[9, 41], init_weights=False))
    adapter_model.add_adapter("l1", LoraEmbeddingConfig(r=2, init_weights=False))
    adapter_model.set_adapter(["t1", "l1", "t2"])
    adapter_model.eval().prepare_for_compile()
    input_ids = _inputs(vocab=128)
    torch._dynamo.reset()
    compiled = torch.compile(adapter_model, fullgraph=True)
    with torch.no_grad():
        assert_same_math(compiled(input_ids), adapter_model(input_ids))
        adapter_model.set_adapter(["l1", "t2"])
        assert_same_math(compiled(input_ids), adapter_model(input_ids))
        names = [["t2", "l1", "t1"], "__base__"]
        got = compiled(input_ids, adapter_names=adapter_model.adapter_entries(names))
        assert_same_math(got, adapter_model(input_ids, adapter_names=names))


def test_eager_calls_of_a_prepared_model_are_unchanged_and_refuse_nothing_new():
    adapter_model = _model()
    input_ids = _inputs()
    expected = {}
    for stack in STACKS:
        adapter_model.set_adapter(stack)
        expected[str(stack)] = _eager(adapter_model, input_ids)
    adapter_model.prepare_for_compile(max_stack=3)
    for stack in STACKS:
        adapter_model.set_adapter(stack)
        assert torch.equal(_eager(adapter_model, input_ids), expected[str(stack)])
    with pytest.raises(AdapterStateError, match="training"):
        adapter_model.train()
        _eager(adapter_model, input_ids, adapter_names=adapter_model.adapter_entries(["t1", "t2"]))
