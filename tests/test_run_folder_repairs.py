"""Run folders that are not as their run left them: a checkpoint copied in from another run (pruning leaves
it, and keeps this run's newest), a finished run copied to another folder (reported, and returned, as the
folder it is in now), and a finished run whose best.safetensors is missing or cut short (resumed to write it
again when its newest checkpoint holds the best epoch, else refused in one line)."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import pytest
import torch

import iisan.train.checkpoint as checkpoint
import iisan.train.checkpoint_writing as checkpoint_writing
from iisan.config import Config
from iisan.errors import TrainingError
from iisan.train.trainer import train
from iisan.train.weights import read_weights

LEARNING_RATES = ("lr", "lr_image", "lr_text", "lr_adapter_image", "lr_adapter_text")


def tiny_run(tiny, tiny_cache, out: Path, **overrides) -> Path:
    values = {k: tiny[k] for k in ("users", "items", "images", "text_model", "image_model")}
    cfg = Config(**{**values, "cache_dir": tiny_cache, "out_dir": str(out), "run_name": "base", "device": "cpu",
                    "num_workers": 0, "progress": False, "batch_size": 16, "epochs": 1, "max_steps_per_epoch": 2,
                    "eval_batch_size": 64, "encode_batch_size": 32, **overrides})
    train(cfg)
    return out / "base"


@pytest.fixture(scope="module")
def finished(tiny, tiny_cache, tmp_path_factory) -> Path:
    """A finished run of one epoch: its best epoch (0) is its one checkpoint, epoch-0000. Copy it, never
    change it."""
    return tiny_run(tiny, tiny_cache, tmp_path_factory.mktemp("finished"))


@pytest.fixture(scope="module")
def stalled(tiny, tiny_cache, tmp_path_factory) -> Path:
    """A finished run of two epochs whose learning rates move no weight: epoch 1 does not improve on epoch 0,
    so its newest checkpoint, epoch-0001, is after its best epoch. Another config than ``finished``'s."""
    run = tiny_run(tiny, tiny_cache, tmp_path_factory.mktemp("stalled"), epochs=2,
                   **dict.fromkeys(LEARNING_RATES, 1e-12))
    assert json.loads((run / "results.json").read_text())["best_epoch"] == 0
    assert [p.name for p in checkpoint.checkpoints(run / "checkpoints")] == ["epoch-0001", "epoch-0000"]
    return run


def copied(run: Path, tmp_path: Path, **changes) -> tuple[Config, Path]:
    """A copy of ``run`` in another out dir under ``tmp_path``, and the config that runs it there."""
    folder = tmp_path / "elsewhere" / "copy"
    shutil.copytree(run, folder)
    saved = json.loads((folder / "config.json").read_text())
    return Config.from_dict({**saved, "out_dir": str(folder.parent), "run_name": "copy", **changes}), folder


