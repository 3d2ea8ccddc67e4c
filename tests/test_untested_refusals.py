"""One-line refusals met as a user meets them: a bad flag or --config value, an empty users file, an encoder
folder that is none, a damaged checkpoint or results file. Each case runs ``iisan`` (``main``) and checks
the exact words of the line, or of the warning a run goes on after."""

from __future__ import annotations

import json
import os
import shutil
import stat
import tempfile
from pathlib import Path

import pytest

import iisan.train.checkpoint as checkpoint
from iisan.cli.main import main
from iisan.config import Config
from iisan.digests import sha256
from iisan.train.trainer import train

from ._cli_driver import run_forked
from ._scripts import script_error

DATA = ("users", "items", "images", "text_model", "image_model")


def error_line(argv: list[str], capsys) -> str:
    """``iisan <argv>``, expected to end with exit status 2 and one ``iisan: error:`` line -> that line."""
    with pytest.raises(SystemExit) as stopped:
        main(argv)
    lines = capsys.readouterr().err.strip().splitlines()
    assert stopped.value.code == 2, lines
    assert lines[-1].startswith("iisan: error: ") and not any("Traceback" in line for line in lines), lines
    return lines[-1].removeprefix("iisan: error: ")


def data_flags(tiny, cache: str) -> list[str]:
    return ["--users", tiny["users"], "--items", tiny["items"], "--images", tiny["images"], "--text-model",
            tiny["text_model"], "--image-model", tiny["image_model"], "--cache-dir", cache, "--device", "cpu",
            "--num-workers", "0", "--no-progress"]


# --------------------------------------------------------------------------------------------------
# values out of bounds, from the command line and from a --config file


@pytest.mark.parametrize("flags, message", [
    (["--drop-rate", "1"], "drop_rate=1.0 must be in [0, 1)"),
    (["--gate-temperature", "0"], "gate_temperature=0.0 must be positive"),
    (["--embedding-dim", "10", "--attention-heads", "3"], "embedding_dim=10 is not divisible by attention_heads=3"),
    (["--text-layers", ""], "text_layers=[] names no layer; give the hidden states to read, such as 0,2,4 (or leave "
                            "it out: the method's default)"),
])
def test_out_of_bounds_training_values_are_one_line(flags, message, tmp_path, capsys):
    """A dropout rate of 1 (nothing passes), a gate temperature of 0 (a division by it) and a width that the
    attention heads cannot share are refused before anything is read or written."""
    assert error_line(["train", *flags, "--out-dir", str(tmp_path / "runs")], capsys) == message
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("values, message", [
    ({"text_layers": [None]}, "text_layers=[None]: expected a list of integers such as 0,2,4"),
    ({"batch_size": True}, "batch_size=True: expected an integer"),
    ({"drop_rate": [1]}, "drop_rate=[1]: expected a number"),
    ({"method": "nope"}, "method='nope' is not one of iisan, fft, adapter, lora, bitfit, id"),
], ids=["null-in-a-layer-list", "true-for-an-integer", "list-for-a-number", "unknown-method"])
def test_config_file_values_of_the_wrong_type_or_not_a_choice_are_one_line(values, message, tmp_path, capsys):
    """A --config JSON file's value of a JSON type the key cannot take (a null among layer indices, true for a
    count, a list for a rate), or a method argparse never saw, is named with the file."""
    path = tmp_path / "c.json"
    path.write_text(json.dumps(values))
    assert error_line(["train", "--config", str(path), "--out-dir", str(tmp_path / "runs")], capsys) == \
        f"{path}: {message}"


def test_a_seed_that_is_not_an_integer_is_refused_by_reproduce(tmp_path, capsys):
    """``scripts/reproduce.py --seeds x``: an argparse error naming the flag and the value."""
    err = script_error("reproduce", ["--dataset", "demo", "--out", str(tmp_path / "r"), "--seeds", "x"], capsys)
    assert "argument --seeds: 'x' is not an integer" in err.strip().splitlines()[-1]
    assert not (tmp_path / "r").exists()


# --------------------------------------------------------------------------------------------------
# data and encoder folders


