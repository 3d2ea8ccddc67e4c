"""Tables and output claims, without training: the averaged table keeps runs of other epochs or patience
apart, verify_point compares every asked epoch, foreign CSVs and EPS files are refused, and the
reproduction and real-data summaries report what the (stubbed) runs gave."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from iisan.config import Config
from iisan.data.cache import cache_file
from iisan.errors import OutputError
from iisan.experiments import realdata, report, reproduce, seed_table
from iisan.experiments.curves import CREATOR, claim_figure
from iisan.experiments.report_rows import read_row_columns
from iisan.experiments.reproduce import Reproduction, StepMissing, ensure_cache, ensure_data, table
from iisan.experiments.results_file import csv_header
from iisan.metric_names import TABLED


def row(run: str, seed: int = 0, hit: float = 0.1, peak: float = 0.5, **config) -> dict:
    """A ``report_rows.read_row`` row of one run, by hand (config values as text, as read_row gives them)."""
    out = dict.fromkeys(read_row_columns())
    out.update({k: str(v) for k, v in Config().to_dict().items() if k in out})
    out.update(run=run, method="IISAN", feed="cached", data="demo", data_files="abc", image_files="def",
               status="finished", seed=str(seed), best_epoch=1, epochs_run=2, train_s_per_epoch=1.5,
               trainable_params=10, peak_gib=peak, device="cpu", folder=f"/r/{run}", written="x", non_finite="",
               processes="1", **{"valid_hit@10": hit, **{f"test_{m}": hit for m in TABLED}})
    out.update({k: str(v) for k, v in config.items()})
    return out


@pytest.mark.parametrize("key, values", [("patience", (5, 10)), ("epochs", (3, 7))])
def test_runs_that_differ_only_in_patience_or_epochs_are_separate_rows_of_the_averaged_table(key, values):
    rows = [row("a", hit=0.1, **{key: values[0]}), row("b", hit=0.3, **{key: values[1]})]
    averaged = report.average_rows(rows)
    assert len(averaged) == 2 and [r["seeds"] for r in averaged] == [1, 1]
    assert sorted(r["test_hit@10"] for r in averaged) == [0.1, 0.3]


def test_verify_point_is_not_identical_when_the_recorded_run_has_fewer_epochs_than_asked(tmp_path, monkeypatch):
    epoch = {"epoch": 0, "loss": 1.0, "valid": {"hit@10": 0.2}}
    folder = tmp_path / "work" / "runs" / seed_table.point_name("id", "Scientific", 1)
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps({"git_commit": "abc", "epochs": [epoch]}))
    monkeypatch.setattr(seed_table, "point_config", lambda *a: Config(method="id"))
    monkeypatch.setattr(seed_table, "train", lambda cfg: {"epochs": [epoch, {**epoch, "epoch": 1}][:cfg.epochs]})
    report_ = seed_table.verify_point("id", "Scientific", 1, tmp_path, tmp_path / "work", tmp_path / "s", epochs=2)
    assert len(report_["compared"]) == 1 and report_["identical"] is False
    same = seed_table.verify_point("id", "Scientific", 1, tmp_path, tmp_path / "work", tmp_path / "s", epochs=1)
    assert same["identical"] is True


def test_a_csv_header_without_its_newline_is_no_table(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("run,method")
    assert csv_header(path) is None
    with pytest.raises(OutputError, match="is not a results table"):
        report.claim_csv(path)
    assert path.read_text() == "run,method"
    path.write_text("run,method\n")
    report.claim_csv(path)  # a table this command wrote (header only): it may be replaced


def test_a_csv_whose_first_column_is_not_run_or_method_is_refused(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("lr,seed\n0.1,1\n")
    with pytest.raises(OutputError, match="is not a results table"):
        report.claim_csv(path)
    assert path.read_text() == "lr,seed\n0.1,1\n"


def test_an_eps_file_that_is_not_postscript_is_refused_even_naming_the_creator(tmp_path):
    path = tmp_path / "c.eps"
    path.write_bytes(f"just text\n%%Creator: {CREATOR}\n".encode())
    with pytest.raises(OutputError, match="is not a figure IISAN drew"):
        claim_figure(path)
    path.write_bytes(f"%!PS-Adobe-3.0 EPSF-3.0\n%%Creator: {CREATOR}\n%%EndComments\n".encode())
    claim_figure(path)


def test_the_reproduction_table_shows_the_largest_peak_memory_of_the_seeds():
    lines = table("demo", [row("s0", 0, peak=0.5), row("s1", 1, peak=1.5), row("s2", 2, peak=1.0)]).splitlines()
    ours = next(line for line in lines if line.startswith("| this reproduction | 3 |"))
    assert ours.endswith("| 1.50 GiB |")


def test_a_file_put_at_the_table_path_while_training_is_not_overwritten(tmp_path, monkeypatch):
    path = tmp_path / "reproduce-demo.md"

    def train(cfg):
        path.write_text("someone else's notes\n")
        return {"run_dir": str(tmp_path / "runs" / cfg.run_name)}

    monkeypatch.setattr(reproduce, "base_config", lambda run, root: Config(device="cpu"))
    monkeypatch.setattr(reproduce, "ensure_cache", lambda cfg, run: None)
    monkeypatch.setattr(reproduce, "train", train)
    monkeypatch.setattr(reproduce, "read_row", lambda p, results: row(Path(p).parent.name))
    with pytest.raises(OutputError, match="is not a reproduction table"):
        reproduce.reproduce(Reproduction("demo", tmp_path, seeds=(1,), fetch=False), root=tmp_path)
    assert path.read_text() == "someone else's notes\n"


def test_the_data_step_needs_the_images_too(tmp_path):
    paths = reproduce.dataset_paths("Scientific", tmp_path)
    for k in ("users", "items"):
        Path(paths[k]).parent.mkdir(parents=True, exist_ok=True)
        Path(paths[k]).write_text("x\n")
    with pytest.raises(StepMissing, match="step 1 of 4 \\(data\\): .* is missing") as err:
        ensure_data("Scientific", tmp_path, fetch=False)
    assert paths["images"] in str(err.value)


def test_a_cache_with_one_tower_file_is_not_the_cache(tmp_path):
    cfg = Config(cache_dir=str(tmp_path / "cache"), text_model=str(tmp_path / "t"), image_model=str(tmp_path / "i"))
    text = cache_file(cfg.cache_dir, "text")
    text.parent.mkdir(parents=True)
    text.write_bytes(b"x")
    with pytest.raises(StepMissing, match="step 2 of 4 \\(cache\\)"):
        ensure_cache(cfg, Reproduction("Scientific", tmp_path, fetch=False))


@pytest.fixture()
def stub_realdata(tmp_path, monkeypatch):
    """realdata's functions with every piece of work replaced: train returns ``result``."""
    data = tmp_path / "data"
    data.mkdir()
    for name in ("users.tsv", "items.tsv"):
        (data / name).write_text("x\n")
    monkeypatch.setattr(realdata, "_data_files", lambda d: (data / "users.tsv", data / "items.tsv"))
    monkeypatch.setattr(realdata, "minilm_path", lambda: str(tmp_path / "minilm"))
    monkeypatch.setattr(realdata, "random_vit", lambda work, **sizes: tmp_path / "vit")
    monkeypatch.setattr(realdata, "blank_image_store", lambda work: tmp_path / "blank")
    monkeypatch.setattr(realdata, "random_image_store", lambda work, ids: tmp_path / "random")
    monkeypatch.setattr(realdata, "read_items", lambda items: type("Items", (), {"ids": ["a"]})())
    monkeypatch.setattr(realdata, "build_cache_from_config", lambda cfg, **kw: None)
    monkeypatch.setattr(realdata, "cache_file", lambda *a: data / "users.tsv")  # "the cache is there"
    result = {"epochs": [{"train_seconds": 2.0}, {"train_seconds": 5.0}, {"train_seconds": 3.0}],
              "best_epoch": 1, "test": {"hit@10": 0.7}, "valid": {"hit@10": 0.4}, "parameters": {"total": 1},
              "timing": {"train_seconds_per_epoch": 3.3}, "run_dir": str(tmp_path / "run")}
    monkeypatch.setattr(realdata, "train", lambda cfg: result)
    return tmp_path


