"""Cache and live feed: the same tiny model gives the same item embeddings; mismatching caches are refused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from iisan.config import DEFAULT_MODELS, model_location
from iisan.data.cache import (
    METADATA_KEYS,
    REQUIRED,
    CacheExpectation,
    check_metadata,
    declared_metadata,
    read_metadata,
)
from iisan.data.run_data import load_data
from iisan.errors import CacheError, ConfigError, OutputError
from iisan.model.build import build_model
from iisan.model.caching import build_cache_from_config

from .conftest import cached_and_live_tables


@pytest.fixture()
def cached_cfg(tiny_config, tiny_cache):
    return tiny_config(cache_dir=tiny_cache)


def test_cache_holds_selected_layers_as_one_contiguous_array(cached_cfg, tiny):
    meta = read_metadata(f"{cached_cfg.cache_dir}/text.safetensors")
    assert json.loads(meta["layers"]) == [0, 1, 2]  # tiny BERT: 2 layers, groups capped at depth
    assert json.loads(read_metadata(f"{cached_cfg.cache_dir}/image.safetensors")["layers"]) == [0, 1, 2, 3]
    assert meta["width"] == "32" and meta["dtype"] == "float32" and meta["modality"] == "text"
    from safetensors import safe_open

    with safe_open(f"{cached_cfg.cache_dir}/text.safetensors", "pt") as fh:
        states = fh.get_tensor("states")
    data = load_data(cached_cfg)
    assert states.shape == (data.num_items + 1, 3, 32)
    assert states[0].abs().sum() == 0  # padding row
    assert json.loads(meta["item_ids"]) == data.item_ids[1:]


def test_cached_and_live_feeds_give_the_same_item_embeddings(cached_cfg):
    a, b, _ = cached_and_live_tables(cached_cfg, torch.device("cpu"))
    assert a.shape == (load_data(cached_cfg).num_items + 1, 64)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    # and the SAN tower really depends on the states (not a constant)
    assert a[1:].std(0).mean() > 1e-3


def test_live_states_take_the_callers_precision_and_evaluation_is_fp32(cached_cfg):
    """The live encoders run in the precision around them: the training step's autocast, and fp32 in
    ``item_table`` (the authors evaluate without autocast) even when its caller has one on."""
    from iisan.evaluate import item_chunks, item_table

    cpu = torch.device("cpu")
    fp32, _, cached = cached_and_live_tables(cached_cfg, cpu)
    data = load_data(cached_cfg)
    live, pixels = build_model(cached_cfg.replace(feed="live"), data, cpu)
    live.load_state_dict(cached.state_dict(), strict=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = item_table(live, data.num_items, 16, pixels, cpu)
        items = next(iter(item_chunks(np.arange(1, 9), 8, pixels)))
        states = live.item_encoder.states(items)
    torch.testing.assert_close(inside, fp32, atol=1e-5, rtol=1e-5)
    exact = live.item_encoder.states(items)
    assert all(not torch.equal(states[m], exact[m]) for m in exact)  # bf16 under the caller's autocast
    torch.testing.assert_close(states["text"], exact["text"], atol=0.1, rtol=0.05)


def test_cache_lacking_a_requested_layer_names_the_missing_ones(tiny_config):
    cfg = tiny_config(towers="text", text_layers=(0, 2))
    build_cache_from_config(cfg, dtype="float32")
    with pytest.raises(CacheError, match=r"text.safetensors was built for layers \[0, 2\], without \[1\] "
                                         r"\(config asks for \[1, 2\];"):
        build_model(cfg.replace(text_layers=(1, 2)), load_data(cfg), torch.device("cpu"))


def test_cache_of_titles_cut_to_another_length_is_refused(tiny_config, tmp_path):
    cfg = tiny_config(towers="text", cache_dir=str(tmp_path / "c8"), title_tokens=8)
    build_cache_from_config(cfg, dtype="float32")
    assert read_metadata(tmp_path / "c8" / "text.safetensors")["title_tokens"] == "8"
    with pytest.raises(CacheError, match=r"text.safetensors was built for title_tokens 8 \(config asks for 30\)"):
        build_model(cfg.replace(title_tokens=30), load_data(cfg), torch.device("cpu"))
    build_model(cfg, load_data(cfg), torch.device("cpu"))  # the length it was built for


def test_a_text_cache_of_titles_decoded_otherwise_is_refused(tiny_config, tiny, tmp_path):
    """One items file read with two --encoding values gives the text encoder two texts under one file
    fingerprint ("Café" or "CafÃ©"): the cache of one is refused to the other, naming the titles. A file whose
    titles read the same either way (ASCII) keeps its cache, and an image cache reads no titles."""
    accented = tmp_path / "items.tsv"
    lines = Path(tiny["items"]).read_text(encoding="utf-8").splitlines()
    item, title = lines[0].split("\t")
    accented.write_text("\n".join([f"{item}\tCafé crème {title}", *lines[1:]]) + "\n", encoding="utf-8")
    cfg = tiny_config(cache_dir=str(tmp_path / "c"), items=str(accented))
    build_cache_from_config(cfg, dtype="float32")
    latin = cfg.replace(encoding="latin-1")
    with pytest.raises(CacheError, match=r"text.safetensors was built for titles with digest [0-9a-f]{16} \(the "
                                         r"config's items file, as this run decodes it, gives [0-9a-f]{16}: the same "
                                         r"file read with another --encoding\?\)"):
        build_model(latin, load_data(latin), torch.device("cpu"))
    build_model(latin.replace(towers="image"), load_data(latin), torch.device("cpu"))
    ascii_cache = cfg.replace(items=tiny["items"], cache_dir=str(tmp_path / "ascii"))
    build_cache_from_config(ascii_cache, dtype="float32")
    build_model(ascii_cache.replace(encoding="latin-1"), load_data(ascii_cache), torch.device("cpu"))


def test_an_items_path_that_is_not_utf8_is_kept_readable_in_the_cache(tiny_config, tiny, tmp_path):
    """A file name with a latin-1 byte (as a command line gives it): the cache's header says it as \\xe9,
    which safetensors' reader takes, and the run reads the cache."""
    import os
    import shutil

    items = tmp_path / os.fsdecode(b"it\xe9ms.tsv")
    shutil.copy(tiny["items"], items)
    cfg = tiny_config(towers="text", cache_dir=str(tmp_path / "c"), items=str(items))
    build_cache_from_config(cfg, dtype="float32")
    assert read_metadata(tmp_path / "c" / "text.safetensors")["items_file"] == str(tmp_path / "it\\xe9ms.tsv")
    build_model(cfg, load_data(cfg), torch.device("cpu"))


