"""`iisan import-cache`: per-item hidden-state files in the authors' layout (plain tensors written with
torch.save) become this project's cache; a run trained on it equals one trained on a cache built
directly from the same states; bad files are counted and named, pickled objects refused unread."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from iisan.cli.main import main
from iisan.config import Config
from iisan.data.cache import CacheExpectation, cache_file, load_cache, read_metadata
from iisan.data.cache_import import REPORT, state_file
from iisan.data.run_data import load_data
from iisan.errors import CacheError, OutputError
from iisan.evaluate import item_table
from iisan.model.build import build_model
from iisan.model.caching import build_cache_from_config, import_cache_from_config
from iisan.train.trainer import train
from iisan.train.weights import load_weights

from ._scripts import ROOT

LAYERS = {"text_layers": (0, 2), "image_layers": (1, 3)}  # a run reads some of the tiny encoders' states


def cache_config(tiny, cache_dir, **overrides) -> Config:
    return Config(**{k: tiny[k] for k in ("users", "items", "images", "text_model", "image_model")},
                  cache_dir=str(cache_dir), device="cpu", num_workers=0, progress=False, **overrides)


@pytest.fixture(scope="module")
def authors_files(tiny, tmp_path_factory):
    """The tiny encoders' CLS states at every hidden layer, one torch.save file per item and modality in
    the authors' layout, and the item ids they cover."""
    root = tmp_path_factory.mktemp("authors")
    every = cache_config(tiny, root / "every-layer", text_layers=(0, 1, 2), image_layers=(0, 1, 2, 3))
    build_cache_from_config(every, dtype="float32")
    item_ids = load_data(every).item_ids
    src = root / "stored_vectors_tiny"
    for m in ("text", "image"):
        with safe_open(str(cache_file(every.cache_dir, m)), framework="pt") as fh:
            states = fh.get_tensor("states")  # (items + 1, depth + 1, width)
        for row, item_id in enumerate(item_ids[1:], 1):
            path = state_file(src, m, item_id)
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(states[row].clone(), path)  # a plain (depth + 1, width) fp32 tensor, as theirs
    return {"src": src, "item_ids": item_ids, "every": every}


def trained_item_table(cfg: Config) -> tuple[torch.Tensor, dict]:
    results = train(cfg)
    data = load_data(cfg)
    model, _ = build_model(cfg, data, torch.device("cpu"))
    load_weights(model, Path(results["run_dir"]) / "best.safetensors")
    return item_table(model, data.num_items, 64, None, torch.device("cpu")), results


@pytest.mark.slow
def test_an_imported_cache_trains_exactly_like_one_built_from_the_same_states(tiny, tiny_config, authors_files,
                                                                              tmp_path):
    direct = cache_config(tiny, tmp_path / "direct", **LAYERS)
    build_cache_from_config(direct, dtype="float32")
    imported_dir = tmp_path / "imported"
    main(["import-cache", "--from", str(authors_files["src"]), "--dtype", "float32",  # no --dataset: files by flag
          "--users", tiny["users"], "--items", tiny["items"], "--text-model", tiny["text_model"],
          "--image-model", tiny["image_model"], "--text-layers", "0,2", "--image-layers", "1,3",
          "--cache-dir", str(imported_dir)])
    data = load_data(direct)
    for m, layers in (("text", [0, 2]), ("image", [1, 3])):
        meta = read_metadata(cache_file(imported_dir, m))
        assert meta["source"] == "imported" and meta["imported_from"] == str(authors_files["src"].resolve())
        assert json.loads(meta["layers"]) == layers and meta["imported_missing"] == "0"
        ours, _ = load_cache(cache_file(direct.cache_dir, m), CacheExpectation(layers=tuple(layers)), data.item_ids)
        theirs, _ = load_cache(cache_file(imported_dir, m), CacheExpectation(layers=tuple(layers)), data.item_ids)
        assert torch.equal(ours, theirs)

    run = {"epochs": 2, "seed": 7, **LAYERS}
    table_direct, results_direct = trained_item_table(tiny_config(cache_dir=direct.cache_dir, run_name="d", **run))
    table_imported, results_imported = trained_item_table(tiny_config(cache_dir=str(imported_dir), run_name="i",
                                                                      **run))
    assert torch.equal(table_direct, table_imported)
    assert results_direct["test"] == results_imported["test"]
    assert results_direct["epochs"][-1]["loss"] == results_imported["epochs"][-1]["loss"]


