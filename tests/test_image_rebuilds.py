"""``iisan build-lmdb`` run again: a store built from the same pictures (names, sizes, modification times), items
and settings is kept, as make would keep it, where the second run of a script that prepares its data refused
without --overwrite; anything else that differs is refused as before, and --overwrite builds again."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from iisan.cli.main import main
from iisan.data.image_build import build_image_lmdb, write_image_lmdb
from iisan.data.images import ImageStore
from iisan.errors import OutputError

OTHER = "already holds an IISAN image LMDB built {}; pass --overwrite to replace it"
CHANGED = "from other pictures or items"


@pytest.fixture
def pictures(tmp_path) -> Path:
    folder = tmp_path / "img"
    folder.mkdir()
    for n, item in enumerate(("a", "b", "c")):
        Image.new("RGB", (12, 12), (40 * n, 0, 0)).save(folder / f"{item}.jpg")
    (folder / "d.jpg").write_bytes(b"not a jpeg")  # a flagged blank, kept as one
    return folder


def files(store: Path) -> dict[str, tuple[int, bytes]]:
    """Each file of ``store`` and its report, with its modification time: what a rebuild would change."""
    report = store.with_name(store.name + ".report.tsv")
    return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in (*store.iterdir(), report) if p.exists()}


def test_a_second_build_of_the_same_pictures_keeps_the_store_and_says_so(pictures, tmp_path, capsys):
    store = tmp_path / "images.lmdb"
    args = ["build-lmdb", "--images", str(pictures), "--out", str(store), "--size", "8", "--no-progress"]
    main(args)
    before = files(store)
    main(args)
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 2 and out[0].startswith(f"stored 4 images in {store} in ")
    assert out[1] == (f"kept {store}: built from these same 4 images and settings, unchanged since (1 flagged "
                      f"blanks, listed in {store}.report.tsv); --overwrite builds it again")
    assert files(store) == before
    assert ImageStore(store).blank_ids(["a", "d"]) == ([], ["d"])


@pytest.mark.parametrize("change, how", [
    ("picture rewritten", CHANGED), ("items", CHANGED),
    ("size", "with --size 8 (16 now)"), ("pixels", "with --pixels displayed (authors now)"),
    ("picture resized, same time", CHANGED), ("a pictureless item listed", CHANGED),
    ("report gone", "and its report images.lmdb.report.tsv is missing"),
])
def test_a_store_of_other_pictures_or_settings_is_refused_and_overwrite_builds_it_again(pictures, tmp_path, change,
                                                                                      how):
    store = tmp_path / "images.lmdb"
    build_image_lmdb(pictures, store, size=8, progress=False)
    before = files(store)
    settings = {"size": 8, "progress": False}
    if change == "a pictureless item listed":  # built from the list without it
        store_files = build_image_lmdb(pictures, store, ["a", "b", "c", "d"], size=8, progress=False, overwrite=True)
        assert store_files["stored"] == 4
        before = files(store)
    if change == "picture rewritten":
        Image.new("RGB", (12, 12), (0, 0, 255)).save(pictures / "b.jpg")
    elif change == "picture resized, same time":  # (make's rule: the size or the time)
        info = os.stat(pictures / "b.jpg")
        Image.new("RGB", (30, 30), (0, 0, 255)).save(pictures / "b.jpg")
        os.utime(pictures / "b.jpg", ns=(info.st_atime_ns, info.st_mtime_ns))
    elif change == "a pictureless item listed":
        settings["item_ids"] = ["a", "b", "c", "d", "e"]
    elif change == "size":
        settings["size"] = 16
    elif change == "pixels":
        settings["pixels"] = "authors"
    elif change == "items":
        settings["item_ids"] = ["a", "b", "c"]
    else:
        (tmp_path / "images.lmdb.report.tsv").unlink()
        before.pop("images.lmdb.report.tsv")
    with pytest.raises(OutputError) as refused:
        build_image_lmdb(pictures, store, **settings)
    assert str(refused.value) == f"--out {store} " + OTHER.format(how)
    assert {k: v for k, v in files(store).items() if k in before} == before
    assert not build_image_lmdb(pictures, store, overwrite=True, **settings).get("kept")
    assert build_image_lmdb(pictures, store, **settings)["kept"]  # and now it is these inputs' store


def test_pictures_copied_with_new_times_keep_the_store_when_their_bytes_are_the_same(pictures, tmp_path, capsys,
                                                                                   monkeypatch):
    """`cp -r` of a data folder to a node's scratch disk gives every picture a new time: the store copied with them
    was refused, and a job script that prepares its data stopped (or built every image again with --overwrite)."""
    import shutil

    from iisan.data import image_build

    store = tmp_path / "images.lmdb"
    build_image_lmdb(pictures, store, size=8, progress=False)
    copied = tmp_path / "scratch"
    copied.mkdir()
    for name in ("img", "images.lmdb"):  # as cp -r copies: contents, new times
        shutil.copytree(tmp_path / name, copied / name, copy_function=shutil.copyfile)
    shutil.copyfile(tmp_path / "images.lmdb.report.tsv", copied / "images.lmdb.report.tsv")
    for picture in (copied / "img").iterdir():
        info = os.stat(picture)
        os.utime(picture, ns=(info.st_atime_ns, info.st_mtime_ns + 5_000_000_000))
    before, reads = files(copied / "images.lmdb"), []
    real = image_build.contents_digest
    monkeypatch.setattr(image_build, "contents_digest", lambda *a: reads.append(a) or real(*a))
    main(["build-lmdb", "--images", str(copied / "img"), "--out", str(copied / "images.lmdb"), "--size", "8",
          "--no-progress"])
    assert capsys.readouterr().out.startswith(f"kept {copied / 'images.lmdb'}: built from these same 4 images")
    assert files(copied / "images.lmdb") == before and len(reads) == 1  # read once, to tell
    main(["build-lmdb", "--images", str(pictures), "--out", str(store), "--size", "8", "--no-progress"])
    assert len(reads) == 1  # the original, its times unchanged: not read
    picture = copied / "img" / "b.jpg"  # the same size and time, other bytes: refused
    info, data = os.stat(picture), bytearray(picture.read_bytes())
    data[-3] ^= 0xFF
    picture.write_bytes(bytes(data))
    os.utime(picture, ns=(info.st_atime_ns, info.st_mtime_ns))
    with pytest.raises(OutputError, match=OTHER.format(CHANGED)):
        build_image_lmdb(copied / "img", copied / "images.lmdb", size=8, progress=False)
    with pytest.raises(OutputError, match=OTHER.format(r"with --size 8 \(16 now\)")):  # not read to tell
        build_image_lmdb(copied / "img", copied / "images.lmdb", size=16, progress=False)
    assert len(reads) == 2


def test_a_store_that_records_no_inputs_is_refused_as_before(pictures, tmp_path):
    """A store of an earlier version, or written by ``write_image_lmdb`` alone (synthetic data): its inputs are
    unknown, so it is not taken for these pictures' store."""
    store = tmp_path / "images.lmdb"
    store.with_name("images.lmdb.report.tsv").write_text("item_id\tproblem\n")
    for recorded, how in (({"pixels": "displayed"}, "by a version that did not record its pictures"),
                          # (formats.md: authors, where not recorded) --pixels authors would be refused next
                          (None, "by a version that did not record its pictures (with --pixels authors; displayed "
                           "now)"),
                          ({"pixels": "displayed", "extension": ".jpg", "inputs": "0" * 64},  # no contents: a hint
                           f"{CHANGED} (or its pictures changed since: their sizes or modification times, as a copy "
                           "without cp -p changes them)")):
        write_image_lmdb(store, ["a"], lambda _: (np.zeros((8, 8, 3), np.uint8), None), size=8, progress=False,
                         recorded=recorded, overwrite=True)
        with pytest.raises(OutputError, match=OTHER.format(how).replace("(", r"\(").replace(")", r"\)")):
            build_image_lmdb(pictures, store, size=8, progress=False)