def test_one_all_layer_cache_serves_runs_with_different_layers(tiny_config, tmp_path):
    """Runs reading layers (0, 1) and (1, 2) from one cache of every layer equal runs on caches built
    for exactly their layers: same item states, same losses, same metrics."""
    from iisan.train.trainer import train

    everything = tiny_config(cache_dir=str(tmp_path / "all"), epochs=1, max_steps_per_epoch=3)
    build_cache_from_config(everything, dtype="float32", all_layers=True)
    assert json.loads(read_metadata(tmp_path / "all" / "text.safetensors")["layers"]) == [0, 1, 2]
    assert json.loads(read_metadata(tmp_path / "all" / "image.safetensors")["layers"]) == [0, 1, 2, 3]
    for layers in ((0, 1), (1, 2)):
        exact = everything.replace(cache_dir=str(tmp_path / f"exact{layers}"), text_layers=layers,
                                   image_layers=(1, 3), run_name=f"exact{layers}")
        build_cache_from_config(exact, dtype="float32")
        shared = exact.replace(cache_dir=everything.cache_dir, run_name=f"shared{layers}")
        a, b = train(exact), train(shared)
        assert a["config"]["text_layers"] == list(layers)
        assert (a["valid"], a["test"], a["epochs"][0]["loss"]) == (b["valid"], b["test"], b["epochs"][0]["loss"])


def test_cache_built_for_another_items_file_is_refused(cached_cfg, tmp_path, tiny):
    other = tmp_path / "items.tsv"
    other.write_text(Path(tiny["items"]).read_text(encoding="utf-8").replace("No.1\n", "No.one\n", 1))
    cfg = cached_cfg.replace(items=str(other))
    with pytest.raises(CacheError, match=r"built for items file .* with fingerprint .*config's items file has "
                                         r"[0-9a-f]{16}\) — rebuild") as refused:
        build_model(cfg, load_data(cfg), torch.device("cpu"))
    assert "--encoding" not in str(refused.value)  # another file's titles differ: no decoding to blame


