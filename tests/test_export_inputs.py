"""``iisan export --out`` never writes into what the run reads: an encoder's folder (its weights digest
covers every .safetensors there, so an export would break the run and its cache afterwards), the cache
folder, the images LMDB, a data file, or the run's checkpoints. Each is one line, exit 2, and leaves
every input and the run folder byte-identical; the run folder itself and a folder holding an input are
fine, and the run is usable afterwards."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from iisan.cli.main import main
from iisan.config import Config
from iisan.train.trainer import train

WRITING_THERE = "writing there would change that input: choose a folder of its own"


@pytest.fixture(scope="module")
def run(tiny, tiny_cache, tmp_path_factory) -> dict:
    """A finished cached run whose data files are copies of its own (in ``data/``), with its paths."""
    root = tmp_path_factory.mktemp("export-inputs")
    data = root / "data"
    data.mkdir()
    users, items = (Path(shutil.copy(tiny[k], data / Path(tiny[k]).name)) for k in ("users", "items"))
    cfg = Config(users=str(users), items=str(items), images=tiny["images"], text_model=tiny["text_model"],
                 image_model=tiny["image_model"], cache_dir=tiny_cache, out_dir=str(root / "runs"), run_name="r",
                 device="cpu", num_workers=0, progress=False, batch_size=16, epochs=1, max_steps_per_epoch=2,
                 eval_batch_size=64, encode_batch_size=32)
    results = train(cfg)
    assert (root / "runs" / "r" / "checkpoints").is_dir()
    return {"root": root, "data": data, "users": str(users), "items": str(items), "images": tiny["images"],
            "text": tiny["text_model"], "image": tiny["image_model"], "cache": tiny_cache,
            "run": results["run_dir"], "tiny": tiny["root"]}


def snapshot(*folders: str | Path) -> dict[str, bytes | None]:
    """Every file's bytes and every folder (None) under ``folders``, by path."""
    return {str(p): (p.read_bytes() if p.is_file() else None)
            for folder in folders for p in sorted(Path(folder).rglob("*"))}


def export(run: dict, out: str, capsys) -> tuple[int, list[str], list[str]]:
    """``iisan export RUN --out OUT``: exit code, stdout lines, stderr lines."""
    try:
        main(["export", run["run"], "--out", out, "--device", "cpu"])
        code = 0
    except SystemExit as stop:
        code = stop.code
    captured = capsys.readouterr()
    return code, captured.out.splitlines(), captured.err.strip().splitlines()


@pytest.mark.parametrize("out, message", [
    ("{text}", f"--out {{text}} is the input {{text}}; {WRITING_THERE}"),
    ("{text}/emb", f"--out {{text}}/emb is inside the input {{text}}; {WRITING_THERE}"),
    ("{image}", f"--out {{image}} is the input {{image}}; {WRITING_THERE}"),
    ("{cache}", f"--out {{cache}} is the input {{cache}}; {WRITING_THERE}"),
    ("{cache}/emb", f"--out {{cache}}/emb is inside the input {{cache}}; {WRITING_THERE}"),
    ("{images}", f"--out {{images}} is the input {{images}}; {WRITING_THERE}"),
    ("{images}/emb", f"--out {{images}}/emb is inside the input {{images}}; {WRITING_THERE}"),
    ("{items}/emb", f"--out {{items}}/emb is inside the input {{items}}; {WRITING_THERE}"),
    ("{users}", "--out {users} is a file, expected a folder (made if absent) for the embeddings"),
    ("{run}/checkpoints", "--out {run}/checkpoints is the run's checkpoint folder {run}/checkpoints, whose folders "
                          "its training replaces and prunes: choose a folder of its own"),
    ("{run}/checkpoints/epoch-0009", "--out {run}/checkpoints/epoch-0009 is inside the run's checkpoint folder "
                                     "{run}/checkpoints, whose folders its training replaces and prunes: choose a "
                                     "folder of its own"),
], ids=["text-encoder", "in-text-encoder", "image-encoder", "cache", "in-cache", "lmdb", "in-lmdb", "in-items-file",
        "users-file", "checkpoints", "a-future-checkpoint"])
