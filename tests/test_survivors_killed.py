"""Exact user-visible behaviour no other test pinned down: a --config value replaces a SWEEP list (no folder
tag for it), evaluate's "the same numbers" means equal to the last bit, one interaction is said in the
singular, a config-file error names its file once, a mean that float noise puts just below a half rounds up
as the exact mean does, an error of no message is named by its type, an OSError about a named file and a
torchrun peer's DistBackendError are one line, a live run whose image store moved is refused up front (a
text-only run never reads it), and a run interrupted before it was set up says it "was interrupted"."""

from __future__ import annotations

import errno
import importlib.util
import json
import shutil
from pathlib import Path

import pytest

from iisan.cli.main import main
from iisan.config import Config
from iisan.console import entry_point, fixed
from iisan.errors import ConfigError, DataError
from iisan.experiments.trained import load_run
from iisan.train.trainer import train

SCRIPT = Path(__file__).resolve().parents[1] / "Code_Cached" / "scripts" / "run_IISAN.py"
DEFAULTS = {"method": "iisan", "feed": "cached"}  # what run_IISAN.py passes


@pytest.fixture(scope="module")
def live_runs(tiny, tmp_path_factory) -> dict[str, Path]:
    """Two finished live IISAN runs of one step: both towers, and the text tower alone."""
    out = tmp_path_factory.mktemp("survivors")
    base = Config(**{k: tiny[k] for k in ("users", "items", "images", "text_model", "image_model")},
                  cache_dir=str(out / "cache"), out_dir=str(out / "runs"), device="cpu", num_workers=0,
                  progress=False, batch_size=16, epochs=1, max_steps_per_epoch=1, eval_batch_size=64,
                  encode_batch_size=32, lr=1e-3, feed="live")
    return {name: Path(train(base.replace(run_name=name, **values))["run_dir"])
            for name, values in {"both": {}, "text": {"towers": "text"}}.items()}


def copied(run: Path, target: Path, **config) -> Path:
    """A copy of ``run`` at ``target``, its config.json changed by ``config``."""
    shutil.copytree(run, target)
    values = json.loads((target / "config.json").read_text())
    (target / "config.json").write_text(json.dumps({**values, **config}))
    return target


def refused(capsys, argv: list[str]) -> list[str]:
    """The stderr lines of an ``iisan`` command that ends with a user's error (exit status 2)."""
    with pytest.raises(SystemExit) as stopped:
        main(argv)
    assert stopped.value.code == 2
    return capsys.readouterr().err.strip().splitlines()


