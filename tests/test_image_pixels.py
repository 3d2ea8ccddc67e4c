"""Pictures as a viewer shows them (``build-lmdb --pixels displayed``, the default) against the authors'
``convert('RGB')`` alone (``--pixels authors``): a phone photo turned upright by its EXIF orientation, a
cut-out's transparent background on white, 16-bit grey scaled, not clipped; the same pixels either way for
a plain JPEG. Files a folder build does not read are named, and a store of another size than the image
tower takes is said once."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from iisan.data.image_build import build_image_lmdb
from iisan.data.images import ImageStore


def stored(folder, tmp_path, name: str, pixels: str, extension: str = ".png", size: int = 8) -> np.ndarray:
    out = tmp_path / f"{name}-{pixels}.lmdb"
    build_image_lmdb(folder, out, [name], size=size, extension=extension, progress=False, pixels=pixels)
    images, blank = ImageStore(out).get([name])
    assert not blank.any()
    return images[0].astype(int)


@pytest.fixture()
def folder(tmp_path):
    path = tmp_path / "images"
    path.mkdir()
    return path


def test_sixteen_bit_grey_is_scaled_not_clipped(folder, tmp_path):
    Image.fromarray(np.tile(np.linspace(0, 65535, 8).astype(np.uint16), (8, 1))).save(folder / "g.png")
    shown = stored(folder, tmp_path, "g", "displayed")[0, :, 0]
    assert shown.tolist() == [round(v * 255 / 65535) for v in np.linspace(0, 65535, 8)]  # 0, 36, 73, ..., 255
    assert stored(folder, tmp_path, "g", "authors")[0, 1:, 0].tolist() == [255] * 7  # PIL's convert clips
    for value in (255, 256):  # a picture's own brightest pixel does not pick the scale: 16 bits are 16 bits
        Image.fromarray(np.full((8, 8), value, np.uint16)).save(folder / f"v{value}.png")
        assert stored(folder, tmp_path, f"v{value}", "displayed")[0, 0, 0] == 1
    Image.fromarray(np.linspace(0, 300, 64, dtype=np.float32).reshape(8, 8), "F").save(folder / "f.tiff")
    floats = stored(folder, tmp_path, "f", "displayed", extension=".tiff")[..., 0]
    assert floats.min() < 10 and floats.max() > 245  # floats beyond 0..1: over their own range, not clipped


def test_a_colour_key_is_transparent_too(folder, tmp_path):
    picture = np.full((8, 8, 3), (10, 20, 30), np.uint8)
    picture[2:6, 2:6] = (0, 0, 200)
    Image.fromarray(picture).save(folder / "k.png", transparency=(10, 20, 30))  # an RGB PNG's tRNS colour key
    assert stored(folder, tmp_path, "k", "displayed")[0, 0].tolist() == [255, 255, 255]
    assert stored(folder, tmp_path, "k", "authors")[0, 0].tolist() == [10, 20, 30]


def test_a_transparent_background_is_white_not_the_colour_under_it(folder, tmp_path):
    picture = np.zeros((8, 8, 4), np.uint8)
    picture[...] = (255, 0, 0, 0)  # transparent, red underneath
    picture[2:6, 2:6] = (0, 0, 200, 255)  # an opaque blue object
    Image.fromarray(picture, "RGBA").save(folder / "c.png")
    shown, theirs = stored(folder, tmp_path, "c", "displayed"), stored(folder, tmp_path, "c", "authors")
    assert shown[0, 0].tolist() == [255, 255, 255] and theirs[0, 0].tolist() == [255, 0, 0]
    assert shown[4, 4].tolist() == theirs[4, 4].tolist() == [0, 0, 200]


def test_an_exif_rotated_photo_is_stored_upright(folder, tmp_path, caplog):
    picture = np.zeros((16, 16, 3), np.uint8)
    picture[:, :8] = (255, 0, 0)  # left half red, right half blue, as the sensor saw it
    picture[:, 8:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    Image.fromarray(picture).save(folder / "p.png", exif=exif)
    with caplog.at_level(logging.INFO, logger="iisan"):
        shown = stored(folder, tmp_path, "p", "displayed", size=16)
    theirs = stored(folder, tmp_path, "p", "authors", size=16)
    assert theirs[0, 15].tolist() == [0, 0, 255] and theirs[0, 0].tolist() == [255, 0, 0]
    assert shown[0, 0].tolist() == shown[0, 15].tolist() == [255, 0, 0]  # upright: red on top, blue below
    assert shown[15, 0].tolist() == [0, 0, 255]
    assert "stored as a viewer shows them: 1 turned upright by their EXIF orientation" in caplog.text


def test_a_plain_jpeg_is_the_same_either_way(tiny, tmp_path):
    from iisan.data.interactions import read_items

    ids = read_items(tiny["items"]).ids[:5]
    a, b = tmp_path / "a.lmdb", tmp_path / "b.lmdb"
    build_image_lmdb(tiny["image_dir"], a, ids, size=16, progress=False)
    build_image_lmdb(tiny["image_dir"], b, ids, size=16, progress=False, pixels="authors")
    assert ImageStore(a).digest() == ImageStore(b).digest()
    assert (ImageStore(a).meta["pixels"], ImageStore(b).meta["pixels"]) == ("displayed", "authors")  # recorded


def test_a_folder_build_names_the_files_it_does_not_read(folder, tmp_path, caplog):
    for name in ("a.jpg", "b.jpg", "c.JPG", "d.jpeg"):
        Image.new("RGB", (8, 8)).save(folder / name, format="JPEG")
    (folder / "sub").mkdir()
    (folder / "e.jpg").mkdir()  # a folder named as an image
    (folder / "f.jpg").symlink_to(folder / "gone.jpg")  # a broken link: counted among the subfolders before
    with caplog.at_level(logging.WARNING):
        report = build_image_lmdb(folder, tmp_path / "db.lmdb", size=8, progress=False)
    assert report["stored"] == 2
    assert f"{folder}: not read: 1 .JPG file(s), 1 .jpeg file(s), 2 subfolder(s), 1 broken link(s) (only *.jpg files " \
           "are: --extension)" in caplog.text
    listed = build_image_lmdb(folder, tmp_path / "listed.lmdb", ["a", "e"], size=8, progress=False)
    assert Path(listed["report"]).read_text(encoding="utf-8").splitlines()[1:] == ["e\ta folder"]


def test_a_store_of_another_size_than_the_tower_is_a_warning_once_and_in_every_runs_log(tiny_config, caplog):
    """Said once per process, a sweep's later runs had it in none of their train.logs: it is a warning the
    first time and an info line after."""
    from iisan.data.run_data import load_data
    from iisan.model import build

    cfg = tiny_config(method="fft", feed="live")  # tiny's LMDB: 64 px; its ViT: 32 px
    with caplog.at_level(logging.INFO, logger="iisan"):
        for _ in range(2):
            build.build_model(cfg, load_data(cfg), "cpu")
    said = [(r.levelname, r.getMessage()) for r in caplog.records if "resized on the fly" in r.getMessage()]
    text = (f"{cfg.images} holds 64 x 64 images and the image tower takes 32 x 32: each batch's images are resized "
            "on the fly; `iisan build-lmdb --size 32` stores them at the tower's size")
    assert said == [("WARNING", text), ("INFO", text)]


def test_a_file_named_in_another_unicode_form_is_pointed_at(folder, tmp_path):
    """The items file says 'café' (composed, NFC); macOS saved the picture as 'cafe' + a combining accent."""
    import unicodedata

    Image.new("RGB", (8, 8)).save(folder / (unicodedata.normalize("NFD", "café") + ".jpg"), format="JPEG")
    report = build_image_lmdb(folder, tmp_path / "db.lmdb", [unicodedata.normalize("NFC", "café")], size=8,
                              progress=False)
    (line,) = Path(report["report"]).read_text(encoding="utf-8").splitlines()[1:]
    assert line.startswith("café\tmissing (but ") and "another Unicode normal form; rename it" in line
