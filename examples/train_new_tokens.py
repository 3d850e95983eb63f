"""Teach a causal LM new chat-marker tokens, training only their rows with ``transformers.Trainer``.

The same script, unchanged, under each launcher (docs/distributed.md)::

    python examples/train_new_tokens.py --tiny --output-dir out
    torchrun --nproc_per_node 2 examples/train_new_tokens.py --tiny --output-dir out
    accelerate launch --config_file ddp.yaml examples/train_new_tokens.py --tiny --output-dir out

``--tiny`` builds a small Llama from a config and a word-level tokenizer
(offline, seconds on a CPU); ``--model PATH`` loads a real causal LM and its
tokenizer from a folder (or, online, a hub name). The markers are added to the
tokenizer, the embeddings resized, and only the markers' rows train (with a
tied head, its columns too, through the same rows). ``--batch-size`` is the
global batch: it is split over the processes, so every launch takes the same
steps on the same examples and ends with the same rows.

Trainer checkpoints every ``--save-steps`` (its default strategy); each
checkpoint holds the rows, not the model, and ``--resume`` continues from the
last one exactly. At the end the adapter is saved (``OUTPUT/adapter``, what
``AdapterModel.from_pretrained`` loads; Trainer's ``save_model`` folder,
``OUTPUT``, loads too) and, with ``--publish NAME``, published to a registry.
"""

from __future__ import annotations

import argparse
import json
import os
import random
from pathlib import Path

import torch
import transformers

from tt_core import Registry, get_adapter_model
from tt_plugins.trainable_tokens import TrainableTokensConfig

MARKERS = ["<|user|>", "<|assistant|>", "<|end|>"]
QUESTION_WORDS = ["what", "is", "the", "weather", "time", "news", "today", "please", "tell", "me"]
ANSWER_WORDS = ["it", "is", "sunny", "late", "quiet", "here", "you", "go", "sure", "thanks"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--tiny", action="store_true", help="a small Llama built from a config (offline)")
    source.add_argument("--model", help="a causal LM folder (or hub name) with its tokenizer")
    parser.add_argument("--output-dir", required=True, type=Path)
    parser.add_argument("--tied", action="store_true", help="--tiny: tie the LM head to the embedding")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=8, help="global: split over the processes")
    parser.add_argument("--learning-rate", type=float, default=0.05)
    parser.add_argument("--save-steps", type=int, default=6, help="a checkpoint every this many steps")
    parser.add_argument("--examples", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    parser.add_argument("--publish", metavar="NAME", help="publish the adapter to the registry as NAME")
    parser.add_argument("--registry", type=Path, help="registry folder (default: the user's)")
    return parser.parse_args(argv)


def tiny_model(tied: bool) -> tuple[transformers.PreTrainedTokenizerBase, transformers.PreTrainedModel]:
    """A word-level tokenizer and a one-layer Llama over its words, both built here."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<pad>", "<unk>", "<s>", "</s>", *sorted(set(QUESTION_WORDS + ANSWER_WORDS))]
    words += [f"w{i}" for i in range(64 - len(words))]
    backend = Tokenizer(models.WordLevel({word: i for i, word in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    config = transformers.LlamaConfig(
        vocab_size=len(words),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        tie_word_embeddings=tied,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
    )
    return tokenizer, transformers.LlamaForCausalLM(config)


def pretrained_model(name: str) -> tuple[transformers.PreTrainedTokenizerBase, transformers.PreTrainedModel]:
    tokenizer = transformers.AutoTokenizer.from_pretrained(name)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer, transformers.AutoModelForCausalLM.from_pretrained(name)


class Chats(torch.utils.data.Dataset):
    """Short chats framed by the markers; padding is left out of the loss."""

    def __init__(self, tokenizer: transformers.PreTrainedTokenizerBase, count: int, seed: int) -> None:
        pick = random.Random(seed)
        texts = [
            f"<|user|> {' '.join(pick.choices(QUESTION_WORDS, k=3))} <|end|> "
            f"<|assistant|> {' '.join(pick.choices(ANSWER_WORDS, k=3))} <|end|>"
            for _ in range(count)
        ]
        encoded = tokenizer(texts, padding="longest", return_tensors="pt")
        self.input_ids = encoded["input_ids"]
        self.attention_mask = encoded["attention_mask"]

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        labels = self.input_ids[i].masked_fill(self.attention_mask[i] == 0, -100)
        return {"input_ids": self.input_ids[i], "attention_mask": self.attention_mask[i], "labels": labels}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))  # set by torchrun and accelerate launch
    if args.batch_size % world_size:
        raise SystemExit(f"--batch-size {args.batch_size} does not split over {world_size} processes")
    transformers.set_seed(args.seed)

    tokenizer, model = tiny_model(args.tied) if args.tiny else pretrained_model(args.model)
    tokenizer.add_tokens(MARKERS, special_tokens=True)
    model.resize_token_embeddings(len(tokenizer))
    marker_ids = tokenizer.convert_tokens_to_ids(MARKERS)
    adapter_model = get_adapter_model(model, TrainableTokensConfig(token_indices=marker_ids))

    training_args = transformers.TrainingArguments(
        output_dir=str(args.output_dir),
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size // world_size,
        learning_rate=args.learning_rate,
        save_steps=args.save_steps,  # save_strategy stays Trainer's default, "steps"
        save_total_limit=2,
        logging_steps=max(1, args.steps // 4),
        seed=args.seed,
        use_cpu=not torch.cuda.is_available(),
        ddp_find_unused_parameters=False,  # every adapter parameter takes part in every step
        report_to=[],
        disable_tqdm=True,
    )
    trainer = transformers.Trainer(
        model=adapter_model,
        args=training_args,
        train_dataset=Chats(tokenizer, args.examples, args.seed),
        processing_class=tokenizer,
    )
    if trainer.is_world_process_zero():
        adapter_model.print_trainable_parameters()
    result = trainer.train(resume_from_checkpoint=True if args.resume else None)

    # Trainer's own folder (rows and tokenizer) and the adapter folder: both load with from_pretrained.
    trainer.save_model()
    adapter_folder = args.output_dir / "adapter"
    adapter_model.save_pretrained(adapter_folder, is_main_process=trainer.is_world_process_zero())
    if trainer.is_world_process_zero():
        summary = {
            "world_size": world_size,
            "distributed": str(trainer.accelerator.distributed_type),
            "wrapped_in": type(trainer.model_wrapped).__name__,
            "train_loss": result.training_loss,
            "marker_ids": marker_ids,
            "adapter": str(adapter_folder),
        }
        if args.publish:
            version = Registry(args.registry).publish(adapter_model, args.publish, tokenizer=tokenizer)
            summary["published"] = f"{args.publish}@{version}"
        print(json.dumps(summary))


if __name__ == "__main__":
    main()
