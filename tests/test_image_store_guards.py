"""Guards of the image store and the caches beside it, each pinned by its behaviour: a record of the wrong
length, a foreign LMDB under ``--out``, an ``--extension`` without its dot, float pictures scaled by the
documented rule, a folder build that skips files whose names are no item ids, the metadata's count of
blanks; an import that refuses a foreign report before reading any file; cache files whose data starts
8-byte aligned, as safetensors' own writer lays it out."""

from __future__ import annotations

import json
import logging
import struct

import lmdb
import numpy as np
import pytest
import torch
from PIL import Image

from iisan.data import cache_import
from iisan.data.cache_import import REPORT, import_caches, state_file
from iisan.data.image_build import build_image_lmdb
from iisan.data.images import ImageStore, decode_record, encode_record
from iisan.errors import ConfigError, ImageStoreError, OutputError
from iisan.tensorfiles import write_safetensors


@pytest.fixture()
def folder(tmp_path):
    path = tmp_path / "images"
    path.mkdir()
    return path


def test_a_record_cut_short_or_with_extra_bytes_is_refused_in_one_line():
    record = encode_record(np.full((4, 5, 3), 7, np.uint8))
    for damaged in (record[:-5], record + b"\x00\x01"):
        with pytest.raises(ImageStoreError) as caught:
            decode_record(damaged, "store", "a")
        assert str(caught.value) == "store: image 'a' is not an IISAN image record"
        with pytest.raises(ImageStoreError, match=r"^store: image 'a' is not a \(4, 5, 3\) IISAN image record$"):
            decode_record(damaged, "store", "a", (4, 5, 3))


def test_overwrite_refuses_an_lmdb_another_tool_wrote_and_leaves_its_bytes(folder, tmp_path):
    Image.new("RGB", (8, 8), (1, 2, 3)).save(folder / "a.jpg")
    foreign = tmp_path / "theirs.lmdb"
    with lmdb.open(str(foreign), map_size=1 << 20) as env, env.begin(write=True) as txn:  # no __meta__ record
        txn.put(b"a", b"someone else's value")
    assert sorted(p.name for p in foreign.iterdir()) == ["data.mdb", "lock.mdb"]
    before = {p.name: p.read_bytes() for p in foreign.iterdir()}
    with pytest.raises(OutputError) as caught:
        build_image_lmdb(folder, foreign, ["a"], size=8, progress=False, overwrite=True)
    assert str(caught.value) == (f"--out {foreign} exists and is not an IISAN image LMDB; IISAN replaces only what "
                                 "it wrote itself, so choose another path or move that one away")
    assert {p.name: p.read_bytes() for p in foreign.iterdir()} == before


@pytest.mark.parametrize("extension", ["jpg", "tiff"])
def test_an_extension_without_its_dot_is_refused(folder, tmp_path, extension):
    Image.new("RGB", (8, 8)).save(folder / f"a.{extension}", format="JPEG" if extension == "jpg" else "TIFF")
    with pytest.raises(ConfigError) as caught:
        build_image_lmdb(folder, tmp_path / "db.lmdb", size=8, extension=extension, progress=False)
    assert str(caught.value) == f"--extension {extension!r} must be a file extension such as .jpg"
    assert not (tmp_path / "db.lmdb").exists()


def _stored_float_row(folder, tmp_path, name: str, row: list[float]) -> list[int]:
    """An 8 x 8 mode-F picture whose rows are all ``row``, stored at its own size (no resampling): the
    stored red channel of its first row (grey, so all three channels)."""
    Image.fromarray(np.tile(np.array(row, np.float32), (8, 1)), "F").save(folder / f"{name}.tiff")
    out = tmp_path / f"{name}.lmdb"
    build_image_lmdb(folder, out, [name], size=8, extension=".tiff", progress=False)
    pixels, blank = ImageStore(out).get([name])
    assert not blank.any() and (pixels[0] == pixels[0, :1]).all()  # every row alike
    assert (pixels[0, ..., 0] == pixels[0, ..., 2]).all()  # grey
    return pixels[0, 0, :, 0].tolist()


