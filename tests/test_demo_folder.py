"""A demo folder keeps the settings its data was generated with: ``iisan demo --out DIR`` (and
``scripts/reproduce.py --dataset demo``) with other users, items or seed refuse in one line and change
nothing in DIR, instead of regenerating the data, tiny encoders and cache in place under runs made from
them; the same settings keep reusing the folder."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
from pathlib import Path

import pytest

from iisan.cli.main import main
from iisan.errors import OutputError
from iisan.experiments.demo import DEMO_SETTINGS, prepare_demo_data
from iisan.experiments.reproduce import DEMO_DATA_FLAGS, Reproduction, reproduce

ROOT = Path(__file__).resolve().parents[1]
SIZES = ["--users", "100", "--items", "40"]


def snapshot(folder: Path) -> dict[str, tuple]:
    """Every path under ``folder``: a file's digest, size and mtime; a folder's mtime."""
    return {str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_size,
                                         p.stat().st_mtime_ns) if p.is_file() else ("dir", p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*"))}


def demo(out: Path, *flags: str) -> None:
    """``iisan demo`` that finishes; 1 epoch of tiny data may not beat most-popular (exit status 1)."""
    try:
        main(["demo", "--out", str(out), "--epochs", "1", "--no-progress", *SIZES, *flags])
    except SystemExit as stopped:
        assert stopped.code == 1, stopped.code


def refused(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as stopped:
        main(argv)
    assert stopped.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


@pytest.mark.slow
def test_other_settings_are_refused_in_one_line_and_the_same_ones_reuse_the_folder(tmp_path, capsys, caplog):
    out = tmp_path / "demo"
    with caplog.at_level(logging.INFO, logger="iisan.experiments.demo"):
        demo(out)
    assert "results in" in capsys.readouterr().out and "writing the demo's data" not in caplog.text  # (new)
    settings = json.loads((out / DEMO_SETTINGS).read_text())["settings"]
    assert (settings["num_users"], settings["num_items"], settings["seed"]) == (100, 40, 0)
    before = snapshot(out)
    held = "100 users, 40 items, seed 0"
    for flags, wanted in ((["--users", "120"], "120 users, 40 items, seed 0"),
                          (["--items", "50"], "100 users, 50 items, seed 0"),
                          (["--seed", "1"], "100 users, 40 items, seed 1"),
                          (["--seed", "1", "--versa"], "100 users, 40 items, seed 1")):
        line = refused(capsys, ["demo", "--out", str(out), "--epochs", "1", "--no-progress", *SIZES, *flags])
        assert line == (f"iisan: error: {out} holds demo data generated with {held}, not {wanted}; it is not "
                        f"overwritten: use another --out for these settings, or the same settings "
                        f"(--users 100 --items 40 --seed 0) to reuse it")
        assert snapshot(out) == before, flags
    # the same settings: reused as before (the run is reported, the data regenerated identically, and said so)
    with caplog.at_level(logging.INFO, logger="iisan.experiments.demo"):
        demo(out)
    assert "results in" in capsys.readouterr().out
    assert f"{out}: writing the demo's data, models and images again from their settings (the same bytes)" in \
        caplog.text
    after = snapshot(out)
    assert {k: v[0] for k, v in after.items() if k in ("users.tsv", "items.tsv", DEMO_SETTINGS)} == \
        {k: v[0] for k, v in before.items() if k in ("users.tsv", "items.tsv", DEMO_SETTINGS)}
    assert after[DEMO_SETTINGS] == before[DEMO_SETTINGS]  # not even rewritten
    for name in ("cache/text.safetensors", "cache/image.safetensors"):  # the same settings' cache: kept, not
        assert after[name] == before[name], name  # encoded and written again on every rerun
    # and another --out takes the other settings
    demo(tmp_path / "other", "--users", "120")


@pytest.mark.slow
def test_a_copied_demo_folder_names_the_run_that_is_not_its_own(tmp_path, capsys):
    import shutil

    demo(tmp_path / "demo")
    shutil.copytree(tmp_path / "demo", tmp_path / "copy")
    run = tmp_path / "copy" / "runs" / "demo-seed0"
    line = refused(capsys, ["demo", "--out", str(tmp_path / "copy"), "--epochs", "1", "--no-progress", *SIZES])
    assert line == (f"iisan: error: {run} holds the run of the demo in {tmp_path / 'demo'} (a copied folder?), not "
                    f"of this one: move {run} away to train the demo here, or use another --out")
    shutil.move(run, tmp_path / "elsewhere")
    demo(tmp_path / "copy")  # as the line says
    assert "results in" in capsys.readouterr().out


def test_a_folder_from_before_the_record_is_judged_by_its_data(tmp_path):
    out = tmp_path / "demo"
    prepare_demo_data(out, seed=0, progress=False, num_users=100, num_items=40)
    record = (out / DEMO_SETTINGS).read_bytes()
    (out / DEMO_SETTINGS).unlink()  # as an earlier version left it
    before = snapshot(out)
    for seed, sizes, wanted in ((0, {"num_users": 120, "num_items": 40}, "120 users, 40 items, seed 0"),
                                (1, {"num_users": 100, "num_items": 40}, "100 users, 40 items, seed 1")):
        with pytest.raises(OutputError) as stopped:
            prepare_demo_data(out, seed=seed, progress=False, **sizes)
        assert str(stopped.value) == (f"{out} holds demo data generated with 100 users, 40 items, seed 0, not "
                                      f"{wanted}; it is not overwritten: use another --out for these settings, "
                                      f"or the same settings (--users 100 --items 40 --seed 0) to reuse it")
        assert snapshot(out) == before
    # its data is what these settings generate: used as today, and the settings recorded
    prepare_demo_data(out, seed=0, progress=False, num_users=100, num_items=40)
    assert (out / DEMO_SETTINGS).read_bytes() == record


def test_earlier_data_of_an_unknown_seed_is_refused_without_a_way_to_match_it(tmp_path):
    out = tmp_path / "demo"
    prepare_demo_data(out, seed=3, progress=False, num_users=100, num_items=40)
    (out / DEMO_SETTINGS).unlink()
    before = snapshot(out)
    with pytest.raises(OutputError) as stopped:
        prepare_demo_data(out, seed=1, progress=False, num_users=100, num_items=40)
    assert str(stopped.value) == (f"{out} holds demo data generated with 100 users, 40 items, seed unknown, not "
                                  f"100 users, 40 items, seed 1; it is not overwritten: use another --out for "
                                  f"these settings")
    assert snapshot(out) == before


def test_an_unfinished_or_unreadable_record_lets_the_same_settings_finish(tmp_path):
    out = tmp_path / "demo"
    prepare_demo_data(out, seed=0, progress=False, num_users=100, num_items=40)
    (out / "users.tsv").unlink()  # stopped during the first generation
    with pytest.raises(OutputError, match="holds demo data generated with 100 users"):
        prepare_demo_data(out, seed=2, progress=False, num_users=100, num_items=40)
    prepare_demo_data(out, seed=0, progress=False, num_users=100, num_items=40)
    assert (out / "users.tsv").is_file()
    (out / DEMO_SETTINGS).write_text("{")  # unreadable: the data decides, and the record is written again
    prepare_demo_data(out, seed=0, progress=False, num_users=100, num_items=40)
    assert json.loads((out / DEMO_SETTINGS).read_text())["settings"]["num_users"] == 100


def test_reproduce_on_demo_data_of_other_sizes_refuses_naming_its_own_flags(tmp_path, capsys):
    prepare_demo_data(tmp_path / "demo_data", progress=False, flags=DEMO_DATA_FLAGS, num_users=100, num_items=40)
    before = snapshot(tmp_path)
    expected = (f"{tmp_path / 'demo_data'} holds demo data generated with 100 users, 40 items, seed 0, not "
                f"120 users, 40 items, seed 0; it is not overwritten: use another --out for these settings, or the "
                f"same settings (--demo-users 100 --demo-items 40) to reuse it")
    with pytest.raises(OutputError) as stopped:
        reproduce(Reproduction("demo", tmp_path, seeds=(1,), fetch=False, overrides={"epochs": 1},
                               demo_sizes={"num_users": 120, "num_items": 40}))
    assert str(stopped.value) == expected
    spec = importlib.util.spec_from_file_location("reproduce_script", ROOT / "scripts" / "reproduce.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with pytest.raises(SystemExit) as ended:
        module.main(["--dataset", "demo", "--out", str(tmp_path), "--demo-users", "120", "--demo-items", "40"])
    err = capsys.readouterr().err.strip().splitlines()
    assert ended.value.code == 2 and err[-1].endswith(expected), err
    after = snapshot(tmp_path)
    assert after.pop("reproduce-demo.log") and after == before and not (tmp_path / "reproduce-demo.md").exists()
    said = (tmp_path / "reproduce-demo.log").read_text().splitlines()  # only its log, which notes each attempt
    assert [line for line in said if "the reproduction ended: " in line][-2:] == [
        line for line in said if line.endswith(f"the reproduction ended: {expected}")]


def test_an_interrupted_demo_says_to_run_the_same_command_again(tmp_path, monkeypatch, capsys):
    """``iisan demo`` takes no --run-name: its Ctrl-C hint is to run the same command again, which goes on."""
    import signal

    import iisan.model.recommender as recommender_module

    loss, calls = recommender_module.in_batch_softmax_loss, []

    def interrupting(*args):
        calls.append(1)
        if len(calls) == 1:  # the first of the epoch's two steps (100 users)
            signal.raise_signal(signal.SIGINT)
        return loss(*args)

    monkeypatch.setattr(recommender_module, "in_batch_softmax_loss", interrupting)
    with pytest.raises(SystemExit) as stopped:
        main(["demo", "--out", str(tmp_path / "demo"), "--epochs", "1", "--no-progress", *SIZES])
    assert stopped.value.code == 130
    said = capsys.readouterr().err.strip().splitlines()[-1]
    assert said.startswith("iisan: SIGINT during epoch 0 after step 1 of 2") and said.endswith(
        "To resume, run the same command again; it goes on in demo-seed0"), said  # no --run-name: demo takes none
    monkeypatch.undo()
    demo(tmp_path / "demo")
    results = json.loads((tmp_path / "demo" / "runs" / "demo-seed0" / "results.json").read_text())
    assert results["status"] == "finished" and results["resumed_from"] == ["epoch-0000-step-00001"]
