"""The real-data seed table: finished points are collected, averaged with the sample standard deviation,
unfinished ones listed; the most-popular row comes from the same protocol."""

from __future__ import annotations

import json
import re
import shutil
import statistics

import pytest

from iisan.data.datasets import DATASETS
from iisan.data.run_data import load_data
from iisan.errors import ConfigError, OutputError
from iisan.evaluate import popularity_metrics
from iisan.experiments import seed_table
from iisan.experiments.seed_table import markdown, mean_std, point_name, run_point, write_table

SCIENTIFIC = DATASETS["Scientific"]


def as_real_data(tiny, root):
    """The tiny data set laid out as the real Scientific files under ``root``."""
    folder, users, items = SCIENTIFIC.folder, SCIENTIFIC.users_file, SCIENTIFIC.items_file
    (root / folder).mkdir(parents=True)
    shutil.copy(tiny["users"], root / folder / users)
    shutil.copy(tiny["items"], root / folder / items)
    return root


def finished_run(work, root, seed, hit=0.1, **results):
    """A finished ``id`` point on Scientific at ``root``'s data, as the trainer records it."""
    folder, users, items = SCIENTIFIC.folder, SCIENTIFIC.users_file, SCIENTIFIC.items_file
    run = work / "runs" / point_name("id", "Scientific", seed)
    run.mkdir(parents=True)
    (run / "results.json").write_text(json.dumps({
        "best_epoch": seed - 12340, "epochs": [{}] * 3, "test": {"hit@10": hit, "ndcg@10": hit / 2},
        "valid": {}, "timing": {"train_seconds_per_epoch": 1.0}, "parameters": {}, "git_commit": "abc",
        "device": "CPU", "config": {"users": str(root / folder / users), "items": str(root / folder / items)},
        **results}))
    return run / "results.json"


def test_mean_std_is_the_sample_standard_deviation():
    assert mean_std([0.1, 0.2, 0.6]) == {"mean": pytest.approx(0.3), "std": pytest.approx(0.26457513), "n": 3}
    assert mean_std([0.5])["std"] is None  # one seed: no spread to state


def test_a_non_finite_seed_makes_a_non_finite_cell_not_a_crash():
    stat = mean_std([0.1, float("nan"), 0.3])
    assert stat == {"mean": None, "std": None, "n": 3}  # never averaged away (it was a traceback)
    assert mean_std([0.1, float("inf")])["mean"] is None
    table = markdown({"table": {"Scientific/id": {"hit@10": stat, "ndcg@10": mean_std([0.1, 0.2]), "seeds": []}},
                      "points": {}})
    assert table.splitlines()[-1] == "| Scientific | id | - | non-finite | 0.1500 ± 0.0707 | - |"


def test_write_table_collects_finished_points_and_lists_the_rest(tiny, tiny_config, tmp_path):
    root = as_real_data(tiny, tmp_path / "data")
    work = tmp_path / "work"
    hits = {12345: 0.10, 12346: 0.14}
    for seed, hit in hits.items():
        finished_run(work, root, seed, hit)
    interrupted = work / "runs" / point_name("id", "Scientific", 12347)  # a run writes results.json from its start
    interrupted.mkdir(parents=True)
    (interrupted / "results.json").write_text(json.dumps({"status": "interrupted", "test": {}, "epochs": []}))
    out = tmp_path / "table.json"
    payload = write_table(work, out, root, settings=("id",), datasets=("Scientific",))
    row = payload["table"]["Scientific/id"]
    assert row["seeds"] == [12345, 12346] and row["hit@10"]["mean"] == pytest.approx(0.12)
    assert row["hit@10"]["std"] == pytest.approx(statistics.stdev([0.10, 0.14]))
    assert payload["missing"] == [point_name("id", "Scientific", 12347)]
    data = load_data(tiny_config())
    assert payload["table"]["Scientific/most-popular"]["hit@10"]["mean"] == popularity_metrics(data, "test")["hit@10"]
    assert json.loads(out.read_text())["git_commit"]  # provenance travels with the table
    assert "| Scientific | id | 2 | 0.1200 ± 0.0283 | 0.0600 ± 0.0141 | 5, 6 |" in markdown(payload)


