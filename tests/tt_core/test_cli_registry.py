"""`tt registry` and `tt merge`: in-process through tt_core.cli.main, plus one run of the console script."""

import json
import shutil
import subprocess

import pytest
import torch
import transformers
from models import VOCAB, batch, build, logits, word_tokenizer
from numerics import assert_same_math

from tt_core import RegistryError, get_adapter_model
from tt_core.cli import main
from tt_core.registry import Registry
from tt_plugins.trainable_tokens import TrainableTokensConfig


def tt(capsys, *argv):
    """Run ``tt argv...`` in this process: (exit status, stdout, stderr)."""
    capsys.readouterr()  # drop what the test printed before (e.g. transformers' progress bars)
    status = main([str(arg) for arg in argv])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def assert_one_line_error(status, out, err, command, expected_status=2):
    assert status == expected_status, err
    assert out == ""
    assert err.startswith(f"tt {command}: ") and err.endswith("\n") and err.count("\n") == 1, err
    assert "Traceback" not in err


@pytest.fixture
def registry(tmp_path):
    return tmp_path / "registry"


@pytest.fixture
def saved(tmp_path):
    """A folder written by save_pretrained, holding one altered trainable-tokens adapter."""
    adapter_model = get_adapter_model(
        build("llama"), TrainableTokensConfig(token_indices=[5, 6], init_weights=False)
    )
    folder = tmp_path / "saved"
    adapter_model.save_pretrained(folder)
    return folder


# -------------------------------------------------------------- tt registry
def test_publish_list_and_info_in_text_and_json(capsys, registry, saved):
    status, out, _ = tt(
        capsys, "registry", "--registry", registry, "publish", saved, "greet", "--description", "hi"
    )
    assert (status, out) == (0, "published greet@1\n")
    # --registry after the action works too, and versions count up
    status, out, _ = tt(capsys, "registry", "publish", saved, "greet", "--registry", registry)
    assert (status, out) == (0, "published greet@2\n")

    status, out, _ = tt(capsys, "registry", "--registry", registry, "list")
    assert status == 0
    assert out.split() == ["greet@2", "trainable_tokens", "local"]  # the newest version has no description

    status, out, _ = tt(capsys, "registry", "--registry", registry, "list", "--json")
    listed = json.loads(out)
    assert status == 0 and [entry["spec"] for entry in listed] == ["greet@2"]
    assert listed[0]["method"] == "trainable_tokens" and listed[0]["source"] == "local"
    assert listed[0] == Registry(registry).info("greet@2").to_dict()

    status, out, _ = tt(capsys, "registry", "--registry", registry, "info", "greet@1")
    assert status == 0
    assert "version:      1 (versions: 1, 2)" in out and "description:  hi" in out
    assert "method:       trainable_tokens" in out and "added tokens: none" in out

    status, out, _ = tt(capsys, "registry", "--registry", registry, "info", "greet", "--json")
    info = json.loads(out)
    assert status == 0 and info["spec"] == "greet@2" and info["versions"] == [1, 2]
    assert info["added_tokens"] == []


def test_the_registry_comes_from_tt_registry_when_not_given(capsys, monkeypatch, registry, saved):
    monkeypatch.setenv("TT_REGISTRY", str(registry))
    assert tt(capsys, "registry", "publish", saved, "greet")[:2] == (0, "published greet@1\n")
    assert [p.spec for p in Registry(registry).list()] == ["greet@1"]
    status, out, _ = tt(capsys, "registry", "list", "--json")
    assert [entry["spec"] for entry in json.loads(out)] == ["greet@1"]


