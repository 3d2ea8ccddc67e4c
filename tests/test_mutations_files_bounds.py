"""Behaviour of the output, config, flag, shape and figure helpers that the other tests left open: an empty
folder is taken (and marked) for the demo or a tiny model; space is refused as soon as an output would not
fit, in the sizes a message shows; config values exactly at their bounds (sizes, seed, device index) are
taken and one past them refused; switches written as text in a config file read as said; a smoke run is
shrunk to two epochs of five steps; an encoder folder may start with ``~``; a misspelt flag is named only
when it is close (``_`` read as ``-``); a bucket ladder rounds each size up, and a growth too small to
change a float still climbs; a figure IISAN drew (upper-case suffix, SVG) is replaced on a rerun, and a run
without a finished epoch is left out of it; a results file older than rates by parameter shows every rate."""

from __future__ import annotations

import json
import shutil
from collections import namedtuple
from pathlib import Path

import pytest

from iisan.bounds import device_problem
from iisan.claims import claim_folder
from iisan.config import REPOSITORY, Config, model_location
from iisan.data.shapes import ShapeBuckets
from iisan.errors import ConfigError, OutputError
from iisan.experiments.curves import CREATOR, creator, draw_curves
from iisan.experiments.report_rows import read_row
from iisan.files import require_space, temporary_sibling
from iisan.flags import FlagParser, add_config_arguments


def test_an_empty_folder_is_taken_and_marked_while_a_full_one_is_refused(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert claim_folder(empty, ".iisan-demo", "a demo folder", "--out") == empty
    assert (empty / ".iisan-demo").read_text() == ("a demo folder, written by IISAN; it may replace the files it "
                                                   "wrote here\n")
    (empty / "data.tsv").write_text("mine\n")  # a folder IISAN marked is taken again, whatever it holds
    assert claim_folder(empty, ".iisan-demo", "a demo folder", "--out") == empty
    full = tmp_path / "full"
    full.mkdir()
    (full / "notes.txt").write_text("mine\n")
    with pytest.raises(OutputError, match=r"^--out .*full exists and is not a demo folder \(no \.iisan-demo in it\)"):
        claim_folder(full, ".iisan-demo", "a demo folder", "--out")
    assert sorted(p.name for p in full.iterdir()) == ["notes.txt"]


def test_a_link_to_a_folder_is_that_folder_as_a_run_folder_link_is(tmp_path):
    """``iisan train --out-dir`` took a link to a folder (a scratch disk linked into a home folder) and the demo's
    --out refused the same link: the same folder is now claimed through it, with the same checks."""
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    (tmp_path / "demo").symlink_to(scratch)
    assert claim_folder(tmp_path / "demo", ".iisan-demo", "a demo folder", "--out") == tmp_path / "demo"
    assert (scratch / ".iisan-demo").is_file() and (tmp_path / "demo").is_symlink()  # through the link, kept
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "notes.txt").write_text("mine\n")
    (tmp_path / "to-theirs").symlink_to(theirs)
    with pytest.raises(OutputError, match="to-theirs exists and is not a demo folder"):
        claim_folder(tmp_path / "to-theirs", ".iisan-demo", "a demo folder", "--out")
    (tmp_path / "to-a-file").symlink_to(theirs / "notes.txt")
    with pytest.raises(OutputError, match="to-a-file is a symbolic link to no folder; give the path of a folder$"):
        claim_folder(tmp_path / "to-a-file", ".iisan-demo", "a demo folder", "--out")
    assert sorted(p.name for p in theirs.iterdir()) == ["notes.txt"]


def test_a_folder_holding_only_the_temporary_of_its_marker_is_taken(tmp_path):
    """A claim killed while writing its marker left the folder with the marker's temporary alone: every later
    run refused the folder as someone else's. Another hidden file still makes it someone else's."""
    died = tmp_path / "died"
    died.mkdir()
    temporary_sibling(died / ".iisan-demo").write_text("a demo")  # ..iisan-demo.<pid>-<hex>.tmp
    assert claim_folder(died, ".iisan-demo", "a demo folder", "--out") == died
    assert (died / ".iisan-demo").is_file()
    other = tmp_path / "other"
    other.mkdir()
    temporary_sibling(other / "notes").write_text("mine")  # a temporary's shape, of another name
    with pytest.raises(OutputError, match="is not a demo folder"):
        claim_folder(other, ".iisan-demo", "a demo folder", "--out")


