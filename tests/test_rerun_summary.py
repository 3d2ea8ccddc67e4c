"""Running a finished run again trains nothing and logs the summary line the run ended with (best
epoch, valid and test HR@10 / NDCG@10, results.json), read from its results.json. A ``--feed``
given for the ID baseline (it has no item encoder; its feed is always ``live``) is one INFO line."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from iisan.cli.main import main
from iisan.console import fixed
from iisan.precedence import resolve
from iisan.train.runfolder import reusable_results
from iisan.train.runnames import default_run_name, known_run_name

SUMMARY = "best epoch "


def console_lines(records: list[logging.LogRecord]) -> list[str]:
    """The console's lines (``console.LOG_FORMAT``) without their time."""
    return [f"{r.levelname} {r.name}: {r.getMessage()}" for r in records]


def train_argv(tiny, tiny_cache, out_dir: Path, *extra: str) -> list[str]:
    return ["train", "--users", tiny["users"], "--items", tiny["items"], "--text-model", tiny["text_model"],
            "--image-model", tiny["image_model"], "--cache-dir", tiny_cache, "--out-dir", str(out_dir),
            "--device", "cpu", "--num-workers", "0", "--no-progress", "--batch-size", "16", "--epochs", "2",
            "--max-steps-per-epoch", "2", "--eval-batch-size", "64", *extra]


def test_a_rerun_of_a_finished_run_logs_the_summary_it_ended_with(tiny, tiny_cache, tmp_path, caplog):
    argv = train_argv(tiny, tiny_cache, tmp_path / "runs", "--run-name", "dup")
    with caplog.at_level(logging.INFO, logger="iisan"):
        main(argv)
    first = console_lines(caplog.records)
    ended = [line for line in first if SUMMARY in line]
    run_dir = tmp_path / "runs" / "dup"
    results = json.loads((run_dir / "results.json").read_text())
    assert ended == [f"INFO iisan.train.runfolder: best epoch {results['best_epoch']} | valid hit@10 "
                     f"{fixed(results['valid']['hit@10'])} ndcg@10 {fixed(results['valid']['ndcg@10'])} | test hit@10 "
                     f"{fixed(results['test']['hit@10'])} ndcg@10 {fixed(results['test']['ndcg@10'])} | "
                     f"{run_dir / 'results.json'}"]
    files = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="iisan"):
        main(argv)
    assert console_lines(caplog.records) == [
        f"INFO iisan.train.runfolder: {run_dir} finished before with this config; not training it again", *ended]
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == files  # nothing trained or written


@pytest.mark.parametrize("damage", [{"valid": "n/a"}, {"best_epoch": None}, {"test": {"hit@10": "0.5"}}])
def test_a_finished_results_file_without_numbers_is_reused_without_a_summary(tiny_config, damage, caplog):
    """A results.json edited by hand still says the run finished; its summary is left out, never an error."""
    cfg = tiny_config(run_name="edited")
    folder = Path(cfg.out_dir) / "edited"
    folder.mkdir(parents=True)
    results = {"status": "finished", "best_epoch": 1, "valid": {"hit@10": 0.5, "ndcg@10": 0.25},
               "test": {"hit@10": 0.5, "ndcg@10": 0.25}, "config": cfg.to_dict(), "run_dir": str(folder),
               "cache": {}}  # (a record of none: results of an older version, without the key, are said unchecked)
    (folder / "results.json").write_text(json.dumps({**results, **damage}))
    save_file({"w": torch.zeros(1)}, str(folder / "best.safetensors"))  # a finished run's best weights are there
    with caplog.at_level(logging.INFO, logger="iisan"):
        assert reusable_results(cfg) == {**results, **damage}
    assert console_lines(caplog.records) == [
        f"INFO iisan.train.runfolder: {folder} finished before with this config; not training it again"]


def test_a_feed_given_for_the_id_method_is_one_info_line(tiny, tmp_path, caplog):
    values = {"users": tiny["users"], "items": tiny["items"], "out_dir": str(tmp_path)}
    with caplog.at_level(logging.INFO, logger="iisan"):
        said = resolve(flags={**values, "method": "id", "feed": "live"})
    assert console_lines(caplog.records) == [
        "INFO iisan.precedence: feed=live is ignored: method=id has no item encoder"]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="iisan"):
        unsaid = resolve(flags={**values, "method": "id"})
    assert caplog.records == []
    assert said == unsaid and said.feed == "live"  # the same run, under the same name
    assert default_run_name(said) == default_run_name(unsaid)


