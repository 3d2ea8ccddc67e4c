"""Folders and files a run takes over only when they are its own:

- a folder holding only a ``train.log``, ``metrics.jsonl`` or ``.lock`` is a run's only when each looks
  as a run writes it; a symbolic link to no folder is refused;
- a lock file (a run folder's ``.lock``, a cache's ``.iisan-lock``, an LMDB's ``.<name>.iisan-lock``) is
  taken over only when it is empty or says ``pid N on HOST``, and a foreign one is never truncated nor
  removed;
- a run folder's damaged ``config.json`` or ``results.json`` is one line naming it;
- a checkpoint whose ``state.json`` holds fields of the wrong type is refused like a damaged one, and the
  checkpoint before it used.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path

import pytest
import torch

import iisan.train.checkpoint as checkpoint
import iisan.train.runfolder as runfolder
from iisan.cli.main import main
from iisan.config import Config
from iisan.digests import sha256
from iisan.errors import ConfigError, OutputError, TrainingError
from iisan.experiments.trained import load_run
from iisan.locks import OutputLock, lock_text
from iisan.train import runstate
from iisan.train.records import RunRecord
from iisan.train.run_results import read_results, results_or_reason
from iisan.train.runfolder import refuse_to_overwrite
from iisan.train.trainer import train

DEEP = "[" * 100_000 + "]" * 100_000  # nested too deep for Python's json
HUGE = '{"epochs": 1' + "0" * 5000 + "}"  # an integer of over 4300 digits
HUGE_REASON = "an integer of more than 4300 digits, far more than any config value takes"  # config.json
HUGE_RESULTS = "not valid JSON (ValueError: Exceeds the limit (4300"  # Python 3.10 "(4300)", 3.11+ "(4300 digits)"
EPOCH = {"epoch": 0, "loss": 2.5, "train_seconds": 0.5, "eval_seconds": 0.1, "steps": 2,
         "valid": {"hit@10": 0.1, "ndcg@10": 0.05}}


def files_of(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def cli_error(argv: list[str], capsys) -> str:
    """The command line's only stderr line for ``argv``, which must end with exit code 2."""
    with pytest.raises(SystemExit) as info:
        main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 2 and len(err) == 1, err
    return err[0]


# --------------------------------------------------------------------------------------------------
# a folder of early files


def header(tmp_path: Path, name: str = "r") -> str:
    """The header a run writes at the top of train.log."""
    cfg = Config(out_dir=str(tmp_path), run_name=name)
    return RunRecord(cfg, tmp_path / name, torch.device("cpu")).header()


def test_the_log_header_a_run_writes_is_the_one_recognised(tmp_path):
    first = header(tmp_path, "some-run.name").splitlines(keepends=True)[0]
    assert first.startswith("=== some-run.name: started ")
    assert re.fullmatch(r"=== some-run.name: started \d{4}-\d\d-\d\d \d\d:\d\d:\d\d [+-]\d{4} ===\n", first)  # zone
    assert runfolder.LOG_HEAD.fullmatch(first)
    assert runfolder.LOG_HEAD.fullmatch("=== r: started 2026-01-01 10:00:00 ===\n")  # an older run's, no zone


@pytest.mark.parametrize("name,content", [
    ("metrics.jsonl", "my precious notes\n"),
    ("metrics.jsonl", '{"epoch": 0, "loss": 1.0}\n'),  # JSON, but not an epoch record
    ("metrics.jsonl", json.dumps(EPOCH) + "\n" + json.dumps({**EPOCH, "steps": "two"}) + "\n"),
    ("metrics.jsonl", json.dumps(EPOCH) + "\n\n"),
    ("metrics.jsonl", DEEP),
    ("metrics.jsonl", b"\xff\xfe binary"),
    ("train.log", "my diary\n=== r: started 2026-01-01 10:00:00 ===\n"),
    ("train.log", "=== r: started yesterday ===\n"),
    (".lock", "mine\n"),
    (".lock", "pid 12 on host\nand more\n"),
], ids=["notes", "json-not-an-epoch", "second-line-wrong-type", "blank-line", "deep", "binary", "log-diary",
        "log-no-time", "lock-mine", "lock-two-lines"])