def test_space_is_refused_as_soon_as_the_output_would_not_fit(tmp_path, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(2**30, 2**30 - 2048, 2048))  # 2 KiB free
    out = tmp_path / "new" / "images.lmdb"
    require_space(out, 2048, "8 images")  # exactly what is free fits
    with pytest.raises(OutputError) as info:
        require_space(out, 3072, "12 images")
    assert str(info.value) == (f"could not write {out}: 12 images need about 3.0 KiB; the disk holding {tmp_path} "
                               "has 2.0 KiB free: free some space there, or write elsewhere")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(2**30, 0, 1024))
    with pytest.raises(OutputError, match=r"need about 1\.0 KiB; the disk holding .* has 1\.0 KiB free"):
        require_space(out, 1025, "a file")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(2**30, 0, 1022))
    with pytest.raises(OutputError, match=r"need about 1023 bytes; the disk holding .* has 1022 bytes free"):
        require_space(out, 1023, "a file")


@pytest.mark.parametrize("key, most", [("max_seq_len", 4096), ("batch_size", 2**20), ("embedding_dim", 65536)])
def test_a_size_at_its_bound_is_taken_and_one_above_is_refused(key, most):
    assert getattr(Config.from_dict({key: most, "attention_heads": 1}), key) == most
    with pytest.raises(ConfigError) as info:
        Config.from_dict({key: most + 1, "attention_heads": 1})
    assert str(info.value) == f"{key}={most + 1} must be at most {most}"


def test_the_largest_seed_numpy_takes_is_taken_and_the_next_is_refused():
    assert Config(seed=2**32 - 1).seed == 4294967295
    with pytest.raises(ConfigError) as info:
        Config(seed=2**32)
    assert str(info.value) == "seed=4294967296 must be in [0, 2**32)"


def test_the_largest_device_index_torch_takes_is_taken():
    assert device_problem("cuda:127") == "" and Config(device="cuda:127").device == "cuda:127"
    assert device_problem("cuda:128") == "'cuda:128': a device index above 127, the largest torch takes"


@pytest.mark.parametrize("argv, said", [
    (["--max_seq_lne", "5"], "unrecognized arguments: --max_seq_lne 5; did you mean --max-seq-len?"),  # '_' as '-'
    (["--dropout", "0.1"], "unrecognized arguments: --dropout 0.1"),  # not close enough to --drop-rate to name it
    (["--lora"], "unrecognized arguments: --lora"),  # nor to --lr
])
def test_an_unknown_flag_names_the_flag_meant_only_when_it_is_close(argv, said, capsys):
    parser = FlagParser(prog="iisan train")
    add_config_arguments(parser)
    with pytest.raises(SystemExit) as info:
        parser.parse_args(argv)
    assert info.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == f"iisan train: error: {said}"


@pytest.mark.parametrize("text, value", [("yes", True), ("YES", True), ("1", True), ("True", True),
                                         ("no", False), ("0", False), ("false", False)])
def test_a_switch_written_as_text_in_a_config_file_reads_as_said(text, value):
    assert Config.from_dict({"smoke": text}).smoke is value


def test_a_switch_of_other_text_is_refused():
    with pytest.raises(ConfigError) as info:
        Config.from_dict({"smoke": "on"})
    assert str(info.value) == "smoke='on': expected true or false"


def test_paths_given_as_path_objects_are_kept_as_strings():
    from pathlib import PurePosixPath

    cfg = Config(users=Path("data/users.tsv"), out_dir=PurePosixPath("runs"))  # as a notebook writes them
    assert (cfg.users, cfg.out_dir) == ("data/users.tsv", "runs") and json.dumps(cfg.to_dict())
    with pytest.raises(ConfigError, match=r"^users=5: expected a string$"):
        Config(users=5)


