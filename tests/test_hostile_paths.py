"""Paths a hostile file system gives: a target name near NAME_MAX, a temporary that cannot even be looked at,
files this user may not read (which safetensors reports as missing), names that are not valid UTF-8 and
symbolic links to nothing. Each is one line that says what is wrong, in the operating system's words."""

from __future__ import annotations

import builtins
import errno
import logging
import os
import shutil
from pathlib import Path

import pytest
from transformers import AutoModel

from iisan import files
from iisan.claims import claim_output, expect_folders
from iisan.cli.main import main
from iisan.config import UTF8_PATHS, Config
from iisan.data import cache
from iisan.data.cache_build import SIDECAR, ShardDir
from iisan.data.datasets import DATASETS
from iisan.data.image_build import write_image_lmdb
from iisan.errors import CacheError, ConfigError, EncoderError, OutputError, TrainingError
from iisan.experiments import exports, seed_table
from iisan.experiments.versa_check import versa_gpu_check
from iisan.files import TEMPORARY, stale_temporaries, temporary_sibling, write_text_atomic
from iisan.model.caching import claim_cache_folder
from iisan.model.encoder_loading import load_from_folder
from iisan.model.tiny import vocabulary, write_bert
from iisan.train import checkpoint, run_results, runfolder, weights
from iisan.train.trainer import train

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
    or ``load_file`` of each of ``modules`` says what safetensors says then: 'No such file or directory' (tests
    run as root, where chmod stops no read)."""

    def make(path: Path, *modules) -> None:
        real_open = builtins.open

        def refusing_open(file, *args, **kwargs):
            if Path(file) == path:
                raise PermissionError(errno.EACCES, "Permission denied", str(file))
            return real_open(file, *args, **kwargs)

        monkeypatch.setattr(files, "open", refusing_open, raising=False)
        for module in modules:
            for name in ("safe_open", "load_file"):
                if not hasattr(module, name):
                    continue
                reader = getattr(module, name)

                def missing(file, *args, real=reader, **kwargs):
                    if Path(file) == path:
                        raise FileNotFoundError(f"No such file or directory: {file}")
                    return real(file, *args, **kwargs)

                monkeypatch.setattr(module, name, missing)

    return make


def refuse_read_text(monkeypatch, refused) -> None:
    """``Path.read_text`` of each path for which ``refused(path)`` holds says 'Permission denied'."""
    real_read_text = Path.read_text

    def read_text(self, *args, **kwargs):
        if refused(self):
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real_read_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", read_text)


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
    refuse_read_text(monkeypatch, lambda path: path.parent == folder)
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


def test_a_pipe_or_a_folder_where_a_weights_file_is_read_is_one_line_not_a_hang(tmp_path):
    """A named pipe called best.safetensors would block whoever opened it until something wrote to it: it is
    refused unopened, as a folder of that name is; a folder named as a cache file in --cache-dir is simply not
    an IISAN cache (no 'make it readable')."""
    os.mkfifo(pipe := tmp_path / "best.safetensors")
    (folder := tmp_path / "folder.safetensors").mkdir()
    for path in (pipe, folder):
        with pytest.raises(TrainingError, match="not a regular file") as info:
            weights.read_weights(path)
        assert str(path) in str(info.value) and "\n" not in str(info.value)
    (cached := tmp_path / "c" / "text.safetensors").mkdir(parents=True)
    with pytest.raises(OutputError, match=f"--cache-dir {cached} exists and is not an IISAN cache"):
        claim_cache_folder(Config(cache_dir=str(cached.parent), items="items.tsv"))


def test_a_folder_where_a_run_record_is_expected_is_called_a_folder(tmp_path):
    """results.json as a folder in a run folder: said so, not 'cannot be read (Is a directory): make it readable'."""
    (run := tmp_path / "run").mkdir()
    (run / runfolder.RESULTS).mkdir()
    with pytest.raises(OutputError, match="is not an IISAN run folder") as info:
        runfolder.claim_run_folder(run)
    assert "make it readable" not in str(info.value)
    assert run_results.results_or_reason(run / runfolder.RESULTS) == ({}, "is a folder, not a file")


def test_unreadable_encoder_weights(tmp_path, unreadable):
    folder = write_bert(tmp_path / "tiny-bert", vocabulary(["a title"]), hidden=32, layers=1, heads=2, seed=1)
    unreadable(Path(folder) / "model.safetensors")
    with pytest.raises(EncoderError) as info:
        load_from_folder(AutoModel, str(folder), "text encoder")
    assert "model.safetensors" in said_in_the_os_words(info.value)


@pytest.fixture(scope="module")
def finished(tiny, tiny_cache, tmp_path_factory) -> tuple[Config, Path]:
    """A finished run of 2 epochs, with checkpoints epoch-0000 and epoch-0001, and its config: never change it."""
    out = tmp_path_factory.mktemp("hostile-runs")
    cfg = Config(**{k: tiny[k] for k in ("users", "items", "images", "text_model", "image_model")},
                 cache_dir=tiny_cache, out_dir=str(out), run_name="base", device="cpu", num_workers=0,
                 progress=False, batch_size=16, epochs=2, max_steps_per_epoch=2, eval_batch_size=64,
                 encode_batch_size=32)
    train(cfg)
    return cfg, out / "base"


def test_an_unreadable_checkpoint_is_refused_in_one_line_and_the_one_before_is_taken(finished, unreadable, caplog):
    """Not a PermissionError from hashing it, nor 'No such file' from safetensors; pruning leaves it too."""
    cfg, run = finished
    root = run / checkpoint.CHECKPOINTS
    newest = root / "epoch-0001" / checkpoint.MODEL
    unreadable(newest, checkpoint)
    with caplog.at_level(logging.WARNING):
        found, refused = checkpoint.latest(root, cfg.to_dict())
    assert found.path == root / "epoch-0000" and refused == [f"{newest} cannot be read (Permission denied)"]
    assert f"refusing checkpoint: {newest} cannot be read (Permission denied)" in caplog.text
    assert checkpoint.verify(newest.parent, digests=False) == refused[0]  # as pruning checks it


def test_a_checkpoint_unreadable_after_its_check_says_so(finished, unreadable, monkeypatch):
    """Read after ``verify`` (or by another rank): 'cannot be read', naming the file, not 'No such file'."""
    cfg, run = finished
    newest = run / checkpoint.CHECKPOINTS / "epoch-0001"
    unreadable(newest / checkpoint.TRAIN_STATE, checkpoint)
    monkeypatch.setattr(checkpoint, "verify", lambda path, digests=True: None)
    why = checkpoint.examine(newest, cfg.to_dict())
    assert why == f"{newest / checkpoint.TRAIN_STATE} cannot be read (Permission denied)"
    with pytest.raises(TrainingError) as info, checkpoint.restoring(newest):
        checkpoint.read(newest)
    assert "make it readable" in said_in_the_os_words(info.value)


def test_a_finished_run_whose_results_cannot_be_read_is_not_trained_over(finished, tmp_path, monkeypatch):
    """Its checkpoints removed, its config.json alone would let a fresh start overwrite it."""
    cfg, run = finished
    folder = tmp_path / "run"
    shutil.copytree(run, folder)
    shutil.rmtree(folder / checkpoint.CHECKPOINTS)
    before = (folder / runfolder.RESULTS).read_bytes()
    refuse_read_text(monkeypatch, lambda path: path == folder / runfolder.RESULTS)
    with pytest.raises(OutputError) as info:
        train(cfg.replace(out_dir=str(tmp_path), run_name="run"))
    assert str(info.value) == (f"results.json of {folder} cannot be read (Permission denied): make it readable, "
                               "or use another --run-name")
    assert (folder / runfolder.RESULTS).read_bytes() == before


def test_an_unreadable_earlier_export_is_not_called_someone_elses(tmp_path, unreadable):
    out = tmp_path / "embeddings"
    out.mkdir()
    items = out / "items.safetensors"
    items.write_bytes(b"an earlier export")
    unreadable(items, exports)
    with pytest.raises(OutputError) as info:  # not 'exists and is not embeddings IISAN exported'
        exports.refuse_other_exports(out, {"run_dir": str(tmp_path), "best_epoch": "0", "config": "{}"})
        claim_output(items, exports.is_export, "embeddings IISAN exported", "--out", overwrite=True)  # as export()
    assert "not embeddings" not in said_in_the_os_words(info.value)


def test_a_cache_build_whose_manifest_cannot_be_read_is_not_called_anothers(tmp_path, monkeypatch):
    sidecar = tmp_path / SIDECAR
    sidecar.mkdir()
    (sidecar / "manifest.json").write_text("{}")
    (sidecar / "chunk-000000.safetensors").write_bytes(b"a shard")
    refuse_read_text(monkeypatch, lambda path: path == sidecar / "manifest.json")
    with pytest.raises(OutputError) as info:  # not 'exists and is not a cache build in progress'
        ShardDir(tmp_path, "key", 1, 8).open()
    assert "not a cache build" not in said_in_the_os_words(info.value)
    assert sorted(os.listdir(sidecar)) == ["chunk-000000.safetensors", "manifest.json"]  # nothing discarded


def test_verify_point_with_an_unreadable_recorded_cache_says_so_before_rebuilding(tiny, tmp_path, monkeypatch,
                                                                                   unreadable):
    root, work = tmp_path / "data", tmp_path / "work"
    monkeypatch.setattr(seed_table, "minilm_path", lambda: tiny["text_model"])  # the real encoder is optional
    spec = DATASETS["Scientific"]
    (root / spec.folder).mkdir(parents=True)
    for name, source in ((spec.users_file, tiny["users"]), (spec.items_file, tiny["items"])):
        shutil.copy(source, root / spec.folder / name)  # the tiny data set as the real files
    cfg = seed_table.point_config("iisan-text", "Scientific", 1, root, work)
    (Path(cfg.out_dir) / cfg.run_name).mkdir(parents=True)
    (Path(cfg.out_dir) / cfg.run_name / "results.json").write_text("{}")
    recorded = cache.cache_file(cfg.cache_dir, "text")
    recorded.parent.mkdir()
    recorded.write_bytes(b"a cache")
    unreadable(recorded, seed_table)
    rebuilt = []
    monkeypatch.setattr(seed_table, "build_cache_from_config", lambda *args, **kwargs: rebuilt.append(args))
    with pytest.raises(CacheError) as info:
        seed_table.verify_point("iisan-text", "Scientific", 1, root, work, tmp_path / "scratch")
    assert str(recorded) in said_in_the_os_words(info.value) and not rebuilt


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


@pytest.mark.parametrize("argv", [["build-lmdb", "--images", "images", "--out", BAD],
                                  ["make-tiny-models", "--out", BAD],
                                  ["export", "run", "--out", BAD],
                                  ["fetch", "data", "--dataset", "Scientific", "--root", BAD],
                                  ["fetch", "encoders", "--root", BAD]], ids=lambda argv: "-".join(argv[:2]))
def test_an_output_not_utf8_of_a_command_without_a_config_is_refused_up_front(tmp_path, monkeypatch, capsys, argv):
    """Not a UnicodeEncodeError from LMDB or a tokenizer after the work, nor exports safetensors cannot open,
    nor a download whose files no run could then open."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as info:
        main(argv)
    said = capsys.readouterr().err
    assert info.value.code == 2
    assert f"argument {argv[-2]}: 'bad\\xff' is not valid UTF-8, which safetensors and LMDB" in said
    assert os.listdir(tmp_path) == []


def test_import_cache_into_a_folder_not_utf8_is_refused_by_its_config(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as info:
        main(["import-cache", "--from", "stored", "--items", "items.tsv", "--cache-dir", BAD])
    assert info.value.code == 2 and "(--cache-dir) is not valid UTF-8" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []


def test_writers_of_lmdb_and_model_folders_refuse_a_path_not_utf8(tmp_path):
    """Whoever calls them (`iisan fetch data --root`, a script's work folder): one line, nothing written."""
    with pytest.raises(OutputError, match="not valid UTF-8"):
        write_image_lmdb(tmp_path / BAD / "images.lmdb", ["a"], lambda _: (None, "missing"), size=8, progress=False)
    with pytest.raises(OutputError, match="not valid UTF-8"):
        write_bert(tmp_path / BAD / "tiny-bert", vocabulary(["a title"]), hidden=32, layers=1, heads=2)
    with pytest.raises(OutputError, match=r"^--work '[^']*/bad\\xff' is not valid UTF-8"):
        versa_gpu_check(tmp_path / "out", tmp_path / BAD, device="cpu")
    assert os.listdir(tmp_path) == []
