"""A conformance kit for adapter-method plugins: the checks every method should pass.

A plugin author gives two functions and a list of bad configs::

    def make_config(vocab):           # a config of the method, with a non-trivial
        return MyConfig(..., init_weights=False)   # init (the outputs must change)

    def fold(state, weight):          # the effective weight the adapter's state makes
        return ...                    # of ``weight``, written by hand with torch ops

and runs each check on each tiny model, e.g. with pytest::

    @pytest.mark.parametrize("family", testing.FAMILIES)
    @pytest.mark.parametrize("check", testing.CHECKS)
    def test_my_method_conforms(check, family):
        testing.run_check(check, family, make_config, fold, bad_configs=BAD_CONFIGS)

or all at once with :func:`check_method`. The method's plugin must be
registered (installed, or ``get_plugin_manager().register(plugin)``).

The checks (each named in :data:`CHECKS`):

``outputs``
    The adapter alone gives the outputs of the base model whose adapted weights
    are replaced by ``fold(state, weight)``, in inference and in trainer.
``stacks``
    The same stacked before and after a trainable-tokens adapter touching some
    of the same rows, outputs and gradients; skipped when the
    ``trainable_tokens`` method is not installed.
``gradients``
    Only the active adapter's parameters get gradients, equal to those of the
    hand-folded reference; base weights and inactive adapters get ``None``.
``forward_hooks``
    An output handed to a forward hook (on an adapted module, or on the base
    module inside it) is never changed after the hook ran, on every forward
    path: eval and training, with and without a gradient, alone and in
    stacks. Write in place only where ``output_writable(earlier)`` allows it.
``merge``
    ``merge_adapter`` writes ``fold`` into the weight, ``unmerge_adapter``
    puts it back, ``merge_and_unload`` gives a plain model keeping its ties,
    alone and in stacks: the outputs stay the same (atol 1e-5).
``save_load``
    ``save_pretrained`` then ``from_pretrained`` on a fresh base keeps the
    config, the stack and the outputs; the manifest names the method.
``hotswap``
    ``hotswap_adapter`` from a second adapter of the same config (its
    parameters moved off the first's) makes the adapter give that adapter's
    outputs, in inference and in training with the reference gradients, in
    the tensors it had (a compiled model keeps reading them); a merged
    adapter is refused with nothing changed.
``bad_configs``
    Each bad config is refused with ``ValueError`` or ``TypeError`` (when
    built or when added) and the model is left bit for bit as it was.
``per_call_work``
    Per training step and per inference call the adapter allocates no
    vocabulary x width tensor and no table over the vocabulary beyond what the
    frozen base model allocates by itself, and builds no index table
    (``full``, ``arange``, ``torch.tensor``) the base model does not.

``fold`` receives the :class:`~tt_core.AdapterState` of one adapted weight
(shared by an embedding and a head tied to it) and that weight as the
earlier adapters of the stack left it. It must be differentiable in the
state's parameters (no ``detach``, no in-place writes to them): the kit
compares gradients through it. It may build vocabulary-sized tensors; it is
a reference, not the forward.

The models are tiny transformers models built from configs (no download):
Llama with an untied and a tied head, BERT, whose tied MLM head has a bias,
and GPT-2, whose attention and MLP layers are transformers' ``Conv1D``.
Every check of one method on one model takes well under a second.
"""

from __future__ import annotations

import copy
import json
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
import transformers
from torch import nn
from torch.func import functional_call
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from tt_core.api.config import AdapterConfig
from tt_core.model import AdapterModel
from tt_core.plugins import get_plugin_manager
from tt_core.tensors.state import AdapterState
from tt_core.tensors.wrapper import AdapterLayer

__all__ = [
    "CHECKS",
    "FAMILIES",
    "LargeAllocations",
    "OpRecorder",
    "check_method",
    "effective_weights",
    "fold_by_rows",
    "run_check",
    "tiny_model",
]

