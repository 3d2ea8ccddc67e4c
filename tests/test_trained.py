"""Using a trained run: ``iisan evaluate`` reproduces results.json exactly (cached IISAN, live IISAN, a
baseline), ``iisan recommend`` never returns the history or padding and ranks by score, exported
embeddings rank as evaluation does, and unknown users and items are one-line errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from iisan.cli.main import main
from iisan.console import fixed
from iisan.evaluate import metrics_from_ranks, rank_targets
from iisan.experiments.trained import load_run, recommend
from iisan.train.trainer import train

SETTINGS = {"cached": {"method": "iisan", "feed": "cached"}, "live": {"method": "iisan", "feed": "live"},
            "bitfit": {"method": "bitfit", "batch_size": 16}}


@pytest.fixture(scope="module")
def runs(tiny, tiny_cache, tmp_path_factory) -> dict[str, dict]:
    """One finished tiny run per setting (2 epochs of 3 steps)."""
    from iisan.config import Config

    out = tmp_path_factory.mktemp("trained")
    base = Config(**{k: tiny[k] for k in ("users", "items", "images", "text_model", "image_model")},
                  cache_dir=tiny_cache, out_dir=str(out), device="cpu", num_workers=0, progress=False,
                  batch_size=16, epochs=2, max_steps_per_epoch=3, eval_batch_size=64, encode_batch_size=32,
                  lr=1e-3)
    return {name: train(base.replace(run_name=name, **values)) for name, values in SETTINGS.items()}


@pytest.mark.parametrize("name", list(SETTINGS))
def test_evaluate_reproduces_the_results_file_exactly(runs, name, capsys):
    results = runs[name]
    main(["evaluate", results["run_dir"], "--device", "cpu", "--json"])
    assert json.loads(capsys.readouterr().out) == {"valid": results["valid"], "test": results["test"]}
    main(["evaluate", results["run_dir"], "--device", "cpu", "--split", "test"])
    out = capsys.readouterr().out.splitlines()
    assert f"best epoch {results['best_epoch']}, CPU (" in out[0]
    assert out[2].split() == ["test", *(fixed(results['test'][m]) for m in
                                        ("hit@5", "ndcg@5", "hit@10", "ndcg@10", "hit@20", "ndcg@20"))]
    assert out[3] == "results.json: the same numbers (test)"


@pytest.mark.parametrize("test, said", [
    ({"hit@10": "abc", "ndcg@10": None}, "results.json: the same numbers (valid, test) (10 of the 12 numbers: "
                                         "results.json holds no number for the others)"),
    ({"hit@5": float("nan")}, "results.json: the same numbers (valid, test) (11 of the 12 numbers: results"
                              ".json holds no number for the others)"),
    ({"hit@5": {"a": 1}, "ndcg@5": 2.0}, "results.json differs: largest difference"),
    ("none", "results.json: the same numbers (valid) (6 of the 12 numbers: results.json holds no "
                "number for the others)"),
])
def test_evaluate_compares_the_numbers_a_damaged_results_file_still_holds(runs, tmp_path, capsys, test, said):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(runs["cached"]["run_dir"], copy)
    results = json.loads((copy / "results.json").read_text())
    results["test"] = test if isinstance(test, str) else {**results["test"], **test}
    (copy / "results.json").write_text(json.dumps(results))
    main(["evaluate", str(copy), "--device", "cpu"])
    assert capsys.readouterr().out.splitlines()[-1].startswith(said)


@pytest.mark.parametrize("shift, said", [
    (1e-15, "results.json: the same numbers to 12 decimal places (valid, test; largest difference 1.0e-15)"),
    (1e-3, "results.json differs: largest difference 1.00e-03 ("),
])
def test_evaluate_says_a_difference_in_the_last_digits_as_such_and_json_warns_of_a_real_one(
        runs, tmp_path, capsys, caplog, shift, said):
    """(a mean summed in another order by an earlier version differs in its last digits; evaluate --json said
    nothing of any difference)"""
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(runs["cached"]["run_dir"], copy)
    results = json.loads((copy / "results.json").read_text())
    results["test"] = {**results["test"], "hit@10": results["test"]["hit@10"] + shift}
    (copy / "results.json").write_text(json.dumps(results))
    main(["evaluate", str(copy), "--device", "cpu"])
    assert capsys.readouterr().out.splitlines()[-1].startswith(said)
    with caplog.at_level("WARNING", logger="iisan"):
        main(["evaluate", str(copy), "--device", "cpu", "--json"])
    assert set(json.loads(capsys.readouterr().out)) == {"valid", "test"}  # stdout: the JSON alone
    warned = [r.getMessage() for r in caplog.records if r.name == "iisan.cli.use"]
    if shift > 1e-12:
        assert len(warned) == 1 and warned[0].startswith(f"{copy}: {said}")
    else:
        assert warned == []


@pytest.mark.parametrize("epoch", ["abc", "1.5", "9" * 40])
def test_a_best_epoch_in_the_weights_that_is_no_whole_number_is_shown_as_unknown(runs, tmp_path, epoch, capsys,
                                                                                caplog):
    import shutil

    from safetensors import safe_open
    from safetensors.torch import save_file

    copy = tmp_path / "copy"
    shutil.copytree(runs["cached"]["run_dir"], copy)
    with safe_open(copy / "best.safetensors", "pt") as f:
        tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    save_file(tensors, copy / "best.safetensors", {**metadata, "epoch": epoch})
    main(["evaluate", str(copy), "--device", "cpu"])
    assert ", best epoch unknown (the weights file names none), CPU (" in capsys.readouterr().out
    assert f"its metadata's epoch {epoch!r} is not a whole number" in caplog.text


def test_a_loaded_run_shows_itself_in_a_few_lines(runs):
    """A notebook cell ending in a loaded run printed every item id, title and user id (4.8 million characters on
    the Scientific data) and the model's every module."""
    run = load_run(runs["cached"]["run_dir"], "cpu")
    shown = repr(run)
    assert f"data=SeqRecData({run.data.num_users:,} users, {run.data.num_items:,} items, max_seq_len " in shown
    assert run.data.item_ids[1] not in shown and "Linear(" not in shown and len(shown) < 6_000
    assert repr(run.data.catalog).startswith(f"ItemCatalog({run.data.catalog.path!r}, {len(run.data.catalog)} items")