def test_another_extension_is_named(pictures, tmp_path):
    """The same pictures under another extension, listed by --items: the store records the extension it read."""
    for picture in pictures.glob("*.jpg"):
        picture.with_suffix(".jpeg").write_bytes(picture.read_bytes())
    store = tmp_path / "images.lmdb"
    build_image_lmdb(pictures, store, ["a", "b"], size=8, progress=False)
    with pytest.raises(OutputError, match=OTHER.format(r"with --extension \.jpg \(\.jpeg now\)")):
        build_image_lmdb(pictures, store, ["a", "b"], size=8, extension=".jpeg", progress=False)


def test_a_store_being_built_is_not_kept(pictures, tmp_path):
    """Another process's build (``--overwrite``, other settings) holds the lock: the store there is about to be
    replaced, so a rerun is refused as before instead of taking it as kept."""
    from iisan.data.image_build import build_lock
    from iisan.errors import InUse

    store = tmp_path / "images.lmdb"
    build_image_lmdb(pictures, store, size=8, progress=False)
    with build_lock(store), pytest.raises(InUse, match=f"image LMDB {store} is in use by "):
        build_image_lmdb(pictures, store, size=8, progress=False)


def test_a_link_or_a_foreign_lmdb_at_out_is_refused_as_before(pictures, tmp_path):
    store = tmp_path / "images.lmdb"
    build_image_lmdb(pictures, store, size=8, progress=False)
    link = tmp_path / "link.lmdb"
    link.symlink_to(store)
    link.with_name("link.lmdb.report.tsv").write_bytes(store.with_name("images.lmdb.report.tsv").read_bytes())
    with pytest.raises(OutputError, match=f"--out {link} is a symbolic link"):
        build_image_lmdb(pictures, link, size=8, progress=False)
    import lmdb

    foreign = tmp_path / "foreign.lmdb"
    with lmdb.open(str(foreign), subdir=True) as env, env.begin(write=True) as txn:
        txn.put(b"a", b"x")
    with pytest.raises(OutputError, match=f"--out {foreign} exists and is not an IISAN image LMDB"):
        build_image_lmdb(pictures, foreign, size=8, progress=False)