@pytest.mark.parametrize("images, label", [("blank", realdata.BLANK), ("random", realdata.RANDOM)])
def test_the_versa_summary_reports_the_test_split_and_the_images_used(stub_realdata, images, label):
    summary = realdata.versa_minilm(stub_realdata, stub_realdata / "work", images=images, epochs=3)
    assert summary["images"] == label
    assert summary["test"] == {"hit@10": 0.7} and summary["valid"] == {"hit@10": 0.4}
    written = json.loads((stub_realdata / "work" / f"versa_minilm_scientific_{images}.json").read_text())
    assert written["images"] == label and written["test"] == {"hit@10": 0.7}


def test_the_benchmark_reports_results_jsons_time_per_epoch_the_mean_of_all_and_the_slowest(stub_realdata, monkeypatch):
    monkeypatch.setattr(realdata, "load_data", lambda cfg: type("Data", (), {"num_users": 4})())
    monkeypatch.setattr(realdata, "build_model", lambda cfg, data, device: (None, None))
    monkeypatch.setattr(realdata, "load_weights", lambda model, path: None)
    monkeypatch.setattr(realdata, "evaluate_model", lambda *a: {"hit@10": 0.6})
    out = stub_realdata / "out.json"
    payload = realdata.cached_cpu_benchmark(stub_realdata, 3, stub_realdata / "work", out)
    assert payload["train_seconds_per_epoch_max"] == 5.0
    assert payload["train_seconds_per_epoch"] == 3.3  # results.json's timing: the first epoch left out
    assert payload["train_seconds_per_epoch_all"] == pytest.approx(10 / 3)  # 2, 5 and 3 s: the first included
    assert json.loads(out.read_text())["train_seconds_per_epoch_max"] == 5.0
