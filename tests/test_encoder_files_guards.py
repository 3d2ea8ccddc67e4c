"""Guards of the encoder folders, each pinned by its behaviour: `iisan fetch encoders` refuses a folder
fetched at another commit than the pinned one, a download whose index names shards it lacks, and an
image model without its preprocessor_config.json; the weights digest a cache records changes with an
image tower's preprocessor_config.json and with a weights file replaced by another of the same size and
modification time."""

from __future__ import annotations

import json
import os
import shutil
import time

import pytest

from iisan.errors import FetchError
from iisan.experiments.encoders import ENCODERS, HubModel, fetch_encoders
from iisan.model import encoder_files

from .test_fetch_encoders import FakeHub, repo_from

VIT, VIT_REPO = "vit-base-patch16-224", "google/vit-base-patch16-224"
BERT_REPO = "google-bert/bert-base-uncased"


@pytest.fixture()
def hub(tiny, tmp_path):
    return FakeHub({BERT_REPO: repo_from(tiny["text_model"], tmp_path, "bert"),
                    VIT_REPO: repo_from(tiny["image_model"], tmp_path, "vit")})


def test_a_folder_fetched_at_another_commit_than_the_pin_is_refused(hub, tmp_path, monkeypatch):
    root = tmp_path / "pretrained_models"
    fetch_encoders("iisan", root, hub)
    fetched = ENCODERS[VIT].revision
    monkeypatch.setitem(ENCODERS, VIT, HubModel(VIT_REPO, "ab" * 20, "image"))  # a later iisan pins another
    with pytest.raises(FetchError) as caught:
        fetch_encoders("iisan", root, hub)
    assert str(caught.value) == (f"{root / VIT} holds {VIT_REPO} at {fetched[:12]}, this version of iisan pins "
                                 f"{'ab' * 6}; move the folder away and run `iisan fetch encoders` again")
    assert len(hub.downloads) == 2  # not fetched again over it


def test_a_download_whose_index_names_shards_it_lacks_is_refused(hub, tmp_path):
    repo = hub.repos[BERT_REPO]
    (repo / "model.safetensors").rename(repo / "model-00001-of-00002.safetensors")
    index = {"metadata": {}, "weight_map": {"embeddings.word_embeddings.weight": "model-00001-of-00002.safetensors",
                                            "pooler.dense.weight": "model-00002-of-00002.safetensors"}}
    (repo / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(FetchError) as caught:
        fetch_encoders("iisan", tmp_path, hub)
    message = str(caught.value)
    assert message.startswith(f"{BERT_REPO}@86b5e0934494 lacks model-00002-of-00002.safetensors among the files a "
                              "run loads; the partial download stays in "), message
    assert "model-00001" not in message.split(" among ")[0]
    assert not (tmp_path / "bert-base-uncased").exists()


def test_an_image_model_without_its_preprocessor_config_is_refused(hub, tmp_path):
    (hub.repos[VIT_REPO] / "preprocessor_config.json").unlink()
    with pytest.raises(FetchError) as caught:
        fetch_encoders("iisan", tmp_path, hub)
    assert str(caught.value).startswith(f"{VIT_REPO}@3f49326eb077 lacks preprocessor_config.json among the files a "
                                        "run loads; "), str(caught.value)
    assert (tmp_path / "bert-base-uncased").is_dir() and not (tmp_path / VIT).exists()


def test_the_weights_digest_changes_with_an_image_towers_preprocessor_config(tiny, tmp_path):
    folder = tmp_path / "vit"
    shutil.copytree(tiny["image_model"], folder)
    before = encoder_files.weights_digest(folder)
    processor = folder / "preprocessor_config.json"
    settings = json.loads(processor.read_text())
    settings["image_mean"], settings["image_std"] = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    processor.write_text(json.dumps(settings))
    after = encoder_files.weights_digest(folder)
    assert after["digest"] != before["digest"]
    assert encoder_files.weights_digest(folder, known=before)["digest"] == after["digest"]  # the old record not taken
    assert "preprocessor_config.json" in after["files"]  # (its sizes and times kept, as the weights')


def _same_size_and_time(path, data: bytes, in_place: bool) -> None:
    """Put ``data`` (as long as the file) in ``path`` and give it back its modification time, as a copy
    that keeps times does (``cp -p``, ``rsync -t``): in place, or as a new file renamed over it."""
    st = os.stat(path)
    assert len(data) == st.st_size
    time.sleep(0.05)  # past the clock's coarse tick: the change time moves
    if in_place:
        with open(path, "r+b") as fh:
            fh.write(data)
    else:
        new = path.with_name(path.name + ".new")
        new.write_bytes(data)
        os.replace(new, path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (os.stat(path).st_size, os.stat(path).st_mtime_ns) == (st.st_size, st.st_mtime_ns)


@pytest.mark.parametrize("in_place", [False, True], ids=["replaced", "rewritten"])
def test_a_weights_file_changed_with_its_size_and_time_kept_is_hashed_again(tiny, tmp_path, in_place):
    folder = tmp_path / "bert"
    shutil.copytree(tiny["text_model"], folder)
    weights = folder / "model.safetensors"
    original = weights.read_bytes()
    first = encoder_files.weights_digest(folder)
    changed = bytearray(original)
    changed[-1] ^= 0xFF  # one byte of the last tensor's data, past the header
    assert len(changed) > 8 + int.from_bytes(original[:8], "little")
    _same_size_and_time(weights, bytes(changed), in_place)
    later = encoder_files.weights_digest(folder)  # same process: its memo must not answer
    assert later["digest"] != first["digest"]
    assert encoder_files.weights_digest(folder, known=first)["digest"] == later["digest"]  # nor the old record
    _same_size_and_time(weights, original, in_place)
    assert encoder_files.weights_digest(folder, known=later)["digest"] == first["digest"]
