"""Using a trained run somewhere else than where it ran, or after something around it changed: its relative
paths mean what they meant where it ran, what moved or failed is said in one line naming the file to edit,
a cached run needs no image store, weights of another run are named as such, and the Python API refuses
what is not a history."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from iisan.cli.main import main
from iisan.config import Config
from iisan.errors import ConfigError, DataError, TrainingError
from iisan.experiments.trained import evaluate, load_run, recommend
from iisan.train.trainer import train


@pytest.fixture(scope="module")
def trained(tiny, tiny_cache, tmp_path_factory) -> dict:
    """A cached and an ID run trained from a folder ``a`` with the data there, named relatively."""
    root = tmp_path_factory.mktemp("use")
    (root / "a").mkdir()
    for key in ("users", "items"):
        shutil.copy(tiny[key], root / "a" / f"{key}.tsv")
    shutil.copytree(tiny_cache, root / "a" / "cache")
    cfg = Config(users="users.tsv", items="items.tsv", images=tiny["images"], text_model=tiny["text_model"],
                 image_model=tiny["image_model"], cache_dir="cache", out_dir="runs", device="cpu", num_workers=0,
                 progress=False, batch_size=16, epochs=2, max_steps_per_epoch=3, eval_batch_size=64, lr=1e-3)
    here = Path.cwd()
    try:
        os.chdir(root / "a")  # where the runs run (monkeypatch is per test)
        cached = train(cfg.replace(run_name="cached"))
        train(cfg.replace(method="id", run_name="id"))
    finally:
        os.chdir(here)
    return {"root": root, "cached": root / "a" / "runs" / "cached", "id": root / "a" / "runs" / "id",
            "results": cached}


def test_relative_paths_mean_where_the_run_ran_even_where_the_same_name_is_here(trained, tmp_path, monkeypatch,
                                                                                caplog):
    other = tmp_path / "b"
    other.mkdir()
    lines = (trained["root"] / "a" / "users.tsv").read_text().splitlines()
    (other / "users.tsv").write_text("\n".join(lines[: len(lines) // 2]) + "\n")  # another users.tsv here
    monkeypatch.chdir(other)
    with caplog.at_level(logging.WARNING):
        run = load_run(trained["cached"], device="cpu")
    assert run.cfg.users == str(trained["root"] / "a" / "users.tsv") and "not the users file" not in caplog.text
    assert evaluate(run, "test") == trained["results"]["test"]


def test_a_moved_data_file_names_the_config_to_edit(trained, tmp_path):
    moved = tmp_path / "moved"
    shutil.copytree(trained["root"] / "a", moved)
    run = moved / "runs" / "cached"
    results = json.loads((run / "results.json").read_text())
    (run / "results.json").write_text(json.dumps({**results, "working_dir": str(tmp_path / "gone")}))
    config = run / "config.json"
    with pytest.raises(ConfigError, match=rf"^{tmp_path}/gone/users.tsv \(users of {config}\) does not exist: if it "
                                          rf"moved, set "
                                          rf"users, items, cache_dir in {config} to where it is now$"):
        load_run(run, device="cpu")
    values = json.loads(config.read_text())
    values.update({k: str(moved / v) for k, v in values.items() if k in ("users", "items", "cache_dir")})
    config.write_text(json.dumps(values))
    assert evaluate(load_run(run, device="cpu"), "test") == trained["results"]["test"]  # as the message says


def test_a_deleted_cache_says_how_to_rebuild_it(trained, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(trained["cached"], copy)
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, "cache_dir": str(tmp_path / "deleted")}))
    with pytest.raises(ConfigError, match=r"cache_dir of .*config.json\) does not exist: .* to where it is now \(a "
                                          r"cache deleted: `iisan cache` with the run's encoders rebuilds it"):
        load_run(copy, device="cpu")


def test_a_cached_run_needs_no_image_store(trained, tmp_path, monkeypatch):
    copy = tmp_path / "copy"
    shutil.copytree(trained["cached"], copy)
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, "images": str(tmp_path / "rebuilt.lmdb")}))
    monkeypatch.chdir(trained["root"] / "a")
    assert evaluate(load_run(copy, device="cpu"), "test") == trained["results"]["test"]


def test_weights_of_another_method_are_named_as_another_runs(trained, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(trained["cached"], copy)
    shutil.copy(trained["id"] / "best.safetensors", copy / "best.safetensors")
    with pytest.raises(ConfigError, match=r"best.safetensors was saved by a run of another config than .*config.json "
                                          r"\(.*method='id' there, 'iisan' now"):
        load_run(copy, device="cpu")


def test_a_failed_run_says_it_failed(trained, tmp_path):
    copy = tmp_path / "failed"
    shutil.copytree(trained["cached"], copy)
    (copy / "best.safetensors").unlink()
    results = json.loads((copy / "results.json").read_text())
    (copy / "results.json").write_text(json.dumps({**results, "status": "failed", "error": "non-finite loss"}))
    with pytest.raises(TrainingError, match=rf"^{copy} holds a run that failed \(non-finite loss\) before an "
                                            r"epoch's validation wrote best.safetensors: nothing to use$"):
        load_run(copy, device="cpu")


@pytest.mark.parametrize("histories,k,said", [
    ([[1, 2]], 3.7, r"-k 3.7: must be a positive whole number"),
    ([[1, 2]], True, r"-k True: must be a positive whole number"),
    ([[]], 5, r"history 0: expected a non-empty list of item indices 1\.\.\d+"),
    ([[1], [-1]], 5, r"history 1: expected .* not \[-1\]"),
    ([[10**6]], 5, r"history 0: expected .* not \[1000000\]"),
    ([[1.5]], 5, r"history 0: expected .*"),
])
def test_recommend_refuses_what_is_not_a_history(trained, histories, k, said):
    run = load_run(trained["id"], device="cpu")
    with pytest.raises((ConfigError, DataError), match=said):
        recommend(run, histories, k)
    assert len(recommend(run, [[1, 2]], 3)[0]) == 3  # a plain list is a history
    assert recommend(run, [np.array([1, 2])], 3) == recommend(run, [[1, 2]], 3)


def test_an_export_spelt_relative_or_absolute_is_of_one_run(trained, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(trained["root"] / "a")
    out = tmp_path / "emb"
    main(["export", "runs/cached", "--out", str(out), "--device", "cpu"])
    main(["export", str(trained["cached"]), "--out", str(out), "--device", "cpu"])
    assert "items.safetensors" in capsys.readouterr().out


def test_evaluate_names_why_the_numbers_differ(trained, tmp_path, monkeypatch, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(trained["cached"], copy)
    results = json.loads((copy / "results.json").read_text())
    (copy / "results.json").write_text(json.dumps({**results, "config": {**results["config"], "lr": 0.5},
                                                   "test": {**results["test"], "hit@10": 0.999}}))
    monkeypatch.chdir(trained["root"] / "a")
    main(["evaluate", str(copy), "--device", "cpu"])
    assert "results.json is of another config than the run's config.json (lr=0.5 there, 0.001 now)" in \
        capsys.readouterr().out.splitlines()[-1]
