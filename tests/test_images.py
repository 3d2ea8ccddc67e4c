"""The image LMDB: raw records behind a fixed header, bad images counted and stored as flagged blanks."""

from __future__ import annotations

import logging
import unicodedata
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from iisan.data.image_build import build_image_lmdb
from iisan.data.images import ImageStore, decode_record, encode_record
from iisan.errors import ImageStoreError, OutputError

from ._scripts import ROOT, load_script


def test_record_round_trip_and_rejects_garbage():
    pixels = np.random.default_rng(0).integers(0, 256, (4, 5, 3), dtype=np.uint8)
    out, blank = decode_record(encode_record(pixels), "store", "a")
    np.testing.assert_array_equal(out, pixels)
    assert not blank and decode_record(encode_record(pixels, blank=True), "store", "a")[1]
    with pytest.raises(ImageStoreError, match="^store: image 'x' is not an IISAN image record$"):
        decode_record(b"\x80\x04pickle-ish-bytes", "store", "x")
    with pytest.raises(ImageStoreError, match=r"^store: image 'a' is not a \(5, 4, 3\) IISAN image record$"):
        decode_record(encode_record(pixels), "store", "a", (5, 4, 3))


def test_build_counts_missing_and_corrupt_images_and_keeps_going(tmp_path):
    folder = tmp_path / "img"
    folder.mkdir()
    Image.new("RGB", (40, 20), (255, 0, 0)).save(folder / "good.jpg")
    Image.new("L", (8, 8), 128).save(folder / "gray.jpg")  # converted to RGB
    (folder / "broken.jpg").write_bytes(b"not a jpeg at all")
    report = build_image_lmdb(folder, tmp_path / "db.lmdb", ["good", "gray", "broken", "absent"], size=16,
                              progress=False)
    assert report["stored"] == 4 and report["blank"] == 2
    lines = Path(report["report"]).read_text(encoding="utf-8").splitlines()
    assert lines[0] == "item_id\tproblem" and lines[2] == "absent\tmissing"
    broken = folder / "broken.jpg"
    assert lines[1] == f"broken\tunreadable: UnidentifiedImageError: cannot identify image file '{broken}'"
    store = ImageStore(tmp_path / "db.lmdb")
    pixels, blank = store.get(["good", "gray", "broken", "absent", "never-stored", ""])
    assert pixels.shape == (6, 16, 16, 3)
    assert blank.tolist() == [False, False, True, True, True, True]
    assert (pixels[0, :, :, 0] > 200).all() and (pixels[0, :, :, 1] < 50).all()  # red, squashed to 16x16
    assert (pixels[1] == 128).all()
    assert (pixels[2:] == 0).all()
    missing, flagged = store.blank_ids(["good", "broken", "absent", "never-stored", ""])
    assert missing == ["never-stored"] and flagged == ["broken", "absent"]


def test_an_image_over_the_pixel_limit_is_a_flagged_blank_without_a_raw_warning(tmp_path, monkeypatch):
    import warnings

    folder = tmp_path / "img"
    folder.mkdir()
    Image.new("RGB", (8, 8), (9, 9, 9)).save(folder / "small.jpg")  # 64 pixels
    Image.new("RGB", (12, 10)).save(folder / "big.jpg")  # 120: over the limit, under twice it
    Image.new("RGB", (30, 20)).save(folder / "huge.png")  # 600: PIL itself refuses it at open
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PIL's DecompressionBombWarning would fail the test
        build_image_lmdb(folder, tmp_path / "jpg.lmdb", ["small", "big"], size=4, progress=False)
        report = build_image_lmdb(folder, tmp_path / "png.lmdb", ["huge"], size=4, extension=".png",
                                  progress=False)
    jpg = Path(tmp_path / "jpg.lmdb.report.tsv").read_text(encoding="utf-8").splitlines()[1:]
    assert jpg == ["big\ttoo large: 12 x 10 pixels, over PIL's decompression-bomb limit of 100"]
    png = Path(report["report"]).read_text(encoding="utf-8").splitlines()[1:]
    assert png == ["huge\ttoo large: 600 pixels, over PIL's decompression-bomb limit of 100"]  # one limit named
    pixels, blank = ImageStore(tmp_path / "jpg.lmdb").get(["small", "big"])
    assert blank.tolist() == [False, True] and (pixels[0] == 9).all() and (pixels[1] == 0).all()