def test_a_folder_of_someone_elses_early_files_is_not_a_run_folder(tmp_path, name, content):
    folder = tmp_path / "r"
    folder.mkdir()
    (folder / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    (folder / "train.log").touch()  # an empty log beside it: fine on its own
    before = files_of(folder)
    with pytest.raises(OutputError) as info:
        runfolder.lock_run_folder(folder)
    message = str(info.value)
    assert message.startswith(f"run folder {folder} exists and is not an IISAN run folder (no run config.json, "
                              f"and {folder / name} ")
    assert message.endswith("IISAN writes only into its own run folders: choose another --run-name or --out-dir")
    assert "\n" not in message
    assert files_of(folder) == before


@pytest.mark.parametrize("kind", ["folder", "link"])
def test_an_early_name_that_is_not_a_plain_file_is_refused(tmp_path, kind):
    folder = tmp_path / "r"
    folder.mkdir()
    (tmp_path / "elsewhere.log").write_text("theirs\n")
    if kind == "folder":
        (folder / "train.log").mkdir()
    else:  # train.log would be appended to: the file it points to
        (folder / "train.log").symlink_to(tmp_path / "elsewhere.log")
    with pytest.raises(OutputError, match=r"train.log is not a plain file\); IISAN writes only"):
        runfolder.claim_run_folder(folder)
    assert (tmp_path / "elsewhere.log").read_text() == "theirs\n"


def test_a_folder_of_early_files_as_a_run_writes_them_is_taken(tmp_path):
    """A run killed before it wrote its config leaves these; the next run takes the folder over."""
    cases = {
        "empty": {"train.log": "", "metrics.jsonl": "", ".lock": ""},
        "written": {"train.log": header(tmp_path) + "10:00:00 INFO iisan.train.trainer: data: 160 users\n"
                    + header(tmp_path), "metrics.jsonl": json.dumps(EPOCH) + "\n"
                    + json.dumps({**EPOCH, "epoch": 1, "test": {"hit@10": 0.2}}) + "\n",
                    ".lock": "pid 123 on x\n"},
        "stale-lock-only": {".lock": "pid 4242 on some-host.example\n"},
    }
    for name, contents in cases.items():
        folder = tmp_path / name
        folder.mkdir()
        for file, text in contents.items():
            (folder / file).write_text(text)
        runfolder.claim_run_folder(folder)
        lock = runfolder.lock_run_folder(folder)
        assert (folder / ".lock").read_text().startswith(f"pid {os.getpid()} on ")
        lock.release()
        assert not (folder / ".lock").exists()


def test_a_run_refuses_a_folder_of_foreign_early_files_and_leaves_them(tiny, tiny_cache, tmp_path, capsys):
    """The audit's case: notes in metrics.jsonl and a .lock of someone else's were replaced and deleted."""
    folder = tmp_path / "runs" / "foreign1"
    folder.mkdir(parents=True)
    (folder / "metrics.jsonl").write_text("my precious notes\n")
    (folder / ".lock").write_text("mine\n")
    before = files_of(folder)
    argv = ["train", "--users", tiny["users"], "--items", tiny["items"], "--images", tiny["images"],
            "--text-model", tiny["text_model"], "--image-model", tiny["image_model"], "--cache-dir", tiny_cache,
            "--device", "cpu", "--no-progress", "--num-workers", "0", "--epochs", "1", "--max-steps-per-epoch",
            "1", "--batch-size", "16", "--eval-batch-size", "64", "--out-dir", str(tmp_path / "runs"),
            "--run-name", "foreign1"]
    line = cli_error(argv, capsys)
    assert line.startswith(f"iisan: error: run folder {folder} exists and is not an IISAN run folder (no run "
                           f"config.json, and {folder / '.lock'} is not a lock file IISAN wrote")
    assert files_of(folder) == before


# --------------------------------------------------------------------------------------------------
# a symbolic link as run folder


@pytest.mark.parametrize("target", ["missing", "file"])
def test_a_symbolic_link_to_no_folder_is_refused(tmp_path, target):
    elsewhere = tmp_path / "elsewhere"
    if target == "file":
        elsewhere.write_text("theirs")
    link = tmp_path / "runs" / "link"
    link.parent.mkdir()
    link.symlink_to(elsewhere)
    with pytest.raises(OutputError) as info:
        runfolder.lock_run_folder(link)
    assert str(info.value) == (f"run folder {link} is a symbolic link to no folder; give the path of a folder "
                               "(--out-dir, --run-name) or choose another --run-name")
    assert link.is_symlink() and os.path.lexists(elsewhere) == (target == "file")
    assert target == "missing" or elsewhere.read_text() == "theirs"


def test_a_symbolic_link_to_a_folder_is_that_folder(tmp_path):
    elsewhere = tmp_path / "scratch" / "run"
    elsewhere.mkdir(parents=True)
    link = tmp_path / "runs" / "link"
    link.parent.mkdir()
    link.symlink_to(elsewhere)
    lock = runfolder.lock_run_folder(link)  # an empty folder: a new run writes into it, through the link
    assert (elsewhere / runfolder.LOCK).is_file()
    lock.release()
    (elsewhere / "notes.txt").write_text("theirs")  # a foreign folder stays refused through a link too
    with pytest.raises(OutputError, match="exists and is not an IISAN run folder"):
        runfolder.lock_run_folder(link)


# --------------------------------------------------------------------------------------------------
# lock files


def test_a_lock_file_of_someone_elses_is_refused_and_left_as_it_is(tmp_path):
    for content in (b"precious\n", b"\x00\x01binary", b"pid 1 on host\n" * 2, b"pid x on host\n",
                    b"pid 1 on host\n" + b" " * 5000):
        path = tmp_path / ".out.iisan-lock"
        path.write_bytes(content)
        with pytest.raises(OutputError) as info:
            OutputLock(path, "store X", "wait").acquire()
        assert str(info.value) == (f"{path}, the lock file of store X, exists and was not written by IISAN (a "
                                   "lock file of IISAN is empty or says 'pid N on HOST'); IISAN never replaces "
                                   "or removes a file it did not write: move that one away")
        assert path.read_bytes() == content


def test_a_stale_or_empty_lock_file_of_ours_is_taken_over_and_removed(tmp_path):
    path = tmp_path / ".lock"
    for content in ("pid 123 on x\n", "pid 123 on x", ""):
        path.write_text(content)
        with OutputLock(path, "run folder"):
            assert path.read_text().startswith(f"pid {os.getpid()} on ")
        assert not path.exists()
    assert lock_text(b"pid 123 on x\n") == "pid 123 on x\n" and lock_text(b"") == ""
    assert lock_text(b"pid 123 on \n") is None and lock_text(b"\xff") is None


def test_a_lock_path_that_is_a_symbolic_link_is_refused(tmp_path):
    for exists in (True, False):
        target = tmp_path / f"theirs-{exists}.txt"
        if exists:
            target.write_text("pid 1 on x\n")  # even one that reads as ours: the file is elsewhere
        link = tmp_path / f".lock-{exists}"
        link.symlink_to(target)
        with pytest.raises(OutputError, match=r"the lock file of run folder R, exists and is a symbolic link; "):
            OutputLock(link, "run folder R").acquire()
        assert target.exists() == exists and (not exists or target.read_text() == "pid 1 on x\n")


def test_a_run_folder_of_ours_with_a_foreign_lock_file_is_refused_and_the_file_kept(tmp_path):
    folder = tmp_path / "r"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(Config().to_dict()))
    (folder / ".lock").write_text("precious\n")
    assert runfolder.is_run_folder(folder)
    with pytest.raises(OutputError, match=rf"^{folder / '.lock'}, the lock file of run folder {folder}, exists and "
                                          "was not written by IISAN"):
        runfolder.lock_run_folder(folder)
    assert (folder / ".lock").read_text() == "precious\n"


