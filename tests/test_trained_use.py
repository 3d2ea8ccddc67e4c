"""Using a trained run somewhere else than where it ran, or after something around it changed: its relative paths
mean what they meant where it ran, what moved or failed (a data file, an encoder folder) is said in one line
naming the file to edit, a cached run needs no image store, weights of another run are named as such, an ID run
refuses a users file that keeps other items, the Python API refuses what is not a history, a split or a device in
one line and leaves the caller's random streams alone, a recommendation masks the user's whole history, a demo
asked for fewer epochs than its run has stops before its work, and a train.log that cannot be written is one
warning."""

from __future__ import annotations

import errno
import io
import json
import logging
import os
import re
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
    """A cached, an ID and a live run trained from a folder ``a`` with the data and encoders there, named
    relatively."""
    root = tmp_path_factory.mktemp("use")
    (root / "a").mkdir()
    for key in ("users", "items"):
        shutil.copy(tiny[key], root / "a" / f"{key}.tsv")
    shutil.copytree(tiny_cache, root / "a" / "cache")
    for key in ("text_model", "image_model"):
        shutil.copytree(tiny[key], root / "a" / "models" / key)
    cfg = Config(users="users.tsv", items="items.tsv", images=tiny["images"], text_model=tiny["text_model"],
                 image_model=tiny["image_model"], cache_dir="cache", out_dir="runs", device="cpu", num_workers=0,
                 progress=False, batch_size=16, epochs=2, max_steps_per_epoch=3, eval_batch_size=64, lr=1e-3)
    here = Path.cwd()
    try:
        os.chdir(root / "a")  # where the runs run (monkeypatch is per test)
        cached = train(cfg.replace(run_name="cached"))
        train(cfg.replace(method="id", run_name="id"))
        train(cfg.replace(feed="live", text_model="models/text_model", image_model="models/image_model",
                          max_steps_per_epoch=1, epochs=1, run_name="live"))
    finally:
        os.chdir(here)
    return {"root": root, "cached": root / "a" / "runs" / "cached", "id": root / "a" / "runs" / "id",
            "live": root / "a" / "runs" / "live", "results": cached}


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


def test_a_run_that_recorded_no_working_folder_reads_its_relative_paths_from_where_its_out_dir_leads(
        trained, tmp_path, monkeypatch):
    """Versions before results.json recorded the working folder: their run folders, used from any other folder,
    were told their data had moved. Its relative ``out_dir`` (``runs``) leads from that folder to the run."""
    copy = tmp_path / "a"
    shutil.copytree(trained["root"] / "a", copy)
    results = json.loads((copy / "runs" / "cached" / "results.json").read_text())
    results.pop("working_dir")
    (copy / "runs" / "cached" / "results.json").write_text(json.dumps(results))
    monkeypatch.chdir(tmp_path)  # not where it ran: users.tsv is not here
    run = load_run(copy / "runs" / "cached", device="cpu")
    assert run.cfg.users == str(copy / "users.tsv") and evaluate(run, "test") == trained["results"]["test"]


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


def test_a_run_config_of_values_wrong_together_names_the_file(trained, tmp_path):
    """A --config file leaves such values to the merge; a run's config.json is all there is, so it is named."""
    copy = tmp_path / "copy"
    shutil.copytree(trained["cached"], copy)
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, "attention_heads": 3}))
    with pytest.raises(ConfigError) as info:
        load_run(copy, device="cpu")
    assert str(info.value) == f"{copy / 'config.json'}: embedding_dim=64 is not divisible by attention_heads=3"


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
    ([[1, "N+1"]], 5, r"history 0: expected a non-empty list of item indices 1\.\.\d+ .*, not \[1, \d+\]$"),
    ([[1, 2]], 0, r"-k 0: must be a positive whole number"),
    ([[1, 2]], -1, r"-k -1: must be a positive whole number"),
    ([[1.5]], 5, r"history 0: expected .*"),
])
def test_recommend_refuses_what_is_not_a_history(trained, histories, k, said):
    run = load_run(trained["id"], device="cpu")
    histories = [[run.data.num_items + 1 if i == "N+1" else i for i in h] for h in histories]  # one past the last
    with pytest.raises((ConfigError, DataError), match=said):
        recommend(run, histories, k)
    assert len(recommend(run, [[1, 2]], 3)[0]) == 3  # a plain list is a history
    assert recommend(run, [np.array([1, 2])], 3) == recommend(run, [[1, 2]], 3)


@pytest.mark.parametrize("dtype", [np.int8, np.uint8, np.int16, np.uint16, np.uint32, np.uint64, np.int32])
def test_a_history_of_any_integer_type_is_recommended_for_as_int64(trained, dtype):
    """(torch indexes with int64 only, and takes uint8 for a mask)"""
    run = load_run(trained["id"], device="cpu")
    assert recommend(run, [np.array([1, 2], dtype=dtype)], 5) == recommend(run, [[1, 2]], 5)