ConfigFactory = Callable[[int], AdapterConfig]
Fold = Callable[[AdapterState, torch.Tensor], torch.Tensor]
BadConfig = AdapterConfig | Callable[[int], AdapterConfig]

#: The tiny models every check runs on. GPT-2's attention and MLP layers are transformers'
#: Conv1D, linear layers storing their weight transposed (in, out).
FAMILIES = ("llama", "llama_tied", "bert", "gpt2")
#: The checks, in the order :func:`check_method` runs them.
CHECKS = (
    "outputs",
    "stacks",
    "gradients",
    "forward_hooks",
    "merge",
    "save_load",
    "hotswap",
    "bad_configs",
    "per_call_work",
)

VOCAB, WIDTH = 128, 16
# per_call_work: big enough that tokens x vocabulary stays far below vocabulary x width
BIG_VOCAB, BIG_WIDTH = 1024, 64
BATCH, SEQ = 2, 8

NAME = "under_test"  # the adapter of the method under test
TOKENS = "tokens"  # the trainable-tokens adapter it is stacked with
ATOL = 1e-5

# Ops that build a tensor from host data or make a fresh index table.
TABLE_BUILDING = frozenset(
    {"aten.lift_fresh.default", "aten.full.default", "aten.arange.default", "aten.arange.start"}
)


# ----------------------------------------------------------------------- models
def tiny_model(family: str, vocab: int = VOCAB, width: int = WIDTH, seed: int = 0) -> nn.Module:
    """A randomly initialised tiny model of ``family`` (one of :data:`FAMILIES`), in eval mode."""
    torch.manual_seed(seed)
    model: nn.Module
    if family in ("llama", "llama_tied"):
        model = transformers.LlamaForCausalLM(
            transformers.LlamaConfig(
                vocab_size=vocab,
                hidden_size=width,
                intermediate_size=2 * width,
                num_hidden_layers=1,
                num_attention_heads=2,
                num_key_value_heads=2,
                tie_word_embeddings=family == "llama_tied",
                pad_token_id=None,
            )
        )
    elif family == "bert":
        model = transformers.BertForMaskedLM(
            transformers.BertConfig(
                vocab_size=vocab,
                hidden_size=width,
                intermediate_size=2 * width,
                num_hidden_layers=1,
                num_attention_heads=2,
                max_position_embeddings=64,
                pad_token_id=0,
            )
        )
        with torch.no_grad():  # a bias that is not zero, so a head rule that mishandles it shows
            model.cls.predictions.bias.normal_()
    elif family == "gpt2":
        model = transformers.GPT2LMHeadModel(
            transformers.GPT2Config(
                vocab_size=vocab,
                n_embd=width,
                n_layer=1,
                n_head=2,
                n_positions=64,
                bos_token_id=0,
                eos_token_id=0,
            )
        )
    else:
        raise ValueError(f"unknown family {family!r}; the kit has {list(FAMILIES)}")
    return model.eval()