def test_a_release_never_removes_a_file_that_replaced_the_lock(tmp_path):
    path = tmp_path / ".lock"
    lock = OutputLock(path, "x").acquire()
    path.unlink()
    path.write_text("someone's file, made after ours went\n")
    lock.release()
    assert path.read_text() == "someone's file, made after ours went\n"


def test_a_cache_build_and_an_lmdb_build_refuse_a_foreign_lock_file(tiny, tmp_path):
    from iisan.data.image_build import write_image_lmdb
    from iisan.model.caching import build_cache_from_config

    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / ".iisan-lock").write_text("precious\n")
    cfg = Config(**{k: tiny[k] for k in ("users", "items", "images", "text_model", "image_model")},
                 cache_dir=str(cache), device="cpu", num_workers=0, progress=False)
    with pytest.raises(OutputError, match=rf"^{cache / '.iisan-lock'}, the lock file of cache folder {cache}, "
                                          "exists and was not written by IISAN"):
        build_cache_from_config(cfg, dtype="float32")
    assert [p.name for p in cache.iterdir()] == [".iisan-lock"]
    assert (cache / ".iisan-lock").read_text() == "precious\n"
    lock = tmp_path / ".mylmdb.iisan-lock"
    lock.write_text("precious\n")
    with pytest.raises(OutputError, match=r"\.mylmdb\.iisan-lock, the lock file of image LMDB .*mylmdb, exists"):
        write_image_lmdb(tmp_path / "mylmdb", ["a"], lambda i: (None, None), size=16, progress=False)
    assert lock.read_text() == "precious\n" and not (tmp_path / "mylmdb").exists()