@pytest.mark.parametrize("histories", [[1, 2], np.array([1, 2]), ["I1", "I2"]], ids=["list", "array", "ids"])
def test_one_history_not_in_a_list_is_said_to_be_one(trained, histories):
    run = load_run(trained["id"], device="cpu")
    with pytest.raises(DataError, match=r"^expected a list of histories, each a list of item indices: one history "
                                        r"is \[history\]$"):
        recommend(run, histories, 3)


@pytest.mark.parametrize("item_ids", ["I0000012", [12, 15], [None]], ids=["a-string", "ints", "none"])
def test_item_index_takes_a_list_of_id_strings(trained, item_ids):
    run = load_run(trained["id"], device="cpu")
    with pytest.raises(DataError, match=r"^--history: expected a list of item ids \(strings\), not "):
        run.item_index(item_ids)
    ids = run.data.item_ids[1:3]
    assert run.item_index(ids).tolist() == [1, 2] and run.item_index(ids[::-1]).tolist() == [2, 1]


@pytest.mark.parametrize("split", ["train", "Test", None])
def test_a_split_neither_valid_nor_test_is_a_config_error_before_any_work(trained, tmp_path, split):
    from iisan.experiments.exports import export, user_embeddings

    run = load_run(trained["id"], device="cpu")
    said = rf"^split {re.escape(repr(split))}: expected 'valid' or 'test'$"
    for call in (lambda: evaluate(run, split), lambda: user_embeddings(run, split),
                 lambda: export(run, tmp_path / "out", split)):
        with pytest.raises(ConfigError, match=said):
            call()
    assert run.table is None and not (tmp_path / "out").exists()  # no item table made, nothing written


@pytest.mark.parametrize("device, said", [
    ("gpu", r"^device='gpu' is not one of auto, cpu, cuda, cuda:N, mps$"),
    ("CPU", r"^device='CPU' is not one of "),
    (None, r"^device='None' is not one of "),
])
def test_load_run_refuses_a_device_name_in_one_line(trained, device, said):
    with pytest.raises(ConfigError, match=said):
        load_run(trained["id"], device=device)


def test_load_run_leaves_the_callers_random_streams_as_they_were(trained):
    import torch

    torch.manual_seed(5)
    expected = torch.randn(3)
    torch.manual_seed(5)
    run = load_run(trained["cached"], device=torch.device("cpu"))  # (a torch.device is taken too)
    assert torch.equal(torch.randn(3), expected) and run.device == torch.device("cpu")


def test_build_model_takes_a_device_name_as_load_run_does(trained):
    from iisan.model.build import build_model

    run = load_run(trained["id"], device="cpu")
    model, _ = build_model(run.cfg, run.data, "cpu")
    assert {p.device.type for p in model.parameters()} == {"cpu"}


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


# --------------------------------------------------------------------------------------------------
# what a walk of `evaluate`, `recommend`, `export` and `demo` found


def run_copy(trained, tmp_path, name: str, users_lines: list[str] | None = None, **results_changes) -> Path:
    """A copy of the run ``name`` whose working folder (``ran``) holds the items file and a users file of
    ``users_lines`` (default: the one it trained on); results.json changed by ``results_changes``."""
    ran, copy = tmp_path / "ran", tmp_path / name
    ran.mkdir(parents=True)
    shutil.copy(trained["root"] / "a" / "items.tsv", ran / "items.tsv")
    users = (trained["root"] / "a" / "users.tsv").read_text().splitlines()
    (ran / "users.tsv").write_text("\n".join(users if users_lines is None else users_lines) + "\n")
    shutil.copytree(trained[name], copy)
    results = json.loads((copy / "results.json").read_text())
    (copy / "results.json").write_text(json.dumps({**results, "working_dir": str(ran), **results_changes}))
    return copy


def swapped(lines: list[str], old: str, new: str) -> list[str]:
    """Users lines with every interaction with item ``old`` made one with item ``new``."""
    return ["\t".join([user, " ".join(new if i == old else i for i in items.split())])
            for user, items in (line.split("\t", 1) for line in lines)]


def refused(capsys, argv: list[str]) -> list[str]:
    """The stderr lines of a command that ends with a user's error (exit status 2)."""
    with pytest.raises(SystemExit) as stopped:
        main(argv)
    assert stopped.value.code == 2
    return capsys.readouterr().err.strip().splitlines()