def test_an_empty_users_file_is_one_line(tiny, tmp_path, capsys):
    users = tmp_path / "users.tsv"
    users.write_text("\n\n")
    argv = ["cache", *data_flags(tiny, str(tmp_path / "cache")), "--users", str(users)]
    assert error_line(argv, capsys) == f"users file {users} holds no users"


def _list_config(folder: Path) -> str:
    folder.mkdir()
    (folder / "config.json").write_text("[1]")
    return f"{folder / 'config.json'} is not a JSON object"


def _bad_index(folder: Path) -> str:
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "bert"}')
    (folder / "model.safetensors.index.json").write_text("{")
    return (f"{folder / 'model.safetensors.index.json'} is not valid JSON (Expecting property name enclosed in "
            "double quotes: line 1 column 2 (char 1))")


@pytest.mark.parametrize("damage", [_list_config, _bad_index], ids=["config-a-list", "shard-index-not-json"])
def test_an_encoder_folder_of_unreadable_json_is_one_line(damage, tiny, tmp_path, capsys):
    """A text-model folder whose config.json is JSON but not an object, or whose sharded-weights index is
    not JSON: named, before transformers reads it."""
    message = damage(tmp_path / "enc")
    argv = ["cache", *data_flags(tiny, str(tmp_path / "cache")), "--text-model", str(tmp_path / "enc")]
    assert error_line(argv, capsys) == message


@pytest.mark.parametrize("flags, message", [
    (["--text-model", ""], "no encoder folder given (--text-model / --image-model)"),
    (["--text-model", "./nowhere", "--allow-download"],
     "model folder './nowhere' does not exist, and it is not a Hub id (organisation/name) that --allow-download "
     "could fetch"),
])
def test_an_encoder_that_is_no_folder_and_no_hub_id_is_one_line(flags, message, tiny, tmp_path, capsys):
    assert error_line(["cache", *data_flags(tiny, str(tmp_path / "cache")), *flags], capsys) == message


def test_a_tokenizer_with_nothing_to_pad_with_is_one_line(tiny, tmp_path, capsys):
    """A text tower whose tokenizer has no pad token, and no eos or unk token to stand in for one."""
    folder = tmp_path / "nopad"
    shutil.copytree(tiny["text_model"], folder)
    settings = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**settings, "pad_token": None, "unk_token": None,
                                                              "eos_token": None}))
    argv = ["cache", *data_flags(tiny, str(tmp_path / "cache")), "--text-model", str(folder), "--towers", "text",
            "--modality", "intra"]
    assert error_line(argv, capsys) == f"tokenizer of {str(folder)!r} has no pad, eos or unk token to pad titles with"


@pytest.mark.parametrize("make, message", [
    (lambda p: p.symlink_to(p.parent), "--out {p} exists and is not a demo folder (no .iisan-demo in it); IISAN "
     "writes only into empty folders or folders it made, so choose another path or move that one away"),
    (lambda p: p.symlink_to(p.parent / "nothing"), "--out {p} is a symbolic link to no folder; give the path of a "
     "folder"),
    (lambda p: p.write_text("mine\n"), "--out {p} is a file, expected a folder"),
], ids=["link-to-a-full-folder", "link-to-nothing", "file"])
def test_demo_out_that_is_a_link_or_a_file_is_one_line(make, message, tmp_path, capsys):
    out = tmp_path / "demo"
    make(out)
    assert error_line(["demo", "--out", str(out), "--epochs", "1", "--no-progress"], capsys) == message.format(p=out)


# --------------------------------------------------------------------------------------------------
# a trained run: evaluate, recommend


@pytest.fixture(scope="module")
def run(tiny, tiny_cache, tmp_path_factory) -> dict:
    """A finished 2-epoch run (2 steps an epoch, both checkpoints kept) on its own copy of the users file."""
    root = tmp_path_factory.mktemp("refusals")
    users = root / "users.tsv"
    shutil.copyfile(tiny["users"], users)
    cfg = Config(**{k: tiny[k] for k in DATA} | {"users": str(users)}, cache_dir=tiny_cache,
                 out_dir=str(root / "runs"), run_name="done", device="cpu", num_workers=0, progress=False,
                 batch_size=16, epochs=2, max_steps_per_epoch=2, eval_batch_size=64, lr=3e-3)
    train(cfg)
    return {"cfg": cfg, "dir": Path(cfg.out_dir) / "done", "root": root}