def test_a_long_data_folder_name_is_cut_to_fit_the_automatic_run_name(tmp_path):
    """The data set's folder name went in whole: train failed on the folder's length, and a sweep blamed a
    --run-name it was never given. The hash at the end keeps two such data sets apart."""
    from iisan.bounds import MAX_NAME_BYTES, check_run_name
    from iisan.config import Config

    names = [default_run_name(Config(users=str(tmp_path / ("a" * 240 + end) / "users.tsv"))) for end in "xy"]
    assert all(len(n) == MAX_NAME_BYTES and n.startswith("iisan-cached-aaaa") for n in names)
    assert names[0] != names[1] and names[0][:-9] == names[1][:-9]  # apart by their hashes alone
    check_run_name(names[0])  # what a sweep checks
    tagged = default_run_name(Config(users=str(tmp_path / "Scientific" / "users.tsv")), "lr0.001")
    assert tagged.startswith("iisan-cached-Scientific-lr0.001-") and len(tagged) < 50  # short names as they were


def test_how_a_step_is_run_does_not_name_another_run():
    """--compile (like --device or --patch-embedding) changes how a step runs, not what it computes: the run
    folder's name is the same, so --compile off on a CPU finds the run of the default auto."""
    from iisan.config import Config

    cfg = Config(users="d/Scientific/u.tsv", items="d/Scientific/i.tsv")
    assert default_run_name(cfg) == default_run_name(cfg.replace(compile="off"))
    assert default_run_name(cfg) != default_run_name(cfg.replace(lr=1e-3))


def test_a_data_path_spelt_relative_or_absolute_finds_the_same_finished_run(tiny, tiny_cache, tmp_path,
                                                                            monkeypatch, caplog):
    """The run folder's hash takes each data file by where it is: a rerun from the data's folder with
    ``users.tsv`` finds the run that was given ``/abs/users.tsv``, and trains nothing."""
    out = tmp_path / "runs"
    main(train_argv(tiny, tiny_cache, out))
    (first,) = [p.name for p in out.iterdir()]
    data = Path(tiny["users"]).parent
    monkeypatch.chdir(data)
    relative = [Path(tiny["users"]).name if a == tiny["users"] else a for a in train_argv(tiny, tiny_cache, out)]
    relative = [Path(tiny["items"]).name if a == tiny["items"] else a for a in relative]
    assert Path(tiny["users"]).name in relative and tiny["users"] not in relative
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="iisan"):
        main(relative)
    assert f"INFO iisan.train.runfolder: {out / first} finished before with this config; not training it again" \
        in console_lines(caplog.records)
    assert [p.name for p in out.iterdir()] == [first]


def test_a_run_named_by_the_hash_of_paths_as_spelt_is_still_found(tiny_config, tmp_path, monkeypatch):
    """Earlier versions hashed each path as spelt: their run folder is found rather than a new one made."""
    monkeypatch.chdir(tmp_path)
    cfg = tiny_config(users=os.path.relpath(tiny_config().users, tmp_path), out_dir=str(tmp_path / "runs"))
    assert default_run_name(cfg) != default_run_name(cfg, scheme="as-spelt")
    assert known_run_name(cfg) == default_run_name(cfg)
    (tmp_path / "runs" / default_run_name(cfg, scheme="as-spelt")).mkdir(parents=True)
    assert known_run_name(cfg) == default_run_name(cfg, scheme="as-spelt")