@pytest.mark.parametrize("values", [None, [("lr", 1)], "lr=1"])
def test_config_from_what_is_no_dict_is_one_line(values):
    with pytest.raises(ConfigError, match=r"^x\.json: expected a dict of config keys, not "):
        Config.from_dict(values, source="x.json")


def test_a_smoke_run_is_its_config_shrunk_to_two_epochs_of_five_steps():
    cfg = Config(smoke=True, epochs=50, max_steps_per_epoch=0)
    assert (cfg.epochs, cfg.max_steps_per_epoch) == (2, 5)
    cfg = Config(smoke=True, epochs=1, max_steps_per_epoch=3)  # already smaller: kept
    assert (cfg.epochs, cfg.max_steps_per_epoch) == (1, 3)
    assert (Config(epochs=50).epochs, Config(epochs=50).max_steps_per_epoch) == (50, 0)


def test_an_encoder_folder_from_a_config_file_may_start_with_the_home_folder(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))  # a JSON file's "~/models/bert" is not expanded by any shell
    assert model_location("~/models/bert") == tmp_path / "models" / "bert"
    assert model_location("pretrained_models/bert-base-uncased") == REPOSITORY / "pretrained_models/bert-base-uncased"
    assert model_location("elsewhere/bert") == Path("elsewhere/bert")


def test_a_ladder_of_uneven_growth_rounds_each_size_up():
    assert [ShapeBuckets(growth=0.126).bucket(n) for n in (129, 145, 161)] == [160, 160, 192]


def test_a_growth_too_small_to_change_a_float_still_climbs_the_ladder():
    import threading

    found = []
    worker = threading.Thread(target=lambda: found.append(ShapeBuckets(growth=1e-20).bucket(40)), daemon=True)
    worker.start()
    worker.join(timeout=10)
    assert found == [48]  # 16, 32, 48: one ROW_MULTIPLE a step, not 16 for ever


RUN = {"epoch": [1, 2], "valid_hit@10": [0.1, 0.2], "loss": [3.0, 2.5], "best_epoch": 2}
NOT_STARTED = {"epoch": [], "valid_hit@10": [], "loss": [], "best_epoch": -1}


@pytest.mark.parametrize("name, fmt", [("curves.PNG", "png"), ("curves.svg", "svg")])
def test_a_figure_drawn_again_replaces_the_one_iisan_drew(tmp_path, name, fmt):
    path = tmp_path / name
    draw_curves({"a": RUN}, path)
    assert creator(path, fmt) == CREATOR
    first = path.read_bytes()
    draw_curves({"a": RUN, "b": {**RUN, "loss": [4.0, 1.0]}}, path)  # a rerun of `iisan results --curves`
    assert creator(path, fmt) == CREATOR and path.read_bytes() != first


def test_a_run_without_a_finished_epoch_is_left_out_of_the_figure_not_refused(tmp_path):
    draw_curves({"a": RUN, "failed": NOT_STARTED}, tmp_path / "curves.png")
    assert creator(tmp_path / "curves.png", "png") == CREATOR
    with pytest.raises(ConfigError) as info:
        draw_curves({"failed": NOT_STARTED}, tmp_path / "none.png")
    assert str(info.value) == f"--curves {tmp_path / 'none.png'}: none of the runs has a finished epoch to plot"
    assert not (tmp_path / "none.png").exists()



def test_a_results_file_that_predates_rates_by_parameter_shows_every_learning_rate(tmp_path):
    cfg = Config(method="lora", users="Dataset/Scientific/users.tsv", lr=0.002, lr_image=0.003).to_dict()
    results = {"config": cfg, "method": "lora", "feed": "live", "parameters": {"trainable": 10, "total": 100},
               "best_epoch": 1, "epochs": [{"epoch": 1, "valid": {"hit@10": 0.1}, "loss": 1.0}], "device": "cpu"}
    row = read_row(tmp_path / "run" / "results.json", results)
    assert (row["data"], row["lr"], row["lr_image"], row["trainable_params"]) == ("Scientific", "0.002", "0.003", 10)
    results["parameters"]["by_rate"] = {"lr": 10}  # a newer file: the rates that train nothing are '-'
    row = read_row(tmp_path / "run" / "results.json", results)
    assert (row["lr"], row["lr_image"]) == ("0.002", "-")
