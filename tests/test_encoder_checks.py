"""Encoder folders whose files do not fit together: a text folder without its tokenizer or with another
model's, and weights that do not match the model's parameter names. Each is refused in one line, before
titles become [UNK] or weights random; intact folders still load."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from iisan.cli.main import main
from iisan.data.interactions import read_items
from iisan.errors import EncoderError
from iisan.model.backbones import load_image_encoder, load_text_encoder
from iisan.model.encoder_files import check_folder
from iisan.model.tiny import vocabulary, write_bert

from .conftest import six_groups

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")


def copy(folder: str, to: Path) -> Path:
    shutil.copytree(folder, to)
    return to


def with_tokenizer_of(folder: Path, other: Path) -> Path:
    """``folder`` with its tokenizer files replaced by ``other``'s."""
    for name in TOKENIZER_FILES:
        (folder / name).unlink(missing_ok=True)
        if (other / name).is_file():
            shutil.copy(other / name, folder / name)
    return folder


def rewrite_weights(folder: Path, change) -> Path:
    """``folder``'s model.safetensors with its tensors (name -> tensor) passed through ``change``."""
    path = folder / "model.safetensors"
    save_file(change(load_file(path)), path, metadata={"format": "pt"})
    return folder


def refused(load, name: str, pattern: str) -> str:
    with pytest.raises(EncoderError, match=pattern) as info:
        load(str(name), (0, 1))  # refused before the layers matter
    assert "\n" not in str(info.value)
    return str(info.value)


def test_text_folder_without_tokenizer_files_is_refused(tiny, tmp_path):
    """transformers 5 would build a tokenizer of the 5 special tokens: every title word [UNK]."""
    folder = with_tokenizer_of(copy(tiny["text_model"], tmp_path / "bert"), tmp_path / "nothing")
    refused(load_text_encoder, folder, rf"^text encoder folder {folder} has no tokenizer files \(tokenizer.json, "
                                       r"vocab.txt, .*\): copy them from the model's source$")


@pytest.mark.parametrize("cache_dir", ["cache", "new/deeper/cache", "existing"])
def test_text_folder_without_tokenizer_from_the_command_line(tiny, tmp_path, capsys, cache_dir):
    """Refused in one line, and the cache folder (with any parents) the refused command would have made is
    not left behind empty; one that existed stays."""
    folder = with_tokenizer_of(copy(tiny["text_model"], tmp_path / "bert"), tmp_path / "nothing")
    (tmp_path / "existing").mkdir()
    with pytest.raises(SystemExit) as info:
        main(["cache", "--users", tiny["users"], "--items", tiny["items"], "--cache-dir", str(tmp_path / cache_dir),
              "--text-model", str(folder), "--towers", "text", "--modality", "intra", "--no-progress"])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"iisan: error: text encoder folder {folder} has no tokenizer files") and "\n" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bert", "existing"]
    assert not any((tmp_path / "existing").iterdir())


def test_tokenizer_with_ids_beyond_the_model_vocabulary_is_refused(tiny, tmp_path):
    """A bigger tokenizer of another model: its ids would index past the embedding (an IndexError)."""
    words = vocabulary(read_items(tiny["items"]).titles) + [f"extra{i}" for i in range(300)]
    other = write_bert(tmp_path / "other", words, hidden=16, layers=1, heads=1)
    folder = with_tokenizer_of(copy(tiny["text_model"], tmp_path / "bert"), other)
    size = load_text_encoder(tiny["text_model"], six_groups(tiny["text_model"], "text")).model.config.vocab_size
    refused(load_text_encoder, folder, rf"^the tokenizer of '{folder}' has ids up to {len(words) - 1} but the "
                                       rf"model's vocab_size is {size} \(a tokenizer of another model\?\)")