def test_cache_for_another_encoder_is_refused(cached_cfg, tmp_path, tiny):
    from iisan.model.tiny import vocabulary, write_bert

    other = write_bert(tmp_path / "bert64", vocabulary(["x"]), hidden=16, layers=2)
    cfg = cached_cfg.replace(text_model=str(other))
    with pytest.raises(CacheError, match=r"width 32 \(config's encoder has 16\)"):
        build_model(cfg, load_data(cfg), torch.device("cpu"))


def test_an_absent_encoder_folder_is_trusted_to_the_cache_but_a_different_name_is_refused(cached_cfg, tmp_path,
                                                                                          caplog):
    """Without the encoder on this machine the cache's own record stands for it (as for the authors'
    released caches) when it is named as the cache's encoder is; a name that is not, such as a typo, is
    refused in one line (it would train, and the run's config would name an encoder that made no state)."""
    recorded = read_metadata(f"{cached_cfg.cache_dir}/text.safetensors")["encoder"]
    cfg = cached_cfg.replace(text_model=str(tmp_path / "typo"))
    reference, _ = build_model(cached_cfg, load_data(cached_cfg), torch.device("cpu"))
    with pytest.raises(ConfigError) as refused:
        build_model(cfg, load_data(cfg), torch.device("cpu"))
    assert str(refused.value) == (
        f"--text-model {tmp_path / 'typo'} does not exist here and is not the encoder {cached_cfg.cache_dir}/"
        f"text.safetensors was built from ({recorded}); check the name: give the folder you meant, or {recorded} to "
        "train on the cache as recorded")
    from iisan.train.trainer import train

    with pytest.raises(ConfigError, match="does not exist here and is not the encoder"):  # before its folder
        train(cfg.replace(run_name="typo"))
    assert not (Path(cfg.out_dir) / "typo").exists()
    (tmp_path / "a-file").write_text("mine")
    with pytest.raises(ConfigError, match=f"--text-model {tmp_path / 'a-file'} is a file, not a folder, and is not"):
        train(cfg.replace(run_name="typo", text_model=str(tmp_path / "a-file")))
    # a run that trained in its folder under a folder since gone goes on under that name (a resume must name
    # what its checkpoint names), with a warning
    import shutil

    copy = Path(shutil.copytree(cached_cfg.text_model, tmp_path / "bert-copy"))
    first = train(cached_cfg.replace(text_model=str(copy), run_name="copy", epochs=1))
    shutil.rmtree(copy)
    caplog.clear()
    with caplog.at_level("WARNING", logger="iisan"):
        more = train(cached_cfg.replace(text_model=str(copy), run_name="copy", epochs=2))
    assert len(first["epochs"]) == 1 and len(more["epochs"]) == 2
    assert any("the run's text_model" in r.getMessage() for r in caplog.records)
    caplog.clear()
    # a run that trained already (one from before the refusal, evaluated now) is used with a warning
    with caplog.at_level("INFO", logger="iisan"):
        model, _ = build_model(cfg, load_data(cfg), torch.device("cpu"), trained=True)
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warned == [f"the run's text_model {tmp_path / 'typo'} does not exist here and is not the encoder "
                      f"{cached_cfg.cache_dir}/text.safetensors was built from ({recorded}): using the cache as "
                      "recorded"]
    assert torch.equal(model.item_encoder.states.table_text, reference.item_encoder.states.table_text)
    caplog.clear()
    moved = cached_cfg.replace(text_model=str(tmp_path / "elsewhere" / Path(recorded).name))  # same name
    with caplog.at_level("INFO", logger="iisan"):
        model, _ = build_model(moved, load_data(moved), torch.device("cpu"))
    assert not [r for r in caplog.records if r.levelname == "WARNING"]
    assert torch.equal(model.item_encoder.states.table_text, reference.item_encoder.states.table_text)
    # the default encoder, as the entry scripts spell it (a full path), is simply not on this machine
    default = model_location(DEFAULT_MODELS["text"])
    if not default.exists():
        caplog.clear()
        for name in (DEFAULT_MODELS["text"], str(default), str(default.parent / ".." / default.parent.name / "x" / ".."
                                                               / default.name)):
            with caplog.at_level("INFO", logger="iisan"):
                build_model(cached_cfg.replace(text_model=name), load_data(cached_cfg), torch.device("cpu"))
        said = [r.getMessage() for r in caplog.records if "is not on this machine" in r.getMessage()]
        assert len(said) == 3 and not [r for r in caplog.records if r.levelname == "WARNING"], said
    # what the run asks of the states is still checked against the cache's record: here its pooling
    with pytest.raises(CacheError, match=r"text.safetensors was built for pooling cls \(config asks for mean\)"):
        build_model(moved.replace(text_pooling="mean"), load_data(moved), torch.device("cpu"))


