"""A checkpoint whose ``state.json`` passes its checksum but claims a position in the run that it does not
hold (a mid-epoch step without that step's losses, a step on an end-of-epoch checkpoint, an epoch the
records do not reach) is refused like a damaged one: one line naming the file and the bad value, then the
checkpoint before it, never a traceback."""

from __future__ import annotations

import json
import logging
import shutil
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import iisan.model.recommender as recommender_module
import iisan.train.checkpoint as checkpoint
from iisan.config import Config
from iisan.digests import sha256
from iisan.errors import ConfigError, RunInterrupted, TrainingError
from iisan.train import runstate
from iisan.train.trainer import train


@pytest.fixture(scope="module")
def trained(tiny, tiny_cache, tmp_path_factory) -> Path:
    """A run of 2-step epochs stopped by Ctrl-C after step 1 of epoch 2: checkpoints epoch-0000, epoch-0001
    and epoch-0002-step-00001. Copy it, never change it."""
    out = tmp_path_factory.mktemp("state-runs")
    cfg = Config(**{k: tiny[k] for k in ("users", "items", "images", "text_model", "image_model")},
                 cache_dir=tiny_cache, out_dir=str(out), run_name="base", device="cpu", num_workers=0,
                 progress=False, batch_size=16, epochs=3, max_steps_per_epoch=2, keep_checkpoints=3,
                 eval_batch_size=64, encode_batch_size=32)
    loss, calls = recommender_module.in_batch_softmax_loss, []

    def interrupting(*args):  # as Ctrl-C during the fifth training loss (epoch 2, step 1 of 2)
        calls.append(1)
        if len(calls) == 5:
            signal.raise_signal(signal.SIGINT)
        return loss(*args)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(recommender_module, "in_batch_softmax_loss", interrupting)
        with pytest.raises(RunInterrupted):
            train(cfg)
    assert [p.name for p in checkpoint.checkpoints(out / "base" / "checkpoints")] == \
        ["epoch-0002-step-00001", "epoch-0001", "epoch-0000"]
    return out / "base"


def copied(trained: Path, tmp_path: Path) -> tuple[Config, Path]:
    """A copy of the trained run under ``tmp_path`` and the config that resumes it for 4 epochs."""
    folder = tmp_path / "runs" / "copy"
    shutil.copytree(trained, folder)
    saved = json.loads((folder / "config.json").read_text())
    return Config.from_dict({**saved, "out_dir": str(tmp_path / "runs"), "run_name": "copy", "epochs": 4}), folder


def rehash(path: Path, name: str) -> None:
    """Record the file ``name`` of the checkpoint at ``path`` in its manifest as it now is."""
    manifest = json.loads((path / checkpoint.MANIFEST).read_text())
    manifest["files"][name] = {"bytes": (path / name).stat().st_size, "sha256": sha256(path / name)}
    (path / checkpoint.MANIFEST).write_text(json.dumps(manifest))


def restate(path: Path, change: dict) -> Path:
    """Update the checkpoint's state.json with ``change``, its manifest to match (intact, but not ours)."""
    state = json.loads((path / checkpoint.STATE).read_text())
    state.update(change)
    (path / checkpoint.STATE).write_text(json.dumps(state))
    rehash(path, checkpoint.STATE)
    return path / checkpoint.STATE


def resumed_after_refusing(cfg: Config, caplog) -> tuple[dict, list[str]]:
    with caplog.at_level(logging.WARNING, logger="iisan"):
        results = train(cfg)
    assert "Traceback" not in caplog.text
    return results, [r.getMessage() for r in caplog.records if "refusing checkpoint" in r.getMessage()]


def test_a_mid_epoch_checkpoint_without_its_step_losses_is_refused_for_the_previous_one(trained, tmp_path, caplog):
    """The fuzzed case: the losses of the steps done are gone from train_state.safetensors (and the
    manifest made to match); the resume crashed on ``None.to`` in the middle of the epoch."""
    cfg, folder = copied(trained, tmp_path)
    newest = folder / "checkpoints" / "epoch-0002-step-00001"
    tensors = load_file(str(newest / checkpoint.TRAIN_STATE))
    del tensors["partial_losses.0"]
    save_file(tensors, str(newest / checkpoint.TRAIN_STATE), metadata={"format": checkpoint.FORMAT})
    rehash(newest, checkpoint.TRAIN_STATE)
    results, refusals = resumed_after_refusing(cfg, caplog)
    assert refusals == [f"refusing checkpoint: {newest / checkpoint.STATE} is damaged (step=1: expected "
                        "partial_losses.0 of shape (1,) in train_state.safetensors, found none)"]
    assert results["status"] == "finished" and results["resumed_from"] == ["epoch-0001"]
    assert [e["epoch"] for e in results["epochs"]] == [0, 1, 2, 3]