def _inputs(vocab: int, ids: Sequence[int], seed: int = 1) -> dict[str, torch.Tensor]:
    """A batch of random ids (never 0 or 1: padding ids) holding each of ``ids``."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(2, vocab, (BATCH, SEQ), generator=generator)
    for position, token in enumerate(list(ids)[: BATCH * SEQ // 2]):
        input_ids.view(-1)[2 * position] = int(token)
    return {"input_ids": input_ids}


def _logits(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    out = model(**inputs)
    return out if isinstance(out, torch.Tensor) else out.logits


def _loss(logits: torch.Tensor, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    targets = inputs["input_ids"].roll(-1, dims=-1)
    return F.cross_entropy(logits.flatten(0, -2).float(), targets.flatten())


# -------------------------------------------------------------------- reference
def fold_by_rows(state: AdapterState, weight: torch.Tensor) -> torch.Tensor:
    """The fold of a row-replacing state through its own ``touched_rows`` and ``adapt_rows``."""
    rows = state.touched_rows()
    if rows is None:
        raise ValueError(f"{type(state).__name__} changes every row; give a fold written by hand")
    return weight.index_copy(0, rows, state.adapt_rows(rows, weight.index_select(0, rows)))


def _groups(adapter_model: AdapterModel) -> list[list[tuple[str, AdapterLayer]]]:
    """The wrapped modules of the model, grouped by the base weight they share."""
    groups: dict[int, list[tuple[str, AdapterLayer]]] = {}
    for name, module in adapter_model.model.named_modules():
        if isinstance(module, AdapterLayer):
            groups.setdefault(id(module.base_layer.weight), []).append((name, module))
    return list(groups.values())


def effective_weights(
    adapter_model: AdapterModel,
    reference: nn.Module,
    stack: Sequence[str],
    folds: dict[str, Fold],
) -> dict[str, torch.Tensor]:
    """``{weight name: fold_n(... fold_1(W))}`` for every weight the adapters of ``stack`` adapt.

    ``reference`` is an untouched copy of the base model: the base weights come
    from it, so the result does not depend on what is merged now.
    """
    weights: dict[str, torch.Tensor] = {}
    for group in _groups(adapter_model):
        weight = reference.get_parameter(f"{group[0][0]}.weight").detach()
        for adapter in stack:
            if adapter in group[0][1].adapters:
                state: AdapterState = group[0][1].adapters[adapter]  # type: ignore[assignment]
                weight = folds[adapter](state, weight)
        weights.update({f"{name}.weight": weight for name, _ in group})
    return weights


def _reference_logits(
    adapter_model: AdapterModel,
    reference: nn.Module,
    stack: Sequence[str],
    folds: dict[str, Fold],
    inputs: dict[str, torch.Tensor],
) -> torch.Tensor:
    weights = effective_weights(adapter_model, reference, stack, folds)
    out = functional_call(reference, weights, args=(), kwargs=inputs, tie_weights=False)
    return out if isinstance(out, torch.Tensor) else out.logits


# ---------------------------------------------------------------------- helpers
def _close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    torch.testing.assert_close(
        actual, expected, atol=ATOL, rtol=ATOL, msg=lambda message: f"{what}:\n{message}"
    )


def _state(adapter_model: AdapterModel, adapter: str) -> list[AdapterState]:
    """The states of one adapter, one per adapted weight."""
    states: list[AdapterState] = []
    for group in _groups(adapter_model):
        found = group[0][1].adapters[adapter] if adapter in group[0][1].adapters else None  # noqa: SIM401
        if isinstance(found, AdapterState):
            states.append(found)
    return states


def _parameters(adapter_model: AdapterModel, adapter: str) -> dict[str, nn.Parameter]:
    found: dict[str, nn.Parameter] = {}
    for index, state in enumerate(_state(adapter_model, adapter)):
        found.update({f"{adapter}[{index}].{key}": p for key, p in state.named_parameters()})
    return found


def _touched(adapter_model: AdapterModel, adapter: str) -> list[int]:
    ids: set[int] = set()
    for state in _state(adapter_model, adapter):
        rows = state.touched_rows()
        if rows is not None:
            ids.update(int(i) for i in rows.tolist())
    return sorted(ids)


def _tokens_config(vocab: int, touched: list[int]) -> AdapterConfig | None:
    """A random trainable-tokens config sharing two rows with the method's, if that method is installed."""
    method = get_plugin_manager().methods.get("trainable_tokens")
    if method is None:
        return None
    shared = [i for i in touched if i >= 2]  # never a padding id
    ids = sorted({*shared[:1], *shared[-1:], 2, 5, vocab - 2})
    return method.config_class(token_indices=ids, init_weights=False)  # type: ignore[call-arg]


def _skip(reason: str) -> None:
    try:
        import pytest
    except ImportError:  # outside pytest: a skipped check simply passes
        return
    pytest.skip(reason)