def test_tokenizer_far_smaller_than_the_model_vocabulary_is_refused(tiny, tmp_path):
    """Fewer than half as many tokens as the model's vocab_size: another model's tokenizer, whose few ids
    would all fit, and most title words would become [UNK]."""
    other = write_bert(tmp_path / "other", vocabulary(["a tiny vocabulary"]), hidden=16, layers=1, heads=1)
    folder = with_tokenizer_of(copy(tiny["text_model"], tmp_path / "bert"), other)
    refused(load_text_encoder, folder, rf"^the tokenizer of '{folder}' knows 8 tokens but the model's vocab_size "
                                       r"is \d+ \(a tokenizer of another model, or one of special tokens only\?\)")


def test_a_tiny_model_an_older_version_wrote_with_special_tokens_only_says_to_write_it_again(tiny, tmp_path):
    """make-tiny-models before commit 7c7ec25 wrote a tokenizer of the special tokens alone: its own folder was
    told to 'use the tokenizer files the model came with', which are these."""
    specials = write_bert(tmp_path / "specials", vocabulary([]), hidden=16, layers=1, heads=1)
    folder = with_tokenizer_of(copy(tiny["text_model"], tmp_path / "bert"), specials)
    refused(load_text_encoder, folder, rf"^the tokenizer of '{folder}' knows 5 tokens but the model's vocab_size is "
                                       r"\d+: a tiny random model an older IISAN version wrote with a tokenizer "
                                       r"of special tokens only; write it again \(iisan make-tiny-models, or "
                                       r"iisan demo in a new folder\), and retrain what used it: its results change$")
    (folder / ".iisan-random-model").unlink()  # not ours: someone else's tokenizer of special tokens
    refused(load_text_encoder, folder, r"\(a tokenizer of another model, or one of special tokens only\?\): use the "
                                       r"tokenizer files the model came with; a tiny random model of an IISAN version "
                                       r"older still \(its folder unmarked\): write it again \(iisan "
                                       r"make-tiny-models\) and retrain what used it$")


def test_weights_under_another_prefix_are_refused_not_random(tiny, tmp_path):
    """Every tensor renamed (a wrapper's prefix): transformers would initialise the whole encoder at random."""
    for load, model, what in [(load_text_encoder, tiny["text_model"], "text"),
                              (load_image_encoder, tiny["image_model"], "image")]:
        folder = rewrite_weights(copy(model, tmp_path / what), lambda ts: {f"foo.{k}": v for k, v in ts.items()})
        message = refused(load, folder, rf"^{what} encoder folder {folder} does not hold the whole model: (\d+) of "
                                        r"\1 weights of \w+ are missing from its safetensors \(e.g. '[\w.]+'\), "
                                        r"which transformers would fill with random numbers; it holds \d+ weights "
                                        r"\w+ does not use \(e.g. 'foo\.[\w.]+'\): saved under other names")
        assert "pooler" not in message  # the pooler may be absent, and is not counted


def test_one_missing_weight_is_refused(tiny, tmp_path):
    key = "encoder.layer.0.attention.self.query.weight"
    folder = rewrite_weights(copy(tiny["text_model"], tmp_path / "bert"),
                             lambda ts: {k: v for k, v in ts.items() if k != key})
    refused(load_text_encoder, folder, rf"^text encoder folder {folder} does not hold the whole model: 1 of \d+ "
                                       rf"weights of BertModel are missing from its safetensors \(e.g. '{key}'\), "
                                       r"which transformers would fill with random numbers$")


def sharded(folder: Path, index: dict | None = None) -> Path:
    """``folder`` with its weights as one shard and an index (``index`` replaces the one save_pretrained writes)."""
    import json

    (folder / "model.safetensors").rename(folder / "model-00001-of-00001.safetensors")
    names = load_file(folder / "model-00001-of-00001.safetensors")
    written = {"metadata": {"total_size": 0}, "weight_map": dict.fromkeys(names, "model-00001-of-00001.safetensors")}
    (folder / "model.safetensors.index.json").write_text(json.dumps(written if index is None else index))
    return folder