def test_publish_records_the_added_tokens_of_a_tokenizer_folder(capsys, tmp_path, registry, saved):
    tokenizer = word_tokenizer()
    tokenizer.add_tokens(["<new>"])
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    status, out, err = tt(
        capsys,
        "registry",
        "--registry",
        registry,
        "publish",
        saved,
        "greet",
        "--tokenizer",
        tmp_path / "tokenizer",
    )
    assert (status, out) == (0, "published greet@1\n"), err
    status, out, _ = tt(capsys, "registry", "--registry", registry, "info", "greet", "--json")
    recorded = json.loads(out)["added_tokens"]
    assert {"content": "<new>", "id": VOCAB, "special": False, "new": True} in recorded
    assert {"content": "<pad>", "id": 0, "special": True, "new": False} in recorded  # checked, not added
    status, out, _ = tt(capsys, "registry", "--registry", registry, "info", "greet")
    assert "added tokens: 1 (and 3 the tokenizer had already, recorded to check their ids)\n" in out
    assert f"{VOCAB} '<new>'\n" in out and "0 '<pad>' (special, had already)\n" in out


def test_publish_of_a_folder_holding_several_adapters_needs_adapter(capsys, tmp_path, registry):
    adapter_model = get_adapter_model(
        build("llama"), TrainableTokensConfig(token_indices=[5, 6], init_weights=False)
    )
    adapter_model.add_adapter("b", TrainableTokensConfig(token_indices=[7], init_weights=False))
    adapter_model.add_adapter("c", TrainableTokensConfig(token_indices=[8], init_weights=False))
    adapter_model.save_pretrained(tmp_path / "three")
    status, out, err = tt(capsys, "registry", "--registry", registry, "publish", tmp_path / "three", "x")
    assert_one_line_error(status, out, err, "registry publish")
    assert "holds adapters ['b', 'c', 'default']; say which to publish with --adapter NAME" in err
    assert not registry.exists()

    status, out, err = tt(
        capsys, "registry", "--registry", registry, "publish", tmp_path / "three", "x", "--adapter", "b"
    )
    assert (status, out) == (0, "published x@1\n"), err
    assert Registry(registry).load(build("llama"), "x").adapter_configs["x"].token_indices == [7]
    _, out, _ = tt(capsys, "registry", "publish", "--help")
    assert "needed when it holds more than one" in " ".join(out.split())


def test_publish_of_a_peft_folder_holding_several_adapters_needs_adapter(capsys, tmp_path, registry):
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(build("llama"), peft.TrainableTokensConfig(token_indices=[5, 6]))
    model.add_adapter("other", peft.TrainableTokensConfig(token_indices=[7]))
    model.save_pretrained(str(tmp_path / "peft"))
    status, out, err = tt(capsys, "registry", "--registry", registry, "publish", tmp_path / "peft", "x")
    assert_one_line_error(status, out, err, "registry publish")
    assert "--adapter NAME" in err and "adapter=" not in err and "['default', 'other']" in err
    status, out, err = tt(
        capsys, "registry", "--registry", registry, "publish", tmp_path / "peft", "x", "--adapter", "other"
    )
    assert (status, out) == (0, "published x@1\n"), err


def test_rm_removes_one_version_and_list_shows_what_is_left(capsys, registry, saved):
    for _ in range(2):
        tt(capsys, "registry", "--registry", registry, "publish", saved, "greet")
    assert tt(capsys, "registry", "--registry", registry, "rm", "greet@2")[:2] == (0, "removed greet@2\n")
    status, out, _ = tt(capsys, "registry", "--registry", registry, "list", "--json")
    assert [entry["spec"] for entry in json.loads(out)] == ["greet@1"]

    assert tt(capsys, "registry", "--registry", registry, "rm", "greet@1")[0] == 0
    assert json.loads(tt(capsys, "registry", "--registry", registry, "list", "--json")[1]) == []
    assert "no adapters" in tt(capsys, "registry", "--registry", registry, "list")[1]
    # numbers are never reused
    assert (
        tt(capsys, "registry", "--registry", registry, "publish", saved, "greet")[1] == "published greet@3\n"
    )