class _Case:
    """One tiny model with the method's adapter (and, if installed, a trainable-tokens one)."""

    def __init__(
        self, family: str, make_config: ConfigFactory, fold: Fold, vocab: int = VOCAB, width: int = WIDTH
    ) -> None:
        self.family = family
        model = tiny_model(family, vocab, width)
        self.reference = copy.deepcopy(model).requires_grad_(False)
        self.config = make_config(vocab)
        self.model = AdapterModel(model)
        self.model.add_adapter(NAME, self.config)
        touched = _touched(self.model, NAME)
        tokens = _tokens_config(vocab, touched)
        if tokens is not None:
            self.model.add_adapter(TOKENS, tokens)
        self.has_tokens = tokens is not None
        self.folds = {NAME: fold, TOKENS: fold_by_rows}
        self.inputs = _inputs(vocab, sorted({*touched, *_touched(self.model, TOKENS)}))
        self.model.set_adapter(NAME)

    def run(self) -> torch.Tensor:
        with torch.no_grad():
            return _logits(self.model, self.inputs)

    def expected(self, stack: Sequence[str]) -> torch.Tensor:
        with torch.no_grad():
            return _reference_logits(self.model, self.reference, stack, self.folds, self.inputs)

    def stacks(self) -> Iterator[list[str]]:
        yield [NAME]
        if self.has_tokens:
            yield [TOKENS, NAME]
            yield [NAME, TOKENS]

    def compare_training(self, stack: list[str], what: str) -> None:
        """Outputs and gradients of a training step on ``stack`` equal the reference's."""
        self.model.set_adapter(stack)
        self.model.zero_grad(set_to_none=True)
        out = _logits(self.model, self.inputs)
        _loss(out, self.inputs).backward()
        expected = _reference_logits(self.model, self.reference, stack, self.folds, self.inputs)
        _close(
            out.detach(), expected.detach(), f"{what}: training outputs differ from the hand-folded reference"
        )
        parameters = {k: p for adapter in stack for k, p in _parameters(self.model, adapter).items()}
        reference_grads = torch.autograd.grad(
            _loss(expected, self.inputs), list(parameters.values()), allow_unused=True
        )
        for (key, parameter), reference_grad in zip(parameters.items(), reference_grads, strict=True):
            if reference_grad is None:
                assert parameter.grad is None or not parameter.grad.any(), (
                    f"{what}: {key} gets a gradient, but none reaches it through fold(); is fold "
                    "differentiable in the state's parameters (no detach, no in-place writes)?"
                )
                continue
            assert parameter.grad is not None, f"{what}: {key} gets no gradient; the reference gives one"
            _close(
                parameter.grad, reference_grad, f"{what}: the gradient of {key} differs from the reference's"
            )
        self.model.zero_grad(set_to_none=True)


def _snapshot(module: nn.Module) -> dict[str, Any]:
    tensors: dict[str, torch.Tensor] = dict(module.named_parameters(remove_duplicate=False))
    tensors.update(module.named_buffers(remove_duplicate=False))
    return {
        "tensors": {name: (t.detach().clone(), t.requires_grad) for name, t in tensors.items()},
        "modules": [(name, type(m).__name__) for name, m in module.named_modules(remove_duplicate=False)],
    }


def _assert_same(before: dict[str, Any], after: dict[str, Any], what: str) -> None:
    assert before["modules"] == after["modules"], f"{what}: the model's modules changed"
    assert before["tensors"].keys() == after["tensors"].keys(), f"{what}: the model's tensors changed"
    for name, (tensor, requires_grad) in before["tensors"].items():
        other, other_requires_grad = after["tensors"][name]
        same = tensor.shape == other.shape and torch.equal(
            tensor.reshape(-1).view(torch.uint8), other.reshape(-1).view(torch.uint8)
        )
        assert same, f"{what}: {name} changed"
        assert requires_grad == other_requires_grad, f"{what}: {name}.requires_grad changed"