def test_a_resumed_mid_epoch_checkpoint_is_pruned_once_its_epoch_is_saved(trained, tmp_path):
    """epoch-0002-step-00001 was kept to resume from; once epoch-0002 is written it holds nothing a resume
    needs, so pruning removes it without counting it, and the three newest epochs stay
    (keep_checkpoints=3). It was counted, keeping the stale position in place of epoch-0001 to the end."""
    cfg, folder = copied(trained, tmp_path)
    results = train(cfg)
    assert results["status"] == "finished" and results["resumed_from"] == ["epoch-0002-step-00001"]
    assert [p.name for p in checkpoint.checkpoints(folder / "checkpoints")] == ["epoch-0003", "epoch-0002",
                                                                                "epoch-0001"]


@pytest.mark.parametrize("change,reason", [
    ({"next_step": 10**9}, "next_step=1000000000: expected 0 (step=null: the epoch finished)"),
    ({"step": 5, "next_step": 3}, "next_step=3: expected 5, as step=5"),
    ({"step": 1, "next_step": 1, "epoch": 2, "next_epoch": 2},
     "step=1: expected partial_losses.0 of shape (1,) in train_state.safetensors, found none"),
    ({"epoch": 1000000}, "epoch=1000000: expected 1, the last of the 2 epochs recorded"),
], ids=["next-step-huge", "step-on-finished-epoch", "mid-epoch-without-losses", "epoch-absurd"])
def test_an_end_of_epoch_checkpoint_claiming_another_position_is_refused(trained, tmp_path, caplog, change, reason):
    """The reported edits of epoch-0001's state.json (the mid-epoch checkpoint after it removed), resumed
    for 4 epochs: epoch-0001 is refused and the run goes on from epoch-0000."""
    cfg, folder = copied(trained, tmp_path)
    shutil.rmtree(folder / "checkpoints" / "epoch-0002-step-00001")
    state = restate(folder / "checkpoints" / "epoch-0001", change)
    results, refusals = resumed_after_refusing(cfg, caplog)
    assert refusals == [f"refusing checkpoint: {state} is damaged ({reason})"]
    assert results["status"] == "finished" and results["resumed_from"] == ["epoch-0000"]
    assert [e["epoch"] for e in results["epochs"]] == [0, 1, 2, 3]


def test_every_checkpoint_claiming_a_position_it_does_not_hold_is_one_line(trained, tmp_path):
    cfg, folder = copied(trained, tmp_path)
    mid = restate(folder / "checkpoints" / "epoch-0002-step-00001", {"step": 3, "next_step": 3})
    one = restate(folder / "checkpoints" / "epoch-0001", {"epoch": 1000000})
    restate(folder / "checkpoints" / "epoch-0000", {"epoch": 1000000})
    with pytest.raises(TrainingError) as info:
        train(cfg)
    assert str(info.value) == (
        f"cannot resume: {mid} is damaged (step=3: expected fewer than max_steps_per_epoch=2 (an epoch's last "
        f"step ends it)); {one} is damaged (epoch=1000000: expected 1, the last of the 2 epochs recorded); "
        f"{folder / 'checkpoints' / 'epoch-0000' / 'state.json'} is damaged (epoch=1000000: expected 0, the "
        "last of the 1 epochs recorded)")