def test_recommend_never_returns_the_history_or_padding_and_ranks_by_score(runs):
    run = load_run(runs["cached"]["run_dir"], "cpu")
    n = run.data.num_items
    ids = run.data.item_ids
    histories = [run.user_history(u) for u in run.data.user_ids[:20]] + [run.item_index([ids[7], ids[7], ids[3]])]
    everything = recommend(run, histories, k=n)
    top5 = recommend(run, histories, k=5)
    table = run.item_embeddings()
    for history, ranked, short in zip(histories, everything, top5, strict=True):
        items = [i for i, _ in ranked]
        assert 0 not in items and not set(items) & set(history.tolist())
        assert sorted(items + list(set(history.tolist()))) == list(range(1, n + 1))  # every other item, once
        scores = [s for _, s in ranked]
        assert scores == sorted(scores, reverse=True) and short == ranked[:5]
        inputs = torch.zeros(1, run.cfg.max_seq_len, dtype=torch.long)
        tail = torch.from_numpy(history[-run.cfg.max_seq_len:])
        inputs[0, run.cfg.max_seq_len - len(tail):] = tail
        by_hand = (run.model.user_vectors(table, inputs) @ table.T)[0].detach().numpy()  # (N+1,)
        by_hand[0] = -np.inf
        by_hand[history] = -np.inf
        assert items[0] == int(np.argmax(by_hand)) and scores[0] == pytest.approx(float(by_hand.max()), abs=1e-5)


def test_recommend_scores_the_histories_a_chunk_at_a_time_with_the_same_lists(runs, monkeypatch):
    """A users file of F users made an (F, items) score matrix at once (about 4 GB for Scientific's users);
    chunks of ``--eval-batch-size`` rows give the same lists. Users are looked up by id, not by list search."""
    run = load_run(runs["cached"]["run_dir"], "cpu")
    users = run.data.user_ids[:11]
    assert [run.data.user_row[u] for u in users] == list(range(11))
    histories = [run.user_history(u) for u in users]
    run.cfg.eval_batch_size = 100  # (this loaded run's own config)
    whole = recommend(run, histories, k=7)
    rows, user_vectors = [], run.model.user_vectors
    monkeypatch.setattr(run.model, "user_vectors", lambda table, inputs: rows.append(len(inputs))
                        or user_vectors(table, inputs))
    run.cfg.eval_batch_size = 4
    chunked = recommend(run, histories, k=7)
    assert rows == [4, 4, 3] and [[i for i, _ in top] for top in chunked] == [[i for i, _ in top] for top in whole]
    assert [s for top in chunked for _, s in top] == pytest.approx([s for top in whole for _, s in top], abs=1e-5)


def test_equal_scores_rank_in_item_order_so_a_shorter_list_is_a_prefix():
    from iisan.experiments.trained import ranked, top_items

    scores = torch.tensor([-torch.inf, 0.5, 2.0, 0.5, 2.0, 0.5, -torch.inf, 1.0])
    top7 = top_items(scores, 7)
    assert top7 == [(2, 2.0), (4, 2.0), (7, 1.0), (1, 0.5), (3, 0.5), (5, 0.5)]  # no -inf, ties by index
    assert all(top_items(scores, k) == ranked(scores[None], k)[0] == top7[:k] for k in range(1, 8))
    many = torch.zeros(5000)  # all tied: topk's own order would be arbitrary
    assert [i for i, _ in top_items(many, 4)] == [0, 1, 2, 3]
    nan = torch.tensor([0.1, float("nan"), 0.3, 0.2])
    assert top_items(nan, 3) == ranked(nan[None], 3)[0] == [(2, pytest.approx(0.3)), (3, pytest.approx(0.2)),
                                                            (0, pytest.approx(0.1))]
    rows = torch.randint(0, 4, (50, 30)).float()  # many ties, some crossing the cut, some not
    rows[rows == 0] = -torch.inf
    for k in (1, 3, 10, 40):
        assert ranked(rows, k) == [top_items(row, k) for row in rows]
        full = [sorted(((i, s) for i, s in enumerate(row.tolist()) if s != -np.inf), key=lambda t: (-t[1], t[0]))
                for row in rows]
        assert ranked(rows, k) == [f[:k] for f in full]


