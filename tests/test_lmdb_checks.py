"""Damaged image LMDBs are refused in one line: a truncated ``data.mdb`` (an interrupted copy, which
would kill the reader with SIGBUS), a ``__meta__`` record with an absurd size; and ``build-lmdb
--overwrite`` never deletes a file someone else put in the folder it replaces."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import lmdb
import pytest

from iisan.data.image_build import build_image_lmdb
from iisan.data.images import META_KEY, ImageStore
from iisan.errors import ImageStoreError, OutputError

from ._cli_driver import run_forked


def _copy(tiny, tmp_path: Path, name: str) -> Path:
    out = tmp_path / name
    shutil.copytree(tiny["images"], out)
    return out


def _truncate(store: Path) -> tuple[int, int]:
    data = store / "data.mdb"
    with lmdb.open(str(store), readonly=True, lock=False) as env:
        need = (env.info()["last_pgno"] + 1) * env.stat()["psize"]
    have = os.path.getsize(data) // 3
    os.truncate(data, have)
    return have, need


def test_truncated_store_is_refused_in_one_line(tiny, tmp_path):
    store = _copy(tiny, tmp_path, "trunc.lmdb")
    have, need = _truncate(store)
    assert have < need
    expected = (f"{store} is not a whole LMDB (data.mdb is {have} bytes, its pages need {need}): copy it again, "
                "or move it away and rebuild it with `iisan build-lmdb`")
    # in a forked child first: were the check missing, the read would kill the process (SIGBUS)
    cache = tmp_path / "cache"
    done = run_forked(["cache", "--users", tiny["users"], "--items", tiny["items"], "--images", str(store),
                       "--image-model", tiny["image_model"], "--text-model", tiny["text_model"],
                       "--cache-dir", str(cache), "--towers", "image", "--no-progress"], tmp_path / "child")
    assert done.code not in (0, -7, 135), done.describe()
    assert done.last_line.endswith(expected), done.describe()
    assert "Traceback" not in done.err, done.describe()
    # and in this process, now that the child proved it safe
    with pytest.raises(ImageStoreError) as caught:
        ImageStore(store)
    assert str(caught.value) == expected and "\n" not in str(caught.value)
    with pytest.raises(ImageStoreError):  # refused again, not remembered as open
        ImageStore(store)


def test_whole_copy_is_still_read(tiny, tmp_path):
    store = _copy(tiny, tmp_path, "whole.lmdb")
    images = ImageStore(store)
    assert images.size == 64


def test_truncated_tiny_file_is_refused_in_one_line(tiny, tmp_path):
    store = _copy(tiny, tmp_path, "stub.lmdb")
    os.truncate(store / "data.mdb", 100)
    with pytest.raises(ImageStoreError, match=f"^{store} is not a (readable|whole) LMDB") as caught:
        ImageStore(store)
    assert "\n" not in str(caught.value)


def _set_meta(store: Path, **changes) -> None:
    with lmdb.open(str(store), lock=False) as env, env.begin(write=True) as txn:
        meta = json.loads(txn.get(META_KEY))
        meta.update(changes)
        txn.put(META_KEY, json.dumps(meta).encode())


@pytest.mark.parametrize("size", [-5, 0, 100000, 1e300, "Infinity"])
def test_absurd_meta_size_is_refused_in_one_line(tiny, tmp_path, size):
    store = _copy(tiny, tmp_path, "meta.lmdb")
    if size == "Infinity":
        with lmdb.open(str(store), lock=False) as env, env.begin(write=True) as txn:
            txn.put(META_KEY, b'{"format": "iisan-images/1", "size": Infinity}')
    else:
        _set_meta(store, size=size)
    expected = (f"{store}: the metadata record '__meta__' is damaged; rebuild the store with "
                "`iisan build-lmdb --overwrite`")
    with pytest.raises(ImageStoreError) as caught:
        ImageStore(store)
    assert str(caught.value) == expected


def test_a_store_of_another_format_is_refused_in_one_line(tiny, tmp_path):
    store = _copy(tiny, tmp_path, "other.lmdb")
    _set_meta(store, format="x")
    with pytest.raises(ImageStoreError) as caught:
        ImageStore(store)
    assert str(caught.value) == (f"{store}: the metadata record says format 'x', not 'iisan-images/1' (a store of "
                                 "another version or tool); rebuild it with `iisan build-lmdb --overwrite`")


def test_overwrite_refuses_a_folder_holding_a_user_file(tiny, tmp_path):
    store = _copy(tiny, tmp_path, "ok.lmdb")
    notes = store / "notes.txt"
    notes.write_text("mine\n")
    before = (store / "data.mdb").read_bytes()
    with pytest.raises(OutputError) as caught:
        build_image_lmdb(tiny["image_dir"], store, size=16, progress=False, overwrite=True)
    assert str(caught.value) == (f"--out {store} holds files IISAN did not write (notes.txt); move them away to "
                                 "replace it")
    assert notes.read_text() == "mine\n" and (store / "data.mdb").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".ok.lmdb.") and "tmp" in p.name) == []


def test_overwrite_refuses_a_user_subfolder_from_the_command_line(tiny, tmp_path):
    store = _copy(tiny, tmp_path, "ok.lmdb")
    (store / "keep").mkdir()
    (store / "keep" / "a.txt").write_text("x")
    done = run_forked(["build-lmdb", "--images", tiny["image_dir"], "--out", str(store), "--size", "16",
                       "--overwrite"], tmp_path / "child")
    assert done.code != 0 and "Traceback" not in done.err, done.describe()
    assert done.last_line.endswith(f"--out {store} holds files IISAN did not write (keep); move them away to "
                                   "replace it"), done.describe()
    assert (store / "keep" / "a.txt").read_text() == "x"


def test_overwrite_replaces_a_store_of_its_own(tiny, tmp_path):
    store = _copy(tiny, tmp_path, "ok.lmdb")
    (store / "lock.mdb").write_bytes(b"")  # what an LMDB opened with locking leaves
    build_image_lmdb(tiny["image_dir"], store, size=16, progress=False, overwrite=True)
    assert ImageStore(store).size == 16


@pytest.mark.parametrize("size, count", [(224, 1), (224, 30), (64, 30), (8, 30)])
def test_the_space_asked_for_covers_the_store_written(tmp_path, monkeypatch, size, count):
    """A 224 x 224 picture takes 37 whole LMDB overflow pages, 0.7 % over its bytes: a disk with free space in that
    gap passed the check and filled during the write (20,314 pictures: 2.87 GiB written, 2.85 GiB asked for)."""
    import numpy as np
    from PIL import Image

    from iisan.data import image_build

    folder = tmp_path / "img"
    folder.mkdir()
    for i in range(count):
        pixels = np.random.default_rng(i).integers(0, 255, (20, 20, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i}.jpg")
    asked, require_space = [], image_build.require_space
    monkeypatch.setattr(image_build, "require_space", lambda path, needed, what: (asked.append(needed),
                                                                                 require_space(path, needed, what)))
    build_image_lmdb(folder, tmp_path / "s.lmdb", [str(i) for i in range(count)], size=size, progress=False)
    written = sum(p.stat().st_size for p in (tmp_path / "s.lmdb").iterdir())
    assert written <= asked[0] <= written * 1.05 + (1 << 16)  # enough, and not far more