def test_the_dataset_script_says_a_store_is_kept(pictures, tmp_path, capsys):
    from ._scripts import ROOT, load_script

    script = load_script(ROOT / "Dataset" / "build_lmdb.py", "build_lmdb_script")
    args = ["--images", str(pictures), "--out", str(tmp_path / "s.lmdb"), "--size", "8"]
    for _ in range(2):
        script.main(args)
    out = capsys.readouterr().out.splitlines()
    assert not out[0].endswith("kept: built from these same pictures and settings")
    assert out[1].endswith("(listed in " + str(tmp_path / "s.lmdb.report.tsv") + "), kept: built from these same "
                           "pictures and settings")


def test_a_build_records_the_contents_of_the_pictures_it_read_without_reading_them_again(pictures, tmp_path,
                                                                                         monkeypatch):
    """The contents digest was a second pass over every picture before each build; it is now what the build
    read, and the same as ``contents_digest`` reads later: a bad picture's bytes, a missing one and a folder
    where a picture belongs ("-") alike."""
    from iisan.data import image_build
    from iisan.data.image_inputs import contents_digest
    from iisan.data.images import own_meta

    (pictures / "e.jpg").mkdir()  # a folder where a picture belongs
    passes = []
    monkeypatch.setattr(image_build, "contents_digest", lambda *a: passes.append(a))
    ids = ["a", "b", "c", "d", "e", "gone"]
    build_image_lmdb(pictures, tmp_path / "images.lmdb", ids, size=8, progress=False)
    assert passes == []
    recorded = own_meta(tmp_path / "images.lmdb")["contents"]
    assert recorded == contents_digest(pictures, ids, ".jpg", 8, "displayed")
    assert recorded != contents_digest(pictures, ids, ".jpg", 8, "authors")


def test_the_inputs_digest_is_the_recipe_formats_md_gives_so_stores_of_earlier_versions_are_kept(pictures):
    """A store records ``inputs``; one built by an earlier version is kept only while the digest is computed as
    it was: the sha256 of [size, pixels, extension] as JSON, then per item ``id<TAB>size mtime_ns`` ("-" when
    missing)."""
    import hashlib
    import json

    from iisan.data.image_inputs import inputs_digest

    os.utime(pictures / "a.jpg", ns=(5, 1_700_000_000_123_456_789))
    ids = ["a", "b", "gone"]
    recipe = hashlib.sha256(json.dumps([8, "displayed", ".jpg"]).encode())
    for item_id in ids:
        path = pictures / f"{item_id}.jpg"
        recipe.update(f"{item_id}\t{path.stat().st_size} {path.stat().st_mtime_ns}\n".encode() if path.exists()
                      else f"{item_id}\t-\n".encode())
    assert inputs_digest(pictures, ids, ".jpg", 8, "displayed") == recipe.hexdigest()