def test_recommend_from_the_command_line(runs, tmp_path, capsys):
    run_dir = runs["live"]["run_dir"]
    run = load_run(run_dir, "cpu")
    user = run.data.user_ids[3]
    main(["recommend", run_dir, "--user", user, "-k", "4", "--device", "cpu"])
    out = capsys.readouterr().out.splitlines()
    history = run.user_history(user)
    assert out[0].startswith(f"user {user}: {len(history)} interactions in the history (its items masked), the last "
                             f"{run.data.item_ids[history[-1]]} ")
    expected = recommend(run, [history], 4)[0]
    assert [line.split()[:3] for line in out[2:]] == [[str(r), run.data.item_ids[i], f"{s:.4f}"]
                                                      for r, (i, s) in enumerate(expected, 1)]
    users_file = tmp_path / "users.txt"
    users_file.write_text(f"\ufeff{user}\n\n{run.data.user_ids[5]}\tignored\n")  # a byte-order mark is dropped
    main(["recommend", run_dir, "--users-file", str(users_file), "-k", "3", "--json", "--device", "cpu"])
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["query"] for line in lines] == [f"user {user}", f"user {run.data.user_ids[5]}"]
    assert [i["item_id"] for i in lines[0]["items"]] == [run.data.item_ids[i] for i, _ in expected[:3]]
    asked = [run.data.item_ids[3], run.data.item_ids[7]]
    main(["recommend", run_dir, "--history", ",".join(asked), "--json", "--device", "cpu"])
    (line,) = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert line["history"] == asked and len(line["items"]) == 10
    assert not set(asked) & {i["item_id"] for i in line["items"]}
    for spelt, history in ((asked[0] + ",", asked[:1]), (" , ".join(asked) + ", ", asked)):  # a trailing comma
        main(["recommend", run_dir, "--history", spelt, "--json", "--device", "cpu"])
        assert json.loads(capsys.readouterr().out)["history"] == history
    # more asked for than there are items left once the history is masked: all of them, and a line saying so
    main(["recommend", run_dir, "--history", ",".join(asked), "-k", "1000", "--device", "cpu"])
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2 + run.data.num_items - 2 + 1
    assert out[-1] == f"(-k 1000: {run.data.num_items - 2} items are all there are to rank here; the history's are " \
                      "masked)"
    main(["recommend", run_dir, "--history", ",".join(run.data.item_ids[2:]), "-k", "3", "--device", "cpu"])
    assert capsys.readouterr().out.splitlines()[-1] == "(-k 3: 1 item is all there is to rank here; the history's " \
                                                       "are masked)"  # item_ids[0] is the padding