# ----------------------------------------------------------------------- checks
def check_outputs(family: str, make_config: ConfigFactory, fold: Fold) -> None:
    case = _Case(family, make_config, fold)
    with torch.no_grad():
        base = _logits(case.reference, case.inputs)
    out = case.run()
    assert (out - base).abs().max() > 1e-4, (
        f"{family}: the adapter leaves the outputs as the base model's, so the checks would prove "
        "nothing; make_config(vocab) must give a non-trivial init (e.g. init_weights=False)"
    )
    _close(out, case.expected([NAME]), f"{family}: the outputs differ from the hand-folded reference")
    case.compare_training([NAME], family)


def check_stacks(family: str, make_config: ConfigFactory, fold: Fold) -> None:
    case = _Case(family, make_config, fold)
    if not case.has_tokens:
        _skip("the trainable_tokens method is not installed")
        return
    for stack in list(case.stacks())[1:]:
        case.model.set_adapter(stack)
        what = f"{family}, stack {stack}"
        _close(case.run(), case.expected(stack), f"{what}: the outputs differ from the hand-folded reference")
        case.compare_training(stack, what)


def check_gradients(family: str, make_config: ConfigFactory, fold: Fold) -> None:
    case = _Case(family, make_config, fold)
    case.model.add_adapter("idle", make_config(VOCAB))
    adapters = case.model.adapters
    for active in (NAME, "idle"):
        case.model.set_adapter(active)
        case.model.zero_grad(set_to_none=True)
        _loss(_logits(case.model, case.inputs), case.inputs).backward()
        for adapter in adapters:
            for key, parameter in _parameters(case.model, adapter).items():
                if adapter == active:
                    assert parameter.requires_grad, f"{family}: {key} of the active adapter is frozen"
                    assert parameter.grad is not None, (
                        f"{family}: {key} of the active adapter got no gradient"
                    )
                else:
                    assert not parameter.requires_grad, (
                        f"{family}: {key} of inactive {adapter!r} is trainable"
                    )
                    assert parameter.grad is None, f"{family}: {key} of inactive {adapter!r} got a gradient"
        grads = [p.grad for p in _parameters(case.model, active).values() if p.grad is not None]
        assert any(bool(g.any()) for g in grads), f"{family}: every gradient of {active!r} is zero"
        for name, parameter in case.model.model.named_parameters():
            if ".adapters." in name:
                continue
            assert not parameter.requires_grad, f"{family}: base parameter {name} is trainable"
            assert parameter.grad is None, f"{family}: base parameter {name} got a gradient"


def check_forward_hooks(family: str, make_config: ConfigFactory, fold: Fold) -> None:
    case = _Case(family, make_config, fold)
    kept: list[tuple[str, torch.Tensor, torch.Tensor]] = []

    def keeper(name: str) -> Callable[..., None]:
        def keep(module: nn.Module, args: Any, output: Any) -> None:
            if isinstance(output, torch.Tensor):
                kept.append((name, output, output.detach().clone()))

        return keep

    handles = []
    for name, module in case.model.model.named_modules():
        if isinstance(module, AdapterLayer):
            handles.append(module.register_forward_hook(keeper(name)))
            handles.append(module.base_layer.register_forward_hook(keeper(f"{name}.base_layer")))
    try:
        for stack in case.stacks():
            case.model.set_adapter(stack)
            for training, grad in [(False, False), (True, False), (True, True)]:
                kept.clear()
                case.model.train(training)
                with torch.set_grad_enabled(grad):
                    _logits(case.model, case.inputs)
                assert kept, f"{family}: no forward hook ran"
                for name, output, clone in kept:
                    assert torch.equal(output.detach(), clone), (
                        f"{family}, stack {stack}, training={training}, grad={grad}: the output handed to "
                        f"{name}'s forward hook changed after the hook ran; write in place only where "
                        "tt_core.tensors.state.output_writable(earlier) says nothing else holds the tensor"
                    )
    finally:
        for handle in handles:
            handle.remove()
        case.model.eval()


