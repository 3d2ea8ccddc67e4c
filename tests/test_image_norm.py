"""``--image-norm``: pixels normalised with each image processor's statistics (default) or with the
authors' 0.5 / 0.5 for every tower; a cache records which, and a run of the other is refused."""

from __future__ import annotations

import json

import pytest
import torch

from iisan.data.cache import CacheExpectation, check_metadata, read_metadata
from iisan.data.run_data import load_data
from iisan.errors import CacheError, ConfigError
from iisan.model.backbones import BackboneEncoder, load_image_encoder
from iisan.model.build import build_model
from iisan.model.caching import build_cache_from_config
from iisan.model.inputs import pixels_to_input
from iisan.model.tiny import write_image_tower
from iisan.train.same_inputs import cache_record, refuse_changed_data

IMAGENET_MEAN = [0.485, 0.456, 0.406]


@pytest.fixture(scope="module")
def dinov2(tmp_path_factory) -> str:
    """A tiny DINOv2 tower, whose processor normalises with ImageNet's statistics (not 0.5)."""
    return str(write_image_tower(tmp_path_factory.mktemp("dinov2") / "dinov2", "dinov2", hidden=16, layers=2,
                                 image_size=32, patch_size=8, seed=3))


def image_tower(model: torch.nn.Module) -> BackboneEncoder:
    (tower,) = [m for m in model.modules() if isinstance(m, BackboneEncoder) and m.modality == "image"]
    return tower


def test_authors_normalisation_is_half_for_every_tower_and_changes_the_pixels(dinov2):
    own = load_image_encoder(dinov2, (0, 1, 2))
    theirs = load_image_encoder(dinov2, (0, 1, 2), image_norm="authors")
    assert own.norm["mean"] == pytest.approx(IMAGENET_MEAN) and own.norm["rule"] == "processor"
    assert theirs.norm == {**own.norm, "mean": [0.5] * 3, "std": [0.5] * 3, "rule": "authors"}
    pixels = torch.full((1, 32, 32, 3), 255, dtype=torch.uint8)  # white, channels last: (1 - mean) / std
    assert pixels_to_input(pixels, theirs.norm, torch.float32)[0, :, 0, 0].tolist() == [1.0, 1.0, 1.0]
    expected = [(1 - m) / s for m, s in zip(IMAGENET_MEAN, own.norm["std"], strict=True)]
    assert pixels_to_input(pixels, own.norm, torch.float32)[0, :, 0, 0].tolist() == pytest.approx(expected)
    with pytest.raises(ValueError, match="image_norm 'imagenet' is not one of processor, authors"):
        load_image_encoder(dinov2, (0, 1, 2), image_norm="imagenet")


def test_a_live_run_normalises_as_its_config_says(tiny_config, dinov2):
    cfg = tiny_config(feed="live", towers="image", image_model=dinov2)
    data = load_data(cfg)
    assert image_tower(build_model(cfg, data, torch.device("cpu"))[0]).norm["mean"] == pytest.approx(IMAGENET_MEAN)
    authors = build_model(cfg.replace(image_norm="authors"), data, torch.device("cpu"))[0]
    assert image_tower(authors).norm["mean"] == [0.5] * 3


def test_a_cache_records_its_normalisation_and_a_run_of_the_other_is_refused(tiny_config, dinov2, tmp_path):
    cfg = tiny_config(towers="image", image_model=dinov2, cache_dir=str(tmp_path / "c"), image_norm="authors")
    build_cache_from_config(cfg, dtype="float32")
    assert read_metadata(tmp_path / "c" / "image.safetensors")["image_norm"] == "authors"
    data = load_data(cfg)
    build_model(cfg, data, torch.device("cpu"))
    with pytest.raises(CacheError, match=r"image.safetensors was built for image_norm authors \(config asks for "
                                         r"processor\) — rebuild it with `iisan cache --overwrite` "
                                         r"\(or use it as built: --image-norm authors\), or keep it and give this "
                                         r"run another --cache-dir$"):
        build_model(cfg.replace(image_norm="processor"), data, torch.device("cpu"))


def test_a_cache_from_before_the_flag_was_normalised_by_the_processor(tmp_path):
    path = tmp_path / "image.safetensors"
    meta = {"modality": "image", "layers": "[0, 1]", "width": "16", "items_fingerprint": "f", "encoder": "vit"}
    check_metadata(path, meta, CacheExpectation(image_norm="processor"))
    with pytest.raises(CacheError, match=r"built for image_norm processor \(config asks for authors\)"):
        check_metadata(path, meta, CacheExpectation(image_norm="authors"))
    check_metadata(path, {**meta, "source": "imported"}, CacheExpectation(image_norm="authors"))  # the authors' own


def test_a_run_recorded_before_the_flag_still_matches_its_cache(tiny_config, tiny_cache, tmp_path):
    """results.json written before caches recorded image_norm: the same cache is not "another cache"; a
    cache normalised otherwise is."""
    cfg = tiny_config(cache_dir=tiny_cache)
    (tmp_path / "best.safetensors").write_bytes(b"")  # the run kept weights of its inputs
    now = cache_record(cfg)
    assert now["image"]["image_norm"] == "processor" and "image_norm" not in now["text"]
    before = {m: {k: v for k, v in record.items() if k != "image_norm"} for m, record in now.items()}
    refuse_changed_data(cfg, {"cache": before}, tmp_path)
    other = json.loads(json.dumps(before))
    other["image"]["image_norm"] = "authors"
    with pytest.raises(ConfigError, match=r"image.safetensors is not the cache .* \(image_norm authors then, "
                                          r"processor now\)"):
        refuse_changed_data(cfg, {"cache": other}, tmp_path)


def test_a_run_refused_for_its_cache_trains_once_the_cache_is_right(tiny_config, tmp_path):
    """The run stopped before training (nothing kept): the corrected cache is not "another cache"."""
    from iisan.train.trainer import train

    cfg = tiny_config(cache_dir=str(tmp_path / "c"), image_norm="authors", epochs=1, max_steps_per_epoch=2)
    build_cache_from_config(cfg, dtype="float32")
    with pytest.raises(CacheError, match="image_norm authors"):
        train(cfg.replace(image_norm="processor"))
    build_cache_from_config(cfg.replace(image_norm="processor"), dtype="float32", overwrite=True)
    assert train(cfg.replace(image_norm="processor"))["status"] == "finished"