@pytest.mark.parametrize("failure, said", [
    (OSError(24, "Too many open files", "/site-packages/PIL/JpegImagePlugin.py"), "Too many open files, a failure "
     "of this machine (its limits: ulimit -n, ulimit -v; or its disk), not of the file: run the same command again "
     "once it is mended"),
    (OSError(5, "Input/output error"), "Input/output error, a failure of this machine"),
    (MemoryError(), "out of memory on the CPU"),
])
def test_the_machine_failing_stops_the_build_instead_of_storing_blanks_for_good(tmp_path, monkeypatch, capsys,
                                                                                failure, said):
    """Under `ulimit -n 7` every image was stored as a flagged blank 'unreadable: Too many open files' and the
    build exited 0 (a rerun was then refused without --overwrite); under `ulimit -v` a large image was.
    The machine's failures stop the build in one line naming the image, leave no store, and a rerun works."""
    import iisan.data.image_build as image_build
    from iisan.cli.main import main

    folder = tmp_path / "img"
    folder.mkdir()
    for name in ("a", "b"):
        Image.new("RGB", (8, 8), (9, 9, 9)).save(folder / f"{name}.jpg")
    real = image_build.load_image
    monkeypatch.setattr(image_build, "load_image", lambda path, *a: (_ for _ in ()).throw(failure)
                        if path.stem == "b" else real(path, *a))
    with pytest.raises(SystemExit) as info:
        main(["build-lmdb", "--images", str(folder), "--out", str(tmp_path / "db.lmdb"), "--size", "4"])
    err = capsys.readouterr().err.strip()
    assert info.value.code == 2 and "\n" not in err and said in err, err
    assert f"iisan: error: could not read {folder / 'b.jpg'}: " in err or isinstance(failure, MemoryError)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["img"]
    monkeypatch.setattr(image_build, "load_image", real)
    assert build_image_lmdb(folder, tmp_path / "db.lmdb", None, size=4, progress=False)["blank"] == 0


def test_store_errors_name_the_path(tmp_path):
    with pytest.raises(ImageStoreError, match="image LMDB .*nope.lmdb does not exist"):
        ImageStore(tmp_path / "nope.lmdb")
    with pytest.raises(ImageStoreError, match="image folder .*nope does not exist"):
        build_image_lmdb(tmp_path / "nope", tmp_path / "x.lmdb")


def test_rebuilding_a_store_in_the_same_process_serves_the_new_images(tmp_path):
    from iisan.data.image_build import write_image_lmdb

    path = tmp_path / "db.lmdb"
    write_image_lmdb(path, ["a"], lambda _: (np.full((4, 4, 3), 7, np.uint8), None), size=4, progress=False)
    assert (ImageStore(path).get(["a"])[0] == 7).all()
    with pytest.raises(OutputError, match="already holds an IISAN image LMDB; pass --overwrite to replace it"):
        write_image_lmdb(path, ["a"], lambda _: (np.full((4, 4, 3), 9, np.uint8), None), size=4, progress=False)
    assert (ImageStore(path).get(["a"])[0] == 7).all()
    write_image_lmdb(path, ["a"], lambda _: (np.full((4, 4, 3), 9, np.uint8), None), size=4, progress=False,
                     overwrite=True)
    assert (ImageStore(path).get(["a"])[0] == 9).all()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["db.lmdb"]  # no temporary, no lock file left