def test_the_default_encoders_and_a_script_s_path_to_them_name_one_run(tiny_config, tmp_path, monkeypatch):
    """``iisan train`` leaves the encoders at their defaults (found under the repository from any folder);
    an entry script gives their absolute paths (``presets.BACKBONES``): one computation, one run folder,
    and a run folder of the earlier hash, which counted the script's spelling, is still found."""
    from iisan.config import DEFAULT_MODELS
    from iisan.experiments.presets import BACKBONES
    from iisan.train.checkpoint import config_differences

    monkeypatch.chdir(tmp_path)  # neither the repository nor the folder above the encoders
    plain = tiny_config(out_dir=str(tmp_path / "runs"), text_model=DEFAULT_MODELS["text"],
                        image_model=DEFAULT_MODELS["image"])
    scripted = plain.replace(**BACKBONES)
    assert scripted.text_model != plain.text_model and default_run_name(scripted) == default_run_name(plain)
    assert config_differences(plain.to_dict(), scripted.to_dict()) == []  # one resumes the other's checkpoints
    assert default_run_name(scripted.replace(text_model=str(tmp_path / "bert"))) != default_run_name(plain)
    earlier = default_run_name(scripted, scheme="defaults-as-spelt")
    assert earlier != default_run_name(scripted) and known_run_name(scripted) == default_run_name(plain)
    (tmp_path / "runs" / earlier).mkdir(parents=True)
    assert known_run_name(scripted) == earlier


def test_a_run_with_relative_data_paths_resumes_and_is_found_from_another_folder(tiny, tiny_cache, tmp_path,
                                                                                  monkeypatch, caplog):
    """Trained from the data's folder with ``users.tsv``, then run from elsewhere with the absolute paths:
    the saved relative paths are taken from the folder the run was started in (its checkpoint and
    results.json record it), so the run resumes, and once finished is found finished."""
    out, here = tmp_path / "runs", Path(tiny["users"]).parent
    absolute = train_argv(tiny, tiny_cache, out, "--epochs", "1")
    paths = [tiny[k] for k in ("users", "items", "text_model", "image_model")]  # encoder folders too
    relative = [os.path.relpath(a, here) if a in paths else a for a in absolute]
    monkeypatch.chdir(here)
    main(relative)
    (first,) = [p.name for p in out.iterdir()]
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    main(train_argv(tiny, tiny_cache, out))  # --epochs 2: one more epoch, resumed
    results = json.loads((out / first / "results.json").read_text())
    assert [p.name for p in out.iterdir()] == [first] and len(results["epochs"]) == 2 and results["resumed_from"]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="iisan"):
        main(train_argv(tiny, tiny_cache, out))
    assert f"{out / first} finished before with this config; not training it again" in caplog.text


def test_an_earlier_versions_sweep_folder_is_found_under_another_tag(tiny_config, tmp_path, monkeypatch):
    """A sweep point run by a version that hashed paths as spelt, then the sweep extended along one axis."""
    monkeypatch.chdir(tmp_path)
    cfg = tiny_config(users=os.path.relpath(tiny_config().users, tmp_path), out_dir=str(tmp_path / "runs"))
    (tmp_path / "runs" / default_run_name(cfg, "lr0.002", scheme="as-spelt")).mkdir(parents=True)
    assert known_run_name(cfg, "lr0.002-drop0.1") == default_run_name(cfg, "lr0.002", scheme="as-spelt")


def test_run_names_of_earlier_versions_are_pinned():
    """The hashes earlier versions named run folders by, computed by the code of d99a7fb: a change to how
    a config is hashed must keep finding those folders (runnames.HASHES), so each scheme is pinned here."""
    from iisan.config import Config
    from iisan.train.runnames import HASHES, config_hash

    absolute = Config(users="/data/Scientific/u.tsv", items="/data/Scientific/i.tsv", cache_dir="/c", lr=1e-3,
                      text_model="/models/bert")
    assert {config_hash(absolute, scheme) for scheme in HASHES} == {"63f8862e"}  # no default spelt otherwise
    assert default_run_name(absolute) == "iisan-cached-Scientific-63f8862e"
    assert config_hash(Config(users="u.tsv", items="i.tsv", cache_dir="/c"), "as-spelt") == "4ec90b6b"