def test_verify_point_reruns_the_first_epochs_and_compares_them(tiny, tmp_path):
    """A point trained here reruns identically (same machine, same threads); a recorded history that
    differs in one loss is reported as differing."""
    from iisan.experiments.seed_table import point_config, verify_point
    from iisan.train.trainer import train

    root = as_real_data(tiny, tmp_path / "data")
    work = tmp_path / "work"
    train(point_config("id", "Scientific", 12345, root, work).replace(epochs=3))
    report = verify_point("id", "Scientific", 12345, root, work, tmp_path / "a", epochs=2)
    assert report["identical"] and report["recorded_commit"], report
    assert [c["epoch"] for c in report["compared"]] == [0, 1]
    assert all(c["loss"][0] == c["loss"][1] for c in report["compared"])

    results = work / "runs" / point_name("id", "Scientific", 12345) / "results.json"
    recorded = json.loads(results.read_text())
    recorded["epochs"][1]["loss"] += 1e-6
    results.write_text(json.dumps(recorded))
    assert not verify_point("id", "Scientific", 12345, root, work, tmp_path / "b", epochs=2)["identical"]


def test_a_point_finished_on_other_data_is_refused_never_reused_or_tabled(tiny, tmp_path, monkeypatch):
    """A run trained on a subset, then --data-root pointed at the full data with the same --work: one line
    naming the run folder and what differs; the folder stays. On its own data it is reused untrained."""
    full, subset = as_real_data(tiny, tmp_path / "full"), as_real_data(tiny, tmp_path / "subset")
    folder, users = SCIENTIFIC.folder, SCIENTIFIC.users_file
    (subset / folder / users).write_text("".join((full / folder / users).read_text().splitlines(True)[:50]))
    work = tmp_path / "work"
    results = finished_run(work, subset, 12345)
    monkeypatch.setattr(seed_table, "train", lambda cfg: pytest.fail("a finished point was trained again"))
    assert run_point("id", "Scientific", 12345, subset, work) == results
    with pytest.raises(ConfigError, match=re.escape(f"{results.parent} finished on other data (users file ")):
        run_point("id", "Scientific", 12345, full, work)
    out = tmp_path / "table.json"
    with pytest.raises(ConfigError, match="finished on other data"):
        write_table(work, out, full, settings=("id",), datasets=("Scientific",))
    assert results.is_file() and not out.exists()


@pytest.mark.parametrize("damage", [{"config": ["users"]}, {"config": {"users": 3}}])
def test_a_point_whose_results_name_its_data_by_no_path_is_refused_in_one_line(tiny, tmp_path, damage):
    root = as_real_data(tiny, tmp_path / "data")
    results = finished_run(tmp_path / "work", root, 12345)
    recorded = json.loads(results.read_text())
    results.write_text(json.dumps({**recorded, "working_dir": 5}))  # its paths are absolute: still this data's
    assert run_point("id", "Scientific", 12345, root, tmp_path / "work") == results
    results.write_text(json.dumps({**recorded, **damage}))  # hand-edited, damaged: no traceback
    with pytest.raises(ConfigError, match=re.escape(f"{results.parent} finished on other data (users file ")) as info:
        run_point("id", "Scientific", 12345, root, tmp_path / "work")
    assert "\n" not in str(info.value)


def test_a_point_whose_items_file_changed_since_is_refused(tiny, tmp_path):
    root = as_real_data(tiny, tmp_path / "data")
    work = tmp_path / "work"
    finished_run(work, root, 12345, items_fingerprint="0123456789abcdef")
    with pytest.raises(ConfigError, match="items file fingerprint 0123456789abcdef there"):
        run_point("id", "Scientific", 12345, root, work)


def test_an_empty_table_never_replaces_one(tiny, tmp_path):
    """--table-only with a --work that does not exist, or holds no finished point: one line, --out kept."""
    root = as_real_data(tiny, tmp_path / "data")
    out = tmp_path / "table.json"
    out.write_text(json.dumps({"table": {"Scientific/id": {}}, "points": {"a": {}}, "missing": []}))
    before = out.read_text()
    with pytest.raises(ConfigError, match="holds no run folders"):
        write_table(tmp_path / "no-such-work", out, root)
    (tmp_path / "work" / "runs").mkdir(parents=True)
    with pytest.raises(ConfigError, match="none of the 3 points has finished"):
        write_table(tmp_path / "work", out, root, settings=("id",), datasets=("Scientific",))
    assert out.read_text() == before


def test_out_replaces_only_a_table(tiny, tmp_path):
    root = as_real_data(tiny, tmp_path / "data")
    finished_run(tmp_path / "work", root, 12345)
    out = tmp_path / "notes.txt"
    out.write_text("mine")
    with pytest.raises(OutputError, match="is not a seed table"):
        write_table(tmp_path / "work", out, root, settings=("id",), datasets=("Scientific",))
    assert out.read_text() == "mine"