def test_a_store_replaced_by_another_process_is_read_anew(tmp_path, caplog):
    """The handle of a store is kept for the process; a store rebuilt in place by another process (or copied
    over) was still read from the replaced file, its old pixels and its old digest, without a word."""
    import os

    from iisan.data.image_build import write_image_lmdb
    from iisan.data.images import store_digest

    path, other = tmp_path / "db.lmdb", tmp_path / "other.lmdb"
    write_image_lmdb(path, ["a"], lambda _: (np.full((4, 4, 3), 7, np.uint8), None), size=4, progress=False)
    write_image_lmdb(other, ["a"], lambda _: (np.full((4, 4, 3), 9, np.uint8), None), size=4, progress=False)
    first, held = store_digest(path), ImageStore(path)
    assert (held.get(["a"])[0] == 7).all()
    os.replace(other / "data.mdb", path / "data.mdb")  # what a rebuild elsewhere leaves: another file there
    caplog.set_level(logging.INFO, logger="iisan.data.images")
    assert (ImageStore(path).get(["a"])[0] == 9).all() and store_digest(path) != first
    assert [r.levelname for r in caplog.records if "was replaced on disk since this process opened it" in
            r.getMessage()] == ["WARNING"]  # runs of one sweep read other images: not comparable
    # a store object made before: the handle it held was closed by the opener that saw the new file; it takes
    # the new one (it said 'a damaged LMDB (Attempt to operate on closed/deleted/dropped object.)')
    assert (held.get(["a"])[0] == 9).all()
    import lmdb

    from iisan.data.images import damage_named

    with pytest.raises(ImageStoreError, match=r"db.lmdb was replaced on disk while this process read it; run again"):
        with damage_named(path):  # a reader inside a transaction as another thread closed the handle
            raise lmdb.Error("Attempt to operate on closed/deleted/dropped object.")


FORKED = """
import os, signal, sys
import numpy as np
from iisan.data.batches import PixelSource
from iisan.data.image_build import write_image_lmdb
from iisan.data.images import ImageStore
from iisan.errors import ImageStoreError
ids = [str(i) for i in range(64)]
write_image_lmdb(sys.argv[1], ids, lambda i: (np.full((4, 4, 3), int(i), np.uint8), None), size=4, progress=False)
source = PixelSource(ImageStore(sys.argv[1]), [""] + ids, threads=2)
assert int(source(np.arange(1, 65))[5, 0, 0, 0]) == 5  # its reader threads are running
if os.fork() == 0:
    signal.alarm(20)  # a child that waits on the parent's threads hangs
    try:
        source(np.arange(1, 65))
    except ImageStoreError as err:
        print(err)
    source.close()
    os._exit(0)
print("child", os.wait()[1])
"""


