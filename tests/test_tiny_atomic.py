"""A tiny model folder appears whole or not at all: written beside its name and renamed into place, so
a failure or a kill mid-write leaves nothing under the model's name that a rerun could take for a
finished model; what a killed writer left is removed by the next one, and nothing of anyone else's is."""

from __future__ import annotations

import errno
import os
import signal

import pytest
import transformers

from iisan.errors import OutputError
from iisan.files import TEMPORARY
from iisan.model.encoder_files import TINY_MARKER
from iisan.model.tiny import vocabulary, write_bert, write_decoder, write_vit

from ._cli_driver import changed, leftovers, run_forked, snapshot

VOCAB = vocabulary(["a tiny vocabulary of words"])
SMALL = dict(hidden=8, layers=1, heads=1, image_size=16, patch_size=8)


def full_disk_in(cls, monkeypatch):
    """``cls.save_pretrained`` writes its files, then fails as a full disk does."""
    original = cls.save_pretrained

    def save(self, folder, *args, **kwargs):
        original(self, folder, *args, **kwargs)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(cls, "save_pretrained", save)


def test_a_write_that_fails_midway_leaves_no_folder_and_a_rerun_succeeds(tmp_path, monkeypatch):
    target = tmp_path / "models" / "tiny-bert"
    with monkeypatch.context() as patch:
        full_disk_in(transformers.BertModel, patch)  # after the tokenizer and the weights are written
        with pytest.raises(OutputError) as err:
            write_bert(target, VOCAB, hidden=8, layers=1, heads=1)
    assert str(err.value) == f"could not write {target}: No space left on device"
    assert list((tmp_path / "models").iterdir()) == []  # no folder, no temporary, no lock
    assert write_bert(target, VOCAB, hidden=8, layers=1, heads=1) == target
    assert (target / TINY_MARKER).is_file()
    assert transformers.AutoModel.from_pretrained(target).config.hidden_size == 8
    assert transformers.AutoTokenizer.from_pretrained(target).tokenize("tiny words") == ["tiny", "words"]


def test_a_failed_rewrite_keeps_the_previous_model_whole(tmp_path, monkeypatch):
    target = write_vit(tmp_path / "vit", seed=0, **SMALL)
    before = snapshot(target)
    with monkeypatch.context() as patch:
        full_disk_in(transformers.ViTImageProcessor, patch)  # the weights were written, the processor not
        with pytest.raises(OutputError, match="No space left on device"):
            write_vit(target, seed=1, **SMALL)
    assert not changed(before, snapshot(target)) and sorted(p.name for p in tmp_path.iterdir()) == ["vit"]
    write_vit(target, seed=1, **SMALL)  # a rewrite that succeeds replaces it
    assert changed(before, snapshot(target)) == [f"{target / 'model.safetensors'} changed"]


def test_an_error_that_is_not_a_write_passes_through_and_cleans_up(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("a bug, not a full disk")

    monkeypatch.setattr(transformers.PreTrainedTokenizerFast, "save_pretrained", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        write_decoder(tmp_path / "llama", "llama", ["some titles"], hidden=8, layers=1, heads=2)
    assert list(tmp_path.iterdir()) == []


def test_what_a_killed_writer_left_is_removed_and_only_that(tmp_path):
    """A kill leaves our temporary folder (``.<name>.<pid>-<hex>.tmp``) and no model folder; the next
    write removes it. Names that only look like ours are someone else's and stay."""
    killed = tmp_path / ".vit.4242-0badc0de.tmp"
    killed.mkdir()
    (killed / "config.json").write_text("{}")  # cut short: no weights
    assert TEMPORARY.match(killed.name)
    strangers = [tmp_path / ".vit.tmp", tmp_path / "vit.partial", tmp_path / ".other.4242-0badc0de.tmp"]
    for stranger in strangers:
        stranger.mkdir()
        (stranger / "notes.txt").write_text("mine")
    before = snapshot(*strangers)
    write_vit(tmp_path / "vit", **SMALL)
    assert not killed.exists() and not changed(before, snapshot(*strangers))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["vit", *(s.name for s in strangers)])


def kill_during(cls):
    """A fault for ``run_forked``: ``cls.save_pretrained`` writes part of its files, then the process is
    killed (SIGKILL: no handler, no cleanup runs)."""

    def fault():
        original = cls.save_pretrained

        def save(self, folder, *args, **kwargs):
            original(self, folder, *args, **kwargs)
            os.kill(os.getpid(), signal.SIGKILL)

        cls.save_pretrained = save

    return fault


def test_make_tiny_models_killed_mid_write_leaves_no_partial_model_and_a_rerun_finishes(tmp_path):
    out = tmp_path / "models"
    outcome = run_forked(["make-tiny-models", "--out", str(out), "--hidden", "8", "--layers", "1"], tmp_path / "s",
                         fault=kill_during(transformers.ViTModel))
    assert outcome.code == -signal.SIGKILL, outcome.describe()
    assert (out / "tiny-bert" / "model.safetensors").is_file()  # written before the kill: whole
    assert not (out / "tiny-vit" / "config.json").exists()  # no partial model under its name
    left = [p.name for p in out.iterdir() if TEMPORARY.match(p.name)]
    assert len(left) == 1 and left[0].startswith(".tiny-vit.") and (out / left[0] / "model.safetensors").is_file()

    outcome = run_forked(["make-tiny-models", "--out", str(out), "--hidden", "8", "--layers", "1"], tmp_path / "s")
    assert outcome.code == 0, outcome.describe()
    assert sorted(p.name for p in out.iterdir()) == ["tiny-bert", "tiny-llama", "tiny-vit"]
    assert not leftovers(out)
    for name in ("tiny-bert", "tiny-vit", "tiny-llama"):
        assert (out / name / TINY_MARKER).is_file()
        assert transformers.AutoConfig.from_pretrained(out / name).hidden_size in (8, 24)


def test_a_folder_of_someone_elses_is_never_replaced(tmp_path):
    for name, files in (("theirs", {"notes.txt": "years of work"}),
                        ("their-model", {"config.json": "{}", "README.md": "# my model"})):
        folder = tmp_path / name
        folder.mkdir()
        for file, text in files.items():
            (folder / file).write_text(text)
        before = snapshot(folder)
        with pytest.raises(OutputError, match=f"model folder {folder} exists and is not a random model folder"):
            write_vit(folder, **SMALL)
        assert not changed(before, snapshot(folder)) and sorted(os.listdir(folder)) == sorted(files)
    (tmp_path / "link").symlink_to(tmp_path / "theirs")
    with pytest.raises(OutputError, match="is a symbolic link"):
        write_vit(tmp_path / "link", **SMALL)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "their-model", "theirs"]


def test_a_folder_written_before_the_marker_existed_is_rewritten(tmp_path):
    """The demo's model folders from before this change hold only files of the names written here."""
    old = write_vit(tmp_path / "vit", **SMALL)
    (old / TINY_MARKER).unlink()
    write_vit(old, seed=3, **SMALL)
    assert (old / TINY_MARKER).is_file()
