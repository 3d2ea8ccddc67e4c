"""Which images a run and a cache were made from: an image LMDB is named by the digest of its records, a
cache records the digest of the LMDB it was built from, and a run records what it read. A cache rebuilt
from other images, or an LMDB rebuilt in place, is never taken for the one a finished run used."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from iisan.data.cache import read_metadata
from iisan.data.image_build import write_image_lmdb
from iisan.data.images import META_KEY, ImageStore, _open_readonly, close_reader, store_digest
from iisan.data.interactions import read_items
from iisan.errors import CacheError, ConfigError, OutputError
from iisan.model.caching import build_cache_from_config
from iisan.train.trainer import train


def other_images(tiny, path: Path, value: int = 7) -> str:
    """An LMDB of the tiny data set's items, every image one flat grey."""
    ids = read_items(tiny["items"]).ids
    write_image_lmdb(path, ids, lambda _: (np.full((64, 64, 3), value, np.uint8), None), size=64, progress=False)
    return str(path)


def test_an_lmdb_is_named_by_its_records_whatever_its_pages(tiny, tmp_path):
    """The digest a build records is that of the records, in key order: the same images written in
    another order name the same content; one other pixel, another. A store built before builds recorded
    it gets the same digest computed."""
    ids = read_items(tiny["items"]).ids
    store = ImageStore(tiny["images"])
    pixels = {i: store.get([i])[0][0].copy() for i in ids}
    forward = write_and_digest(tmp_path / "a", ids, pixels)
    assert forward == store.digest() and len(forward) == 16
    assert write_and_digest(tmp_path / "b", ids[::-1], pixels) == forward  # other insertion order, pages
    pixels[ids[3]][5, 5, 0] ^= 1
    assert write_and_digest(tmp_path / "c", ids, pixels) != forward
    # a store of an earlier version: no digest in its metadata; read once, the same digest
    old = older_lmdb(tiny, tmp_path / "old")
    assert "digest" not in ImageStore(old).meta and ImageStore(old).digest() == forward
    assert store_digest(old) is None and store_digest(old, compute=True) == forward  # computed when asked only


def test_a_cached_run_never_reads_every_image_of_an_older_lmdb(tiny, tiny_config, tmp_path, monkeypatch):
    """An LMDB built before builds recorded its digest: a cache build reads every image anyway and computes
    it once; training and evaluating the cached run read no image at all (a 3 GB store at every start)."""
    import iisan.data.images as images
    from iisan.cli.main import main

    old = older_lmdb(tiny, tmp_path / "old.lmdb")
    calls = []
    monkeypatch.setattr(images, "records_digest", lambda txn: calls.append(1) or "0123456789abcdef")
    cfg = tiny_config(images=str(old), cache_dir=str(tmp_path / "cache"), run_name="old-lmdb", epochs=1)
    build_cache_from_config(cfg, dtype="float32")
    assert len(calls) == 1 and read_metadata(tmp_path / "cache" / "image.safetensors")["images"] == "0123456789abcdef"
    train(cfg)
    main(["evaluate", str(Path(cfg.out_dir) / "old-lmdb"), "--device", "cpu"])
    assert len(calls) == 1


def test_a_cache_rebuilt_with_every_layer_is_still_the_one_a_run_trained_on(tiny_config, tmp_path):
    """The run read layers 0 and 2; the cache rebuilt with --all-layers holds them too: the finished run
    stays finished and can be evaluated."""
    from iisan.experiments.trained import load_run

    cfg = tiny_config(cache_dir=str(tmp_path / "cache"), run_name="some", epochs=1, text_layers=(0, 2),
                      image_layers=(0, 3))
    build_cache_from_config(cfg, dtype="float32")
    done = train(cfg)
    build_cache_from_config(cfg, dtype="float32", all_layers=True, overwrite=True)
    assert read_metadata(tmp_path / "cache" / "text.safetensors")["layers"] == "[0, 1, 2]"
    assert train(cfg) == done
    assert load_run(Path(cfg.out_dir) / "some", "cpu").best_epoch == done["best_epoch"]


def older_lmdb(tiny, path: Path) -> Path:
    """A copy of the tiny data set's LMDB whose metadata holds no digest, as builds wrote it before they
    recorded one."""
    import lmdb  # to rewrite the metadata record

    store = ImageStore(tiny["images"])
    write_image_lmdb(path, read_items(tiny["items"]).ids, lambda i: (store.get([i])[0][0], None), size=64,
                     progress=False)
    close_reader(path)
    meta = json.loads(bytes(_open_readonly(path).begin().get(META_KEY)))
    close_reader(path)
    with lmdb.open(str(path), map_size=1 << 26) as env, env.begin(write=True) as txn:
        txn.put(META_KEY, json.dumps({k: v for k, v in meta.items() if k != "digest"}).encode())
    return path


def write_and_digest(path: Path, ids: list[str], pixels: dict) -> str:
    write_image_lmdb(path, ids, lambda i: (pixels[i], None), size=64, progress=False)
    return ImageStore(path).meta["digest"]