def test_sharded_weights_load_and_a_broken_index_is_one_line(tiny, tmp_path):
    enc = load_text_encoder(str(sharded(copy(tiny["text_model"], tmp_path / "ok"))), (0, 1))
    assert enc.width == 32
    index = r"model.safetensors.index.json is not a sharded-weights index: expected a JSON object with 'metadata'"
    for n, broken in enumerate(({"weight_map": {"x": "model-00001-of-00001.safetensors"}}, [], {"metadata": {}})):
        folder = sharded(copy(tiny["text_model"], tmp_path / f"bad{n}"), broken)
        refused(load_text_encoder, folder, rf"^{folder}/{index}")
    lost = {"metadata": {}, "weight_map": {"x": "gone.safetensors"}}
    folder = sharded(copy(tiny["text_model"], tmp_path / "lost"), lost)
    refused(load_text_encoder, folder, r"index.json names weights files the folder lacks: gone.safetensors$")


def test_intact_encoders_load_and_an_unused_head_is_only_logged(tiny, towers, tmp_path, caplog):
    """The tiny BERT, ViT (saved without its pooler) and decoder LLMs (BPE tokenizers) load as they are;
    a checkpoint with a task head the bare encoder does not use loads too, with a line in the log."""
    assert load_text_encoder(tiny["text_model"], six_groups(tiny["text_model"], "text")).width == 32
    assert load_image_encoder(tiny["image_model"], six_groups(tiny["image_model"], "image")).width == 24
    for name in ("llama48x6", "qwen2_40x3", "gpt2_24x4"):
        enc = load_text_encoder(towers[name], six_groups(towers[name], "text"))
        assert len(enc.tokenizer) <= enc.model.config.vocab_size
    folder = rewrite_weights(copy(tiny["image_model"], tmp_path / "vit"),
                             lambda ts: {**ts, "classifier.weight": torch.zeros(2, 24)})
    with caplog.at_level(logging.INFO, logger="iisan"):
        assert load_image_encoder(str(folder), six_groups(str(folder), "image")).width == 24
    assert any("not used by ViTModel (e.g. 'classifier.weight'" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("share, refused_here", [(0.4, True), (0.6, False)])
def test_a_tokenizer_under_half_the_vocabulary_is_refused_and_one_over_half_is_not(tiny, tmp_path, share,
                                                                                  refused_here):
    """The line is half the model's vocab_size: 40 % of it refused, 60 % taken (a tokenizer trimmed of
    unused words, whose ids all fit)."""
    size = load_text_encoder(tiny["text_model"], six_groups(tiny["text_model"], "text")).model.config.vocab_size
    words = vocabulary(read_items(tiny["items"]).titles)[: int(size * share)]
    other = write_bert(tmp_path / "other", words, hidden=16, layers=1, heads=1)
    folder = with_tokenizer_of(copy(tiny["text_model"], tmp_path / "bert"), other)
    if refused_here:
        refused(load_text_encoder, folder, rf"^the tokenizer of '{folder}' knows {len(words)} tokens but the model's "
                                           rf"vocab_size is {size} ")
    else:
        assert len(load_text_encoder(folder, six_groups(folder, "text")).tokenizer) == len(words)


def test_a_model_folder_without_a_config_file_says_which_it_lacks(tmp_path):
    """No config.json, or one that is a folder, a pipe or a link to nothing (never opened: a pipe would hang)."""
    folder = tmp_path / "m"
    folder.mkdir()
    with pytest.raises(EncoderError, match=rf"^{folder} has no config.json; it is not a transformers model folder$"):
        check_folder(folder)
    config = folder / "config.json"
    for make in (config.mkdir, lambda: os.mkfifo(config), lambda: config.symlink_to("nowhere.json")):
        make()
        with pytest.raises(EncoderError, match=rf"^{config} is not a regular file; a transformers model folder holds "
                                               r"its config there as a JSON file$"):
            check_folder(folder)
        config.rmdir() if config.is_dir() else config.unlink()