# --------------------------------------------------------------------------------------------------
# a run folder's damaged config.json and results.json


def run_folder(tiny, tmp_path: Path, config: str | None = None, results: str | None = None) -> Path:
    """A run folder holding a config.json (a valid one unless given) and, if given, a results.json."""
    folder = tmp_path / "runs" / "ev"
    folder.mkdir(parents=True)
    cfg = Config(**{k: tiny[k] for k in ("users", "items", "images", "text_model", "image_model")}, device="cpu")
    (folder / "config.json").write_text(config if config is not None else json.dumps(cfg.to_dict()))
    if results is not None:
        (folder / "results.json").write_text(results)
    return folder


def bad_value(tiny) -> str:
    cfg = Config(**{k: tiny[k] for k in ("users", "items", "images", "text_model", "image_model")}, device="cpu")
    return json.dumps({**cfg.to_dict(), "embedding_dim": "big"})


@pytest.mark.parametrize("config,message", [
    (bad_value, "embedding_dim='big': expected an integer"),
    (lambda tiny: DEEP, "not valid JSON (NestedTooDeep: arrays or objects nested deeper"),
    (lambda tiny: HUGE, HUGE_REASON),
], ids=["bad-value", "deep", "huge-int"])
def test_evaluate_names_a_damaged_config_json(tiny, tmp_path, capsys, config, message):
    folder = run_folder(tiny, tmp_path, config=config(tiny))
    with pytest.raises(ConfigError) as info:
        load_run(folder, device="cpu")
    assert str(info.value).startswith(f"{folder / 'config.json'}: {message}") and "\n" not in str(info.value)
    line = cli_error(["evaluate", str(folder), "--device", "cpu"], capsys)
    assert line.startswith(f"iisan: error: {folder / 'config.json'}: {message}")


@pytest.mark.parametrize("results,reason", [
    (DEEP, "not valid JSON (NestedTooDeep: arrays or objects nested deeper"),
    (HUGE, HUGE_RESULTS),
    ("[1, 2]", "not a JSON object"),
    ("{", "not valid JSON (Expecting property name enclosed in double quotes at line 1)"),
], ids=["deep", "huge-int", "list", "broken"])
def test_a_damaged_results_json_is_named_in_one_line(tiny, tmp_path, caplog, results, reason):
    folder = run_folder(tiny, tmp_path, results=results)
    found, why = results_or_reason(folder / "results.json")
    assert found == {} and why.startswith(reason) and "\n" not in why
    assert read_results(folder / "results.json") == {}
    with caplog.at_level(logging.WARNING, logger="iisan"), pytest.raises(TrainingError, match="no best.safetensors"):
        load_run(folder, device="cpu")  # used without it; this folder has no weights to go further
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and warnings[0].startswith(f"{folder / 'results.json'}: {reason}")
    assert "\n" not in warnings[0]
    caplog.clear()
    cfg = Config.from_dict(json.loads((folder / "config.json").read_text()))
    with caplog.at_level(logging.WARNING, logger="iisan"):  # train --run-name: judged by config.json alone
        refuse_to_overwrite(folder, cfg)
    assert [r.getMessage() for r in caplog.records] == [
        f"{folder / 'results.json'}: {why}; the run there is judged by its config.json alone"]
    with pytest.raises(ConfigError, match=r"config.json belongs to a run of another config \(lr="):
        refuse_to_overwrite(folder, cfg.replace(lr=0.5))
    assert results_or_reason(tmp_path / "absent.json") == ({}, "")