def test_every_key_that_changes_what_a_run_computes_changes_its_name():
    """A key the hash left out would send two experiments into one folder (the second refused, or worse):
    each Config field but those that may change on resume (MAY_CHANGE) and those the method never reads
    changes the hash when it changes."""
    import copy
    import dataclasses

    from iisan.config import Config
    from iisan.methods import unread_keys
    from iisan.train.checkpoint import MAY_CHANGE
    from iisan.train.runnames import config_hash

    base = Config(users="/data/Scientific/u.tsv", items="/data/Scientific/i.tsv", cache_dir="/c")
    skipped = MAY_CHANGE | unread_keys(base.method, base.towers, base.feed)
    checked = []
    for f in dataclasses.fields(Config):
        if f.name in skipped:
            continue
        value, choices = getattr(base, f.name), f.metadata.get("choices")
        other = (next(c for c in choices if c != value) if choices else not value if isinstance(value, bool)
                 else value + 1 if isinstance(value, int) else value * 2 + 1 if isinstance(value, float)
                 else (*value, 99) if isinstance(value, tuple) else (0, 1) if value is None else f"{value}x")
        changed = copy.copy(base)
        object.__setattr__(changed, f.name, other)  # as a flag would set it (no validation needed to name it)
        assert config_hash(changed) != config_hash(base), f.name
        checked.append(f.name)
    assert {"lr", "seed", "text_layers", "drop_rate", "batch_size", "modality", "users"} <= set(checked)


def test_a_finished_run_of_an_older_format_is_never_overwritten(tiny_config, tmp_path):
    """A results.json of the same config with no status field (files from before it existed were written
    only when a run finished) is a finished run: a fresh start there is refused."""
    from iisan.errors import ConfigError
    from iisan.train.runfolder import refuse_to_overwrite

    cfg = tiny_config(out_dir=str(tmp_path))
    folder = tmp_path / "old"
    folder.mkdir()
    (folder / "results.json").write_text(json.dumps({"config": cfg.to_dict(), "epochs": [{"epoch": 0}]}))
    with pytest.raises(ConfigError, match=r"results.json is a finished run with no checkpoint left"):
        refuse_to_overwrite(folder, cfg)


def test_two_earlier_sweep_folders_that_could_be_this_run_are_neither(tiny_config, tmp_path):
    """Two folders of this config under other sweep tags (lrA, lrB): which one was this run cannot be told,
    so a run named by its own tag starts in a folder of its own."""
    cfg = tiny_config(out_dir=str(tmp_path / "runs"))
    for tag in ("lr0.001", "lr0.002"):
        (tmp_path / "runs" / default_run_name(cfg, tag)).mkdir(parents=True)
    assert known_run_name(cfg, "seed1") == default_run_name(cfg, "seed1")
    (tmp_path / "runs" / default_run_name(cfg, "lr0.002")).rmdir()  # one: that is this run, named before
    assert known_run_name(cfg, "seed1") == default_run_name(cfg, "lr0.001")


def test_a_folder_is_a_run_folder_only_by_a_runs_config(tmp_path):
    from iisan.train.runfolder import is_run_folder

    for name, config, expected in [("foreign", {"method": "id", "note": "mine"}, False),
                                   ("run", {"method": "iisan", "feed": "cached", "lr": 2e-4}, True)]:
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps(config))
        assert is_run_folder(tmp_path / name) is expected, name
    (tmp_path / "failed").mkdir()  # a run that failed before its config.json: its results record the config
    (tmp_path / "failed" / "results.json").write_text(json.dumps({"config": {"method": "fft", "feed": "live",
                                                                             "lr": 1e-4}}))
    assert is_run_folder(tmp_path / "failed")


@pytest.mark.parametrize("edited", ["edited", [1], 5])
def test_a_finished_run_whose_config_was_edited_into_no_object_is_not_reused_but_mended_from_its_checkpoint(
        tiny, tmp_path, edited):
    """A results.json whose ``config`` is no longer an object proves no config: the run is not taken as finished
    with this one (it crashed comparing them); its last checkpoint, whose config is checked, resumes it and
    writes its results again, the same numbers."""
    argv = ["train", "--method", "id", "--users", tiny["users"], "--items", tiny["items"], "--out-dir",
            str(tmp_path), "--run-name", "r", "--device", "cpu", "--num-workers", "0", "--no-progress",
            "--epochs", "1", "--max-steps-per-epoch", "2", "--eval-batch-size", "64"]
    main(argv)
    path = tmp_path / "r" / "results.json"
    first = json.loads(path.read_text())
    path.write_text(json.dumps({**first, "config": edited}))
    main(argv)
    again = json.loads(path.read_text())
    assert again["status"] == "finished" and again["config"] == first["config"]
    assert (again["valid"], again["test"], again["best_epoch"]) == (first["valid"], first["test"], first["best_epoch"])