def test_an_id_run_refuses_a_users_file_that_keeps_other_items(trained, tmp_path, capsys):
    run = load_run(trained["id"], device="cpu")
    lines = (trained["root"] / "a" / "users.tsv").read_text().splitlines()
    kept, dropped = run.data.item_ids[1:], [i for i in run.data.catalog.ids if i not in run.data.item_ids]
    # the first kept item made the last dropped one: as many items kept, those between them one row up
    edited = swapped(lines, kept[0], dropped[-1])
    recorded = json.loads((trained["id"] / "results.json").read_text())["kept_items"]  # as the trainer wrote it
    assert recorded == run.data.kept_items and len(recorded) == 16
    copy = run_copy(trained, tmp_path, "id", edited)
    err = refused(capsys, ["evaluate", str(copy), "--device", "cpu"])
    assert len(err) == 1, err
    assert err[0].startswith(f"iisan: error: {tmp_path / 'ran' / 'users.tsv'} keeps other items than the users "
                             f"file {copy} trained on (kept items {run.data.kept_items} then, ")
    assert err[0].endswith("restore the users file the run trained on, or train again")
    # the same items kept (another user's line changed): used, with the warning of another users file
    same = run_copy(trained, tmp_path / "same", "id", [*lines[:-1], lines[-1] + " " + kept[1]])
    assert load_run(same, device="cpu").data.num_users == run.data.num_users


def test_an_id_run_before_kept_items_were_recorded_names_another_count(trained, tmp_path, capsys):
    run = load_run(trained["id"], device="cpu")
    lines = (trained["root"] / "a" / "users.tsv").read_text().splitlines()
    edited = swapped(lines, run.data.item_ids[1], run.data.item_ids[2])  # one item fewer kept
    copy = run_copy(trained, tmp_path, "id", edited, kept_items="")
    err = refused(capsys, ["evaluate", str(copy), "--device", "cpu"])
    assert err[-1] == (f"iisan: error: {copy / 'best.safetensors'} holds embeddings of {run.data.num_items} items, "
                      f"those the users file it trained on kept; {tmp_path / 'ran' / 'users.tsv'} keeps "
                      f"{run.data.num_items - 1}: it is not that users file (edited since, or another file); restore "
                      "the users file the run trained on, or train again")


def test_recommend_for_a_user_masks_their_whole_history(trained, capsys):
    run = load_run(trained["id"], device="cpu")
    keep = run.cfg.max_seq_len + 3
    row = next(r for r, before in run.data.earlier.items() if set(before) - set(run.data.padded[r]))
    user, tail = run.data.user_ids[row], run.data.padded[row][run.data.padded[row] > 0]
    line = next(x for x in (trained["root"] / "a" / "users.tsv").read_text().splitlines() if x.split("\t")[0] == user)
    whole = [run.data.item_ids.index(i) for i in line.split("\t")[1].split() if i in run.data.item_ids]
    assert len(whole) > keep and run.user_history(user).tolist() == whole
    main(["recommend", str(trained["id"]), "--user", user, "-k", str(run.data.num_items), "--json", "--device", "cpu"])
    listed = {run.data.item_ids.index(i["item_id"]): i["score"] for i in json.loads(capsys.readouterr().out)["items"]}
    assert sorted([*listed, *set(whole)]) == list(range(1, run.data.num_items + 1))  # every other item, once
    # the model reads the same last items as before: the scores are those after the kept tail alone
    assert listed == pytest.approx({i: s for i, s in recommend(run, [tail], run.data.num_items)[0] if i in listed})


def test_a_moved_encoder_folder_names_the_config_to_edit(trained, tmp_path, capsys):
    moved = tmp_path / "moved"
    shutil.copytree(trained["root"] / "a", moved, ignore=shutil.ignore_patterns("cache"))
    run = moved / "runs" / "live"
    results = json.loads((run / "results.json").read_text())
    (run / "results.json").write_text(json.dumps({**results, "working_dir": str(moved)}))
    shutil.move(moved / "models" / "text_model", tmp_path / "elsewhere")
    config = run / "config.json"
    err = refused(capsys, ["evaluate", str(run), "--device", "cpu"])
    assert err == [f"iisan: error: {moved / 'models' / 'text_model'} (text_model of {config}) does not exist: if it "
                   f"moved, set text_model in {config} to where it is now"]
    values = json.loads(config.read_text())
    config.write_text(json.dumps({**values, "text_model": str(tmp_path / "elsewhere")}))
    assert evaluate(load_run(run, device="cpu"), "valid")  # as the message says