# --------------------------------------------------------------------------------------------------
# a checkpoint's state.json of the wrong types


@pytest.fixture(scope="module")
def trained(tiny, tiny_cache, tmp_path_factory) -> Path:
    """A finished run of 2 epochs (checkpoints epoch-0000 and epoch-0001); copy it, never change it."""
    out = tmp_path_factory.mktemp("safety-runs")
    cfg = Config(**{k: tiny[k] for k in ("users", "items", "images", "text_model", "image_model")},
                 cache_dir=tiny_cache, out_dir=str(out), run_name="base", device="cpu", num_workers=0,
                 progress=False, batch_size=16, epochs=2, max_steps_per_epoch=2, eval_batch_size=64,
                 encode_batch_size=32)
    train(cfg)
    return out / "base"


def copied(trained: Path, tmp_path: Path, name: str) -> tuple[Config, Path]:
    """A copy of the trained run under ``tmp_path/runs/name`` and the config that resumes it for 3 epochs."""
    folder = tmp_path / "runs" / name
    shutil.copytree(trained, folder)
    saved = json.loads((folder / "config.json").read_text())
    return Config.from_dict({**saved, "out_dir": str(tmp_path / "runs"), "run_name": name, "epochs": 3}), folder


def restate(path: Path, edit) -> Path:
    """Edit a checkpoint's state.json and record the edit in its manifest (intact, but not what we wrote)."""
    file = path / checkpoint.STATE
    file.write_text(edit(file.read_text()))
    manifest = json.loads((path / checkpoint.MANIFEST).read_text())
    manifest["files"][checkpoint.STATE] = {"bytes": file.stat().st_size, "sha256": sha256(file)}
    (path / checkpoint.MANIFEST).write_text(json.dumps(manifest))
    return file


def edited(change):
    def edit(text: str) -> str:
        state = json.loads(text)
        change(state)
        return json.dumps(state)
    return edit


EDITS = {
    "world-size-text": (lambda s: s.update(world_size="1"), "world_size='1': expected a count of at least 1"),
    "world-size-zero": (lambda s: s.update(world_size=0), "world_size=0: expected a count of at least 1"),
    "step-text": (lambda s: s.update(step="3"), "step='3': expected a count or null"),
    "device-number": (lambda s: s.update(device=1), "device=1: expected text"),
    "seconds-text": (lambda s: s.update(train_seconds_in_epoch="0.5"), "train_seconds_in_epoch='0.5': expected"),
    "global-step-bool": (lambda s: s.update(global_step=True), "global_step=True: expected a count"),
    "no-next-epoch": (lambda s: s.pop("next_epoch"), "no next_epoch"),
    "best-text": (lambda s: s["early_stopping"].update(best="0.1"), "early_stopping.best='0.1': expected a number"),
    "best-valid-text": (lambda s: s["best_valid"].update({"hit@10": "x"}), "best_valid={"),
    "epochs-object": (lambda s: s.update(epochs={}), "epochs={}: expected a list"),
    "epoch-seconds-text": (lambda s: s["epochs"][0].update(train_seconds="1"),
                           "epochs[0]: train_seconds='1': expected a number"),
    "epoch-not-object": (lambda s: s["epochs"].append(3), "epochs[2]: not a JSON object"),
    "resumed-from-numbers": (lambda s: s.update(resumed_from=[1]), "resumed_from=[1]: expected a list of names"),
    "rng-list": (lambda s: s.update(rng=[]), "rng=[]: expected an object"),
}