def test_the_default_encoder_absent_is_no_warning(cached_cfg, caplog, monkeypatch, tmp_path):
    """A cached run that names no encoder gets the default pair's names; when that folder is not here (a
    cache built from another encoder, the README's MiniLM runs), no name was mistyped: an info line. (A
    repository without the default BERT, wherever the tests run: they skipped where it had been fetched.)"""
    import iisan.config
    from iisan.config import DEFAULT_MODELS

    monkeypatch.setattr(iisan.config, "REPOSITORY", tmp_path / "checkout")
    assert iisan.config.model_location(DEFAULT_MODELS["text"]) == tmp_path / "checkout" / DEFAULT_MODELS["text"]
    recorded = read_metadata(f"{cached_cfg.cache_dir}/text.safetensors")["encoder"]
    cfg = cached_cfg.replace(text_model=DEFAULT_MODELS["text"])
    with caplog.at_level("INFO", logger="iisan"):
        build_model(cfg, load_data(cfg), torch.device("cpu"))
    assert not [r for r in caplog.records if r.levelname == "WARNING"]
    assert f"{cached_cfg.cache_dir}/text.safetensors was built from {recorded}; the text encoder named, the " \
           f"default {DEFAULT_MODELS['text']}, is not on this machine: training on the cache as recorded" in \
           [r.getMessage() for r in caplog.records]


def test_missing_cache_names_the_file(tiny_config):
    cfg = tiny_config(cache_dir="/nonexistent/cache")
    with pytest.raises(CacheError, match=r"cache file /nonexistent/cache/text.safetensors does not exist"):
        build_model(cfg, load_data(cfg), torch.device("cpu"))


def test_a_cache_from_before_image_norm_is_rebuilt_in_place(tiny_config, tmp_path):
    """A cache without the image_norm key was built with the processor's statistics: the same settings."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    cfg = tiny_config(cache_dir=str(tmp_path / "c"))
    build_cache_from_config(cfg, dtype="float32")
    path = tmp_path / "c" / "image.safetensors"
    with safe_open(str(path), framework="pt") as fh:
        meta, states = {k: v for k, v in fh.metadata().items() if k != "image_norm"}, fh.get_tensor("states")
    save_file({"states": states}, str(path), metadata=meta)
    build_cache_from_config(cfg, dtype="float32")  # no --overwrite needed
    assert read_metadata(path)["image_norm"] == "processor"


def test_a_text_cache_from_before_title_tokens_is_rebuilt_in_place_and_kept_by_reuse(tiny_config, tmp_path, caplog):
    """A text cache built before commit 79420f4 records no title length: training took it, but a build over it
    was refused as 'built with other settings (title_tokens None there, 30 now)'."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    cfg = tiny_config(cache_dir=str(tmp_path / "c"), towers="text", modality="intra")
    path = build_cache_from_config(cfg, dtype="float32")["text"]
    with safe_open(str(path), framework="pt") as fh:
        meta, states = {k: v for k, v in fh.metadata().items() if k != "title_tokens"}, fh.get_tensor("states")
    save_file({"states": states}, str(path), metadata=meta)
    with caplog.at_level("INFO", logger="iisan"):
        build_cache_from_config(cfg, dtype="float32", reuse=True)
    assert "built before with these settings; kept as it is" in caplog.text
    assert "title_tokens" not in read_metadata(path)
    build_cache_from_config(cfg, dtype="float32")  # no --overwrite needed
    assert read_metadata(path)["title_tokens"] == "30"