def test_an_out_that_is_or_is_inside_an_input_is_one_line_and_changes_nothing(run, out, message, capsys):
    before = snapshot(run["tiny"], run["cache"], run["root"])
    code, printed, err = export(run, out.format(**run), capsys)
    assert code == 2 and printed == [] and err == [f"iisan: error: {message.format(**run)}"]
    assert snapshot(run["tiny"], run["cache"], run["root"]) == before


def test_a_link_to_an_encoder_folder_is_refused_as_that_folder(run, tmp_path, capsys):
    link = tmp_path / "models"
    link.symlink_to(run["text"], target_is_directory=True)
    before = snapshot(run["tiny"])
    code, _, err = export(run, str(link), capsys)
    assert code == 2 and err == [f"iisan: error: --out {link} is the input {run['text']}; {WRITING_THERE}"]
    assert snapshot(run["tiny"]) == before


@pytest.mark.parametrize("where", ["elsewhere", "run-folder", "data-folder"])
def test_an_ordinary_out_the_run_folder_or_a_folder_holding_inputs_takes_the_export(run, where, tmp_path, capsys):
    """The run folder and ``data/`` (holding the users and items files) get the two files and nothing else
    changes: the run evaluates to its results.json numbers afterwards."""
    out = {"elsewhere": tmp_path / "emb", "run-folder": Path(run["run"]), "data-folder": run["data"]}[where]
    exported = [out / "items.safetensors", out / "users-test.safetensors"]
    before = snapshot(run["tiny"], run["cache"], run["root"])
    code, printed, err = export(run, str(out), capsys)
    assert code == 0 and err == []
    assert printed[1].startswith(f"items: {exported[0]} (") and printed[2].startswith(f"users: {exported[1]} (")
    after = snapshot(run["tiny"], run["cache"], run["root"])
    assert {k: v for k, v in after.items() if Path(k) not in exported} == before
    main(["evaluate", run["run"], "--device", "cpu"])
    assert capsys.readouterr().out.splitlines()[-1] == "results.json: the same numbers (valid, test)"
    if where != "elsewhere":  # leave the run's folders as the other cases expect them
        for path in exported:
            path.unlink()


def test_an_export_whose_header_no_reader_would_take_is_refused_before_either_file_is_written(run, tmp_path, capsys,
                                                                                              monkeypatch):
    """The items file was written, then the users' embeddings computed, then their file (millions of user ids)
    written where no reader could open it."""
    import struct

    from iisan import tensorfiles

    assert export(run, str(tmp_path / "whole"), capsys)[0] == 0
    items, users = (struct.unpack("<Q", (tmp_path / "whole" / name).read_bytes()[:8])[0]
                    for name in ("items.safetensors", "users-test.safetensors"))
    assert users > items  # (more users than items here: their ids are the longest metadata)
    monkeypatch.setattr(tensorfiles, "HEADER_LIMIT", (items + users) // 2)  # (as millions of user ids would be)
    code, _, err = export(run, str(tmp_path / "emb"), capsys)
    assert code == 2 and len(err) == 1
    assert err[0].startswith(f"iisan: error: could not write {tmp_path / 'emb' / 'users-test.safetensors'}: its header")
    assert "of them its 'config'" in err[0]  # (a tiny run's longest metadata; millions of user ids would be)
    assert not list((tmp_path / "emb").glob("*.safetensors"))


def test_a_killed_exports_temporary_goes_at_the_next_export(run, tmp_path, capsys):
    from iisan.files import temporary_sibling

    out = tmp_path / "emb"
    out.mkdir()
    left = temporary_sibling(out / "users-test.safetensors")
    left.write_bytes(b"half a file")
    assert export(run, str(out), capsys)[0] == 0
    assert not left.exists() and sorted(p.name for p in out.glob("*.safetensors")) == [
        "items.safetensors", "users-test.safetensors"]