def check_merge(family: str, make_config: ConfigFactory, fold: Fold) -> None:
    case = _Case(family, make_config, fold)
    model = case.model
    groups = _groups(model)
    base = {
        name: model.model.get_parameter(f"{name}.weight").detach().clone() for g in groups for name, _ in g
    }
    for stack in case.stacks():
        what = f"{family}, stack {stack}"
        model.set_adapter(stack)
        stacked = case.run()
        model.merge_adapter()
        assert model.merged_adapters == stack, f"{what}: merged_adapters is {model.merged_adapters}"
        _close(case.run(), stacked, f"{what}: merging changed the outputs")
        expected = effective_weights(model, case.reference, stack, case.folds)
        for key, weight in expected.items():
            _close(
                model.model.get_parameter(key).detach(),
                weight.detach(),
                f"{what}: merged {key} is not fold(W)",
            )
        model.unmerge_adapter()
        _close(case.run(), stacked, f"{what}: unmerging changed the outputs")
        for name, weight in base.items():
            _close(
                model.model.get_parameter(f"{name}.weight").detach(), weight, f"{what}: unmerge left {name}"
            )
    tied = [[name for name, _ in group] for group in groups if len(group) > 1]
    model.set_adapter(NAME)
    merged_outputs = case.run()
    plain = model.merge_and_unload()
    leftovers = [name for name, m in plain.named_modules() if isinstance(m, (AdapterLayer, AdapterState))]
    assert not leftovers, f"{family}: merge_and_unload left adapter modules at {leftovers}"
    for names in tied:
        weights = {id(plain.get_submodule(name).weight) for name in names}
        assert len(weights) == 1, f"{family}: merge_and_unload untied {names}"
    with torch.no_grad():
        _close(_logits(plain, case.inputs), merged_outputs, f"{family}: merge_and_unload changed the outputs")


def check_save_load(family: str, make_config: ConfigFactory, fold: Fold) -> None:
    case = _Case(family, make_config, fold)
    stack = list(case.stacks())[-1]
    case.model.set_adapter(stack)
    stacked = case.run()
    method = get_plugin_manager().method_for(case.config)
    with tempfile.TemporaryDirectory() as folder:
        case.model.save_pretrained(folder)
        with open(f"{folder}/manifest.json") as file:
            entry = json.load(file)["adapters"][NAME]
        assert entry["method"] == case.config.method, (
            f"{family}: the manifest says method {entry['method']!r}"
        )
        assert entry["plugin"] == method.plugin, f"{family}: the manifest says plugin {entry['plugin']!r}"
        assert entry.get("distribution") == method.distribution, (
            f"{family}: the manifest says distribution {entry.get('distribution')!r}, "
            f"not {method.distribution!r}"
        )
        loaded = AdapterModel.from_pretrained(tiny_model(family), folder)
    assert loaded.active_adapters == stack, f"{family}: loaded stack {loaded.active_adapters}, saved {stack}"
    config = loaded.adapter_configs[NAME]
    assert type(config) is type(case.config), f"{family}: loaded a {type(config).__name__}"
    assert config.to_dict() == case.config.to_dict(), f"{family}: the config changed: {config.to_dict()}"
    with torch.no_grad():
        _close(_logits(loaded, case.inputs), stacked, f"{family}: the loaded adapters give other outputs")