def test_verify_reports_a_damaged_file_and_exits_1(capsys, registry, saved):
    tt(capsys, "registry", "--registry", registry, "publish", saved, "greet")
    tt(capsys, "registry", "--registry", registry, "publish", saved, "other")
    status, out, _ = tt(capsys, "registry", "--registry", registry, "verify")
    assert status == 0 and "intact" in out

    weights = next((registry / "greet" / "1").rglob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.chmod(0o644)
    weights.write_bytes(bytes(data))

    status, out, _ = tt(capsys, "registry", "--registry", registry, "verify")
    assert status == 1
    lines = out.splitlines()
    assert len(lines) == 1 and lines[0].startswith("greet@1: ") and "hash" in lines[0]
    status, out, _ = tt(capsys, "registry", "--registry", registry, "verify", "--json")
    report = json.loads(out)
    assert status == 1 and report["registry"] == str(registry)
    assert len(report["problems"]) == 1 and report["problems"][0].startswith("greet@1: ")


def test_list_shows_a_version_whose_manifest_is_corrupt_and_exits_1(capsys, registry, saved):
    for name in ("greet", "greet", "other"):
        tt(capsys, "registry", "--registry", registry, "publish", saved, name)
    manifest = registry / "greet" / "2" / "manifest.json"
    manifest.chmod(0o644)
    manifest.write_text("{ not json")

    status, out, err = tt(capsys, "registry", "--registry", registry, "list")
    assert status == 1
    greet, other = out.splitlines()
    assert greet.startswith("greet@2") and "BROKEN" in greet and "manifest.json" in greet
    assert other.split() == ["other@1", "trainable_tokens", "local"]
    assert err.count("\n") == 1
    assert err.startswith("tt registry list: 1 listed version(s) cannot be read: greet@2")
    assert "tt registry verify" in err

    status, out, err = tt(capsys, "registry", "--registry", registry, "list", "--json")
    listed = {entry["spec"]: entry for entry in json.loads(out)}
    assert status == 1 and set(listed) == {"greet@2", "other@1"}
    assert listed["greet@2"]["broken"] is True and "manifest.json" in listed["greet@2"]["problem"]
    assert listed["other@1"]["broken"] is False and listed["other@1"]["problem"] == ""


def test_gc_removes_what_a_killed_publish_left(capsys, registry, saved):
    tt(capsys, "registry", "--registry", registry, "publish", saved, "greet")
    leftover = registry / ".tt-tmp-x"
    leftover.mkdir()
    (leftover / "half_written").write_bytes(b"x")
    status, out, _ = tt(capsys, "registry", "--registry", registry, "gc")
    assert status == 0 and out == f"removed {leftover}\n"
    assert not leftover.exists() and Registry(registry).versions("greet") == [1]
    assert "nothing to remove" in tt(capsys, "registry", "--registry", registry, "gc")[1]


@pytest.mark.parametrize(
    ("argv", "command", "message"),
    [
        (["info", "nobody"], "registry info", "no adapter 'nobody'"),
        (["info", "x@0"], "registry info", "whole number >= 1"),
        (["rm", "x@0"], "registry rm", "whole number >= 1"),
        (["rm", "greet"], "registry rm", "say which version"),
        (["rm", "greet@7"], "registry rm", "no version 7"),
        (["publish", "{tmp}/not_there", "greet"], "registry publish", "is not a folder"),
        (["publish", "{tmp}", "greet"], "registry publish", "save_pretrained"),
        (["publish", "{saved}", "bad/name"], "registry publish", "bad/name"),
        (["info"], "registry info", "required"),
        (["frobnicate"], "registry", "invalid choice"),
    ],
)
def test_errors_are_one_line_with_exit_2(capsys, tmp_path, registry, saved, argv, command, message):
    tt(capsys, "registry", "--registry", registry, "publish", saved, "greet")
    argv = [arg.format(tmp=tmp_path / "empty", saved=saved) for arg in argv]
    (tmp_path / "empty").mkdir()
    status, out, err = tt(capsys, "registry", "--registry", registry, *argv)
    assert_one_line_error(status, out, err, command)
    assert message in err


@pytest.mark.parametrize("action", [["list"], ["verify"], ["gc"], ["info", "x"], ["publish", "{saved}", "x"]])
def test_a_file_as_the_registry_is_refused(capsys, tmp_path, saved, action):
    afile = tmp_path / "afile"
    afile.write_text("not a registry")
    for root in (afile, afile / "below"):
        argv = [arg.format(saved=saved) for arg in action]
        status, out, err = tt(capsys, "registry", "--registry", root, *argv)
        assert_one_line_error(status, out, err, f"registry {action[0]}")
        assert f"the registry {root} is not a folder" in err and "pass a folder" in err
    with pytest.raises(RegistryError, match="is not a folder"):
        Registry(afile)
    assert afile.read_text() == "not a registry"


def test_an_interrupt_exits_130_on_one_line(capsys, monkeypatch, registry):
    def interrupted(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(Registry, "list", interrupted)
    status, out, err = tt(capsys, "registry", "--registry", registry, "list")
    assert_one_line_error(status, out, err, "registry list", 130)


def test_the_console_script_runs_and_errors_on_one_line(tmp_path):
    tt_script = shutil.which("tt")
    assert tt_script is not None, "the console script is installed with the package"
    done = subprocess.run(
        [tt_script, "registry", "--registry", str(tmp_path), "info", "nobody@1"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.startswith("tt registry info: no adapter 'nobody'") and done.stderr.count("\n") == 1
    assert "Traceback" not in done.stderr


# ------------------------------------------------------------------ tt merge
def test_merge_saves_a_plain_model_with_the_adapter_folded_in(capsys, tmp_path, registry):
    base_dir, out = tmp_path / "base", tmp_path / "out"
    build("llama_tied").save_pretrained(base_dir)
    adapter_model = get_adapter_model(
        build("llama_tied"), TrainableTokensConfig(token_indices=[5, 6], init_weights=False)
    )
    assert Registry(registry).publish(adapter_model, "greet") == 1
    inputs = batch("llama_tied", [5, 6])
    with torch.no_grad():
        expected = logits(adapter_model, inputs)

    status, stdout, err = tt(capsys, "merge", base_dir, "greet", "--out", out, "--registry", registry)
    assert status == 0, err
    assert "greet@1" in stdout and str(out) in stdout
    merged = transformers.LlamaForCausalLM.from_pretrained(out, local_files_only=True).eval()
    assert not any("adapter" in key for key in merged.state_dict())
    with torch.no_grad():
        got = logits(merged, inputs)
    assert_same_math(got, expected)
    with torch.no_grad():
        plain = logits(build("llama_tied"), inputs)
    assert not torch.allclose(plain, expected)  # the adapter really changed something

    # a non-empty --out is refused before anything is loaded, then written with --force
    status, stdout, err = tt(capsys, "merge", base_dir, "greet", "--out", out, "--registry", registry)
    assert_one_line_error(status, stdout, err, "merge")
    assert "--force" in err
    assert tt(capsys, "merge", base_dir, "greet@1", "--out", out, "--registry", registry, "--force")[0] == 0


def test_merge_adds_the_recorded_tokens_to_the_saved_tokenizer(capsys, tmp_path, registry):
    base_dir, out = tmp_path / "base", tmp_path / "out"
    model, tokenizer = build("llama_tied"), word_tokenizer()
    model.save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)  # the original tokenizer, without the new token
    tokenizer.add_tokens(["<new>"])
    model.resize_token_embeddings(len(tokenizer))
    new_id = tokenizer.convert_tokens_to_ids("<new>")
    adapter_model = get_adapter_model(
        model, TrainableTokensConfig(token_indices=[new_id, 5], init_weights=False)
    )
    Registry(registry).publish(adapter_model, "greet", tokenizer=tokenizer)

    status, stdout, err = tt(capsys, "merge", base_dir, "greet", "--out", out, "--registry", registry)
    assert status == 0, err
    assert "1 added token" in stdout
    info = tt(capsys, "registry", "info", "greet", "--registry", registry)[1]
    assert "added tokens: 1 (" in info  # the same count as the merge's
    saved_tokenizer = transformers.AutoTokenizer.from_pretrained(out, local_files_only=True)
    assert saved_tokenizer.convert_tokens_to_ids("<new>") == new_id == VOCAB
    assert len(saved_tokenizer) == VOCAB + 1
    merged = transformers.LlamaForCausalLM.from_pretrained(out, local_files_only=True).eval()
    assert merged.get_input_embeddings().weight.shape[0] == VOCAB + 1 == merged.config.vocab_size
    inputs = batch("llama_tied", [new_id, 5])
    with torch.no_grad():
        assert_same_math(logits(merged, inputs), logits(adapter_model, inputs))


def test_the_merge_command_says_where_it_wrote_and_nothing_else(tmp_path, registry):
    """The console script: no transformers notice on stderr, and the base folder is named as unchanged."""
    base_dir, out = tmp_path / "base", tmp_path / "out"
    model, tokenizer = build("llama_tied"), word_tokenizer()
    model.save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    tokenizer.add_tokens(["<new>", "<other>"])
    model.resize_token_embeddings(len(tokenizer))
    ids = tokenizer.convert_tokens_to_ids(["<new>", "<other>"])
    adapter_model = get_adapter_model(model, TrainableTokensConfig(token_indices=ids, init_weights=False))
    Registry(registry).publish(adapter_model, "greet", tokenizer=tokenizer)
    base_files = {path: path.read_bytes() for path in base_dir.iterdir()}

    command = [shutil.which("tt"), "merge", base_dir, "greet", "--out", out, "--registry", registry]
    done = subprocess.run([str(arg) for arg in command], capture_output=True, text=True, timeout=300)
    assert (done.returncode, done.stderr) == (0, "")
    assert done.stdout == (
        f"wrote {out}: LlamaForCausalLM with greet@1 merged in, and the tokenizer with 2 added token(s); "
        f"the base model in {base_dir} is unchanged\n"
    )
    assert {path: path.read_bytes() for path in base_dir.iterdir()} == base_files


def test_merge_onto_another_base_is_refused_with_the_flag_that_allows_it(capsys, tmp_path, registry):
    base_dir, out = tmp_path / "base", tmp_path / "out"
    build("llama_tied", seed=1).save_pretrained(base_dir)  # not the base the adapter was trained on
    adapter_model = get_adapter_model(
        build("llama_tied"), TrainableTokensConfig(token_indices=[5, 6], init_weights=False)
    )
    Registry(registry).publish(adapter_model, "greet")

    status, stdout, err = tt(capsys, "merge", base_dir, "greet", "--out", out, "--registry", registry)
    assert_one_line_error(status, stdout, err, "merge")
    assert "trained on another base model" in err and "pass --no-strict" in err
    assert "strict=False" not in err and not out.exists()

    argv = ["merge", base_dir, "greet", "--out", out, "--registry", registry, "--no-strict"]
    status, stdout, err = tt(capsys, *argv)
    assert status == 0 and "greet@1" in stdout and (out / "config.json").is_file()
    assert err.startswith("tt: UserWarning: adapter 'greet': ") and err.count("\n") == 1
    assert "not the ones it was trained on (loaded anyway, --no-strict)" in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["{tmp}/no_model", "greet"], "no config.json"),
        (["{base}", "nobody"], "no adapter 'nobody'"),
        (["{base}", "greet@0"], "whole number >= 1"),
        (["{base}", "greet@9"], "no version 9"),
    ],
)
def test_merge_errors_are_one_line_with_exit_2(capsys, tmp_path, registry, saved, argv, message):
    base_dir = tmp_path / "base"
    (base_dir).mkdir()
    (base_dir / "config.json").write_text("{}")
    tt(capsys, "registry", "--registry", registry, "publish", saved, "greet")
    argv = [arg.format(tmp=tmp_path, base=base_dir) for arg in argv]
    status, out, err = tt(capsys, "merge", *argv, "--out", tmp_path / "out", "--registry", registry)
    assert_one_line_error(status, out, err, "merge")
    assert message in err and not (tmp_path / "out").exists()