@pytest.mark.parametrize("change,reason", [
    (lambda s: s.update(step=0, next_step=0, next_epoch=1), "step=0: expected null (the epoch finished) or at least 1"),
    (lambda s: s.update(next_epoch=7), "next_epoch=7: expected 2 (epoch=1, step=null)"),
    (lambda s: s["epochs"][0].update(epoch=1), "epochs[0]: epoch=1: expected 0"),
    (lambda s: s.update(global_step=5), "global_step=5: expected 4, the steps of the epochs recorded"),
    (lambda s: s["early_stopping"].update(best_epoch=2),
     "early_stopping.best_epoch=2: expected -1 or one of the 2 epochs recorded"),
    (lambda s: s.update(epochs=s["epochs"][:1]), "epoch=1: expected 0, the last of the 1 epochs recorded"),
], ids=["step-zero", "next-epoch", "records-numbered", "global-step", "best-epoch", "record-missing"])
def test_position_fields_that_disagree_are_a_damaged_state(trained, change, reason):
    state = json.loads((trained / "checkpoints" / "epoch-0001" / checkpoint.STATE).read_text())
    assert runstate.state_problem(state) is None  # as a run writes it
    change(state)
    assert runstate.state_problem(state) == reason


def test_the_losses_of_every_rank_are_needed_only_by_a_resume_of_as_many_processes():
    """A resume by another number of processes starts the epoch again and reads none but rank 0's."""
    state = {"step": 3, "world_size": 2}
    losses = {"partial_losses.0": torch.zeros(3)}
    assert checkpoint.partial_losses_problem(state, losses, 1) is None
    assert checkpoint.partial_losses_problem(state, losses, 2) == (
        "step=3: expected partial_losses.1 of shape (3,) in train_state.safetensors, found none")
    assert checkpoint.partial_losses_problem(state, {"partial_losses.0": torch.zeros(2)}, 1) == (
        "step=3: expected partial_losses.0 of shape (3,) in train_state.safetensors, found shape (2,)")
    assert checkpoint.partial_losses_problem({"step": None, "world_size": 2}, {}, 2) is None


def test_an_fp16_loss_scaler_comes_back_from_state_json_as_it_was_saved():
    """--amp fp16's GradScaler state goes through state.json (``runstate.scaler_state``/``restore_scaler``):
    a scale that moved (backed off to 256, 3 steps into its growth interval) comes back as it was, not at a
    fresh scaler's 65,536; on a CPU too (the GPU test saw only a scale above 0)."""
    from iisan.train.runstate import restore_scaler, scaler_state

    saved = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=5)
    saved.scale(torch.tensor(1.0))
    saved.update(new_scale=256.0)
    saved.load_state_dict({**saved.state_dict(), "_growth_tracker": 3})
    state = json.loads(json.dumps(scaler_state(saved)))  # what the checkpoint's state.json holds
    fresh = torch.amp.GradScaler("cpu")
    restore_scaler(fresh, state)
    assert fresh.get_scale() == 256.0 and fresh.state_dict() == saved.state_dict()
    assert fresh.state_dict()["_growth_tracker"] == 3 and fresh.state_dict()["growth_interval"] == 5
    assert scaler_state(None) == {} and restore_scaler(None, state) is None  # bf16 / fp32: no scaler


def test_a_finished_epoch_is_newer_than_the_steps_inside_it(tmp_path):
    """An epoch's end-of-epoch checkpoint comes after its mid-epoch ones (a Ctrl-C during it, resumed):
    resuming takes it, and pruning keeps it, not a stale position inside the epoch."""
    from iisan.train.checkpoint import checkpoints

    for name in ("epoch-0002", "epoch-0003-step-00004", "epoch-0003", "epoch-0003-step-00010", "epoch-0004-step-00001"):
        (tmp_path / name).mkdir()
    assert [p.name for p in checkpoints(tmp_path)] == ["epoch-0004-step-00001", "epoch-0003", "epoch-0003-step-00010",
                                                       "epoch-0003-step-00004", "epoch-0002"]


def test_python_and_numpy_generators_come_back_as_they_were_saved():
    """Nothing in training draws from them today; what a checkpoint says it restores, it restores."""
    import random

    import numpy as np

    from iisan.distributed import SINGLE
    from iisan.train.runstate import capture_rng, restore_rng

    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    state, tensors = capture_rng(SINGLE, torch.device("cpu"))
    state = json.loads(json.dumps(state))  # as state.json holds it
    first = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(2)
    np.random.seed(2)
    torch.manual_seed(2)
    assert restore_rng(state, tensors, SINGLE, torch.device("cpu"), 12345) is True
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == first


