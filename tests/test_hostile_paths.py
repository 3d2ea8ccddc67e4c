"""Paths a hostile file system gives: a target name near NAME_MAX, a temporary that cannot even be looked at,
files this user may not read (which safetensors reports as missing), names that are not valid UTF-8 and
symbolic links to nothing. Each is one line that says what is wrong, in the operating system's words."""

from __future__ import annotations

import builtins
import errno
import os
from pathlib import Path

import pytest
from transformers import AutoModel

from iisan import files
from iisan.cli.main import main
from iisan.config import UTF8_PATHS, Config
from iisan.data import cache
from iisan.errors import CacheError, ConfigError, EncoderError, OutputError, TrainingError
from iisan.files import TEMPORARY, expect_folders, stale_temporaries, temporary_sibling, write_text_atomic
from iisan.model.caching import claim_cache_folder
from iisan.model.encoder_loading import load_from_folder
from iisan.model.tiny import vocabulary, write_bert
from iisan.train import runfolder, weights

BAD = b"bad\xff".decode("utf-8", "surrogateescape")  # how Python holds a file name of undecodable bytes


# --------------------------------------------------------------------------------------------------
# atomic writes beside a long name


@pytest.mark.parametrize("name", ["x" * 240, "x" * 255, "é" * 127])  # 240, 255 and 254 bytes: all valid names
def test_a_long_name_is_written_through_a_temporary_of_a_valid_name(tmp_path, name):
    write_text_atomic(tmp_path / name, "a")
    assert os.listdir(tmp_path) == [name] and (tmp_path / name).read_text() == "a"


def test_stale_temporaries_of_a_long_name_are_its_own_alone(tmp_path):
    """Two long names that differ only past the kept head: each one's temporaries are told apart."""
    mine, other = tmp_path / ("x" * 240 + "a"), tmp_path / ("x" * 240 + "b")
    left = [temporary_sibling(mine), temporary_sibling(other)]
    for tmp in left:
        tmp.write_text("killed")
        assert len(os.fsencode(tmp.name)) <= 255 and TEMPORARY.match(tmp.name)
    assert stale_temporaries(mine) == [left[0]] and stale_temporaries(other) == [left[1]]


def test_a_failed_write_whose_temporary_cannot_be_looked_at_names_the_target(tmp_path, monkeypatch):
    """Cleaning up after a failed write must not hide it: the temporary's stat failing (a name too long, a
    permission) still gives 'could not write <target>' with the first error's words."""
    real_is_dir = Path.is_dir

    def full_disk(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(self))

    def is_dir(self):
        if TEMPORARY.match(self.name):
            raise OSError(errno.ENAMETOOLONG, "File name too long", str(self))
        return real_is_dir(self)

    monkeypatch.setattr(Path, "write_text", full_disk)
    monkeypatch.setattr(Path, "is_dir", is_dir)
    target = tmp_path / "report.tsv"
    with pytest.raises(OutputError) as info:
        write_text_atomic(target, "a")
    assert str(info.value) == f"could not write {target}: No space left on device"


# --------------------------------------------------------------------------------------------------
# files this user may not read


@pytest.fixture
def unreadable(monkeypatch):
    """``unreadable(path, *modules)``: opening ``path`` is refused ('Permission denied'), and the ``safe_open``
    of each of ``modules`` says what safetensors says then: 'No such file or directory' (tests run as root,
    where chmod stops no read)."""

    def make(path: Path, *modules) -> None:
        real_open = builtins.open

        def refusing_open(file, *args, **kwargs):
            if Path(file) == path:
                raise PermissionError(errno.EACCES, "Permission denied", str(file))
            return real_open(file, *args, **kwargs)

        monkeypatch.setattr(files, "open", refusing_open, raising=False)
        for module in modules:
            real_safe_open = module.safe_open

            def safe_open(file, *args, real=real_safe_open, **kwargs):
                if Path(file) == path:
                    raise FileNotFoundError(f"No such file or directory: {file}")
                return real(file, *args, **kwargs)

            monkeypatch.setattr(module, "safe_open", safe_open)

    return make


def said_in_the_os_words(err: BaseException) -> str:
    message = str(err)
    assert "Permission denied" in message and "missing" not in message and "No such file" not in message, message
    return message


def test_unreadable_best_weights_are_not_called_missing(tmp_path, unreadable):
    """A rerun of a finished run whose best.safetensors it may not read: not 'missing, use another --run-name'."""
    best = tmp_path / "run" / runfolder.BEST
    best.parent.mkdir()
    best.write_bytes(b"weights")
    unreadable(best, runfolder)
    with pytest.raises(TrainingError) as info:
        runfolder.unfinished_weights(best.parent, Config(), {"best_epoch": 0})
    assert "make it readable" in said_in_the_os_words(info.value)