def test_merge_refuses_a_file_or_the_base_folder_as_out(capsys, tmp_path, registry):
    base_dir = tmp_path / "base"
    build("llama").save_pretrained(base_dir)
    (tmp_path / "file").write_text("x")
    for out in (tmp_path / "file", base_dir):
        status, stdout, err = tt(
            capsys, "merge", base_dir, "greet", "--out", out, "--registry", registry, "--force"
        )
        assert_one_line_error(status, stdout, err, "merge")


# ------------------------------------------------------------------- tt export
def _published_with_a_new_token(tmp_path, registry, new_token):
    """A base model folder, and in the registry an adapter training row 5 (and a new token's row)."""
    base_dir = tmp_path / "base"
    model, tokenizer = build("llama_tied"), word_tokenizer()
    model.save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    ids = [5, 9]
    if new_token:
        tokenizer.add_tokens(["<new>"])
        model.resize_token_embeddings(len(tokenizer))
        ids.append(tokenizer.convert_tokens_to_ids("<new>"))
    adapter_model = get_adapter_model(model, TrainableTokensConfig(token_indices=ids, init_weights=False))
    Registry(registry).publish(adapter_model, "greet", tokenizer=tokenizer)
    return base_dir, adapter_model.eval(), ids


@pytest.mark.parametrize(("form", "new_token"), [("peft-lora", False), ("peft", False), ("peft", True)])
def test_export_writes_a_folder_peft_loads_with_the_adapters_outputs(
    capsys, tmp_path, registry, form, new_token
):
    peft = pytest.importorskip("peft")
    out = tmp_path / "out"
    base_dir, adapter_model, ids = _published_with_a_new_token(tmp_path, registry, new_token)

    status, stdout, err = tt(
        capsys, "export", base_dir, "greet", "--as", form, "--out", out, "--registry", registry
    )
    assert status == 0, err
    assert stdout.startswith(f"wrote {out}: greet@1 as ") and "with its tokenizer" in stdout
    assert not any(path.name.startswith(".tt-export-") for path in tmp_path.iterdir())
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == ("LORA" if form == "peft-lora" else "TRAINABLE_TOKENS")
    served_tokenizer = transformers.AutoTokenizer.from_pretrained(out, local_files_only=True)
    assert len(served_tokenizer) == VOCAB + new_token

    fresh = build("llama_tied")
    fresh.resize_token_embeddings(len(served_tokenizer))  # new rows at random: PEFT's own rows replace them
    served = peft.PeftModel.from_pretrained(fresh, str(out)).eval()
    inputs = batch("llama_tied", [*ids, 7])
    with torch.no_grad():
        assert_same_math(logits(served, inputs), logits(adapter_model, inputs))