def test_a_demo_with_fewer_epochs_than_its_run_stops_before_its_work(tmp_path, capsys):
    out = tmp_path / "demo"
    flags = ["--users", "100", "--items", "40", "--no-progress"]
    try:
        main(["demo", "--out", str(out), "--epochs", "2", *flags])
    except SystemExit as stopped:  # 2 epochs of tiny data may not beat most-popular
        assert stopped.code == 1, stopped.code
    capsys.readouterr()
    made = {p: p.stat().st_mtime_ns for p in (out / "cache" / "text.safetensors", out / "users.tsv",
                                              out / "images.lmdb" / "data.mdb")}
    err = refused(capsys, ["demo", "--out", str(out), "--epochs", "1", *flags])
    assert err == [f"iisan: error: --epochs 1: {out / 'runs' / 'demo-seed0'} has trained 2 epochs already; give at "
                   "least that many to go on with it, or another --out"]
    assert {p: p.stat().st_mtime_ns for p in made} == made


def test_a_users_file_that_is_a_device_is_not_said_to_be_missing(trained, capsys):
    err = refused(capsys, ["recommend", str(trained["id"]), "--users-file", os.devnull, "--device", "cpu"])
    assert err[-1] == (f"iisan: error: --users-file {os.devnull} is not a regular file; expected a file of user ids, "
                       "one per line")


def test_a_config_json_that_is_a_folder_is_said_to_be_one(trained, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(trained["id"], copy)
    (copy / "config.json").unlink()
    (copy / "config.json").mkdir()
    with pytest.raises(ConfigError, match=rf"^{copy / 'config.json'} is a folder; expected the config file a run "
                                          r"writes$"):
        load_run(copy, device="cpu")


def test_an_id_run_is_described_without_a_feed(trained, capsys):
    main(["evaluate", str(trained["id"]), "--device", "cpu", "--split", "test"])
    assert capsys.readouterr().out.startswith(f"{trained['id']}: SASRec-ID, best epoch ")  # no encoder, no feed


def test_an_id_runs_export_records_no_feed(trained, tmp_path):
    from safetensors import safe_open

    main(["export", str(trained["id"]), "--out", str(tmp_path / "emb"), "--device", "cpu"])
    with safe_open(str(tmp_path / "emb" / "items.safetensors"), "pt") as fh:
        assert (fh.metadata()["method"], fh.metadata()["feed"]) == ("SASRec-ID", "-")  # as `iisan results` shows it


class FullDisk(io.StringIO):
    """A stream on a full disk: every write and flush fails."""

    def write(self, text: str) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def flush(self) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_train_log_on_a_full_disk_is_one_warning_and_the_run_ends_with_its_own_error(tiny, tmp_path, monkeypatch,
                                                                                       capsys, caplog):
    from iisan import logfiles
    from iisan.train.trainer import Run

    def fails(run):
        for epoch in range(30):
            logging.getLogger("iisan.train.trainer").info("epoch %d", epoch)
        raise DataError("the run's own error")

    monkeypatch.setattr(logfiles.LogFile, "_open", lambda handler: FullDisk())
    monkeypatch.setattr(Run, "run", fails)
    argv = ["train", "--users", tiny["users"], "--items", tiny["items"], "--method", "id", "--device", "cpu",
            "--num-workers", "0", "--out-dir", str(tmp_path), "--run-name", "full", "--no-progress"]
    err = refused(capsys, argv)
    assert "Logging error" not in "\n".join(err) and "Traceback" not in "\n".join(err)
    assert err[-1] == "iisan: error: the run's own error"
    assert [r.getMessage() for r in caplog.records if "train.log" in r.getMessage()] == [
        f"could not write {tmp_path / 'full' / 'train.log'}: No space left on device; it stops here (the console has "
        "every line)"]
    from iisan import logfiles

    monkeypatch.setattr(logfiles, "open", lambda *args, **kwargs: FullDisk(), raising=False)  # the header
    assert refused(capsys, argv) == [f"iisan: error: could not write {tmp_path / 'full' / 'train.log'}: No space "
                                     "left on device"]


def test_the_embeddings_docs_runs_md_describes_score_as_evaluation_does(trained):
    import torch

    from iisan.experiments.exports import user_embeddings

    run = load_run(trained["id"], device="cpu")
    items, users = run.item_embeddings(), user_embeddings(run, "test")
    assert items.shape[0] == run.data.num_items + 1 and run.data.item_ids[0] == ""
    assert users.shape == (len(run.data.user_ids), items.shape[1])
    scores = users @ items.T  # row u: user_ids[u]; the test target ranked among them gives the test metrics
    _, targets, history = (torch.from_numpy(a).long() for a in run.data.eval_split("test"))
    target = scores[torch.arange(len(targets)), targets]
    scores[:, 0] = -torch.inf
    scores.scatter_(1, history, -torch.inf)
    repeated = (history == targets[:, None]).any(1)  # a target its history holds counts as a miss
    hits = ((scores > target[:, None]).sum(1) < 10) & ~repeated
    assert hits.float().mean().item() == pytest.approx(evaluate(run, "test")["hit@10"], abs=1e-6)