def test_a_store_read_before_a_fork_is_refused_in_the_child_in_one_line(tmp_path):
    """An LMDB handle must not cross a fork, and py-lmdb refuses to open the parent's path again: the child was told
    the store 'is not a readable LMDB ... build it with iisan build-lmdb', or hung on its parent's reader threads."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", FORKED, str(tmp_path / "db.lmdb")], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines == [f"{tmp_path / 'db.lmdb'} was opened before this process was forked, and an LMDB handle cannot "
                     "cross a fork: start the processes that read it with multiprocessing's 'spawn' method", "child 0"]


def test_an_item_list_without_one_picture_in_the_folder_is_refused_before_anything_is_written(tmp_path):
    """The users file given as --items, or the wrong folder: not an LMDB of blanks alone. One item with a
    picture is enough to build, even one under a decomposed (macOS-written) name, which the report then
    names for renaming."""
    folder = tmp_path / "img"
    folder.mkdir()
    Image.new("RGB", (8, 8)).save(folder / "b.png")
    with pytest.raises(ImageStoreError, match=rf"^none of the 2 items listed has a picture {folder}/<item_id>.jpg "
                                              r"\(1 are there with another extension: see --extension\): is --images "
                                              r"the folder of their pictures, and --items their items file\?$"):
        build_image_lmdb(folder, tmp_path / "db.lmdb", ["b", "U1"], size=8, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["img"]  # no LMDB, no report
    Image.new("RGB", (8, 8)).save(folder / unicodedata.normalize("NFD", "caf\u00e9.jpg"))
    built = build_image_lmdb(folder, tmp_path / "db.lmdb", ["b", "caf\u00e9"], size=8, progress=False)
    assert built["stored"] == 2 and built["blank"] == 2
    third = Path(built["report"]).read_text(encoding="utf-8").splitlines()[2]
    assert third.endswith("the same name in another Unicode normal form; rename it)")


def test_an_image_under_another_extension_is_named_in_the_report(tmp_path, caplog):
    folder = tmp_path / "img"
    folder.mkdir()
    Image.new("RGB", (8, 8)).save(folder / "a.jpg")
    Image.new("RGB", (8, 8)).save(folder / "b.png")
    report = build_image_lmdb(folder, tmp_path / "db.lmdb", ["a", "b", "c"], size=8, progress=False)
    lines = Path(report["report"]).read_text(encoding="utf-8").splitlines()[1:]
    assert lines == ["b\tmissing (but b.png is there: --extension .png)", "c\tmissing"]
    assert "2 of 3 images missing or unreadable, stored as flagged blanks (1 of them are there with another " \
           "extension: see --extension)" in caplog.text
    again = build_image_lmdb(folder, tmp_path / "png.lmdb", ["b"], size=8, extension=".png", progress=False)
    assert again["blank"] == 0


def test_dataset_build_lmdb_script_takes_v_for_debug_logging(tiny, tmp_path):
    script = load_script(ROOT / "Dataset" / "build_lmdb.py", "build_lmdb_script")
    root = logging.getLogger()
    before = root.level
    try:
        root.setLevel(logging.INFO)
        script.main(["--images", tiny["image_dir"], "--items", tiny["items"], "--out", str(tmp_path / "x.lmdb"), "-v"])
        assert root.level == logging.DEBUG and (tmp_path / "x.lmdb").is_dir()
    finally:
        root.setLevel(before)


def test_dataset_build_lmdb_script_refuses_an_unknown_encoding_in_one_line(tiny, tmp_path, capsys):
    """``Dataset/build_lmdb.py`` (the authors' command) checks --encoding as ``iisan build-lmdb`` does."""

    script = load_script(ROOT / "Dataset" / "build_lmdb.py", "build_lmdb_script")
    with pytest.raises(SystemExit) as stopped:
        script.main(["--images", tiny["image_dir"], "--items", tiny["items"], "--out", str(tmp_path / "x.lmdb"),
                     "--encoding", "klingon"])
    assert stopped.value.code == 2 and not (tmp_path / "x.lmdb").exists()
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "build_lmdb.py: error: encoding='klingon' is not a text encoding Python knows (e.g. utf-8, latin-1, cp1252)")


def test_dataset_build_lmdb_script_without_images_names_its_folder_and_refuses_stray_flags(tmp_path, capsys,
                                                                                            monkeypatch):

    script = load_script(ROOT / "Dataset" / "build_lmdb.py", "build_lmdb_script")
    monkeypatch.setattr(script, "HERE", tmp_path)  # a Dataset folder without the authors' archives
    for argv, expected in (
            ([], f"no image folder in {tmp_path} (am_image_is, am_image_mi, am_image_op); unzip the authors' "
                 "archives there (Dataset/README.md), or pass --images DIR --out PATH"),
            (["--out", str(tmp_path / "x.lmdb")], "--items and --out go with --images (without it, every data set "
                                                  "found in Dataset/ is built)")):
        with pytest.raises(SystemExit) as stopped:
            script.main(argv)
        assert stopped.value.code == 2
        assert capsys.readouterr().err.strip().splitlines()[-1].endswith(f"error: {expected}")
    assert list(tmp_path.iterdir()) == []