def check_hotswap(family: str, make_config: ConfigFactory, fold: Fold) -> None:
    case = _Case(family, make_config, fold)
    model = case.model
    source = "hotswap_source"
    model.add_adapter(source, make_config(VOCAB))
    with torch.no_grad():  # other values than the adapter under test, whatever the config's init
        for parameter in _parameters(model, source).values():
            if parameter.is_floating_point():
                parameter.add_(torch.randn_like(parameter) * 0.1 * (parameter.abs().mean() + 0.1))
    model.set_adapter(source)
    expected = case.run()
    model.set_adapter(NAME)
    before = case.run()
    assert not torch.allclose(before, expected, atol=ATOL, rtol=ATOL), (
        f"{family}: the adapter and its hot-swap source give the same outputs; the check cannot tell"
    )
    tensors = {
        f"[{index}].{key}": tensor
        for index, state in enumerate(_state(model, NAME))
        for key, tensor in [*state.named_parameters(), *state.named_buffers()]
    }
    model.merge_adapter()
    merged = _snapshot(model)
    try:
        model.hotswap_adapter(NAME, source)
    except ValueError:
        pass
    else:
        raise AssertionError(f"{family}: hotswap_adapter into a merged adapter must raise ValueError")
    _assert_same(merged, _snapshot(model), f"{family}: a refused hot-swap into a merged adapter")
    model.unmerge_adapter()
    model.hotswap_adapter(NAME, source)
    _close(case.run(), expected, f"{family}: after hotswap_adapter the outputs are not the source's")
    _close(case.run(), case.expected([NAME]), f"{family}: after hotswap_adapter the outputs are not fold's")
    after = {
        f"[{index}].{key}": tensor
        for index, state in enumerate(_state(model, NAME))
        for key, tensor in [*state.named_parameters(), *state.named_buffers()]
    }
    replaced = sorted(key for key in tensors if after.get(key) is not tensors[key])
    assert not replaced, (
        f"{family}: hotswap_adapter replaced the tensors {replaced}; copy into them (a compiled model "
        "keeps reading the old ones)"
    )
    case.compare_training([NAME], f"{family}, after hotswap_adapter")


def check_bad_configs(
    family: str, make_config: ConfigFactory, fold: Fold, bad_configs: Sequence[BadConfig]
) -> None:
    assert bad_configs, (
        "give bad_configs: configs (or functions of the vocabulary size returning one) the method "
        "must refuse, e.g. a token id out of range"
    )
    case = _Case(family, make_config, fold)
    model = case.model
    outputs = case.run()
    for index, bad in enumerate(bad_configs):
        what = f"{family}, bad config #{index}"
        try:
            config = bad(VOCAB) if callable(bad) else bad
        except (ValueError, TypeError):
            continue  # refused when built
        before, adapters, active = _snapshot(model), model.adapters, model.active_adapters
        try:
            model.add_adapter("bad", config)
        except (ValueError, TypeError):
            pass
        else:
            raise AssertionError(f"{what}: {config!r} was accepted; add_adapter must raise ValueError")
        _assert_same(before, _snapshot(model), what)
        assert (model.adapters, model.active_adapters) == (adapters, active), f"{what}: the adapters changed"
        _close(case.run(), outputs, f"{what}: the outputs changed")