def test_a_rank_the_checkpoint_has_no_stream_for_draws_as_a_fresh_run_s_rank_does():
    """Resumed with more processes: rank 3 had no saved stream and kept the one every rank was seeded with, so
    all new ranks drew the same dropout masks; it is seeded seed + rank, as a fresh run seeds it."""
    from iisan.distributed import SINGLE, Dist
    from iisan.train.runstate import capture_rng, restore_rng

    torch.manual_seed(7)
    state, tensors = capture_rng(SINGLE, torch.device("cpu"))  # one process saved it: rng.torch.0 alone
    rank3 = Dist(rank=3, world_size=4, local_rank=3)
    torch.manual_seed(12345)  # what seed_everything left on every rank
    assert restore_rng(json.loads(json.dumps(state)), tensors, rank3, torch.device("cpu"), 12345) is False
    drawn = torch.rand(3)
    torch.manual_seed(12345 + 3)
    assert torch.equal(drawn, torch.rand(3))


def test_an_apple_mps_stream_is_saved_and_restored_and_one_missing_is_seeded_as_a_fresh_run_seeds_it(monkeypatch):
    """Resumed on MPS, its generator (the user encoder's dropout) was neither saved nor restored, yet the resume
    said it was exact: it is saved as CUDA's is, and a checkpoint without it is not taken as exact."""
    from iisan.distributed import SINGLE
    from iisan.train.runstate import capture_rng, restore_rng

    mps = {"state": torch.tensor([7, 8, 9], dtype=torch.uint8), "seeded": None}
    monkeypatch.setattr(torch.mps, "get_rng_state", lambda: mps["state"].clone())
    monkeypatch.setattr(torch.mps, "set_rng_state", lambda state: mps.update(state=state.clone()))
    monkeypatch.setattr(torch.mps, "manual_seed", lambda seed: mps.update(seeded=seed))
    monkeypatch.setattr(torch, "manual_seed", lambda seed: None)  # (it would seed MPS too, were there one)
    state, tensors = capture_rng(SINGLE, torch.device("mps"))
    assert torch.equal(tensors["rng.mps.0"], torch.tensor([7, 8, 9], dtype=torch.uint8))
    mps["state"] = torch.zeros(3, dtype=torch.uint8)
    assert restore_rng(state, tensors, SINGLE, torch.device("mps"), 12345) is True
    assert mps["state"].tolist() == [7, 8, 9] and mps["seeded"] is None
    cpu_only = {k: v for k, v in tensors.items() if k != "rng.mps.0"}  # saved by a run on the CPU
    assert restore_rng(state, cpu_only, SINGLE, torch.device("mps"), 12345) is False
    assert mps["seeded"] == 12345


def test_weights_are_copied_into_the_trained_parameters_alone():
    """A weights file holds the trained parameters (``trainable_state``); one naming a frozen parameter (a
    pretrained weight) is of another model, refused before anything is copied over it."""
    from iisan.errors import TrainingError
    from iisan.train.weights import copy_weights, trainable_state

    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
    model[0].requires_grad_(False)  # the frozen backbone
    state = {name: torch.full_like(value, 0.5) for name, value in trainable_state(model).items()}
    assert sorted(state) == ["1.bias", "1.weight"]
    copy_weights(model, state, "best.safetensors")
    assert all(bool((p == 0.5).all()) for p in model[1].parameters())
    frozen = model[0].weight.clone()
    with pytest.raises(TrainingError, match=r"^best.safetensors holds '0.weight', which this model keeps frozen: "):
        copy_weights(model, {**state, "0.weight": torch.zeros(2, 2)}, "best.safetensors")
    assert torch.equal(model[0].weight, frozen)