def test_reuse_keeps_a_shared_cache_this_process_cannot_write_without_locking_it(tiny_config, tmp_path,
                                                                                  monkeypatch, caplog):
    """A job array's tasks over a cache another user built, read-only to them: --reuse is for exactly that, yet
    the lock file it took first could not be written ("could not write .../.iisan-lock: Permission denied")."""
    import os

    from iisan.locks import OutputLock
    from iisan.model import caching

    cfg = tiny_config(cache_dir=str(tmp_path / "shared"), towers="text", modality="intra")
    built = build_cache_from_config(cfg, dtype="float32")
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "shared").iterdir()}
    shared = os.path.abspath(cfg.cache_dir)
    access = os.access
    monkeypatch.setattr(caching.os, "access", lambda path, mode: access(path, mode) and os.path.abspath(path) != shared)

    def no_lock(self):
        raise AssertionError("a lock was taken")

    monkeypatch.setattr(OutputLock, "acquire", no_lock)
    with caplog.at_level("INFO", logger="iisan"):
        assert build_cache_from_config(cfg, dtype="float32", reuse=True) == built
    assert "built before with these settings; kept as it is" in caplog.text
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "shared").iterdir()} == before
    with pytest.raises(OutputError, match=r"^could not write .*/shared: this process may not write there, and its "
                                          r"text cache is missing or was built with other settings; choose another "
                                          r"--cache-dir$"):
        build_cache_from_config(cfg, dtype="float16", reuse=True)


def test_a_folder_where_a_cache_file_belongs_is_named_as_one(tiny_config, tmp_path):
    (tmp_path / "c" / "text.safetensors").mkdir(parents=True)
    cfg = tiny_config(cache_dir=str(tmp_path / "c"))
    with pytest.raises(CacheError, match=r"^cache file .*/c/text.safetensors is a folder; expected the safetensors "
                                         r"file `iisan cache` writes$"):
        build_model(cfg, load_data(cfg), torch.device("cpu"))


def test_the_weights_digest_reads_no_weights_while_the_files_are_unchanged(tiny, tmp_path, monkeypatch):
    import shutil

    import iisan.model.encoder_files as encoder_files

    folder = tmp_path / "bert"
    shutil.copytree(tiny["text_model"], folder)
    first = encoder_files.weights_digest(folder)
    assert set(first["files"]) >= {"model.safetensors", "vocab.txt", "tokenizer.json"}
    assert "config.json" not in first["files"]  # hashed separately, without its volatile keys
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    assert encoder_files.weights_digest(copy)["digest"] == first["digest"]  # same bytes, same digest

    def no_reading(path):
        raise AssertionError(f"read {path}")

    monkeypatch.setattr(encoder_files, "sha256", no_reading)
    encoder_files._MEMO.clear()
    assert encoder_files.weights_digest(folder, known=first) == first  # sizes and times match the record
    (folder / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes())  # same bytes, new file
    with pytest.raises(AssertionError, match="read .*model.safetensors"):
        encoder_files.weights_digest(folder, known=first)


def test_a_cache_is_rebuilt_in_place_for_the_same_settings_and_replaced_only_when_asked(tiny_config, tmp_path):
    from iisan.errors import OutputError
    from iisan.model.caching import build_cache_from_config

    cfg = tiny_config(cache_dir=str(tmp_path / "c"), towers="text", modality="intra")
    path = build_cache_from_config(cfg, dtype="float32")["text"]
    first = path.read_bytes()
    build_cache_from_config(cfg, dtype="float32")  # the same build again: allowed, the same bytes
    assert path.read_bytes() == first
    with pytest.raises(OutputError, match=r"text.safetensors holds a cache built with other settings \(dtype "
                                          r"float32 there, float16 now\); pass --overwrite"):
        build_cache_from_config(cfg, dtype="float16")
    assert path.read_bytes() == first
    build_cache_from_config(cfg, dtype="float16", overwrite=True)
    assert read_metadata(path)["dtype"] == "float16"
    assert sorted(p.name for p in path.parent.iterdir()) == ["cache-build.log", "text.safetensors"]  # no sidecar,
    # lock or temporary