def copied(run: dict, tmp_path: Path) -> Path:
    target = tmp_path / "run"
    shutil.copytree(run["dir"], target)
    return target


def test_evaluate_says_when_results_json_holds_no_metrics(run, tmp_path, capsys):
    """results.json without its valid and test numbers: evaluate prints its own and says there is nothing
    to compare them with."""
    folder = copied(run, tmp_path)
    results = json.loads((folder / "results.json").read_text())
    (folder / "results.json").write_text(json.dumps({**results, "valid": {}, "test": {}}))
    main(["evaluate", str(folder), "--device", "cpu"])
    assert capsys.readouterr().out.strip().splitlines()[-1] == "results.json holds no metrics to compare with"


def test_evaluate_names_an_edited_users_file_as_why_the_numbers_moved(run, tmp_path, capsys):
    """The users file edited after training (half its users kept): evaluate's numbers differ from results.json's,
    and the reason given is the users file."""
    users = Path(run["cfg"].users)
    kept = users.read_text()
    try:
        lines = kept.splitlines(keepends=True)
        users.write_text("".join(lines[: len(lines) // 2]))
        main(["evaluate", str(run["dir"]), "--device", "cpu"])
    finally:
        users.write_text(kept)
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("results.json differs: largest difference ")
    assert last.endswith(f"(the users file {users} is not the one the run trained on)")


def test_recommend_for_a_users_file_of_no_ids_is_one_line(run, tmp_path, capsys):
    empty = tmp_path / "ids.txt"
    empty.write_text("\n \n")
    assert error_line(["recommend", str(run["dir"]), "--users-file", str(empty), "--device", "cpu"], capsys) == \
        f"--users-file {empty} holds no user ids (one per line)"


# --------------------------------------------------------------------------------------------------
# a damaged newest checkpoint: the run goes on from the one before, with one warning naming the file


def restate(path: Path, edit) -> None:
    """Edit a checkpoint's state.json and record the edit in its manifest (intact, but not what a run wrote)."""
    state = json.loads((path / checkpoint.STATE).read_text())
    (path / checkpoint.STATE).write_text(json.dumps(edit(state)))
    manifest = json.loads((path / checkpoint.MANIFEST).read_text())
    manifest["files"][checkpoint.STATE] = {"bytes": (path / checkpoint.STATE).stat().st_size,
                                           "sha256": sha256(path / checkpoint.STATE)}
    (path / checkpoint.MANIFEST).write_text(json.dumps(manifest))


def _manifest_a_folder(path: Path) -> str:
    (path / checkpoint.MANIFEST).unlink()
    (path / checkpoint.MANIFEST).mkdir()
    return f"{path / checkpoint.MANIFEST} cannot be read (Is a directory)"


def _manifest_of_another_format(path: Path) -> str:
    manifest = json.loads((path / checkpoint.MANIFEST).read_text())
    (path / checkpoint.MANIFEST).write_text(json.dumps({**manifest, "format": "iisan-checkpoint/0"}))
    return f"{path / checkpoint.MANIFEST} has format 'iisan-checkpoint/0', expected {checkpoint.FORMAT}"


def _weights_gone(path: Path) -> str:
    (path / checkpoint.MODEL).unlink()
    return f"{path / checkpoint.MODEL} is missing"


def _state_of_another_format(path: Path) -> str:
    restate(path, lambda state: {**state, "format": "iisan-checkpoint/0"})
    return f"{path / checkpoint.STATE} has format 'iisan-checkpoint/0', expected {checkpoint.FORMAT}"


def _state_a_list(path: Path) -> str:
    state = json.loads((path / checkpoint.STATE).read_text())
    restate(path, lambda state: [state])
    # the value cut to 40 characters: the whole state, repeated, made a warning of some 20,000
    return f"{path / checkpoint.STATE} has format {repr([state])[:37]}..., expected {checkpoint.FORMAT}"


def _epoch_test_not_numbers(path: Path) -> str:
    restate(path, lambda state: {**state, "epochs": [{**state["epochs"][0], "test": {"hit@10": "high"}},
                                                     *state["epochs"][1:]]})
    return f"{path / checkpoint.STATE} is damaged (epochs[0]: test: expected an object of numbers)"


def _mid_epoch_of_the_wrong_epoch(path: Path) -> str:
    restate(path, lambda state: {**state, "epoch": 0, "step": 1, "next_step": 1})
    return (f"{path / checkpoint.STATE} is damaged (epoch=0: expected 2, the one after the 2 epochs recorded "
            "(step=1))")


@pytest.mark.parametrize("damage", [_manifest_a_folder, _manifest_of_another_format, _weights_gone,
                                    _state_of_another_format, _state_a_list, _epoch_test_not_numbers,
                                    _mid_epoch_of_the_wrong_epoch],
                         ids=["manifest-a-folder", "manifest-format", "weights-missing", "state-format",
                              "state-a-list", "epoch-test-not-numbers", "mid-epoch-epoch"])
def test_a_damaged_newest_checkpoint_is_named_and_the_one_before_resumes(damage, run, tiny, tiny_cache, tmp_path,
                                                                         caplog):
    """``iisan train`` again over a run stopped after its last checkpoint, that checkpoint damaged: one warning
    names the damaged file and why, and the run resumes from the checkpoint before."""
    folder = copied(run, tmp_path)
    results = json.loads((folder / "results.json").read_text())
    (folder / "results.json").write_text(json.dumps({**results, "status": "running"}))  # as a killed run leaves it
    damaged = folder / "checkpoints" / "epoch-0001"
    reason = damage(damaged)
    caplog.set_level("WARNING")
    main(["train", *data_flags(tiny, tiny_cache), "--users", run["cfg"].users, "--out-dir", str(tmp_path),
          "--run-name", "run", "--batch-size", "16", "--epochs", "2", "--max-steps-per-epoch", "2",
          "--eval-batch-size", "64", "--lr", "0.003"])
    refusals = [r.getMessage() for r in caplog.records if "refusing checkpoint" in r.getMessage()]
    assert refusals == [f"refusing checkpoint: {reason}"]
    assert json.loads((folder / "results.json").read_text())["resumed_from"] == ["epoch-0000"]


def test_a_checkpoint_of_other_optimiser_groups_is_one_line(run, tiny, tiny_cache, tmp_path, capsys):
    """An intact checkpoint whose optimiser groups are not the model's (a hand edit, another version): the
    resume ends with one line naming the checkpoint and both lists of groups."""
    folder = copied(run, tmp_path)
    results = json.loads((folder / "results.json").read_text())
    (folder / "results.json").write_text(json.dumps({**results, "status": "running"}))
    newest = folder / "checkpoints" / "epoch-0001"

    def renamed(state):
        state["optimizer"]["groups"][0]["name"] = "renamed"
        return state

    saved = json.loads((newest / checkpoint.STATE).read_text())["optimizer"]["groups"]
    groups = [(g["name"], g["size"]) for g in saved]
    restate(newest, renamed)
    line = error_line(["train", *data_flags(tiny, tiny_cache), "--users", run["cfg"].users, "--out-dir",
                       str(tmp_path), "--run-name", "run", "--batch-size", "16", "--epochs", "2",
                       "--max-steps-per-epoch", "2", "--eval-batch-size", "64", "--lr", "0.003"], capsys)
    assert line == (f"cannot resume: {newest} holds a state this version cannot restore (ValueError: optimiser groups "
                    f"differ: checkpoint {[('renamed', groups[0][1]), *groups[1:]]}, model {groups}); use another "
                    "--run-name to start a new run")


# --------------------------------------------------------------------------------------------------
# iisan results over damaged results files


@pytest.mark.parametrize("content, message", [
    (b'{"a": "\xff"}', "not UTF-8 text (at byte offset 7), so not JSON"),
    (b'{"n": 1' + b"0" * 5000 + b"}", "not JSON this table can read (a number too long or nesting too deep)"),
], ids=["not-utf8", "number-too-long"])
def test_results_skips_a_results_file_it_cannot_decode_with_its_reason(content, message, tmp_path, caplog, capsys):
    path = tmp_path / "runs" / "a" / "results.json"
    path.parent.mkdir(parents=True)
    path.write_bytes(content)
    caplog.set_level("WARNING")
    with pytest.raises(SystemExit) as info:  # (the only file: nothing to show is an error)
        main(["results", str(tmp_path / "runs")])
    said = [r.getMessage() for r in caplog.records]
    assert f"skipping {path}: {message}" in said, said
    assert info.value.code == 2 and capsys.readouterr().err.strip().splitlines()[-1] == (
        f"iisan: error: none of the 1 results file(s) under {tmp_path / 'runs'} could be read (the warnings above "
        "name each and why)")


def test_results_skips_a_results_file_it_may_not_read(tmp_path):
    """A results.json this user may not read (as root, the command runs as nobody): skipped with the
    operating system's reason."""
    root = Path(tempfile.mkdtemp(prefix="iisan-refusals-"))
    try:
        root.chmod(0o755)
        path = root / "runs" / "a" / "results.json"
        path.parent.mkdir(parents=True)
        for folder in (root / "runs", path.parent):
            folder.chmod(0o755)
        path.write_text("{}")
        path.chmod(0)

        def another_user():
            if os.geteuid() == 0:
                os.setgid(65534)
                os.setuid(65534)

        import iisan.experiments.report  # noqa: F401  (imported here: the child, as nobody, may not read the venv)

        done = run_forked(["results", str(root / "runs")], root / "scratch", fault=another_user)
        if "Traceback" not in done.err and "Operation not permitted" in done.err:
            pytest.skip("this container forbids dropping to nobody")
        assert f"skipping {path}: cannot be read (Permission denied)" in done.err, done.describe()
    finally:
        path.chmod(stat.S_IRUSR | stat.S_IWUSR)
        shutil.rmtree(root)


def test_evaluate_of_a_run_without_results_json_says_an_older_version_wrote_it_at_the_end(run, tmp_path, capsys):
    """Versions before results.json was written from a run's start wrote it when the run finished: a run they
    left stopped has none, and was evaluated as if finished, 'results.json holds no metrics' implying one."""
    folder = copied(run, tmp_path)
    (folder / "results.json").unlink()
    main(["evaluate", str(folder), "--device", "cpu"])
    assert capsys.readouterr().out.strip().splitlines()[-1] == (
        "no results.json to compare with (an older IISAN version wrote it when a run finished: this one may have "
        "stopped; its command, run again, resumes it)")


@pytest.mark.parametrize("unreadable, message", [
    ("users", "users file {path} cannot be read: Permission denied"),
    ("tokenizer", "text encoder {folder}: {name} cannot be read: Permission denied"),
])
def test_another_users_unreadable_input_is_refused_before_a_run_folder_is_made(unreadable, message, tiny, tmp_path,
                                                                               monkeypatch, capsys):
    """Only a missing input was refused before the run claimed its folder: an unreadable users file or tokenizer
    (another user's, mode 600) left a failed run folder, with a traceback in its train.log."""
    folder = Path(tiny["text_model"])
    path = Path(tiny["users"]) if unreadable == "users" else next(
        p for p in sorted(folder.iterdir()) if p.name.startswith("tokenizer"))
    opened = os.open

    def refuse(name, *args, **kwargs):
        if os.fspath(name) == str(path):
            raise PermissionError(13, "Permission denied", str(name))
        return opened(name, *args, **kwargs)

    monkeypatch.setattr(os, "open", refuse)
    argv = ["train", "--method", "fft", *data_flags(tiny, str(tmp_path / "cache")), "--out-dir", str(tmp_path / "runs")]
    assert error_line(argv, capsys) == message.format(path=path, folder=folder, name=path.name)
    assert not (tmp_path / "runs").exists()