def contents(folder: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def messages(caplog, start: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith(start)]



def copied_checkpoints(stalled: Path, tmp_path: Path) -> tuple[Path, dict]:
    """A copy of ``stalled``'s checkpoints folder under ``tmp_path``, and the config they were saved with."""
    root = tmp_path / "checkpoints"
    shutil.copytree(stalled / "checkpoints", root)
    return root, json.loads((root / "epoch-0000" / checkpoint.STATE).read_text())["config"]


def counted_checks(monkeypatch) -> list[str]:
    """The names of the checkpoints pruning reads and checks (``checked_state``), in order, from now on."""
    checked = []

    def counted(path, *args, **kwargs):
        checked.append(path.name)
        return checkpoint.checked_state(path, *args, **kwargs)

    monkeypatch.setattr(checkpoint_writing, "checked_state", counted)
    return checked


# --------------------------------------------------------------------------------------------------
# pruning (bug 13)


def test_a_foreign_checkpoint_is_neither_counted_nor_deleted_by_pruning(finished, stalled, tmp_path, caplog):
    """Another config's checkpoint copied in as epoch-0009: refused on resume, and pruning keeps the two
    newest of this run's own (keep_checkpoints=2) besides it, naming it once."""
    cfg, folder = copied(finished, tmp_path, epochs=4)
    foreign = folder / "checkpoints" / "epoch-0009"
    shutil.copytree(stalled / "checkpoints" / "epoch-0001", foreign)
    before = contents(foreign)
    with caplog.at_level(logging.INFO, logger="iisan"):
        results = train(cfg)
    assert results["status"] == "finished" and results["resumed_from"] == ["epoch-0000"]
    assert [p.name for p in checkpoint.checkpoints(folder / "checkpoints")] == ["epoch-0009", "epoch-0003",
                                                                                "epoch-0002"]
    assert contents(foreign) == before
    assert len(messages(caplog, f"refusing checkpoint: {foreign / 'state.json'} belongs to a different config")) == 1
    (left,) = messages(caplog, "pruning leaves")
    assert left.startswith(f"pruning leaves {foreign} in place, as this run cannot resume from it: "
                           f"{foreign / 'state.json'} belongs to a different config (lr=1e-12 there, 0.0002 now;")
    assert "--run-name" not in left


def test_a_refused_checkpoint_whose_name_is_needed_is_set_aside_and_a_note_keeps_its_folder(finished, stalled,
                                                                                             tmp_path, caplog):
    """Another config's checkpoint copied in as epoch-0002, a name this run writes: kept, byte for byte, as
    epoch-0002.set-aside (no checkpoint's name: never read nor pruned again). A note put in this run's own
    epoch-0000 keeps that folder whole when pruning would remove it."""
    cfg, folder = copied(finished, tmp_path, epochs=4)
    root = folder / "checkpoints"
    shutil.copytree(stalled / "checkpoints" / "epoch-0001", root / "epoch-0002")
    foreign = contents(root / "epoch-0002")
    (root / "epoch-0000" / "notes.txt").write_text("the run I showed at the group meeting\n")
    own = contents(root / "epoch-0000")
    with caplog.at_level(logging.INFO, logger="iisan"):
        results = train(cfg)
    assert results["status"] == "finished"
    aside = root / "epoch-0002.set-aside"
    assert {p.relative_to(aside): b for p, b in contents(aside).items()} == \
        {p.relative_to(root / "epoch-0002"): b for p, b in foreign.items()}
    assert checkpoint.verify(root / "epoch-0002") is None  # this run's own now
    assert messages(caplog, f"{root / 'epoch-0002'}, which this run could not resume from, is kept as {aside}")
    assert contents(root / "epoch-0000") == own
    (left,) = messages(caplog, f"pruning leaves {root / 'epoch-0000'} in place")
    assert left.endswith("as it holds files a checkpoint does not: notes.txt")
    assert [p.name for p in checkpoint.checkpoints(root)] == ["epoch-0003", "epoch-0002", "epoch-0000"]
    assert sorted(p.name for p in root.iterdir()) == ["epoch-0000", "epoch-0002", "epoch-0002.set-aside",
                                                      "epoch-0003"]


def test_pruning_leaves_a_damaged_checkpoint_and_keeps_the_last_good_one(stalled, tmp_path):
    """epoch-0002 just written, epoch-0001 cut short since: counting it would delete epoch-0000, the last
    checkpoint before the new one that a resume could use. (Pruning compares sizes with the manifest, not
    sha256 digests: hashing every kept checkpoint each epoch would read gigabytes for FFT.)"""
    root = tmp_path / "checkpoints"
    shutil.copytree(stalled / "checkpoints", root)
    shutil.copytree(root / "epoch-0001", root / "epoch-0002")
    model = root / "epoch-0001" / checkpoint.MODEL
    model.write_bytes(model.read_bytes()[:-8])
    config = json.loads((root / "epoch-0000" / checkpoint.STATE).read_text())["config"]
    checkpoint_writing.prune(root, 2, config, root / "epoch-0002")
    assert [p.name for p in checkpoint.checkpoints(root)] == ["epoch-0002", "epoch-0001", "epoch-0000"]
    checkpoint_writing.prune(root, 1, config, root / "epoch-0000")  # the one just written is kept, whatever is newer
    assert [p.name for p in checkpoint.checkpoints(root)] == ["epoch-0002", "epoch-0001", "epoch-0000"]
    checkpoint_writing.prune(root, 1, config, root / "epoch-0002")
    assert [p.name for p in checkpoint.checkpoints(root)] == ["epoch-0002", "epoch-0001"]



def test_pruning_reads_a_checkpoint_once_until_its_files_or_the_config_change(stalled, tmp_path, monkeypatch):
    """Each epoch's prune read every kept checkpoint's state.json again (each holds the run's history, so the
    bookkeeping cost more each epoch). A checkpoint found good is read again only once one of its files changed
    or the config is another: then it is checked, and refused, as before."""
    root, config = copied_checkpoints(stalled, tmp_path)
    checked = counted_checks(monkeypatch)
    assert checkpoint_writing.prune(root, 2, config, root / "epoch-0001") == 0
    assert checked == ["epoch-0000"]  # epoch-0001 was just written: unchecked, as before
    for _ in range(3):
        assert checkpoint_writing.prune(root, 2, config, None) == 0
    assert checked == ["epoch-0000", "epoch-0001"]  # epoch-0001 at the prune after it, then neither
    assert checkpoint_writing.prune(root, 2, {**config, "lr": 0.5}, None) == 0  # another config: both read, refused
    assert checked[2:] == ["epoch-0001", "epoch-0000"]
    state = root / "epoch-0000" / checkpoint.STATE
    text, when = state.read_text(), state.stat().st_mtime_ns
    state.write_text(text.replace('"epoch": 0', '"epoch": 9', 1))  # the same size and time, written since: read
    os.utime(state, ns=(when, when))  # again, and left in place
    assert checkpoint_writing.prune(root, 1, config, root / "epoch-0001") == 0
    assert checked[4:] == ["epoch-0000"]
    assert [p.name for p in checkpoint.checkpoints(root)] == ["epoch-0001", "epoch-0000"]



def test_pruning_reads_every_time_a_checkpoint_whose_files_it_cannot_list(stalled, tmp_path, monkeypatch):
    """No listing of its files (a folder this user may not read) is nothing to tell a change by: checked at each
    prune, as before, never taken as found good."""
    root, config = copied_checkpoints(stalled, tmp_path)
    checked = counted_checks(monkeypatch)
    monkeypatch.setattr(checkpoint_writing, "files_now", lambda path: None)
    for _ in range(2):
        assert checkpoint_writing.prune(root, 2, config, None) == 0
    assert checked == ["epoch-0001", "epoch-0000"] * 2


def test_a_removal_cut_short_leaves_no_half_checkpoint_and_the_next_prune_finishes_it(stalled, tmp_path, monkeypatch):
    """An old checkpoint whose files cannot be removed now (busy on a network file system): the folder is
    already under a leftover's hidden name, never a checkpoint without its manifest, and the next prune
    removes it with the other leftovers."""
    root, config = copied_checkpoints(stalled, tmp_path)
    monkeypatch.setattr(checkpoint_writing.shutil, "rmtree", lambda path, ignore_errors=False: None)
    checkpoint_writing.prune(root, 1, config, root / "epoch-0001")
    assert sorted(p.name for p in root.iterdir()) == [".epoch-0000.pruned.tmp", "epoch-0001"]
    assert [p.name for p in checkpoint.checkpoints(root)] == ["epoch-0001"]
    monkeypatch.undo()
    checkpoint_writing.prune(root, 1, config, root / "epoch-0001")
    assert sorted(p.name for p in root.iterdir()) == ["epoch-0001"]


# --------------------------------------------------------------------------------------------------
# a finished run in another folder (bug 6), and without its best weights (bug 11)


def test_a_copied_finished_run_is_reported_and_returned_as_the_folder_it_is_in(finished, tmp_path, caplog):
    cfg, folder = copied(finished, tmp_path)
    before = contents(folder)
    with caplog.at_level(logging.INFO, logger="iisan"):
        results = train(cfg)
    assert results["run_dir"] == str(folder)
    assert [r.getMessage() for r in caplog.records][0] == \
        f"{folder} finished before with this config; not training it again"
    assert str(finished) not in caplog.text
    assert contents(folder) == before  # nothing trained or written


@pytest.mark.parametrize("damage", ["truncated", "missing"])
def test_a_finished_run_without_readable_best_weights_is_resumed_to_write_them(finished, tmp_path, caplog, damage):
    """Its newest checkpoint is its best epoch's: the resume writes best.safetensors again, the very weights."""
    cfg, folder = copied(finished, tmp_path)
    best = folder / "best.safetensors"
    if damage == "truncated":
        with open(best, "r+b") as fh:
            fh.truncate(1000)
    else:
        best.unlink()
    with caplog.at_level(logging.INFO, logger="iisan"):
        results = train(cfg)
    (said,) = messages(caplog, str(best))
    what = "is missing" if damage == "missing" else "is not a readable safetensors file (SafetensorError: "
    assert said.startswith(f"{best} {what}")
    assert said.endswith(f", so the run is not finished: resuming from {folder / 'checkpoints' / 'epoch-0000'}, "
                         "which holds its best epoch, to write it again")
    assert "finished before" not in caplog.text
    assert results["status"] == "finished" and results["resumed_from"] == ["epoch-0000"]
    assert results["run_dir"] == str(folder) and results["best_epoch"] == 0
    written, original = read_weights(best)[0], read_weights(finished / "best.safetensors")[0]
    assert written.keys() == original.keys() and all(torch.equal(written[k], original[k]) for k in written)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="iisan"):
        train(cfg)
    assert f"{folder} finished before with this config; not training it again" in caplog.text