@pytest.mark.parametrize("name", list(EDITS))
def test_a_state_json_of_wrong_types_is_refused_as_damaged(trained, name):
    change, reason = EDITS[name]
    state = json.loads((trained / "checkpoints" / "epoch-0001" / checkpoint.STATE).read_text())
    assert runstate.state_problem(state) is None  # as a run writes it
    change(state)
    problem = runstate.state_problem(state)
    assert problem is not None and problem.startswith(reason) and "\n" not in problem


def test_a_resume_refuses_a_hand_edited_state_and_goes_on_from_the_one_before(trained, tmp_path, caplog):
    """The audit's case: "world_size": "1" with the manifest re-hashed printed a logging traceback."""
    cfg, folder = copied(trained, tmp_path, "world")
    state = restate(folder / "checkpoints" / "epoch-0001", edited(lambda s: s.update(world_size="1")))
    with caplog.at_level(logging.WARNING, logger="iisan"):
        resumed = train(cfg)
    assert resumed["status"] == "finished" and resumed["resumed_from"] == ["epoch-0000"]
    refusals = [r.getMessage() for r in caplog.records if "refusing checkpoint" in r.getMessage()]
    assert refusals == [f"refusing checkpoint: {state} is damaged (world_size='1': expected a count of at least 1)"]
    assert "Logging error" not in caplog.text and "Traceback" not in caplog.text


@pytest.mark.parametrize("content,reason", [
    (DEEP, "is damaged (not valid JSON)"),
    ('{"format": "iisan-checkpoint/1", "x": 1' + "0" * 5000 + "}", "is damaged (not valid JSON)"),
    ("{", "is damaged (not valid JSON)"),
], ids=["deep", "huge-int", "broken"])
def test_a_state_json_that_is_not_json_is_damaged_not_unreadable(trained, tmp_path, content, reason):
    cfg, folder = copied(trained, tmp_path, "deep")
    newest = folder / "checkpoints" / "epoch-0001"
    state = restate(newest, lambda text: content)
    found, refused = checkpoint.latest(folder / "checkpoints", cfg.to_dict())
    assert found.path == folder / "checkpoints" / "epoch-0000"
    assert refused == [f"{state} {reason}"]


def test_every_checkpoint_refused_for_wrong_types_is_one_line(trained, tmp_path):
    cfg, folder = copied(trained, tmp_path, "all")
    for name in ("epoch-0001", "epoch-0000"):
        restate(folder / "checkpoints" / name, edited(lambda s: s.update(world_size="1")))
    with pytest.raises(TrainingError) as info:
        train(cfg)
    assert str(info.value) == (f"cannot resume: {folder / 'checkpoints' / 'epoch-0001' / 'state.json'} is damaged "
                               "(world_size='1': expected a count of at least 1); 1 older checkpoint(s) refused "
                               "for the same reason")


def test_the_temporary_file_of_a_write_a_kill_cut_short_is_a_runs_and_removed(tmp_path):
    folder = tmp_path / "runs" / "r"
    folder.mkdir(parents=True)
    killed = folder / ".config.json.4242-0123abcd.tmp"  # a run killed while writing its config
    killed.write_text('{"method": "iis')
    (folder / "train.log").write_text("")
    lock = runfolder.lock_run_folder(folder)
    lock.release()
    assert not killed.exists() and (folder / "train.log").exists()
    weights = folder / ".best.safetensors.4242-0123abcd.tmp"  # killed while saving its best weights
    weights.write_bytes(b"\0" * 64)
    (folder / "config.json").write_text(json.dumps({"method": "iisan", "feed": "cached", "lr": 1e-3}))  # a run's
    runfolder.lock_run_folder(folder).release()
    assert not weights.exists()
    (folder / "config.json").unlink()
    theirs = folder / ".notes.txt.4242-0123abcd.tmp"  # the pattern, but not a file a run writes
    theirs.write_text("theirs")
    with pytest.raises(OutputError, match="exists and is not an IISAN run folder"):
        runfolder.lock_run_folder(folder)
    assert theirs.read_text() == "theirs"