@pytest.mark.parametrize("argv, message", [
    (["recommend", "{run}", "--user", "nobody"], "--user: user 'nobody' is not among the 160 users of"),
    (["recommend", "{run}", "--history", "{item},no-such-item"], "--history: item id(s) 'no-such-item' are not "
                                                                   "among the 56 items of the data set"),
    (["recommend", "{run}", "--history", "no-such-item,{item},no-such-item"],  # named once
     "--history: item id(s) 'no-such-item' are not among the 56 items of the data set"),
    (["recommend", "{run}", "--history", "{item},,{item}"], "--history '{item},,{item}': item 2 is empty; give "
                                                              "item ids separated by single commas"),
    (["recommend", "{run}", "--history", ","], "--history: an empty history (give at least one item id)"),
    (["recommend", "{run}", "--users-file", "{users}"], "{users}:2: user 'ghost' is not among"),
    (["recommend", "{run}", "--user", "{user}", "-k", "0"], "argument -k: '0' is not a positive integer"),
    (["recommend", "{run}", "--user", "{user}", "-k", "\u0665"], "argument -k: '\u0665' is not a positive integer"),
    (["evaluate", "{run}", "--device", "cuda:01"], "argument --device: 'cuda:01' is not one of auto, cpu, cuda"),
    (["evaluate", "{missing}"], "run folder {missing} does not exist"),
    (["evaluate", "{users}"], "{users} is a file; expected a run folder (runs/<name>)"),
    (["export", "{folder}", "--out", "{folder}/x"], "{folder} is not a run folder: it has no config.json"),
])
def test_unknown_users_items_and_folders_are_one_line(runs, argv, message, tmp_path, capsys):
    from iisan.data.interactions import load_dataset

    data = load_dataset(runs["cached"]["config"]["users"], runs["cached"]["config"]["items"])
    users = tmp_path / "users.txt"
    users.write_text(f"{data.user_ids[0]}\nghost\n")
    names = {"run": runs["cached"]["run_dir"], "users": str(users), "missing": str(tmp_path / "nothing"),
             "folder": str(tmp_path),
             "user": data.user_ids[0], "item": data.item_ids[1]}
    with pytest.raises(SystemExit) as info:
        main([a.format(**names) for a in argv] + ["--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 2 and message.format(**names) in err[-1]
    assert len(err) == 1 or message.startswith("argument")  # argparse's own errors come after the usage


def _damage_cut(weights: Path) -> str:
    weights.write_bytes(weights.read_bytes()[:1000])
    return "is not a readable safetensors file"


def _damage_shape(weights: Path) -> str:
    from safetensors.torch import save_file

    with safe_open(str(weights), framework="pt") as fh:
        state, meta = {k: fh.get_tensor(k) for k in fh.keys()}, fh.metadata()
    name = next(k for k, v in state.items() if v.dim() == 2)
    state[name] = state[name][:, :-1].contiguous()
    save_file(state, str(weights), meta)
    return f"{name!r} has shape"


def _rewrite_config(weights: Path, config: str) -> None:
    from safetensors.torch import load_file, save_file

    with safe_open(str(weights), framework="pt") as fh:
        meta = fh.metadata()
    save_file(load_file(weights), str(weights), {**meta, "config": config})


def _damage_config(weights: Path) -> str:
    """Weights of another run (another learning rate, same shapes) beside this run's config.json."""
    with safe_open(str(weights), framework="pt") as fh:
        config = json.loads(fh.metadata()["config"])
    _rewrite_config(weights, json.dumps({**config, "lr": 0.5}))
    return f"was saved by a run of another config than {weights.parent / 'config.json'} (lr=0.5 there, 0.001 now)"


@pytest.mark.parametrize("damage", [_damage_cut, _damage_shape, _damage_config])
def test_a_damaged_weights_file_is_one_line(runs, damage, tmp_path, capsys):
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(runs["cached"]["run_dir"], run_dir)
    message = damage(run_dir / "best.safetensors")
    with pytest.raises(SystemExit) as info:
        main(["evaluate", str(run_dir), "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 2 and len(err) == 1
    assert err[0].startswith(f"iisan: error: {run_dir / 'best.safetensors'}") and message in err[0]


def test_export_to_a_file_is_one_line_and_leaves_the_file(runs, tmp_path, capsys):
    target = tmp_path / "embeddings"
    target.write_text("someone's file\n")
    with pytest.raises(SystemExit) as info:
        main(["export", runs["cached"]["run_dir"], "--out", str(target), "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 2 and err == [f"iisan: error: --out {target} is a file, expected a folder (made "
                                            "if absent) for the embeddings"]
    assert target.read_text() == "someone's file\n"


def test_export_replaces_an_earlier_export_but_no_one_elses_file(runs, tmp_path, capsys):
    folder = tmp_path / "emb"
    for _ in range(2):  # the same command again: the earlier export is replaced
        main(["export", runs["cached"]["run_dir"], "--out", str(folder), "--device", "cpu"])
    theirs = folder / "users-valid.safetensors"
    theirs.write_text("my precious\n")
    with pytest.raises(SystemExit) as info:
        main(["export", runs["cached"]["run_dir"], "--out", str(folder), "--split", "valid", "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert info.value.code == 2 and err == (f"iisan: error: --out {theirs} exists and is not embeddings IISAN "
                                            "exported; IISAN replaces only what it wrote itself, so choose another "
                                            "path or move that one away")
    assert theirs.read_text() == "my precious\n"


def test_evaluate_while_the_run_trains_says_so_and_blames_the_epoch_not_the_software(runs, tmp_path, capsys,
                                                                                     caplog):
    """A run that improves between the reading of results.json and of best.safetensors: the weights'
    epoch is not the file's, which the comparison names instead of another library version."""
    import shutil

    from iisan.train.runfolder import lock_run_folder

    copy = tmp_path / "copy"
    shutil.copytree(runs["cached"]["run_dir"], copy)
    results = json.loads((copy / "results.json").read_text())
    results.update(best_epoch=results["best_epoch"] + 7,  # the largest of the differences is said (0.125)
                   test={k: v + (0.125 if k == "hit@10" else 0.0625) for k, v in results["test"].items()})
    (copy / "results.json").write_text(json.dumps(results))
    held = lock_run_folder(copy)  # as a training process holds it
    try:
        main(["evaluate", str(copy), "--device", "cpu", "--split", "test"])
    finally:
        held.close()
    assert f"{copy} is still training: its best weights and results.json change" in caplog.text
    assert capsys.readouterr().out.splitlines()[-1] == (
        f"results.json differs: largest difference 1.25e-01 (results.json is of best epoch "
        f"{results['best_epoch']}, the weights of {results['best_epoch'] - 7})")


def test_export_into_a_folder_of_another_runs_embeddings_is_refused(runs, tmp_path, capsys):
    """users-test of one run beside items of another would be a folder whose products mean nothing."""
    from safetensors import safe_open

    folder, first, second = tmp_path / "emb", runs["cached"], runs["bitfit"]
    main(["export", first["run_dir"], "--out", str(folder), "--device", "cpu"])
    main(["export", first["run_dir"], "--out", str(folder), "--split", "valid", "--device", "cpu"])  # the same run
    capsys.readouterr()
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    with pytest.raises(SystemExit) as info:
        main(["export", second["run_dir"], "--out", str(folder), "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert info.value.code == 2 and err == (
        f"iisan: error: --out {folder} holds items.safetensors exported from {first['run_dir']} (best epoch "
        f"{first['best_epoch']}), not {second['run_dir']} (best epoch {second['best_epoch']}): export into another "
        "folder (a folder holds one model's embeddings)")
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    with safe_open(str(folder / "users-valid.safetensors"), "pt") as fh:
        assert fh.metadata()["run_dir"] == first["run_dir"]


def test_an_export_into_a_folder_another_export_is_writing_waits_for_it(runs, tmp_path, capsys):
    """Two exports at once into one folder: the second is refused in one line, not mixed with the first."""
    import os
    import socket

    from iisan.experiments.exports import LOCK
    from iisan.locks import OutputLock

    folder = tmp_path / "emb"
    with OutputLock(folder / LOCK, f"export folder {folder}"):  # another process's export, midway
        with pytest.raises(SystemExit) as info:
            main(["export", runs["cached"]["run_dir"], "--out", str(folder), "--device", "cpu"])
        assert sorted(p.name for p in folder.iterdir()) == [LOCK]
    err = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 2 and err == [f"iisan: error: export folder {folder} is in use by pid {os.getpid()} on "
                                            f"{socket.gethostname()}; another export is writing there; wait for it "
                                            "to finish"]
    main(["export", runs["cached"]["run_dir"], "--out", str(folder), "--device", "cpu"])  # free again
    assert sorted(p.name for p in folder.iterdir()) == ["items.safetensors", "users-test.safetensors"]


def test_an_export_of_the_same_run_with_a_moved_data_file_replaces_its_own(runs, tmp_path, capsys):
    """config.json edited to say where a data file is now is the same model: its export replaces the earlier
    one. Another config in the earlier export's metadata (a key that changes what a step computes) is named."""
    import shutil

    from iisan.experiments.exports import other_model

    run_dir, folder = tmp_path / "run", tmp_path / "emb"
    shutil.copytree(runs["cached"]["run_dir"], run_dir)
    main(["export", str(run_dir), "--out", str(folder), "--device", "cpu"])
    config = json.loads((run_dir / "config.json").read_text())
    moved = Path(shutil.copy(config["users"], tmp_path / "users.tsv"))
    (run_dir / "config.json").write_text(json.dumps({**config, "users": str(moved)}))
    main(["export", str(run_dir), "--out", str(folder), "--device", "cpu"])
    assert "users.safetensors" not in capsys.readouterr().err
    with safe_open(str(folder / "items.safetensors"), "pt") as fh:
        meta = fh.metadata()
    assert json.loads(meta["config"])["users"] == str(moved)  # the second export's
    other = {**meta, "config": json.dumps({**config, "lr": 0.5})}
    assert other_model(other, meta) == f"of another config (lr=0.5 there, {config['lr']!r} now)"
    assert other_model({**meta, "config": "{"}, meta) == "and records no readable config"
    assert other_model(meta, meta) == ""
    earlier = {**meta, "best_epoch": str(int(meta["best_epoch"]) - 1)}  # the run's weights of an earlier epoch
    assert other_model(earlier, meta) == f"not {meta['run_dir']} (best epoch {meta['best_epoch']})"


@pytest.mark.parametrize("name", ["cached", "bitfit"])
def test_exported_embeddings_rank_as_evaluation_does(runs, name, tmp_path, capsys):
    results = runs[name]
    main(["export", results["run_dir"], "--out", str(tmp_path / "emb"), "--device", "cpu"])
    assert "items.safetensors" in capsys.readouterr().out
    with safe_open(str(tmp_path / "emb" / "items.safetensors"), "pt") as fh:
        items, item_meta = fh.get_tensor("items"), fh.metadata()
    with safe_open(str(tmp_path / "emb" / "users-test.safetensors"), "pt") as fh:
        users, user_meta = fh.get_tensor("users"), fh.metadata()
    run = load_run(results["run_dir"], "cpu")
    assert json.loads(item_meta["item_ids"]) == run.data.item_ids[1:] and items.shape == (run.data.num_items, 64)
    assert json.loads(user_meta["user_ids"]) == run.data.user_ids and user_meta["split"] == "test"
    # Rank with nothing but the files (and each user's history): the test metrics of results.json.
    index = {item_id: i + 1 for i, item_id in enumerate(json.loads(item_meta["item_ids"]))}
    _, targets, history = run.data.eval_split("test")
    scores = torch.cat([torch.full((len(users), 1), -math.inf), users @ items.T], dim=1)  # column 0: padding
    assert index[run.data.item_ids[5]] == 5  # the files' order is the data set's, so indices carry over
    ranks = rank_targets(scores, torch.from_numpy(targets), torch.from_numpy(history))
    metrics = metrics_from_ranks(ranks)
    assert metrics == pytest.approx(results["test"], abs=1e-12)
    assert Path(item_meta["run_dir"]) == Path(results["run_dir"]) and item_meta["best_epoch"] == str(
        results["best_epoch"])


def test_evaluate_and_export_show_progress_whatever_the_run_trained_with(runs, tmp_path, monkeypatch, capsys):
    """A run trained with --no-progress (a batch job) was evaluated and exported without a bar or a line on a
    terminal too, and `iisan evaluate RUN --no-progress` was an unknown flag; export's user vectors had no bar."""
    from iisan.experiments import exports

    run_dir = runs[next(iter(runs))]["run_dir"]
    assert load_run(run_dir, "cpu").cfg.progress is False  # as it trained
    assert load_run(run_dir, "cpu", progress=True).cfg.progress is True
    shown = []
    bar = exports.progress_bar
    monkeypatch.setattr(exports, "progress_bar",
                        lambda *a, **kw: shown.append((kw["desc"], kw["enabled"])) or bar(*a, **kw))
    main(["export", run_dir, "--out", str(tmp_path / "on"), "--device", "cpu"])
    main(["export", run_dir, "--out", str(tmp_path / "off"), "--device", "cpu", "--no-progress"])
    main(["evaluate", run_dir, "--device", "cpu", "--no-progress", "--split", "test"])
    assert shown == [("user vectors before test", True), ("user vectors before test", False)]
    assert "results.json: the same numbers (test)" in capsys.readouterr().out


def test_a_run_trained_with_relative_paths_is_usable_from_another_folder(tiny, tiny_cache, tmp_path,
                                                                            monkeypatch, capsys):
    """config.json keeps paths as given; results.json says where they were relative to."""
    import os
    import shutil

    from iisan.config import Config

    work = tmp_path / "project"
    shutil.copytree(Path(tiny["users"]).parent, work / "data")
    shutil.copytree(tiny_cache, work / "cache")
    monkeypatch.chdir(work)
    rel = {k: os.path.relpath(work / "data" / Path(tiny[k]).relative_to(Path(tiny["users"]).parent))
           for k in ("users", "items", "images", "text_model", "image_model")}
    assert not Path(rel["users"]).is_absolute()
    results = train(Config(**rel, cache_dir="cache", out_dir="runs", run_name="rel", device="cpu", num_workers=0,
                           progress=False, batch_size=16, epochs=1, eval_batch_size=64))
    assert json.loads(Path("runs/rel/config.json").read_text())["users"] == rel["users"]
    monkeypatch.chdir(tmp_path)  # elsewhere: "data/users.tsv" means nothing here
    main(["evaluate", "project/runs/rel", "--json", "--device", "cpu"])
    shown = json.loads(capsys.readouterr().out)
    assert shown["test"] == pytest.approx(results["test"], abs=1e-9)


def test_evaluate_names_a_cache_rebuilt_in_another_precision(tiny, tiny_config, tmp_path, capsys):
    from iisan.model.caching import build_cache_from_config

    cfg = tiny_config(cache_dir=str(tmp_path / "cache"), out_dir=str(tmp_path / "runs"), run_name="fp32", epochs=1)
    build_cache_from_config(cfg, dtype="float32")
    train(cfg)
    build_cache_from_config(cfg, dtype="float16", overwrite=True)  # the same folder, another precision
    main(["evaluate", str(tmp_path / "runs" / "fp32"), "--device", "cpu"])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("results.json differs: largest difference ")
    assert last.endswith("(the cache was rebuilt in another precision (text float32 then, float16 now; "
                         "image float32 then, float16 now))")


def test_using_a_run_that_failed_before_it_was_set_up_says_so(tiny_config, tmp_path, capsys):
    from iisan.errors import EncoderError

    cfg = tiny_config(feed="live", text_layers=(0, 9), out_dir=str(tmp_path / "runs"), run_name="broken")
    with pytest.raises(EncoderError, match="do not fit"):
        train(cfg)  # the run folder exists, with a failed results.json, but no config.json or weights
    with pytest.raises(SystemExit) as info:
        main(["evaluate", str(tmp_path / "runs" / "broken"), "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert info.value.code == 2
    assert err.startswith(f"iisan: error: {tmp_path / 'runs' / 'broken'} holds a run that failed (")
    assert err.endswith(") before it was set up: nothing to use")


def test_a_run_used_with_a_changed_items_file_is_refused(tiny, tiny_config, tmp_path, capsys):
    """An ID-embedding run's rows follow the items file's order: reordered, evaluation would be silently
    wrong. The run records the file's fingerprint, and using it with another file is one line."""
    from iisan.data.interactions import read_items
    from iisan.digests import file_fingerprint

    items = tmp_path / "items.tsv"
    items.write_bytes(Path(tiny["items"]).read_bytes())
    cfg = tiny_config(method="id", items=str(items), out_dir=str(tmp_path / "runs"), run_name="id", epochs=1)
    results = train(cfg)
    assert results["items_fingerprint"] == file_fingerprint(items)
    lines = items.read_text().splitlines(keepends=True)
    items.write_text("".join(lines[1:] + lines[:1]))  # the same items, another order
    assert sorted(read_items(str(items)).ids) == sorted(read_items(tiny["items"]).ids)
    with pytest.raises(SystemExit) as info:
        main(["evaluate", results["run_dir"], "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert info.value.code == 2
    assert err == (f"iisan: error: {items} has changed since {results['run_dir']} was trained (items fingerprint "
                   f"{results['items_fingerprint']} then, {file_fingerprint(items)} now): the run's item rows would "
                   "not match it; restore the file or train again")


def test_a_trained_runs_data_that_its_commands_cannot_read_says_to_restore_it(tiny, tiny_config, tmp_path, capsys):
    """A user line repeated since training: evaluate, recommend and export said 'pass --merge-duplicate-users',
    a flag none of them has (they read the data through the run's config.json)."""
    users = tmp_path / "users.tsv"
    users.write_bytes(Path(tiny["users"]).read_bytes())
    cfg = tiny_config(method="id", users=str(users), out_dir=str(tmp_path / "runs"), run_name="id", epochs=1)
    results = train(cfg)
    users.write_text(users.read_text() + users.read_text().splitlines(keepends=True)[0])
    for command in (["evaluate"], ["export", "--out", str(tmp_path / "export")]):
        with pytest.raises(SystemExit) as info:
            main([*command[:1], results["run_dir"], *command[1:], "--device", "cpu"])
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert info.value.code == 2 and "pass --merge-duplicate-users to join a user's lines in file order (for a " \
            f"new run: {results['run_dir']} read its data through its config.json, with its own settings; restore " \
            "the file it trained on)" in err, err
    assert not (tmp_path / "export").exists()


@pytest.mark.parametrize("change", ["weights", "tokenizer", "config"])
def test_a_live_run_whose_encoder_folder_changed_is_refused(tiny, tiny_config, tmp_path, capsys, change):
    """A live run reads its encoders from their folders: another model put at the same path (or the same
    one with other weights, or another config.json) is not what the run trained with, for a rerun, a
    resume and evaluate alike; a run recorded before encoders were recorded is not held to them."""
    import shutil

    from safetensors.torch import load_file, save_file

    from iisan.errors import ConfigError

    text = tmp_path / "bert"
    shutil.copytree(tiny["text_model"], text)
    cfg = tiny_config(method="iisan", feed="live", text_model=str(text), out_dir=str(tmp_path / "runs"),
                      run_name="live", epochs=1)
    results = train(cfg)
    assert set(results["encoders"]) == {"text", "image"} and len(results["encoders"]["text"]["digest"]) == 64
    assert train(cfg)["run_dir"] == results["run_dir"]  # unchanged: finished before, not trained again
    if change == "weights":
        weights = load_file(str(text / "model.safetensors"))
        name = next(iter(weights))
        save_file({**weights, name: weights[name] + 0.01}, str(text / "model.safetensors"))
        what = r"weights digest \w+ then, \w+ now, over its weight and tokenizer/processor files; changed since: " \
            r"model\.safetensors"
    elif change == "tokenizer":  # no weight changed: the message said 'weights digest' alone
        (text / "tokenizer_config.json").write_text((text / "tokenizer_config.json").read_text() + "\n")
        what = r"weights digest \w+ then, \w+ now, over its weight and tokenizer/processor files; changed since: " \
            r"tokenizer_config\.json"
    else:
        config = json.loads((text / "config.json").read_text())
        (text / "config.json").write_text(json.dumps({**config, "hidden_dropout_prob": 0.3}))
        what = r"config.json hash \w+ then, \w+ now"
    for attempt in (cfg, cfg.replace(epochs=2)):  # rerun, and a resume
        with pytest.raises(ConfigError, match=rf"^{text} is not the text encoder {results['run_dir']} trained with "
                                              rf"\({what}\); use another --run-name"):
            train(attempt)
    with pytest.raises(SystemExit) as info:
        main(["evaluate", results["run_dir"], "--device", "cpu"])
    assert info.value.code == 2 and capsys.readouterr().err.strip().splitlines()[-1].startswith(
        f"iisan: error: {text} is not the text encoder {results['run_dir']} trained with (")
    recorded = json.loads((Path(results["run_dir"]) / "results.json").read_text())
    del recorded["encoders"]  # as written before the field existed
    (Path(results["run_dir"]) / "results.json").write_text(json.dumps(recorded))
    assert train(cfg)["run_dir"] == results["run_dir"]


def test_a_run_whose_best_weights_hold_nan_is_refused(runs, tmp_path, capsys):
    import shutil

    from safetensors.torch import load_file, save_file

    run_dir = tmp_path / "nan-run"
    shutil.copytree(runs["cached"]["run_dir"], run_dir)
    weights = run_dir / "best.safetensors"
    with safe_open(str(weights), "pt") as fh:
        metadata = fh.metadata()
    tensors = load_file(weights)
    name = sorted(tensors)[0]
    tensors[name].view(-1)[0] = float("nan")
    save_file(tensors, weights, metadata=metadata)
    with pytest.raises(SystemExit) as info:
        main(["evaluate", str(run_dir), "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert info.value.code == 2
    assert err == (f"iisan: error: {weights} holds non-finite values in 1 weight tensor(s) (e.g. {name}); its "
                   "metrics and scores would be NaN: restore the file or train again")


def test_relative_paths_of_a_run_resolve_from_where_it_was_trained(tmp_path, monkeypatch):
    from iisan.config import Config
    from iisan.experiments.trained import rebased

    trained, here = tmp_path / "trained", tmp_path / "here"
    for folder in (trained / "data", trained / "models" / "bert", here / "data"):
        folder.mkdir(parents=True)
    (trained / "data" / "items.tsv").write_text("x")
    (here / "data" / "users.tsv").write_text("x")
    monkeypatch.chdir(here)
    cfg = Config(users="data/users.tsv", items="data/items.tsv", cache_dir="cache", text_model="models/bert",
                 image_model="google/vit-base-patch16-224", images=str(tmp_path / "abs.lmdb"))
    moved = rebased(cfg, str(trained))
    assert moved.users == "data/users.tsv"  # found from here: kept
    assert moved.items == str(trained / "data" / "items.tsv") and moved.text_model == str(trained / "models/bert")
    assert moved.cache_dir == str(trained / "cache")  # found nowhere: named where the run had it
    assert moved.image_model == "google/vit-base-patch16-224" and moved.images == str(tmp_path / "abs.lmdb")
    assert rebased(cfg, None) == cfg


def test_a_run_saved_before_a_field_is_rebuilt_as_it_ran(runs, tmp_path):
    """config.json from before --layer-rule: automatic layers were --layer-rule groups then, so the run is
    rebuilt with it (the default now differs for deep towers), and evaluates to its own numbers."""
    import shutil

    from iisan.experiments.trained import load_run

    folder = tmp_path / "old"
    shutil.copytree(runs["cached"]["run_dir"], folder)
    config = json.loads((folder / "config.json").read_text())
    assert config.pop("layer_rule") == "stride"
    (folder / "config.json").write_text(json.dumps(config))
    _rewrite_config(folder / "best.safetensors", json.dumps(config))  # its weights were saved without it too
    assert load_run(folder, device="cpu").cfg.layer_rule == "groups"


def test_weights_without_a_readable_config_are_used_with_a_warning(runs, tmp_path, capsys, caplog):
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(runs["cached"]["run_dir"], run_dir)
    _rewrite_config(run_dir / "best.safetensors", "{not json")
    main(["evaluate", str(run_dir), "--device", "cpu", "--json"])
    assert json.loads(capsys.readouterr().out) == {s: runs["cached"][s] for s in ("valid", "test")}
    assert f"{run_dir / 'best.safetensors'} holds no readable config in its metadata" in caplog.text


def test_a_run_resumed_with_another_spelling_of_its_data_is_usable_from_anywhere(tiny_config, tmp_path, monkeypatch):
    """Trained with ``d/users.tsv``, resumed with its absolute path (one run: the same file) without a better
    epoch: config.json spells the path one way, best.safetensors the other; both are this run's."""
    import os
    import shutil

    work = tmp_path / "work"
    (work / "d").mkdir(parents=True)
    base = tiny_config()
    for key in ("users", "items"):
        shutil.copy(getattr(base, key), work / "d" / Path(getattr(base, key)).name)
    monkeypatch.chdir(work)
    relative = {key: f"d/{Path(getattr(base, key)).name}" for key in ("users", "items")}
    cfg = tiny_config(towers="text", feed="live", out_dir=str(tmp_path / "runs"), epochs=1, **relative)
    train(cfg)
    run = tmp_path / "runs" / "t"
    resumed = cfg.replace(users=os.path.abspath(cfg.users), items=os.path.abspath(cfg.items), epochs=2)
    (run / "config.json").write_text(json.dumps(resumed.to_dict()))  # what the resumed start writes
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert load_run(run, "cpu").cfg.users == str(work / "d" / Path(base.users).name)


@pytest.mark.parametrize("said, shown", [("running", "was stopped"), ("interrupted", "was interrupted"),
                                         ("failed", "failed")])
def test_a_run_that_did_not_finish_is_named_so_by_what_uses_its_weights(said, shown, runs, tmp_path, caplog):
    """evaluate, recommend and export of a run killed, interrupted or failed after some epochs: its best
    weights so far are what they use, and a warning says so and how to finish it; a finished run, nothing."""
    import shutil

    from iisan.experiments.trained import load_run

    copy = tmp_path / "copy"
    shutil.copytree(runs["cached"]["run_dir"], copy)
    results = json.loads((copy / "results.json").read_text())
    (copy / "results.json").write_text(json.dumps({**results, "status": said, "epochs": results["epochs"][:1]}))
    with caplog.at_level("WARNING"):
        load_run(copy, device="cpu")
    assert f"{copy} {shown} after 1 of its {results['config']['epochs']} epochs: its best weights so far are " \
           "used; its command, run again, resumes it" in caplog.text
    caplog.clear()
    load_run(runs["cached"]["run_dir"], device="cpu")
    assert "best weights so far" not in caplog.text


def test_a_cached_run_that_recorded_no_cache_is_said_unchecked_when_found_and_evaluated(runs, tmp_path, capsys,
                                                                                        caplog):
    """Results from before commit 6349197 record no cache: a rerun found the run finished and evaluate blamed
    'another device or library version' where the cache had been rebuilt from other encoders."""
    import shutil

    from iisan.config import Config

    copy = tmp_path / "old"
    shutil.copytree(runs["cached"]["run_dir"], copy)
    results = json.loads((copy / "results.json").read_text())
    del results["cache"]
    results["test"]["hit@10"] += 0.01
    (copy / "results.json").write_text(json.dumps(results))
    main(["evaluate", str(copy), "--device", "cpu"])
    assert capsys.readouterr().out.splitlines()[-1] == (
        "results.json differs: largest difference 1.00e-02 (a cache rebuilt since? (this run, of an older version, "
        "recorded none to compare) or another device or library version?)")
    cfg = Config(**results["config"]).replace(out_dir=str(tmp_path), run_name="old")
    with caplog.at_level("WARNING", logger="iisan"):
        assert train(cfg)["status"] == "finished" and train(cfg)["status"] == "finished"
    assert caplog.text.count(f"{copy} recorded no cache (a run of an older version): whether "
                             f"{cfg.cache_dir} holds the states it trained on cannot be told") == 1  # said once


def test_a_cache_written_after_the_run_is_named_when_the_numbers_moved(runs, tmp_path, capsys):
    """A cache built again with the same settings (`iisan cache --overwrite`; on a GPU the last bits vary) has
    the record of the one the run read: evaluate blamed another device or library version alone."""
    import os
    import shutil

    copy, cache = tmp_path / "run", tmp_path / "cache"
    shutil.copytree(runs["cached"]["run_dir"], copy)
    results = json.loads((copy / "results.json").read_text())
    shutil.copytree(results["config"]["cache_dir"], cache)
    results["config"]["cache_dir"] = str(cache)
    results["test"]["hit@10"] += 0.01
    (copy / "results.json").write_text(json.dumps(results))
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, "cache_dir": str(cache)}))
    main(["evaluate", str(copy), "--device", "cpu", "--split", "test"])
    assert capsys.readouterr().out.splitlines()[-1].endswith("(another device or library version?)")
    later = (copy / "results.json").stat().st_mtime + 60
    os.utime(cache / "image.safetensors", (later, later))
    main(["evaluate", str(copy), "--device", "cpu", "--split", "test"])
    assert capsys.readouterr().out.splitlines()[-1] == (
        f"results.json differs: largest difference 1.00e-02 ({cache / 'image.safetensors'} was written after the "
        "run's results.json: a cache built again (a GPU build's last bits vary) or another device or library "
        "version?)")


def test_a_run_whose_lock_names_another_machine_is_said_to_train_there(runs, tmp_path, caplog):
    """A run on a lost node (results.json says running, its lock a process on another host, which this machine
    cannot see): `iisan evaluate` said nothing of it, where a run training here is warned of."""
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(runs["cached"]["run_dir"], copy)
    results = json.loads((copy / "results.json").read_text())
    (copy / "results.json").write_text(json.dumps({**results, "status": "running"}))
    (copy / ".lock").write_text("pid 4242 on node7-of-another-cluster\n")
    main(["evaluate", str(copy), "--device", "cpu", "--split", "test"])
    assert f"{copy} is said to be training (results.json: running) by a process this machine cannot see, its lock " \
           "naming another machine or unreadable here: its best weights and results.json change" in caplog.text


def test_a_run_killed_before_its_first_epoch_is_said_to_be_killed_not_to_have_no_weights_yet(runs, tmp_path):
    """SIGKILL before the first validation: results.json says running, no process holds the folder. `evaluate`
    said it had 'no best.safetensors yet (written when an epoch's validation improves)', as of a live run."""
    import shutil

    from iisan.errors import TrainingError
    from iisan.experiments.trained import run_files

    copy = tmp_path / "copy"
    shutil.copytree(runs["cached"]["run_dir"], copy)
    results = json.loads((copy / "results.json").read_text())
    (copy / "results.json").write_text(json.dumps({**results, "status": "running", "epochs": []}))
    (copy / "best.safetensors").unlink()
    with pytest.raises(TrainingError, match=r"holds a run that was killed \(its command, run again, starts it "
                                            r"again\) before an epoch's validation wrote best.safetensors"):
        run_files(copy)