def test_export_as_lora_refuses_rows_of_new_tokens(capsys, tmp_path, registry):
    """A LoRA holds row changes; a new token's base row is random after a resize, so none reproduces it."""
    out = tmp_path / "out"
    base_dir, _, _ = _published_with_a_new_token(tmp_path, registry, new_token=True)
    status, stdout, err = tt(capsys, "export", base_dir, "greet", "--out", out, "--registry", registry)
    assert_one_line_error(status, stdout, err, "export")
    assert "['<new>']" in err and "--as peft" in err
    assert not out.exists()


def test_export_refuses_what_its_format_cannot_hold_and_writes_nothing(capsys, tmp_path, registry):
    from tt_plugins.lora_embedding import LoraEmbeddingConfig

    base_dir, out = tmp_path / "base", tmp_path / "out"
    build("llama").save_pretrained(base_dir)
    Registry(registry).publish(get_adapter_model(build("llama"), LoraEmbeddingConfig(r=2)), "style")
    status, stdout, err = tt(capsys, "export", base_dir, "style", "--out", out, "--registry", registry)
    assert_one_line_error(status, stdout, err, "export")
    assert not out.exists()
    assert [path.name for path in tmp_path.iterdir() if path.name.startswith(".tt-")] == []
    status, stdout, err = tt(capsys, "export", base_dir, "nope", "--out", out, "--registry", registry)
    assert_one_line_error(status, stdout, err, "export")
    assert "nope" in err