def test_a_config_file_value_replaces_the_sweep_list_and_tags_no_folder(tmp_path):
    """SWEEP lists two learning rates; a --config file setting lr makes it one value, so the run's folder
    is named as for ``--lr`` of that value: no ``lr...`` tag, under --run-name too."""
    from iisan.experiments.sweep import parse_script_args

    spec = importlib.util.spec_from_file_location("run_IISAN_cached", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sweep = {**module.SWEEP, "lr": [1e-4, 2e-4]}  # a user's edit of the script's grid
    (tmp_path / "c.json").write_text(json.dumps({"lr": 5e-4}))
    base = ["--out-dir", str(tmp_path / "runs"), "--device", "cpu"]
    for extra in ([], ["--run-name", "mine"]):
        from_file, _ = parse_script_args(DEFAULTS, sweep, [*base, "--config", str(tmp_path / "c.json"), *extra])
        from_flag, _ = parse_script_args(DEFAULTS, sweep, [*base, "--lr", "5e-4", *extra])
        assert [p.values["lr"] for p in from_file] == [5e-4]
        assert [p.config.run_name for p in from_file] == [p.config.run_name for p in from_flag]
        assert "lr" not in from_file[0].config.run_name.removeprefix("iisan-cached-Scientific-")
    assert from_file[0].config.run_name == "mine"


def test_evaluate_says_results_differ_by_a_millionth(live_runs, tmp_path, capsys):
    """Only equal numbers are "the same numbers": a recorded test metric 1e-6 off is a difference."""
    copy = copied(live_runs["both"], tmp_path / "copy")
    results = json.loads((copy / "results.json").read_text())
    results["test"]["hit@10"] += 1e-6
    (copy / "results.json").write_text(json.dumps(results))
    main(["evaluate", str(copy), "--device", "cpu"])
    assert capsys.readouterr().out.splitlines()[-1] == ("results.json differs: largest difference 1.00e-06 (another "
                                                        "device or library version?)")


def test_recommend_for_a_history_of_one_item_says_one_interaction(live_runs, capsys):
    run = load_run(live_runs["both"], device="cpu")
    item, title = run.data.item_ids[1], run.data.titles[1]
    main(["recommend", str(live_runs["both"]), "--history", item, "-k", "3", "--device", "cpu"])
    assert capsys.readouterr().out.splitlines()[0] == (f"history {item}: 1 interaction in the history (its items "
                                                       f"masked), the last {item} ({title})")


def test_an_error_of_a_config_file_names_the_file_once(tmp_path, capsys):
    """Config.from_dict's own error names the file already (unknown keys): not ``c.json: c.json: ...``;
    a value's error gets the file's name in front, once."""
    from iisan.precedence import read_config_file

    path = tmp_path / "c.json"
    path.write_text(json.dumps({"colour": "red"}))
    with pytest.raises(ConfigError) as unknown:
        read_config_file(path)
    assert str(unknown.value) == f"{path}: unknown key(s) colour"
    assert refused(capsys, ["train", "--config", str(path)]) == [f"iisan: error: {path}: unknown key(s) colour"]
    path.write_text(json.dumps({"lr": "abc"}))
    with pytest.raises(ConfigError) as value:
        read_config_file(path)
    assert str(value.value) == f"{path}: lr='abc': expected a number"


def test_a_mean_just_below_a_half_by_float_noise_rounds_as_the_exact_mean():
    """(1 + 2 + 30) / 160 / 3 = 0.06875 exactly; the float mean is 0.06874999999999999."""
    import statistics

    mean = statistics.fmean([1 / 160, 2 / 160, 30 / 160])
    assert mean < 0.06875 and fixed(mean) == "0.0688"


def test_the_seed_table_shows_the_mean_of_three_seeds_rounded_as_exact(tiny, tmp_path):
    """A seed table of three seeds whose HR@10 are 1/160, 2/160 and 30/160 shows their mean as 0.0688."""
    from iisan.data.datasets import DATASETS
    from iisan.experiments.seed_table import markdown, point_name, write_table

    data = DATASETS["Scientific"]
    root, work = tmp_path / "data", tmp_path / "work"
    (root / data.folder).mkdir(parents=True)
    shutil.copy(tiny["users"], root / data.folder / data.users_file)
    shutil.copy(tiny["items"], root / data.folder / data.items_file)
    for seed, hits in zip((12345, 12346, 12347), (1, 2, 30), strict=True):
        run = work / "runs" / point_name("id", "Scientific", seed)
        run.mkdir(parents=True)
        (run / "results.json").write_text(json.dumps({
            "best_epoch": 1, "epochs": [{}] * 2, "test": {"hit@10": hits / 160, "ndcg@10": 0.0}, "valid": {},
            "timing": {"train_seconds_per_epoch": 1.0}, "parameters": {}, "git_commit": "abc", "device": "CPU",
            "config": {"users": str(root / data.folder / data.users_file),
                       "items": str(root / data.folder / data.items_file)}}))
    payload = write_table(work, tmp_path / "table.json", root, settings=("id",), datasets=("Scientific",))
    row = next(line for line in markdown(payload).splitlines() if line.startswith("| Scientific | id |"))
    assert row.split("|")[3:5] == [" 3 ", " 0.0688 ± 0.1029 "], row


def test_an_error_of_no_message_is_named_by_its_type(capsys):
    with pytest.raises(SystemExit) as stopped:
        entry_point("iisan", lambda: (_ for _ in ()).throw(DataError("")))
    assert stopped.value.code == 2 and capsys.readouterr().err == "iisan: error: DataError\n"


def test_an_os_error_about_a_named_file_is_one_line(capsys):
    """A permission the OS refused on a file: one line naming it; an OSError that names no file is a bug."""
    def denied():
        raise PermissionError(errno.EACCES, "Permission denied", "/somewhere/users.tsv")

    with pytest.raises(SystemExit) as stopped:
        entry_point("iisan", denied)
    assert stopped.value.code == 2
    assert capsys.readouterr().err == "iisan: error: /somewhere/users.tsv: Permission denied\n"
    with pytest.raises(OSError, match="^no file$"):
        entry_point("iisan", lambda: (_ for _ in ()).throw(OSError("no file")))


def test_a_dist_backend_error_under_torchrun_is_one_line(monkeypatch, capsys):
    """torch's DistBackendError (a peer gone, in words none of the known phrases match) is the lost-peer line."""
    class DistBackendError(RuntimeError):
        pass

    def collective():
        raise DistBackendError("NCCL error in: ProcessGroupNCCL.cpp:1970, remote process exited\nmore")

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit) as stopped:
        entry_point("iisan", collective)
    assert stopped.value.code == 2
    assert capsys.readouterr().err.strip() == (
        "iisan: error: lost contact with another process of this torchrun launch (it stopped or was killed: NCCL "
        "error in: ProcessGroupNCCL.cpp:1970, remote process exited); the checkpoints already written are intact: "
        "run the same command again to resume")


def test_a_live_run_whose_image_store_moved_is_refused_up_front(live_runs, tmp_path, capsys):
    gone = tmp_path / "moved.lmdb"
    copy = copied(live_runs["both"], tmp_path / "copy", images=str(gone))
    config = copy / "config.json"
    assert refused(capsys, ["evaluate", str(copy), "--device", "cpu"]) == [
        f"iisan: error: {gone} (images of {config}) does not exist: if it moved, set images in {config} to where it "
        "is now"]


def test_a_text_only_run_with_a_stale_image_store_is_used(live_runs, tmp_path, capsys):
    """A text-only run never reads images: a path there that is gone refuses nothing."""
    copy = copied(live_runs["text"], tmp_path / "copy", images=str(tmp_path / "gone.lmdb"))
    main(["evaluate", str(copy), "--device", "cpu", "--split", "test"])
    assert capsys.readouterr().out.splitlines()[-1] == "results.json: the same numbers (test)"


def test_a_run_interrupted_before_it_was_set_up_says_it_was_interrupted(tmp_path, capsys):
    run = tmp_path / "runs" / "x"
    run.mkdir(parents=True)
    (run / "results.json").write_text(json.dumps({"status": "interrupted", "error": "Ctrl-C while loading data"}))
    assert refused(capsys, ["evaluate", str(run), "--device", "cpu"]) == [
        f"iisan: error: {run} holds a run that was interrupted (Ctrl-C while loading data) before it was set up: "
        "nothing to use"]