@pytest.mark.parametrize("case", ["no-checkpoint", "checkpoint-after-the-best"])
def test_a_finished_run_whose_best_weights_no_checkpoint_holds_is_refused(finished, stalled, tmp_path, case):
    """Missing best weights that no resume would write again (the newest checkpoint is not the best epoch's,
    or none is left): one line naming the file and what to do; nothing changes. Where an older checkpoint kept holds
    the best epoch, the line says so (it said no checkpoint did), and doing what it says writes them again."""
    cfg, folder = copied(finished if case == "no-checkpoint" else stalled, tmp_path)
    if case == "no-checkpoint":
        shutil.rmtree(folder / "checkpoints")
    best = folder / "best.safetensors"
    best.unlink()
    before = contents(folder)
    with pytest.raises(TrainingError) as info:
        train(cfg)
    root = folder / "checkpoints"
    move = "" if case == "no-checkpoint" else \
        f"move the checkpoints newer than {root / 'epoch-0000'} out of {root} to resume from it, "
    assert str(info.value) == (f"{best} is missing, and the checkpoint of {folder} a resume takes (the newest) does "
                               f"not hold its best epoch (0) to write it again from: {move}restore best.safetensors "
                               "from a copy, or use another --run-name to train again")
    assert contents(folder) == before
    if case != "no-checkpoint":  # as it says
        shutil.move(root / "epoch-0001", tmp_path / "epoch-0001")
        assert train(cfg)["status"] == "finished" and best.is_file()