def test_keep_checkpoints_0_removes_a_finished_runs_checkpoints_and_nothing_else(trained, tmp_path, caplog):
    """An FFT checkpoint is ~3x the model's weights and two stayed after the run finished (a sweep of them filled
    a quota): 0 keeps the newest while training and none once results.json says finished. A checkpoint folder
    holding a file of someone else's is left whole, as pruning leaves it."""
    cfg, folder = copied(trained, tmp_path)
    (folder / "checkpoints" / "epoch-0000" / "note.txt").write_text("mine")
    caplog.set_level(logging.INFO, logger="iisan")
    results = train(cfg.replace(keep_checkpoints=0))
    assert results["status"] == "finished" and (folder / "best.safetensors").is_file()
    assert sorted(p.name for p in (folder / "checkpoints").iterdir()) == ["epoch-0000"]
    assert sorted(p.name for p in (folder / "checkpoints" / "epoch-0000").iterdir()) == sorted(
        ["note.txt", *(p.name for p in (trained / "checkpoints" / "epoch-0000").iterdir())])
    assert "removed 1 checkpoint(s) of the finished run (--keep-checkpoints 0)" in caplog.text  # the rest: before
    assert train(cfg.replace(keep_checkpoints=0)) == results  # finished before
    (folder / "checkpoints" / "epoch-0000" / "note.txt").unlink()
    shutil.rmtree(folder / "checkpoints" / "epoch-0000")
    with pytest.raises(ConfigError, match="is a finished run with no checkpoint left to continue it"):
        train(cfg.replace(epochs=5))
    again, tried = copied(trained, tmp_path / "again")  # with nothing of anyone else's: not even the folder is left
    assert train(again.replace(keep_checkpoints=0))["status"] == "finished" and not (tried / "checkpoints").exists()
    with pytest.raises(ConfigError, match=r"keep_checkpoints=-1 must be 0 \(none once the run has finished\) or more"):
        again.replace(keep_checkpoints=-1)



def test_a_checkpoint_that_cannot_be_renamed_stays_whole_and_is_not_counted_as_removed(trained, tmp_path, caplog,
                                                                                      monkeypatch):
    """Pruning renames a checkpoint to a hidden name before deleting it; one the file system will not rename (busy
    on a network mount) stays under its own name, named once, and the finished run's count leaves it out."""
    from iisan.train import checkpoint_writing

    cfg, folder = copied(trained, tmp_path)
    stuck, rename = folder / "checkpoints" / "epoch-0001", checkpoint_writing.os.rename

    def busy(src, dst, *args, **kwargs):
        if Path(src) == stuck:
            raise OSError(16, "Device or resource busy")
        return rename(src, dst, *args, **kwargs)

    monkeypatch.setattr(checkpoint_writing.os, "rename", busy)
    caplog.set_level(logging.INFO, logger="iisan")
    assert train(cfg.replace(keep_checkpoints=0))["status"] == "finished"
    assert [p.name for p in (folder / "checkpoints").iterdir()] == ["epoch-0001"]
    assert checkpoint.checkpoints(folder / "checkpoints") == [stuck]  # whole: still a checkpoint
    left = [r.getMessage() for r in caplog.records if "cannot be renamed" in r.getMessage()]
    assert left == [f"pruning leaves {stuck} in place, as it cannot be renamed to be removed: Device or resource busy"]
    assert "removed 1 checkpoint(s) of the finished run" in caplog.text  # epoch-0003, not the one left


def test_a_resumed_run_counts_the_checkpoints_it_has_in_the_space_it_still_needs(trained, tmp_path, caplog,
                                                                                 monkeypatch):
    """Resumed with its three checkpoints (--keep-checkpoints 3) and best weights on disk, a run needs room for
    one more checkpoint only (a new one is written before the oldest goes), not for four and new best weights."""
    from collections import namedtuple

    from iisan.files import shown_bytes
    from iisan.train import resuming

    cfg, _ = copied(trained, tmp_path)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(resuming.shutil, "disk_usage", lambda path: usage(2**30, 2**30 - 5000, 5000))
    caplog.set_level(logging.WARNING, logger="iisan")
    results = train(cfg)
    each = shown_bytes(12 * results["parameters"]["trainable"])
    (line,) = [r.getMessage() for r in caplog.records if "checkpoints need about" in r.getMessage()]
    assert f"this run's checkpoints need about {each} more ({each} each, --keep-checkpoints 3, and " in line


@pytest.mark.parametrize("is_main", [True, False], ids=["rank-0", "other-rank"])
def test_only_rank_0_removes_a_finished_runs_checkpoints(trained, tmp_path, is_main):
    """Under torchrun every rank reaches the end of the run; rank 0 alone prunes the folder they share (two
    ranks deleting the same checkpoints would race each other's renames)."""
    from types import SimpleNamespace

    from iisan.train.resuming import RunCheckpoints

    cfg, folder = copied(trained, tmp_path)

    class Run:  # what RunCheckpoints reads of a trainer.Run
        pass

    run = Run()
    run.cfg, run.run_dir, run.dist = cfg.replace(keep_checkpoints=0), folder, SimpleNamespace(is_main=is_main)
    RunCheckpoints(run).finished()
    assert (folder / "checkpoints").exists() is not is_main