def test_all_layers_can_be_kept(tiny, authors_files, tmp_path):
    cfg = cache_config(tiny, tmp_path / "all")
    import_cache_from_config(cfg, authors_files["src"], layers="all", dtype="float32")
    with safe_open(str(cache_file(cfg.cache_dir, "image")), framework="pt") as fh:
        table = fh.get_tensor("states")
    with safe_open(str(cache_file(authors_files["every"].cache_dir, "image")), framework="pt") as fh:
        every = fh.get_tensor("states")
    assert torch.equal(table, every)  # all 4 states of the 3-layer ViT, rows in the data set's order
    assert json.loads(read_metadata(cache_file(cfg.cache_dir, "image"))["layers"]) == [0, 1, 2, 3]


def test_an_import_says_where_it_stands_and_how_long_it_took(tiny, authors_files, tmp_path, caplog):
    """Importing 30,000 items took half a minute a tower without a bar or a line, and had no --no-progress."""
    cfg = cache_config(tiny, tmp_path / "told").replace(progress=True)
    with caplog.at_level("INFO", logger="iisan.console"):
        import_cache_from_config(cfg, authors_files["src"], dtype="float32")
    said = [r.getMessage() for r in caplog.records if r.name == "iisan.console"]
    assert [line.split(":")[0] for line in said] == ["importing text", "importing image"]
    assert all(" items (100 %), " in line and line.endswith(" s") for line in said)
    caplog.clear()
    with caplog.at_level("INFO", logger="iisan.console"):
        import_cache_from_config(cfg.replace(progress=False, cache_dir=str(tmp_path / "quiet")), authors_files["src"],
                                 dtype="float32")
    assert not [r for r in caplog.records if r.name == "iisan.console"]


def test_an_import_keeps_its_lines_in_the_cache_folders_log_after_a_build_s(tiny, authors_files, tmp_path):
    """A build kept a log in its cache folder and an import of the same folder kept none; an import's header
    follows a build's in the one log."""
    cfg = cache_config(tiny, tmp_path / "c")
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "cache-build.log").write_text("=== cache build: started earlier ===\n")
    import_cache_from_config(cfg, authors_files["src"], dtype="float32")
    lines = (tmp_path / "c" / "cache-build.log").read_text().splitlines()
    assert [line.split(":")[0] for line in lines if line.startswith("===")] == ["=== cache build", "=== cache import"]
    assert lines[2].startswith("command: ") and lines[3].startswith("commit: ")
    assert "INFO iisan.data.cache_import: importing text states of " in lines[4]
    assert any("INFO iisan.data.cache_import: wrote " in line and "image.safetensors" in line for line in lines)


def test_an_import_with_a_local_encoder_records_it_and_trains_without_it(tiny, authors_files, tmp_path):
    """States imported as a local folder's encoder's (its depth and width read from it) name that folder, not
    the authors' BERT: a run on the cache names it too, and is used once the folder is gone."""
    from iisan.model.build import cached_states

    local = tmp_path / "models" / "my-bert"
    shutil.copytree(tiny["text_model"], local)
    cfg = cache_config(tiny, tmp_path / "imported").replace(text_model=str(local))
    import_cache_from_config(cfg, authors_files["src"], layers="all", dtype="float32")
    assert read_metadata(cache_file(cfg.cache_dir, "text"))["encoder"] == str(local)
    assert read_metadata(cache_file(cfg.cache_dir, "image"))["encoder"] == tiny["image_model"]
    shutil.rmtree(local)  # the encoder gone: its cache stands for it
    states = cached_states(cfg, load_data(cfg), torch.device("cpu"))
    assert states.table_text.shape[1] == len(json.loads(read_metadata(cache_file(cfg.cache_dir, "text"))["layers"]))


