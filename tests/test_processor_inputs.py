"""What an encoder folder says of its inputs is what a run computes with, and a cache records it: the image
processor's settings wherever transformers reads them (processor_config.json first), whether it normalises
and rescales, its image size against the model's, the precision the encoders ran in, and tokenizer folders
whose vocabulary is a sentencepiece model."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch

from iisan.data.cache import cache_file, read_metadata
from iisan.data.run_data import load_data
from iisan.errors import CacheError, EncoderError, OutputError
from iisan.model.backbones import load_image_encoder
from iisan.model.build import build_model
from iisan.model.caching import build_cache_from_config
from iisan.model.encoder_loading import load_tokenizer
from iisan.model.tiny import write_image_tower

CPU = torch.device("cpu")


def _edit(path: Path, change) -> None:
    values = json.loads(path.read_text())
    change(values)
    path.write_text(json.dumps(values))


def _nested(folder: Path) -> Path:
    """``folder``'s image processor settings moved into processor_config.json, as a transformers 5
    ``Processor.save_pretrained`` writes them (and no preprocessor_config.json)."""
    settings = json.loads((folder / "preprocessor_config.json").read_text())
    (folder / "processor_config.json").write_text(json.dumps({"image_processor": settings,
                                                              "processor_class": "ViTProcessor"}))
    (folder / "preprocessor_config.json").unlink()
    return folder / "processor_config.json"


def test_settings_in_processor_config_json_are_read_and_named(tiny, tmp_path):
    folder = Path(shutil.copytree(tiny["image_model"], tmp_path / "vit"))
    nested = _nested(folder)
    assert load_image_encoder(str(folder), (0, 1)).norm["std"] == [0.5, 0.5, 0.5]
    _edit(nested, lambda v: v["image_processor"].update(image_std=[0.25, 0.25, 0.25]))
    assert load_image_encoder(str(folder), (0, 1)).norm["std"] == [0.25, 0.25, 0.25]
    _edit(nested, lambda v: v["image_processor"].update(image_std=[0, 0, 0]))
    with pytest.raises(EncoderError, match=r"its processor_config.json gives image_std \(0, 0, 0\)"):
        load_image_encoder(str(folder), (0, 1))


def test_a_cache_is_refused_once_processor_config_json_changes(tiny_config, tiny, tmp_path):
    folder = Path(shutil.copytree(tiny["image_model"], tmp_path / "vit"))
    nested = _nested(folder)
    cfg = tiny_config(towers="image", modality="intra", image_model=str(folder), cache_dir=str(tmp_path / "c"))
    build_cache_from_config(cfg, dtype="float32")
    data = load_data(cfg)
    build_model(cfg, data, CPU)  # the cache of these settings is read
    _edit(nested, lambda v: v["image_processor"].update(image_std=[0.25, 0.25, 0.25]))
    with pytest.raises(CacheError, match=r"was built for encoder .* with weights digest"):
        build_model(cfg, data, CPU)  # other pixels give other states: not the cache of this folder any more
    with pytest.raises(OutputError, match="holds a cache built with other settings .*encoder_weights"):
        build_cache_from_config(cfg, dtype="float32")  # nor is it rebuilt over without --overwrite


@pytest.mark.parametrize("setting,expected", [("do_normalize", ([0.0] * 3, [1.0] * 3))])
def test_a_processor_that_does_not_normalise_leaves_pixels_at_0_to_1(tiny, tmp_path, setting, expected):
    folder = Path(shutil.copytree(tiny["image_model"], tmp_path / "vit"))
    _edit(folder / "preprocessor_config.json", lambda v: v.update({setting: False}))
    norm = load_image_encoder(str(folder), (0, 1)).norm
    assert (norm["mean"], norm["std"]) == expected
    assert load_image_encoder(str(folder), (0, 1), image_norm="authors").norm["std"] == [0.5] * 3  # the rule's


@pytest.mark.parametrize("change,shown", [({"do_rescale": False}, "do_rescale False, rescale_factor None"),
                                          ({"rescale_factor": 1.0}, "do_rescale True, rescale_factor 1.0")])
def test_a_processor_that_does_not_rescale_to_0_1_is_refused(tiny, tmp_path, change, shown):
    folder = Path(shutil.copytree(tiny["image_model"], tmp_path / "vit"))
    _edit(folder / "preprocessor_config.json", lambda v: v.update(change))
    with pytest.raises(EncoderError, match=rf"^cannot load image processor from '{folder}': its "
                                           rf"preprocessor_config.json gives {shown}; IISAN feeds the tower pixels "
                                           r"rescaled to 0..1"):
        load_image_encoder(str(folder), (0, 1))


def test_an_image_size_the_position_embeddings_are_not_for_is_refused(tiny, tmp_path):
    folder = Path(shutil.copytree(tiny["image_model"], tmp_path / "vit"))
    _edit(folder / "preprocessor_config.json", lambda v: v.update(size={"height": 64, "width": 64}))
    with pytest.raises(EncoderError, match=rf"^image encoder '{folder}': its preprocessor_config.json sizes images "
                                           r"to 64 pixels, its config.json's image_size is 32"):
        load_image_encoder(str(folder), (0, 1))
    dinov2 = write_image_tower(tmp_path / "dinov2", "dinov2", hidden=24, layers=2, image_size=64)
    _edit(dinov2 / "preprocessor_config.json", lambda v: v.update(crop_size={"height": 32, "width": 32}))
    assert load_image_encoder(str(dinov2), (0, 1)).norm["size"] == 32  # DINOv2 interpolates: any size


def test_a_cache_records_the_precision_its_encoders_ran_in(tiny_config, tmp_path):
    cfg = tiny_config(towers="text", modality="intra", cache_dir=str(tmp_path / "c"), encoder_dtype="bfloat16",
                      cache_dtype="float32")
    build_cache_from_config(cfg)
    meta = read_metadata(cache_file(cfg.cache_dir, "text"))
    assert (meta["encoder_dtype"], meta["dtype"]) == ("bfloat16", "float32")
    data = load_data(cfg)
    build_model(cfg, data, CPU)
    build_model(cfg.replace(encoder_dtype="auto"), data, CPU)  # auto takes the precision it was built in
    with pytest.raises(CacheError, match=r"was built for encoder_dtype bfloat16 \(config asks for float32\)"):
        build_model(cfg.replace(encoder_dtype="float32"), data, CPU)
    with pytest.raises(OutputError, match="encoder_dtype bfloat16 there, float32 now"):
        build_cache_from_config(cfg.replace(encoder_dtype="float32"))
    earlier = tmp_path / "earlier"  # a cache built before caches recorded it: taken as it is
    earlier.mkdir()
    from safetensors.torch import load_file, save_file

    save_file(load_file(str(cache_file(cfg.cache_dir, "text"))), str(cache_file(earlier, "text")),
              {k: v for k, v in meta.items() if k != "encoder_dtype"})
    build_model(cfg.replace(encoder_dtype="float32", cache_dir=str(earlier)), data, CPU)


def test_a_sentencepiece_vocabulary_is_a_vocabulary(tiny, tmp_path):
    folder = Path(shutil.copytree(tiny["text_model"], tmp_path / "bert"))
    (folder / "vocab.txt").rename(folder / "spm.model")  # a DeBERTa-v3 folder ships spm.model, no tokenizer.json
    for name in ("tokenizer.json",):
        (folder / name).unlink(missing_ok=True)
    if importlib.util.find_spec("sentencepiece") is None:
        with pytest.raises(EncoderError, match=rf"^text encoder folder {folder} has its vocabulary only as spm.model, "
                                               r"which needs the sentencepiece package"):
            load_tokenizer(str(folder), None)
    (folder / "spm.model").unlink()
    with pytest.raises(EncoderError, match="has no tokenizer files"):
        load_tokenizer(str(folder), None)