def test_float_pictures_are_scaled_from_0_to_1_else_over_their_own_range(folder, tmp_path):
    """load_image's rule: floats in 0..1 are 0..1 (value * 255); any others are stretched over their own
    range, lowest 0 and highest 255 (a float picture of 0..250 is not read as 0..1 and clipped)."""
    unit = _stored_float_row(folder, tmp_path, "unit", [0, 0.2, 0.4, 0.6, 0.8, 1.0, 0.04, 0.92])
    assert unit == [0, 51, 102, 153, 204, 255, 10, 235]
    wide = _stored_float_row(folder, tmp_path, "wide", [0, 10, 30, 50, 100, 150, 200, 250])  # * 255 / 250
    assert wide == [0, 10, 31, 51, 102, 153, 204, 255]
    signed = _stored_float_row(folder, tmp_path, "signed", [-1, -0.6, -0.2, 0.2, 0.6, 1.0, -0.92, 0.92])
    assert signed == [0, 51, 102, 153, 204, 255, 10, 245]  # (value + 1) * 255 / 2
    # from its own lowest, not from 0: 100..200 is 0..255 (the range once always held 0, giving 127..255)
    shifted = _stored_float_row(folder, tmp_path, "shifted", [100, 120, 140, 160, 180, 200, 104, 196])
    assert shifted == [0, 51, 102, 153, 204, 255, 10, 245]  # (value - 100) * 255 / 100


def test_a_folder_build_skips_a_file_whose_name_is_no_item_id_and_says_so(folder, tmp_path, caplog):
    for name, value in (("a", 10), ("a b", 20), ("c", 30)):
        Image.new("RGB", (8, 8), (value,) * 3).save(folder / f"{name}.png")
    with caplog.at_level(logging.WARNING, logger="iisan"):
        report = build_image_lmdb(folder, tmp_path / "db.lmdb", size=8, extension=".png", progress=False)
    assert report["stored"] == 2 and report["blank"] == 0
    store = ImageStore(tmp_path / "db.lmdb")
    assert store.meta["count"] == 2
    pixels, blank = store.get(["a", "c", "a b"])
    assert blank.tolist() == [False, False, True]  # "a b" never stored
    assert (pixels[0] == 10).all() and (pixels[1] == 30).all()
    said = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert said == [f"{folder}: skipped 1 files whose names are not valid item ids (e.g. 'a b.png'; item ids hold "
                    "no whitespace, '/', '\\' or control characters)"]


def test_the_metadata_counts_the_blanks(folder, tmp_path):
    for name in ("good", "fine"):
        Image.new("RGB", (8, 8), (5, 5, 5)).save(folder / f"{name}.jpg")
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    report = build_image_lmdb(folder, tmp_path / "db.lmdb", ["good", "broken", "fine", "absent"], size=8,
                              progress=False)
    meta = ImageStore(tmp_path / "db.lmdb").meta
    assert (meta["count"], meta["blank"], report["blank"]) == (4, 2, 2)
    clean = build_image_lmdb(folder, tmp_path / "clean.lmdb", ["good", "fine"], size=8, progress=False)
    assert ImageStore(tmp_path / "clean.lmdb").meta["blank"] == clean["blank"] == 0