def test_an_import_the_disk_cannot_hold_is_refused_before_it_is_written(tiny, authors_files, tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    from iisan.errors import OutputError

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(2**30, 2**30 - 512, 512))
    cfg = cache_config(tiny, tmp_path / "full")
    with pytest.raises(OutputError, match=r"^could not write .*full: the text, image states of \d+ items \(float32\) "
                                          r"need about [\d.]+ KiB; .* has 512 bytes free: free some space there"):
        import_cache_from_config(cfg, authors_files["src"], layers="all", dtype="float32")
    assert not cache_file(cfg.cache_dir, "text").exists()


class Touches:
    """Unpickling this object would create a file: the import must never run it."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def copy_files(src: Path, dst: Path) -> Path:
    for path in src.rglob("*.pt"):
        (dst / path.relative_to(src)).parent.mkdir(parents=True, exist_ok=True)
        (dst / path.relative_to(src)).write_bytes(path.read_bytes())
    return dst


def test_bad_files_are_counted_and_named_and_a_pickled_object_is_refused_unread(tiny, authors_files, tmp_path):
    src = copy_files(authors_files["src"], tmp_path / "stored")
    ids = authors_files["item_ids"][1:]
    marker = tmp_path / "unpickled"
    torch.save(Touches(marker), state_file(src, "text", ids[0]))
    state_file(src, "text", ids[1]).unlink()
    torch.save(torch.zeros(5, 32), state_file(src, "text", ids[2]))
    torch.save({"states": torch.zeros(3, 32)}, state_file(src, "image", ids[3]))
    state_file(src, "image", ids[4]).write_bytes(b"not a torch file")
    torch.save(torch.full((4, 24), float("nan")), state_file(src, "image", ids[5]))
    torch.save(torch.randint(0, 9, (3, 32)), state_file(src, "text", ids[6]))  # token ids, not states
    cfg = cache_config(tiny, tmp_path / "cache")
    with pytest.raises(CacheError) as err:
        import_cache_from_config(cfg, src, dtype="float32")
    message = str(err.value)
    assert "\n" not in message and f"7 of {2 * len(ids)} files" in message and "no cache was written" in message
    for part in ("1 refused", f"bert_{ids[0]}.pt", "1 missing", "1 wrong shape", "1 not a plain tensor",
                 "1 unreadable", "1 NaN or infinite values", "1 not floating-point"):
        assert part in message
    assert not marker.exists()  # the pickled call never ran
    assert not cache_file(cfg.cache_dir, "text").exists() and not cache_file(cfg.cache_dir, "image").exists()
    report = (Path(cfg.cache_dir) / REPORT).read_text().splitlines()
    assert len(report) == 8 and report[1].startswith(f"text\t{ids[0]}\t") and "refused" in report[1]
    assert "shape (5, 32), expected (3, 32)" in report[3]
    import_cache_from_config(cfg, authors_files["src"], dtype="float32")  # the intact files, same folder
    assert (Path(cfg.cache_dir) / REPORT).read_text() == "modality\titem_id\tfile\tproblem\n"


def test_states_beyond_float16_are_refused_when_importing_as_float16(tiny, authors_files, tmp_path):
    """A finite state above 65504 would be stored as inf (and the run refuse the cache, pointing at a rebuild
    from encoders): the import says so, naming the file and the precisions that hold it, and writes nothing."""
    src = copy_files(authors_files["src"], tmp_path / "stored")
    ids = authors_files["item_ids"][1:]
    big = torch.load(state_file(src, "text", ids[2]), weights_only=True)
    big[1, 0] = 1e5
    torch.save(big, state_file(src, "text", ids[2]))
    cfg = cache_config(tiny, tmp_path / "cache")
    with pytest.raises(CacheError) as err:
        import_cache_from_config(cfg, src, dtype="float16")
    assert f"1 values beyond float16 range (e.g. bert_{ids[2]}.pt)" in str(err.value)
    assert "no cache was written" in str(err.value) and not cache_file(cfg.cache_dir, "text").exists()
    report = (Path(cfg.cache_dir) / REPORT).read_text().splitlines()
    assert report[1:] == [f"text\t{ids[2]}\t{state_file(src, 'text', ids[2])}\tvalues beyond float16 range (import "
                          "with --dtype bfloat16 or float32)"]
    import_cache_from_config(cfg, src, dtype="bfloat16")  # its range holds the value
    with safe_open(str(cache_file(cfg.cache_dir, "text")), framework="pt") as fh:
        assert torch.isfinite(fh.get_tensor("states")).all()


def test_a_raw_pickle_is_refused_without_torchs_protocol_warning(tmp_path):
    """A pickle written by pickle.dump, not torch.save: refused in the report's words alone (torch warned
    of its pickle protocol on stderr first)."""
    import pickle

    path = tmp_path / "bert_I1.pt"
    path.write_bytes(pickle.dumps({"states": [1.0]}, protocol=4))
    code = ("import sys; from pathlib import Path; from iisan.data.cache_import import read_state; "
            "print(read_state(Path(sys.argv[1]), (13, 32))[1])")
    done = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)  # a fresh warnings registry
    assert done.returncode == 0 and done.stderr == "", done.stderr
    assert done.stdout.startswith("unreadable: not a torch.save file (")


def test_missing_files_can_be_stored_as_zero_states_when_asked(tiny, authors_files, tmp_path):
    src = copy_files(authors_files["src"], tmp_path / "stored")
    ids = authors_files["item_ids"]
    state_file(src, "image", ids[2]).unlink()
    cfg = cache_config(tiny, tmp_path / "cache")
    with pytest.raises(CacheError, match="1 missing"):
        import_cache_from_config(cfg, src)
    import_cache_from_config(cfg, src, allow_missing=True)
    with safe_open(str(cache_file(cfg.cache_dir, "image")), framework="pt") as fh:
        table = fh.get_tensor("states")
    assert table.dtype == torch.float32 and not table[2].any() and table[3].any()  # the authors' fp32 kept
    assert read_metadata(cache_file(cfg.cache_dir, "image"))["imported_missing"] == "1"
    assert read_metadata(cache_file(cfg.cache_dir, "text"))["imported_missing"] == "0"


def test_a_folder_without_the_authors_layout_is_one_line(tiny, tmp_path):
    with pytest.raises(CacheError, match="bert_outputs/") as info:
        import_cache_from_config(cache_config(tiny, tmp_path / "cache"), tmp_path)
    assert str(info.value) == (f"{tmp_path / 'bert_outputs'} does not exist: --from should name the folder holding "
                               "the authors' bert_outputs/ (e.g. stored_vectors_sci/)")


def test_an_encoder_folder_that_is_not_there_is_said_before_its_states_are_taken_as_the_authors(
        tiny, authors_files, tmp_path, caplog):
    """--text-model /a/typo fell back to the authors' BERT-base shape without a word: the import then
    refused every file as '(13, 768) expected', with nothing pointing at the folder."""
    cfg = cache_config(tiny, tmp_path / "cache").replace(text_model=str(tmp_path / "typo"))
    with caplog.at_level(logging.INFO, logger="iisan"), pytest.raises(CacheError, match="wrong shape"):
        import_cache_from_config(cfg, authors_files["src"], dtype="float32")
    assert f"text: {tmp_path / 'typo'} is not an encoder folder here; the states are taken as the authors' " \
           "bert-base-uncased's (13 x 768)" in caplog.text
    assert "image: " not in caplog.text  # its folder is there


def test_an_items_file_in_latin_1_and_a_user_listed_twice_are_imported_with_the_flags_the_errors_name(
        tiny, authors_files, tmp_path, capsys):
    """The refusals of such files say "pass --encoding ..." and "pass --merge-duplicate-users": import-cache
    did not take either flag, so such a data set could not be imported at all."""
    items = Path(tiny["items"]).read_text(encoding="utf-8").splitlines(True)
    items[1] = items[1].rstrip("\n") + " caf\u00e9\n"
    (tmp_path / "items.tsv").write_bytes("".join(items).encode("latin-1"))
    users = Path(tiny["users"]).read_text().splitlines(True)
    (tmp_path / "users.tsv").write_text("".join(users + users[:1]))
    argv = ["import-cache", "--from", str(authors_files["src"]), "--dtype", "float32", "--users",
            str(tmp_path / "users.tsv"), "--items", str(tmp_path / "items.tsv"), "--text-model", tiny["text_model"],
            "--image-model", tiny["image_model"], "--text-layers", "0,2", "--image-layers", "1,3",
            "--cache-dir", str(tmp_path / "c")]
    for given, named in [([], "pass --encoding"), (["--encoding", "latin-1"], "pass --merge-duplicate-users")]:
        with pytest.raises(SystemExit) as exit_:
            main([*argv, *given])  # each file refused in turn, naming its flag
        err = capsys.readouterr().err.strip()
        assert exit_.value.code != 0 and "\n" not in err and named in err, err
    main([*argv, "--encoding", "latin-1", "--merge-duplicate-users"])
    assert read_metadata(cache_file(tmp_path / "c", "text"))["source"] == "imported"


def _times(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in sorted(folder.iterdir())}


def test_an_import_run_again_on_the_same_files_keeps_its_cache_and_reads_none(tiny, authors_files, tmp_path,
                                                                            monkeypatch, caplog):
    """`iisan import-cache` run again read every file and rewrote the cache, where `iisan cache` and `build-lmdb`
    keep what they built from the same inputs. A file changed since (by its size or time), --overwrite, a cache
    imported before this was recorded, or a missing report: imported again, to the same bytes."""
    from iisan.data import cache_import

    src = copy_files(authors_files["src"], tmp_path / "stored")
    cfg = cache_config(tiny, tmp_path / "cache", **LAYERS)
    reads = []
    read = cache_import.read_state
    monkeypatch.setattr(cache_import, "read_state", lambda path, shape: reads.append(path) or read(path, shape))
    import_cache_from_config(cfg, src)
    items = len(authors_files["item_ids"]) - 1
    assert len(reads) == 2 * items
    cache = Path(cfg.cache_dir)

    def held() -> dict:  # what each cache holds, but the record of the files' times
        return {m: (load_file(cache_file(cache, m))["states"].tolist(),
                    {k: v for k, v in read_metadata(cache_file(cache, m)).items() if k != "imported_files"})
                for m in ("text", "image")}

    first, before = held(), _times(cache)

    def again(expect_reads: int, **flags) -> None:
        reads.clear()
        caplog.clear()
        with caplog.at_level("INFO", logger="iisan.model.caching"):
            paths = import_cache_from_config(cfg, src, **flags)
        assert paths == {m: cache_file(cache, m) for m in ("text", "image")}
        assert len(reads) == expect_reads
        assert ("imported before from the same files with these settings; kept" in caplog.text) == (not expect_reads)
        assert held() == first

    again(0)
    assert _times(cache) == before  # nothing rewritten, the report and log included
    os.utime(state_file(src, "image", authors_files["item_ids"][3]), ns=(1, 1))  # touched: read again
    again(2 * items)
    os.utime(state_file(src, "text", authors_files["item_ids"][1]), ns=(1, 1))  # the first item's too
    again(2 * items)
    cache_file(cache, "image").unlink()  # one tower's file gone, the other and the report there: imported again
    again(2 * items)
    again(0)
    again(2 * items, overwrite=True)
    (cache / REPORT).unlink()
    again(2 * items)
    meta = read_metadata(cache_file(cache, "text"))
    assert len(meta["imported_files"]) == 64  # a sha256
    del meta["imported_files"]  # as the version before wrote it: imported again, not refused
    save_file(load_file(cache_file(cache, "text")), str(cache_file(cache, "text")), metadata=meta)
    again(2 * items)
    assert "imported_files" in read_metadata(cache_file(cache, "text"))


def test_an_import_that_stored_zeros_is_kept_only_when_they_are_allowed_again(tiny, authors_files, tmp_path):
    src = copy_files(authors_files["src"], tmp_path / "stored")
    state_file(src, "text", authors_files["item_ids"][2]).unlink()
    cfg = cache_config(tiny, tmp_path / "cache")
    import_cache_from_config(cfg, src, allow_missing=True)
    before = _times(Path(cfg.cache_dir))
    import_cache_from_config(cfg, src, allow_missing=True)
    assert _times(Path(cfg.cache_dir)) == before
    with pytest.raises(CacheError, match="1 missing"):  # without --allow-missing: refused, as a first import
        import_cache_from_config(cfg, src)
    shape = torch.load(state_file(src, "text", authors_files["item_ids"][1]), weights_only=True).shape
    torch.save(torch.zeros(shape), state_file(src, "text", authors_files["item_ids"][2]))  # the file came back
    import_cache_from_config(cfg, src, allow_missing=True)
    assert read_metadata(cache_file(cfg.cache_dir, "text"))["imported_missing"] == "0"


def test_an_import_whose_header_no_reader_would_take_is_refused_before_a_file_is_read(tiny, authors_files, tmp_path,
                                                                                      monkeypatch):
    from iisan import tensorfiles
    from iisan.data import cache_import

    reads = []
    monkeypatch.setattr(cache_import, "read_state", lambda path, shape: reads.append(path))
    monkeypatch.setattr(tensorfiles, "HEADER_LIMIT", 1_000)  # (a tiny catalog's ids, as millions would be)
    cfg = cache_config(tiny, tmp_path / "cache")
    with pytest.raises(OutputError, match=r"its header would take 0.0 MB, 0.0 MB of them its 'item_ids'"):
        import_cache_from_config(cfg, authors_files["src"])
    assert reads == [] and not cache_file(cfg.cache_dir, "text").exists()


def test_a_killed_imports_temporaries_go_at_the_next_import(tiny, authors_files, tmp_path):
    """A killed import left a whole cache of temporaries (1.6 GB at the paper's size) that reruns kept for an hour."""
    from iisan.files import temporary_sibling

    cfg = cache_config(tiny, tmp_path / "cache")
    Path(cfg.cache_dir).mkdir()
    left = [temporary_sibling(cache_file(cfg.cache_dir, m)) for m in ("text", "image")]
    for path in left:
        path.write_bytes(b"half a cache")
    (Path(cfg.cache_dir) / "notes.safetensors.tmp").write_text("mine")  # not an import's: kept
    import_cache_from_config(cfg, authors_files["src"])
    assert not any(p.exists() for p in left) and (Path(cfg.cache_dir) / "notes.safetensors.tmp").exists()


def test_a_ctrl_c_amid_an_import_drops_the_reads_still_queued(tmp_path, monkeypatch):
    """Every file of a modality was queued for the reading threads at once, and a Ctrl-C waited for all of them to
    be read before it could end the command (25 s at 87k items): the reads still queued are dropped."""
    import iisan.data.cache_import as cache_import

    read, real_bar = [], cache_import.progress_bar

    def slow(path, shape):
        read.append(path)
        time.sleep(0.02)
        return torch.zeros(shape), None

    def interrupted(iterable, *args, **kwargs):  # the user's Ctrl-C after the first row
        for n, row in enumerate(real_bar(iterable, *args, **kwargs)):
            if n == 1:
                raise KeyboardInterrupt
            yield row

    monkeypatch.setattr(cache_import, "read_state", slow)
    monkeypatch.setattr(cache_import, "progress_bar", interrupted)
    ids = ["", *(f"I{i}" for i in range(400))]
    with pytest.raises(KeyboardInterrupt):
        cache_import.import_table(tmp_path, "text", ids, [0], (1, 4), torch.float32, threads=4)
    # the reading threads are gone when the error leaves, having read the rows taken and what they had begun (even
    # with this thread kept from running for a while, on a busy machine), never the 400 queued
    assert not any(t.name.startswith("iisan-import") for t in threading.enumerate()) and len(read) < 200