def test_a_picture_is_squashed_to_the_side_with_bilinear_resampling(tmp_path):
    """The authors' Resize((224, 224)) on a PIL image: the whole picture squashed (not cropped) to a square,
    bilinear; a 10 x 7 gradient at side 4 (nearest resampling keeps other pixels: row 0 12,36,72,96)."""
    from iisan.data.image_build import load_image

    picture = (np.arange(7)[:, None] * 20 + np.arange(10)[None, :] * 12).astype(np.uint8)
    rgb = np.stack([picture, 255 - picture, picture // 2], axis=-1)
    Image.fromarray(rgb).save(tmp_path / "p.png")
    pixels, changed = load_image(tmp_path / "p.png", size=4)
    expected = np.asarray(Image.fromarray(rgb).resize((4, 4), Image.BILINEAR))
    assert pixels.shape == (4, 4, 3) and changed == "" and np.array_equal(pixels, expected)
    assert not np.array_equal(pixels, np.asarray(Image.fromarray(rgb).resize((4, 4), Image.NEAREST)))


def test_a_store_is_in_place_only_with_its_report(tmp_path, monkeypatch):
    """The report of problems was written after the store was renamed into place: a failed (or killed) write of
    it left a store without one, which the next build refused without --overwrite (and `iisan fetch` took as
    found in place, its report never written). Now the store stays out until its report is written."""
    import iisan.data.image_build as image_build
    from iisan.files import write_text_atomic

    folder = tmp_path / "img"
    folder.mkdir()
    Image.new("RGB", (8, 8), (9, 9, 9)).save(folder / "a.jpg")

    def full_disk(path, text):
        raise OutputError(f"could not write {path}: No space left on device")

    monkeypatch.setattr(image_build, "write_text_atomic", full_disk)
    with pytest.raises(OutputError, match="db.lmdb.report.tsv: No space left on device"):
        build_image_lmdb(folder, tmp_path / "db.lmdb", ["a", "b"], size=4, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith("iisan-lock")) == ["img"]
    monkeypatch.setattr(image_build, "write_text_atomic", write_text_atomic)
    report = build_image_lmdb(folder, tmp_path / "db.lmdb", ["a", "b"], size=4, progress=False)  # no --overwrite
    assert Path(report["report"]).read_text(encoding="utf-8").splitlines()[1:] == ["b\tmissing"]


def test_a_store_whose_rename_fails_keeps_its_own_report(tmp_path, monkeypatch):
    """The report is written before the store's rename: a rename that then failed left the old store beside the
    new build's report. The old report is put back with the old store."""
    import errno

    import iisan.files as files

    folder = tmp_path / "img"
    folder.mkdir()
    Image.new("RGB", (8, 8), (9, 9, 9)).save(folder / "a.jpg")
    build_image_lmdb(folder, tmp_path / "db.lmdb", ["a"], size=4, progress=False)
    before = (tmp_path / "db.lmdb.report.tsv").read_bytes()

    def failing(tmp, path):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(files, "replace_folder", failing)
    with pytest.raises(OutputError, match="db.lmdb: Input/output error"):
        build_image_lmdb(folder, tmp_path / "db.lmdb", ["a", "b"], size=4, progress=False, overwrite=True)
    assert (tmp_path / "db.lmdb.report.tsv").read_bytes() == before  # no "b missing" beside the old store
    assert ImageStore(tmp_path / "db.lmdb").get(["a"])[1].tolist() == [False]
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith("iisan-lock")) == [
        "db.lmdb", "db.lmdb.report.tsv", "img"]


def test_a_rebuild_removes_the_report_temporaries_of_killed_builds(tmp_path):
    """A build killed while writing its report (or holding the old report's link to put back) left
    ``.db.lmdb.report.tsv.<pid>-<hex>.tmp``, which nothing removed for an hour; the next build holds the lock,
    so it removes them as it removes the store's."""
    from iisan.files import temporary_sibling

    folder = tmp_path / "img"
    folder.mkdir()
    Image.new("RGB", (8, 8), (9, 9, 9)).save(folder / "a.jpg")
    build_image_lmdb(folder, tmp_path / "db.lmdb", ["a"], size=4, progress=False)
    left = [temporary_sibling(tmp_path / "db.lmdb.report.tsv") for _ in range(2)]
    for path in left:
        path.write_text("item_id\tproblem\n")
    build_image_lmdb(folder, tmp_path / "db.lmdb", ["a", "b"], size=4, progress=False, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith("iisan-lock")) == [
        "db.lmdb", "db.lmdb.report.tsv", "img"]
    assert (tmp_path / "db.lmdb.report.tsv").read_text().splitlines()[1:] == ["b\tmissing"]