class OpRecorder(TorchDispatchMode):
    """Records the name of every aten op run inside it (``ops``), and with it the element count
    of the op's first argument when that is a tensor, else -1 (``calls``): an in-place op's
    count is the size of the tensor it writes."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []
        self.calls: list[tuple[str, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        first = args[0] if args and isinstance(args[0], torch.Tensor) else None
        self.ops.append(str(func))
        self.calls.append((str(func), -1 if first is None else first.numel()))
        return func(*args, **(kwargs or {}))


class LargeAllocations(TorchDispatchMode):
    """Counts (op, shape) of every freshly allocated op output at least ``threshold`` elements big.

    With ``vocab``, also of every fresh 1-D tensor ``vocab`` long (a table
    over the vocabulary). A view or an in-place result is not fresh: it
    shares storage with an input. ``ops`` are the names of the ops seen.
    """

    def __init__(self, threshold: int, vocab: int | None = None) -> None:
        super().__init__()
        self.threshold = threshold
        self.vocab = vocab
        self.found: Counter[tuple[str, tuple[int, ...]]] = Counter()
        self.ops: set[str] = set()

    def _large(self, tensor: torch.Tensor) -> bool:
        if tensor.numel() >= self.threshold:
            return True
        return self.vocab is not None and tensor.dim() == 1 and tensor.shape[0] == self.vocab

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops.add(str(func))
        inputs = {
            t.untyped_storage().data_ptr()
            for t in tree_flatten((args, kwargs))[0]
            if isinstance(t, torch.Tensor)
        }
        for tensor in tree_flatten(out)[0]:
            if (
                isinstance(tensor, torch.Tensor)
                and self._large(tensor)
                and tensor.untyped_storage().data_ptr() not in inputs
            ):
                self.found[(str(func), tuple(tensor.shape))] += 1
        return out


def _per_call(
    model: nn.Module, trainable: list[nn.Parameter], inputs: dict[str, torch.Tensor], vocab: int, width: int
) -> dict[str, LargeAllocations]:
    """What one training step and one inference call allocate and run, each after a warm-up."""
    optimizer = torch.optim.AdamW(trainable, lr=1e-3)

    def step() -> None:
        _loss(_logits(model, inputs), inputs).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def infer() -> None:
        with torch.no_grad():
            _logits(model, inputs)

    model.train()
    step()  # gradients and optimizer state are created once, not per step
    with LargeAllocations(vocab * width, vocab) as training:
        step()
    model.eval()
    infer()
    with LargeAllocations(vocab * width, vocab) as inference:
        infer()
    return {"per training step": training, "per inference call": inference}


def check_per_call_work(family: str, make_config: ConfigFactory, fold: Fold) -> None:
    vocab, width = BIG_VOCAB, BIG_WIDTH
    adapter_model = AdapterModel(tiny_model(family, vocab, width))
    adapter_model.add_adapter(NAME, make_config(vocab))
    adapter_model.set_adapter(NAME)
    inputs = _inputs(vocab, _touched(adapter_model, NAME))
    trainable = [p for p in adapter_model.parameters() if p.requires_grad]
    found = _per_call(adapter_model, trainable, inputs, vocab, width)
    # The floor: the frozen base model training one zero bias on the embedding output.
    floor_model = tiny_model(family, vocab, width).requires_grad_(False)
    bias = nn.Parameter(torch.zeros(width))
    floor_model.get_input_embeddings().register_forward_hook(  # type: ignore[operator]
        lambda _module, _args, output: output + bias
    )
    floor = _per_call(floor_model, [bias], inputs, vocab, width)
    for when, seen in found.items():
        extra = seen.found - floor[when].found
        assert not extra, (
            f"{family}: {when} the adapter allocates vocabulary-sized tensors the base model does not "
            f"(op, shape): {dict(extra)}; work on the looked-up ids or on the columns the adapter changes"
        )
        tables = (seen.ops & TABLE_BUILDING) - floor[when].ops
        assert not tables, (
            f"{family}: {when} the adapter builds tensors from Python data or index tables "
            f"{sorted(tables)}; build them once, when the layer is created"
        )


_CHECKS: dict[str, Callable[..., None]] = {
    "outputs": check_outputs,
    "stacks": check_stacks,
    "gradients": check_gradients,
    "forward_hooks": check_forward_hooks,
    "merge": check_merge,
    "save_load": check_save_load,
    "hotswap": check_hotswap,
    "per_call_work": check_per_call_work,
}


def run_check(
    check: str,
    family: str,
    make_config: ConfigFactory,
    fold: Fold,
    bad_configs: Sequence[BadConfig] = (),
) -> None:
    """Run one of :data:`CHECKS` on one of :data:`FAMILIES`; an ``AssertionError`` says what failed."""
    if check == "bad_configs":
        check_bad_configs(family, make_config, fold, bad_configs)
    elif check in _CHECKS:
        _CHECKS[check](family, make_config, fold)
    else:
        raise ValueError(f"unknown check {check!r}; the kit has {list(CHECKS)}")


def check_method(
    make_config: ConfigFactory,
    fold: Fold,
    bad_configs: Sequence[BadConfig] = (),
    families: Sequence[str] = FAMILIES,
    checks: Sequence[str] = CHECKS,
) -> None:
    """Run every check on every family; the first failure raises ``AssertionError``."""
    for family in families:
        for check in checks:
            run_check(check, family, make_config, fold, bad_configs)