def test_a_cache_of_other_images_is_neither_replaced_silently_nor_read_for_them(tiny, tiny_config, tmp_path):
    """An image cache records its LMDB's digest: a build from other images over it is refused without
    --overwrite, and a run whose --images is not what the cache was built from is refused, naming both."""
    cfg = tiny_config(cache_dir=str(tmp_path / "cache"))
    build_cache_from_config(cfg, dtype="float32")
    recorded = read_metadata(tmp_path / "cache" / "image.safetensors")["images"]
    assert recorded == ImageStore(tiny["images"]).digest()
    assert "images" not in read_metadata(tmp_path / "cache" / "text.safetensors")
    grey = cfg.replace(images=other_images(tiny, tmp_path / "grey.lmdb"))
    grey_digest = ImageStore(grey.images).digest()
    with pytest.raises(OutputError, match=rf"image.safetensors holds a cache built with other settings \(images "
                                          rf"{recorded} there, {grey_digest} now\); pass --overwrite"):
        build_cache_from_config(grey, dtype="float32")
    with pytest.raises(CacheError, match=rf"was built for the images whose LMDB has digest {recorded} \(config's "
                                         rf"--images has {grey_digest}\)"):
        train(grey.replace(run_name="grey", epochs=1))


def test_a_finished_run_is_not_taken_as_finished_on_other_images(tiny, tiny_config, tmp_path, capsys):
    """Cached: the cache rebuilt from other images (--overwrite) is not the cache the finished run trained on.
    Live: the LMDB rebuilt in place with other images is not the one it read; evaluate refuses it too."""
    from iisan.cli.main import main

    lmdb_path = other_images(tiny, tmp_path / "images.lmdb", value=7)
    cached = tiny_config(images=lmdb_path, cache_dir=str(tmp_path / "cache"), run_name="cached", epochs=1)
    build_cache_from_config(cached, dtype="float32")
    live = cached.replace(feed="live", run_name="live", epochs=1, batch_size=64, smoke=True)
    assert train(cached)["status"] == "finished" and train(live)["status"] == "finished"
    before = ImageStore(lmdb_path).digest()
    close_reader(Path(lmdb_path))
    write_image_lmdb(lmdb_path, read_items(tiny["items"]).ids,
                     lambda _: (np.full((64, 64, 3), 9, np.uint8), None), size=64, progress=False, overwrite=True)
    after = ImageStore(lmdb_path).digest()
    with pytest.raises(ConfigError, match=rf"{lmdb_path} is not the image LMDB .*live trained on \(the digest of its "
                                          rf"records {before} then, {after} now\)"):
        train(live)
    with pytest.raises(SystemExit):
        main(["evaluate", str(Path(live.out_dir) / "live"), "--device", "cpu"])
    assert capsys.readouterr().err.strip().endswith(f"records {before} then, {after} now): the run's weights were "
                                                    "trained with the other one; restore it or train again")
    build_cache_from_config(cached, dtype="float32", overwrite=True)
    with pytest.raises(ConfigError, match=rf"image.safetensors is not the cache .*cached trained on \(images {before} "
                                          rf"then, {after} now\)"):
        train(cached)


def test_a_live_run_that_recorded_no_image_lmdb_is_said_unchecked(tiny, tiny_config, tmp_path, caplog):
    """Results of a version before ff4b0f2 record no digest of the LMDB a live run read: a rebuilt LMDB of other
    pictures could not be told from its own, and the run was reused or resumed without a word."""
    lmdb_path = other_images(tiny, tmp_path / "images.lmdb", value=7)
    live = tiny_config(images=lmdb_path, feed="live", run_name="live", epochs=1, batch_size=64, smoke=True)
    assert train(live)["status"] == "finished"
    results_path = Path(live.out_dir) / "live" / "results.json"
    results = json.loads(results_path.read_text())
    del results["encoders"]["image"]["images"]
    results_path.write_text(json.dumps(results))
    with caplog.at_level("WARNING", logger="iisan"):
        assert train(live)["status"] == "finished" and train(live)["status"] == "finished"
    assert caplog.text.count(f"{Path(live.out_dir) / 'live'} recorded no digest of its image LMDB (a run of an older "
                             f"version): whether {lmdb_path} holds the images it trained on cannot be told") == 1
    # a cached run records no encoders (its cache records its images): it is not said unchecked
    cached = tiny_config(images=lmdb_path, cache_dir=str(tmp_path / "cache-of-7"), run_name="cached", epochs=1,
                         batch_size=64, smoke=True)
    build_cache_from_config(cached, dtype="float32")
    caplog.clear()
    with caplog.at_level("WARNING", logger="iisan"):
        assert train(cached)["status"] == "finished" and train(cached)["status"] == "finished"
    assert "recorded no digest of its image LMDB" not in caplog.text


def test_one_encoder_spelt_two_ways_is_the_cache_a_run_trained_on(tiny, tiny_config, tmp_path, monkeypatch):
    """A cache rebuilt with the encoder given by a relative path, after a run read it built with the
    absolute one: the weights digest says it is the same encoder, so the finished run stays finished."""
    cfg = tiny_config(cache_dir=str(tmp_path / "cache"), run_name="spelt", epochs=1)
    build_cache_from_config(cfg, dtype="float32")
    done = train(cfg)
    monkeypatch.chdir(Path(tiny["text_model"]).parent)
    relative = cfg.replace(text_model=Path(tiny["text_model"]).name)
    build_cache_from_config(relative, dtype="float32")  # the same settings: rebuilt in place, no --overwrite
    assert read_metadata(tmp_path / "cache" / "text.safetensors")["encoder"] == relative.text_model
    assert train(relative) == done