def test_an_import_refuses_a_foreign_report_before_reading_any_file(tmp_path, monkeypatch):
    src = tmp_path / "stored"
    ids = ["", "i1", "i2"]
    for item_id in ids[1:]:
        path = state_file(src, "text", item_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(torch.ones(3, 4), path)
    out = tmp_path / "cache"
    out.mkdir()
    (out / REPORT).write_text("my own notes\n")
    reads = []
    real = cache_import.read_state
    monkeypatch.setattr(cache_import, "read_state", lambda path, shape: reads.append(path) or real(path, shape))
    with pytest.raises(OutputError) as caught:
        import_caches(src, ids, {"text": [0, 2]}, {"text": (3, 4)}, {"text": {}}, out, torch.float32)
    assert str(caught.value) == (f"--cache-dir {out / REPORT} exists and is not an import report IISAN wrote; IISAN "
                                 "replaces only what it wrote itself, so choose another path or move that one away")
    assert reads == []  # refused before the first file was read
    assert (out / REPORT).read_text() == "my own notes\n" and sorted(p.name for p in out.iterdir()) == [REPORT]


def test_cache_files_start_their_data_8_byte_aligned_as_safetensors_writes_them(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    table = torch.arange(24, dtype=torch.float32).reshape(2, 3, 4)
    for n in range(8):  # header lengths of every remainder mod 8 before padding
        metadata = {"note": "x" * n}
        ours, theirs = tmp_path / f"ours{n}.safetensors", tmp_path / f"theirs{n}.safetensors"
        write_safetensors(ours, {"states": (torch.float32, (2, 3, 4))}, [("states", table)], metadata)
        save_file({"states": table}, str(theirs), metadata=metadata)
        raw, reference = ours.read_bytes(), theirs.read_bytes()
        (length,) = struct.unpack("<Q", raw[:8])
        assert length == struct.unpack("<Q", reference[:8])[0] and (8 + length) % 8 == 0, n
        assert json.loads(raw[8 : 8 + length]) == json.loads(reference[8 : 8 + length])
        assert raw[8 + length :] == reference[8 + length :] == table.numpy().tobytes()
        with safe_open(str(ours), framework="pt") as fh:
            assert torch.equal(fh.get_tensor("states"), table) and fh.metadata() == metadata


def damaged_copy(store, tmp_path, offset=8192):
    """``store`` copied with 4 KiB of noise over its third page (a B-tree page of a small store)."""
    import shutil

    copy = tmp_path / "damaged.lmdb"
    shutil.copytree(store, copy)
    with open(copy / "data.mdb", "r+b") as fh:
        fh.seek(offset)
        fh.write(np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    return copy


def test_a_damaged_lmdb_page_is_one_line_naming_the_store_not_a_traceback(tiny, tmp_path, capsys):
    """lmdb.CorruptedError came through as a traceback from every read (meta, images, digest)."""
    from iisan.cli.main import main
    from iisan.data.images import close_reader, store_digest
    from iisan.data.interactions import read_items

    ids = read_items(tiny["items"]).ids
    build_image_lmdb(tiny["image_dir"], tmp_path / "small.lmdb", ids, size=16, progress=False)
    damaged = damaged_copy(tmp_path / "small.lmdb", tmp_path)
    said = rf"^{damaged} is a damaged LMDB \(mdb_get: MDB_CORRUPTED: .*\); move it away and rebuild it with `iisan " \
           r"build-lmdb` \(or copy it again\)$"
    with pytest.raises(ImageStoreError, match=said):
        ImageStore(damaged).get(ids)
    close_reader(damaged)
    with pytest.raises(SystemExit) as stopped:
        main(["cache", "--users", tiny["users"], "--items", tiny["items"], "--images", str(damaged), "--text-model",
              tiny["text_model"], "--image-model", tiny["image_model"], "--towers", "image", "--modality", "intra",
              "--cache-dir", str(tmp_path / "cache"), "--no-progress", "--num-workers", "0"])
    assert stopped.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(f"iisan: error: {damaged} is a damaged LMDB (")
    close_reader(damaged)
    with lmdb.open(str(damaged)) as env, env.begin(write=True) as txn:  # a store from before digests were recorded
        meta = json.loads(txn.get(b"__meta__"))
        del meta["digest"]
        txn.put(b"__meta__", json.dumps(meta).encode())
    with pytest.raises(ImageStoreError, match=said.replace("mdb_get", "mdb_cursor_.*")):
        store_digest(damaged, compute=True)