def test_the_cache_writer_and_its_readers_share_one_list_of_metadata_keys(cached_cfg):
    """A built cache records exactly ``METADATA_KEYS``; what ``read_metadata`` requires and what
    ``CacheExpectation`` compares are among them, and a writer's undeclared key is refused."""
    import dataclasses

    text_keys = set(METADATA_KEYS) - {"image_norm", "images"}  # an image cache's only
    assert set(read_metadata(f"{cached_cfg.cache_dir}/text.safetensors")) == text_keys
    image_keys = set(METADATA_KEYS) - {"title_tokens", "titles"}  # a text cache's only
    assert set(read_metadata(f"{cached_cfg.cache_dir}/image.safetensors")) == image_keys
    assert set(REQUIRED) < set(METADATA_KEYS)
    assert {f.name for f in dataclasses.fields(CacheExpectation)} < set(METADATA_KEYS)
    with pytest.raises(ValueError, match=r"\['dtpye'\] is not declared"):
        declared_metadata({"format": "x", "dtpye": "float32"})


def test_an_expectation_skips_what_it_or_an_older_or_imported_cache_leaves_out(tmp_path):
    """The acceptance rules of ``check_metadata``: an empty expectation accepts anything; pooling, dtype
    and title_tokens are compared only when the cache records them; an imported cache's weights digest
    never; an encoder config hash that differs is reported instead of the weights."""
    path = tmp_path / "text.safetensors"
    meta = {"modality": "text", "layers": "[0, 1, 2]", "width": "32", "items_file": "items.tsv",
            "items_fingerprint": "f1", "encoder": "bert", "encoder_config": "c1", "encoder_weights": "w1" * 10,
            "pooling": "cls", "dtype": "float16", "title_tokens": "30"}
    check_metadata(path, meta, CacheExpectation())
    same = CacheExpectation(modality="text", items_fingerprint="f1", layers=(2, 0), width=32, encoder="bert",
                            encoder_config="c1", encoder_weights="w1" * 10, pooling="cls", dtype="float16",
                            title_tokens="30")
    check_metadata(path, meta, same)
    older = {k: v for k, v in meta.items() if k not in ("pooling", "dtype", "title_tokens")}
    check_metadata(path, older, dataclasses_replace(same, pooling="mean", dtype="float32", title_tokens="8"))
    with pytest.raises(CacheError, match=r"built for pooling cls \(config asks for mean\); dtype float16 "):
        check_metadata(path, meta, dataclasses_replace(same, pooling="mean", dtype="float32"))
    other_weights = dataclasses_replace(same, encoder_weights="w2" * 10)
    check_metadata(path, dict(meta, source="imported"), other_weights)
    with pytest.raises(CacheError, match=r"encoder bert with weights digest w1w1w1w1w1w1w1w1 \(the weight, "
                                         r"tokenizer and processor files of bert now have w2w2w2w2w2w2w2w2\)"):
        check_metadata(path, meta, other_weights)
    # the same folder, its model rewritten in place: said so, not the one path twice
    with pytest.raises(CacheError, match=r"built for encoder bert with config digest c1 \(that folder: its "
                                         r"config.json now has c2, another model\) — rebuild"):
        check_metadata(path, meta, dataclasses_replace(other_weights, encoder_config="c2"))
    with pytest.raises(CacheError, match=r"built for encoder bert with config digest c1 \(the config's encoder "
                                         r"vit: its config.json now has c2, another model\)"):
        check_metadata(path, meta, dataclasses_replace(other_weights, encoder="vit", encoder_config="c2"))
    with pytest.raises(CacheError, match=r"built for layers \[0, 1, 2\], without \[3\] .*; width 32 \(config's "
                                         r"encoder has 16\); items file items.tsv with fingerprint f1 \(config's "
                                         r"items file has f2\); modality text \(expected image\)"):
        check_metadata(path, meta, CacheExpectation(modality="image", items_fingerprint="f2", layers=(3,), width=16))


def dataclasses_replace(expected: CacheExpectation, **changes) -> CacheExpectation:
    import dataclasses

    return dataclasses.replace(expected, **changes)


def test_a_cache_whose_build_stopped_says_to_finish_it_not_to_build_it(tmp_path):
    """A build killed between its two files (or before either) leaves ``.building`` with its finished chunks:
    the run that reads the cache says to run the build again, which resumes; not only that the file is absent."""
    (tmp_path / "c" / ".building").mkdir(parents=True)
    with pytest.raises(CacheError, match=r"^cache file .*c/text.safetensors does not exist: a build of it stopped "
                                         r"before it finished \(.*c/\.building holds its finished chunks\); run the "
                                         r"same `iisan cache` command again to finish it$"):
        read_metadata(tmp_path / "c" / "text.safetensors")
    (tmp_path / "c" / ".building").rmdir()
    with pytest.raises(CacheError, match=r"does not exist \(build it with `iisan cache --cache-dir "):
        read_metadata(tmp_path / "c" / "text.safetensors")