def test_a_run_folder_whose_records_cannot_be_read_is_not_called_foreign(tmp_path, monkeypatch):
    """Not 'no run config.json; choose another --run-name': the run may be there, unread."""
    folder = tmp_path / "run"
    folder.mkdir()
    for name in ("config.json", runfolder.RESULTS):
        (folder / name).write_text("{}")
    real_read_text = Path.read_text

    def read_text(self, *args, **kwargs):
        if self.parent == folder:
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real_read_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", read_text)
    with pytest.raises(OutputError) as info:
        runfolder.claim_run_folder(folder)
    assert "config.json cannot be read (Permission denied)" in said_in_the_os_words(info.value)


def test_unreadable_weights_file_is_not_called_cut_short(tmp_path, unreadable):
    best = tmp_path / "best.safetensors"
    best.write_bytes(b"weights")
    unreadable(best, weights)
    with pytest.raises(TrainingError) as info:
        weights.read_weights(best)
    assert "cut short" not in said_in_the_os_words(info.value)


def test_unreadable_cache_file(tmp_path, unreadable):
    path = tmp_path / "c2" / "text.safetensors"
    path.parent.mkdir()
    path.write_bytes(b"a cache")
    unreadable(path, cache)
    with pytest.raises(CacheError) as info:
        cache.read_metadata(path)
    said_in_the_os_words(info.value)
    with pytest.raises(OutputError) as info:  # not 'exists and is not an IISAN cache'
        claim_cache_folder(Config(cache_dir=str(path.parent), items="items.tsv"))
    assert "not an IISAN cache" not in said_in_the_os_words(info.value)


def test_unreadable_encoder_weights(tmp_path, unreadable):
    folder = write_bert(tmp_path / "tiny-bert", vocabulary(["a title"]), hidden=32, layers=1, heads=2, seed=1)
    unreadable(Path(folder) / "model.safetensors")
    with pytest.raises(EncoderError) as info:
        load_from_folder(AutoModel, str(folder), "text encoder")
    assert "model.safetensors" in said_in_the_os_words(info.value)


# --------------------------------------------------------------------------------------------------
# names that are not valid UTF-8 (safetensors cannot open them)


@pytest.mark.parametrize("key", UTF8_PATHS)
def test_a_path_that_is_not_utf8_is_refused_by_the_config(key):
    with pytest.raises(ConfigError) as info:
        Config(**{key: BAD})
    message = str(info.value)
    assert f"--{key.replace('_', '-')}" in message and "'bad\\xff'" in message and "not valid UTF-8" in message


def test_data_files_not_utf8_are_still_taken():
    """Python reads them, whatever their names (tests/test_cache.py builds a cache from such an items file)."""
    assert Config(users=BAD, items=BAD).items == BAD


def test_cache_into_a_folder_not_utf8_writes_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as info:
        main(["cache", "--items", "items.tsv", "--cache-dir", BAD, "--no-progress"])
    assert info.value.code == 2 and "--cache-dir) is not valid UTF-8" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []


def test_reading_weights_at_a_path_not_utf8_says_so(tmp_path):
    best = tmp_path / BAD / "best.safetensors"
    best.parent.mkdir()
    best.write_bytes(b"weights")
    with pytest.raises(TrainingError) as info:
        weights.read_weights(best)
    assert "not valid UTF-8" in str(info.value) and "cut short" not in str(info.value)


# --------------------------------------------------------------------------------------------------
# symbolic links to nothing


@pytest.fixture
def dangling(tmp_path) -> Path:
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "nowhere")
    return link


def test_out_dir_a_link_to_nothing(dangling):
    with pytest.raises(OutputError) as info:  # not 'could not write link/r: File exists'
        runfolder.lock_run_folder(dangling / "r")
    assert "symbolic link to no folder" in str(info.value) and str(dangling) in str(info.value)


def test_cache_dir_a_link_to_nothing(dangling):
    with pytest.raises(OutputError) as info:  # not 'could not write link/.iisan-lock: File exists'
        claim_cache_folder(Config(cache_dir=str(dangling), items="items.tsv"))
    assert str(info.value).startswith(f"--cache-dir {dangling} is a symbolic link to no folder")


def test_expect_folders_a_link_to_nothing(dangling):
    with pytest.raises(OutputError) as info:  # not 'is a file'
        expect_folders(out=dangling / "sub")
    assert str(info.value).startswith(f"--out {dangling / 'sub'} is inside {dangling}, a symbolic link to no folder")
