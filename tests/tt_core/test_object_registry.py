"""The registry on object storage, as a user sees it, in one process.

Every test runs against ``memory://`` and against a real S3-compatible HTTP
server on localhost (moto in server mode, started once for the session by
``tests/conftest.py``). Processes racing on an S3 registry, and publishers
killed mid-upload, are in test_object_registry_race.py.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import uuid

import pytest
import torch
from models import VOCAB, batch, build, logits, word_tokenizer

from tt_core import AdapterLayer, AdapterModel, RegistryError, get_adapter_model
from tt_core.api.errors import SavedFolderError, StorageError
from tt_core.disk.objectstore import ObjectStore, StoreUnreachable
from tt_core.object_registry import ObjectRegistry
from tt_core.registry import Registry
from tt_plugins.trainable_tokens import TrainableTokensConfig

FAMILY = "llama_tied"


def trained(name: str = "default", tokens: list[int] = (10, 11, 12), seed: int = 0) -> AdapterModel:
    adapter_model = get_adapter_model(
        build(FAMILY), TrainableTokensConfig(token_indices=list(tokens)), adapter_name=name
    )
    torch.manual_seed(seed)
    with torch.no_grad():
        for parameter_name, parameter in adapter_model.named_parameters():
            if "trainable_tokens_rows" in parameter_name:
                parameter.normal_()
    return adapter_model


def rows(adapter_model: AdapterModel, name: str) -> torch.Tensor:
    return adapter_model.model.model.embed_tokens.adapters[name].trainable_tokens_rows.detach()


@pytest.fixture(params=["memory", "s3"])
def url(request):
    if request.param == "memory":
        return f"memory://tt-{uuid.uuid4().hex[:12]}/registry"
    server = request.getfixturevalue("s3_server")
    return f"s3://{server.bucket()}/team/registry"


@pytest.fixture
def registry(url, tmp_path):
    return Registry(url, cache_dir=tmp_path / "cache")


def test_a_url_makes_an_object_registry_and_file_urls_stay_local(url, tmp_path, monkeypatch):
    assert isinstance(Registry(url, cache_dir=tmp_path), ObjectRegistry)
    monkeypatch.setenv("TT_REGISTRY", url)
    assert isinstance(Registry(), ObjectRegistry) and Registry().root == url
    local = Registry(f"file://{tmp_path / 'local'}")
    assert type(local) is Registry and local.root == tmp_path / "local"
    monkeypatch.setenv("TT_REGISTRY", f"file://{tmp_path / 'local'}")
    assert type(Registry()) is Registry and Registry().root == tmp_path / "local"


def test_publish_versions_info_load_remove_and_numbers_never_reused(registry):
    first, second = trained(seed=1), trained(seed=2)
    assert registry.publish(first, "terms", description="v1") == 1
    assert registry.publish(second, "terms") == 2
    assert registry.versions("terms") == [1, 2] and registry.names() == ["terms"]
    info = registry.info("terms")
    assert (info.spec, info.method, info.source) == ("terms@2", "trainable_tokens", registry.store.protocol)
    assert registry.info("terms@1").description == "v1"
    assert [p.spec for p in registry.list()] == ["terms@2"]
    loaded = registry.load(build(FAMILY), "terms@1")
    assert torch.equal(rows(loaded, "terms"), rows(first, "default"))
    registry.remove("terms@2")
    with pytest.raises(RegistryError, match="terms@2 was removed"):
        registry.info("terms@2")
    with pytest.raises(RegistryError, match="'terms' has no version 2"):
        registry.remove("terms@2")
    assert registry.publish(second, "terms") == 3  # 2 is never given out again
    assert registry.versions("terms") == [1, 3]
    assert registry.verify() == []


def test_loads_stack_in_order_and_into_an_existing_model(registry):
    for name, seed in (("a", 1), ("b", 2)):
        registry.publish(trained(name, tokens=(10, 11), seed=seed), name)
    inputs = batch(FAMILY, [10, 11, 12])
    a_b = registry.load(build(FAMILY), ["a", "b"])
    assert a_b.active_adapters == ["a", "b"]
    b_a = registry.load(build(FAMILY), ["b", "a"])
    assert not torch.allclose(logits(a_b, inputs), logits(b_a, inputs))
    host = registry.load(build(FAMILY), "a")
    registry.load(build(FAMILY), "b", into=host)
    assert host.adapters == ["a", "b"] and host.active_adapters == ["a"]


def test_publish_folder_takes_native_and_peft_folders(registry, tmp_path):
    trained(seed=3).save_pretrained(tmp_path / "saved")
    assert registry.publish_folder(tmp_path / "saved", "native") == 1
    peft = pytest.importorskip("peft")
    base = build(FAMILY)
    peft_model = peft.get_peft_model(base, peft.TrainableTokensConfig(token_indices=[4, 5]))
    peft_model.save_pretrained(tmp_path / "peft")
    assert registry.publish_folder(tmp_path / "peft", "from-peft") == 1
    assert registry.info("from-peft").method == "trainable_tokens"
    registry.load(build(FAMILY), ["native", "from-peft"])


def test_tokens_travel_with_the_adapter(registry):
    tokenizer, model = word_tokenizer(), build(FAMILY)
    tokenizer.add_tokens(["<drug>", "<dose>"])
    model.resize_token_embeddings(len(tokenizer))
    ids = tokenizer.convert_tokens_to_ids(["<drug>", "<dose>"])
    adapter_model = get_adapter_model(model, TrainableTokensConfig(token_indices=[5, *ids]))
    registry.publish(adapter_model, "terms", tokenizer=tokenizer)
    fresh, base = word_tokenizer(), build(FAMILY)
    registry.load(base, "terms", tokenizer=fresh)
    assert fresh.convert_tokens_to_ids(["<drug>", "<dose>"]) == ids
    assert base.get_input_embeddings().weight.shape[0] == VOCAB + 2


def test_a_flipped_byte_in_the_store_is_refused_naming_the_version_and_the_object(registry):
    registry.publish(trained(seed=1), "terms")
    record = registry._record("terms", 1)
    weights_path = next(path for path in record["files"] if path.endswith(".safetensors"))
    key = f"objects/{record['files'][weights_path]}"
    data = bytearray(registry.store.get(key))
    data[len(data) // 2] ^= 0x01
    registry.store.put(key, bytes(data))
    other = Registry(registry.root, cache_dir=registry.cache.folder.parent / "cold")  # nothing cached
    base = build(FAMILY)
    before = {name: p.detach().clone() for name, p in base.named_parameters()}
    damaged = rf"terms@1 {weights_path}: the object .*{key} .*damaged in the store"
    with pytest.raises(SavedFolderError, match=damaged):
        other.load(base, "terms")
    assert all(torch.equal(before[name], p) for name, p in base.named_parameters())
    assert not other.cache.has(record["files"][weights_path])  # never cached either
    assert any(key in problem for problem in other.verify())


def test_a_flipped_byte_in_the_cache_is_detected_and_fetched_again(registry):
    published = trained(seed=1)
    registry.publish(published, "terms")
    record = registry._record("terms", 1)
    digest = next(d for path, d in record["files"].items() if path.endswith(".safetensors"))
    cached = registry.cache.folder / "objects" / digest
    data = bytearray(cached.read_bytes())
    data[-3] ^= 0x40
    cached.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match=rf"cached copy .*{digest} of terms@1 .* fetched again"):
        loaded = registry.load(build(FAMILY), "terms")
    assert torch.equal(rows(loaded, "terms"), rows(published, "default"))
    assert registry.cache.get(digest) is not None  # fetched again, intact


def test_gc_removes_only_unnamed_content_older_than_the_grace_period(registry):
    registry.publish(trained(seed=1), "terms")
    registry.publish(trained(seed=2), "terms")
    orphan = b"what a killed publish left"
    orphan_key = f"objects/{hashlib.sha256(orphan).hexdigest()}"
    registry.store.put(orphan_key, orphan)
    assert registry.gc() == []  # everything is younger than the grace period
    registry.remove("terms@1")
    registry.grace_seconds = 0
    removed = registry.gc()
    assert registry.store.name(orphan_key) in removed
    assert len(removed) > 1  # the removed version's content went too
    assert registry.load(build(FAMILY), "terms@2") is not None and registry.verify() == []
    assert registry.gc() == []


def test_a_store_that_cannot_create_if_absent_is_read_only(tmp_path, monkeypatch):
    registry = Registry("memory://read-only/registry", cache_dir=tmp_path)
    monkeypatch.setattr(registry.store, "protocol", "ftp")
    with pytest.raises(RegistryError, match="cannot create an object only if it is absent"):
        registry.publish(trained(), "terms")
    assert registry.names() == []  # reading works


def test_two_creators_of_one_record_the_second_is_refused(url):
    store = ObjectStore(url)
    store.create("records/x/1.json", b"first")
    with pytest.raises(FileExistsError):
        store.create("records/x/1.json", b"second")
    assert store.get("records/x/1.json") == b"first"


def test_copy_promotes_between_local_and_object_registries_keeping_history(registry, tmp_path):
    local = Registry(tmp_path / "local")
    local.publish(trained(seed=1), "terms", description="first")
    local.publish(trained(seed=2), "terms", description="second")
    local.remove("terms@1")
    registry.publish(trained(seed=9), "terms")  # the shared registry has its own history
    assert local.copy("terms", registry) == 2
    copied = registry.info("terms@2")
    assert copied.description == "second"
    loaded = registry.load(build(FAMILY), "terms@2")
    assert torch.equal(rows(loaded, "terms"), rows(local.load(build(FAMILY), "terms@2"), "terms"))
    assert registry.copy("terms@1", local) == 3  # and back: the next number there
    record = json.loads(registry.store.get("records/terms/2.json"))
    assert set(record) >= {"files", "version", "name"}


def test_no_credential_or_url_secret_is_written_or_printed(tmp_path):
    registry = Registry("memory://user:s3cr3t@bucket/registry?token=s3cr3t", cache_dir=tmp_path)
    assert "s3cr3t" not in repr(registry) and "s3cr3t" not in str(registry.root)


def test_a_server_that_stops_mid_load_changes_nothing_and_the_cache_serves_offline(tmp_path, monkeypatch):
    from s3server import S3Server

    server = S3Server()  # its own server: this test stops it
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", server.endpoint)
        url = f"s3://{server.bucket()}/registry"
        published = trained(seed=4)
        Registry(url, cache_dir=tmp_path / "publisher").publish(published, "terms")
        reader = Registry(url, cache_dir=tmp_path / "reader")
        real_get, calls = reader.store.get, []

        def stopping_get(key):
            calls.append(key)
            if len(calls) == 3:  # the record and manifest.json are read; the weights are not
                server.stop()
            return real_get(key)

        monkeypatch.setattr(reader.store, "get", stopping_get)
        base = build(FAMILY)
        before = {name: p.detach().clone() for name, p in base.named_parameters()}
        with pytest.raises(StoreUnreachable, match=rf"the registry {url} cannot be reached"):
            reader.load(base, "terms")
        assert all(torch.equal(before[name], p) for name, p in base.named_parameters())
        assert not [m for m in base.modules() if isinstance(m, AdapterLayer)]

        # What the publisher's cache holds loads offline: by number, and by name (with a warning).
        offline = Registry(url, cache_dir=tmp_path / "publisher")
        with pytest.warns(UserWarning, match=r"terms resolves to terms@1, the newest version in the cache"):
            loaded = offline.load(build(FAMILY), "terms")
        assert torch.equal(rows(loaded, "terms"), rows(published, "default"))
        with pytest.warns(UserWarning, match=r"terms@1 loads from the cache"):
            offline.load(build(FAMILY), "terms@1")
        with pytest.raises(StorageError, match=r"cannot be reached.*nothing of it is cached"):
            Registry(url, cache_dir=tmp_path / "empty").load(build(FAMILY), "terms")
    finally:
        server.stop()


def test_tt_registry_commands_take_a_url_and_copy_promotes(url, tmp_path, monkeypatch, capsys):
    from tt_core.cli import main

    def tt(*argv):
        status = main([str(arg) for arg in argv])
        out, err = capsys.readouterr()
        return status, out, err

    monkeypatch.setenv("TT_REGISTRY_CACHE", str(tmp_path / "cache"))
    trained(seed=1).save_pretrained(tmp_path / "saved")
    local = tmp_path / "local"
    assert tt("registry", "publish", tmp_path / "saved", "terms", "--registry", local)[:2] == (
        0,
        "published terms@1\n",
    )
    status, out, _ = tt("registry", "copy", "terms", "--from", local, "--to", url, "--json")
    assert status == 0
    assert json.loads(out) == {"from": str(local), "copied": "terms@1", "to": url, "as": "terms@1"}
    monkeypatch.setenv("TT_REGISTRY", url)
    status, out, _ = tt("registry", "list", "--json")
    assert status == 0 and [p["spec"] for p in json.loads(out)] == ["terms@1"]
    status, out, _ = tt("registry", "info", "terms")
    assert status == 0 and f"path:         {url}/records/terms/1.json" in out
    assert tt("registry", "copy", "terms@1", "--to", local)[1].endswith(f"to {local} as terms@2\n")
    assert tt("registry", "verify")[:2] == (0, f"every published version in {url} is intact\n")
    assert tt("registry", "rm", "terms@1")[0] == 0
    status, _, err = tt("registry", "info", "terms@1")
    assert status == 2 and err == "tt registry info: terms@1 was removed (versions left: [])\n"
    assert tt("registry", "gc")[1] == f"nothing to remove in {url}\n"  # younger than the grace period
    status, out, _ = tt("registry", "gc", "--grace-seconds", "0")
    assert status == 0 and out.count("removed ") == 4  # terms@1's four objects
    status, _, err = tt("registry", "gc", "--grace-seconds", "0", "--registry", local)
    assert status == 2 and "--grace-seconds applies to a registry on object storage" in err


def test_http_requests_of_a_cold_load_a_warm_load_and_a_listing(s3_server, tmp_path):
    from fsspec.asyn import sync

    def requests_of(registry):
        client = sync(registry.store.fs.loop, registry.store.fs.set_session)
        seen = []
        client.meta.events.register("before-send.s3", lambda request, **_: seen.append(request.url))
        return seen

    url = f"s3://{s3_server.bucket()}/registry"
    publisher = Registry(url, cache_dir=tmp_path / "publisher")
    for name in ("a", "b", "c"):
        publisher.publish(trained(seed=1), name)
    reader = Registry(url, cache_dir=tmp_path / "reader")
    seen = requests_of(reader)
    reader.load(build(FAMILY), "a")
    assert len(seen) == 5  # listing a's records, the record, manifest.json, the config, the weights
    seen.clear()
    reader.load(build(FAMILY), "a")
    assert len(seen) == 1  # warm: only the listing (a removal must still be seen)
    seen.clear()
    assert [p.spec for p in reader.list()] == ["a@1", "b@1", "c@1"]
    assert sum("list-type=2" in u for u in seen) == 1  # one listing for every name


def test_a_missing_bucket_is_an_error_naming_the_registry(s3_server, tmp_path):
    registry = Registry("s3://no-such-bucket/registry", cache_dir=tmp_path)
    with pytest.raises(StorageError, match=r"the registry s3://no-such-bucket/registry: listing .* bucket"):
        registry.versions("terms")
    with pytest.raises(StorageError, match=r"the registry s3://no-such-bucket/registry: writing objects/"):
        registry.publish(trained(), "terms")


@pytest.mark.parametrize(
    ("url", "extra", "package"), [("gs://bucket/x", "gcs", "gcsfs"), ("az://container/x", "azure", "adlfs")]
)
def test_a_backend_not_installed_names_the_extra_to_install(url, extra, package, tmp_path):
    if importlib.util.find_spec(package):
        pytest.skip(f"{package} is installed")
    with pytest.raises(RegistryError, match=rf"pip install 'tt-adapters\[{extra}\]'"):
        Registry(url, cache_dir=tmp_path)


def test_a_read_only_backend_is_refused_for_writing_with_the_reason(tmp_path):
    registry = Registry("http://127.0.0.1:9/registry", cache_dir=tmp_path)
    with pytest.raises(RegistryError, match=r"http://, whose fsspec backend cannot create an object only if"):
        registry.publish(trained(), "terms")


def test_gc_spares_content_a_publish_names_while_gc_is_listing(registry, monkeypatch):
    adapter_model = trained(seed=1)
    registry.publish(adapter_model, "terms")
    registry.remove("terms@1")  # its content is unnamed now, and old enough with a grace of 0
    registry.grace_seconds = 0
    other = Registry(registry.root, cache_dir=registry.cache.folder.parent / "other")
    real_listing, calls = registry._listing, []

    def listing_then_publish(name=None):
        found = real_listing(name)
        calls.append(name)
        if len(calls) == 1:  # gc has listed the objects and the records: the same content is published
            other.publish(adapter_model, "terms")
        return found

    monkeypatch.setattr(registry, "_listing", listing_then_publish)
    registry.gc()
    monkeypatch.undo()
    fresh = Registry(registry.root, cache_dir=registry.cache.folder.parent / "fresh")
    loaded = fresh.load(build(FAMILY), "terms@2")
    assert torch.equal(rows(loaded, "terms"), rows(adapter_model, "default"))
    assert fresh.verify() == []


def test_an_object_missing_from_the_store_is_named_not_called_a_removal(registry):
    registry.publish(trained(seed=1), "terms")
    record = registry._record("terms", 1)
    path, digest = next((p, d) for p, d in record["files"].items() if p.endswith(".safetensors"))
    registry.store.delete([f"objects/{digest}"])
    cold = Registry(registry.root, cache_dir=registry.cache.folder.parent / "cold")
    with pytest.raises(SavedFolderError, match=rf"terms@1: the object .*{digest} \({path}\) is missing"):
        cold.load(build(FAMILY), "terms")


def test_a_damaged_cached_record_is_detected_and_read_again(registry):
    registry.publish(trained(seed=1), "terms")
    (cached,) = (registry.cache.folder / "records").rglob("1.json")
    cached.write_bytes(cached.read_bytes().replace(b'\\"version\\": 1', b'\\"version\\": 7'))
    with pytest.warns(UserWarning, match=r"cached record .*1.json of terms@1 is damaged"):
        registry.load(build(FAMILY), "terms")
    assert registry.cache.record("terms", 1)["version"] == 1


def test_a_warm_load_follows_the_store_not_the_cache(registry):
    first, second = trained(seed=1), trained(seed=2)
    registry.publish(first, "terms")
    reader = Registry(registry.root, cache_dir=registry.cache.folder.parent / "reader")
    assert torch.equal(rows(reader.load(build(FAMILY), "terms"), "terms"), rows(first, "default"))
    registry.publish(second, "terms")  # the reader's cache still has only terms@1: its guess is wrong
    assert torch.equal(rows(reader.load(build(FAMILY), "terms"), "terms"), rows(second, "default"))
    registry.remove("terms@2")  # cached by the reader now, but removed: not loaded
    with pytest.raises(RegistryError, match="terms@2 was removed"):
        reader.load(build(FAMILY), "terms@2")
    assert torch.equal(rows(reader.load(build(FAMILY), "terms"), "terms"), rows(first, "default"))