def test_a_cache_build_keeps_a_log_beside_the_cache_and_leaves_anyone_elses_file(tiny_config, tmp_path, caplog):
    """Only training wrote a log file: an LLM's cache build of hours left nothing but its two files. Each build
    appends its header and lines; a file of that name that is no build log is not touched."""
    from iisan.model.caching import BUILD_LOG

    cfg = tiny_config(cache_dir=str(tmp_path / "c"), towers="text", modality="intra")
    build_cache_from_config(cfg, dtype="float32")
    build_cache_from_config(cfg, dtype="float32")  # rebuilt in place: a second build, a second header
    lines = (tmp_path / "c" / BUILD_LOG).read_text().splitlines()
    assert [line.split(":")[0] for line in lines if line.startswith("===")] == ["=== cache build"] * 2
    assert lines[1].startswith("command: ") and lines[2].startswith("commit: ")
    assert any("INFO iisan.data.cache_build: wrote " in line and "text.safetensors" in line for line in lines)
    other = tiny_config(cache_dir=str(tmp_path / "o"), towers="text", modality="intra")
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / BUILD_LOG).write_text("my notes\n")
    with caplog.at_level("WARNING", logger="iisan.model.caching"):
        build_cache_from_config(other, dtype="float32")
    assert (tmp_path / "o" / BUILD_LOG).read_text() == "my notes\n"
    assert f"{tmp_path / 'o' / BUILD_LOG} is not a cache build log of IISAN's: left as it is" in caplog.text


def test_a_build_ends_its_image_readers_whether_it_finishes_or_fails(tiny_config, tmp_path, monkeypatch):
    """The reader threads of an image cache's pixels end with the build, a failed one's too."""
    import iisan.model.caching as caching
    from iisan.data import batches

    closed, close = [], batches.PixelSource.close
    monkeypatch.setattr(batches.PixelSource, "close", lambda self: (closed.append(1), close(self))[1])
    cfg = tiny_config(cache_dir=str(tmp_path / "c"), towers="image", modality="intra")
    build_cache_from_config(cfg, dtype="float32")
    assert closed == [1]

    def fails(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(caching, "build_caches", fails)
    with pytest.raises(OSError):
        build_cache_from_config(cfg.replace(cache_dir=str(tmp_path / "d")), dtype="float32")
    assert closed == [1, 1]


def test_a_loaded_caches_rows_are_checked_for_nan_and_inf_a_few_at_a_time(cached_cfg, monkeypatch):
    """Checked whole, a half-precision table on a CPU costs a float32 copy and a mask (2.5x the cache)."""
    from iisan.data import cache

    table = torch.randn(23, 3, 4).half()  # rows of 12 values, 48 bytes in float32
    table[[0, 9, 10, 22], [1, 0, 2, 1], [2, 3, 0, 1]] = torch.tensor([np.nan, np.inf, -np.inf, np.nan]).half()
    seen, isfinite = [], torch.isfinite
    monkeypatch.setattr(torch, "isfinite", lambda t: seen.append(t.numel()) or isfinite(t))
    monkeypatch.setattr(cache, "CHECKED_BYTES", 100)  # two rows at a time: the rows 9 and 10 in two checks
    assert cache.nonfinite_rows(table).tolist() == [0, 9, 10, 22]
    assert seen == [24] * 11 + [12]
    assert cache.nonfinite_rows(torch.zeros(0, 3, 4)).tolist() == [] and seen == [24] * 11 + [12]  # no rows: none
    seen.clear()  # and loading a run's caches, both towers
    monkeypatch.setattr(cache, "CHECKED_BYTES", 1000)
    build_model(cached_cfg, load_data(cached_cfg), torch.device("cpu"))
    metas = [read_metadata(f"{cached_cfg.cache_dir}/{m}.safetensors") for m in ("text", "image")]
    rows = load_data(cached_cfg).num_items + 1
    assert seen and max(seen) <= 1000 // 4
    assert sum(seen) == sum(rows * len(json.loads(meta["layers"])) * int(meta["width"]) for meta in metas)
