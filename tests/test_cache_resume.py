"""The cache build: interrupted and resumed it gives the same bytes as an uninterrupted build; shards of
other settings or torn shards are redone; SIGTERM stops it as Ctrl-C does; without a bar it logs where it
stands; refused states; a cache whose width disagrees is one line."""

from __future__ import annotations

import hashlib
import logging
import math
import re
import shutil
import signal
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from iisan.cli.main import main
from iisan.console import ProgressLog
from iisan.data.cache import cache_file
from iisan.data.cache_build import SIDECAR, write_safetensors
from iisan.data.run_data import load_data
from iisan.errors import CacheError, OutputError
from iisan.model.build import build_model
from iisan.model.caching import build_cache_from_config
from iisan.model.feeds import LiveStates

CHUNK = 16


class Crash(RuntimeError):
    pass


@pytest.fixture()
def counted(monkeypatch):
    """Count the live feed's chunk passes; ``crash_at`` = n makes the n-th pass raise (a killed build)."""
    original = LiveStates.forward
    state = {"calls": 0, "crash_at": None}

    def forward(self, items):
        state["calls"] += 1
        if state["calls"] == state["crash_at"]:
            raise Crash("simulated interruption")
        return original(self, items)

    monkeypatch.setattr(LiveStates, "forward", forward)
    return state


def _bytes(cache_dir):
    return {m: cache_file(cache_dir, m).read_bytes() for m in ("text", "image")}


def test_interrupted_build_resumes_to_the_same_bytes(tiny_config, tmp_path, counted):
    whole = tiny_config(cache_dir=str(tmp_path / "whole"), encode_batch_size=CHUNK)
    build_cache_from_config(whole, dtype="float16")
    chunks = counted["calls"]
    assert chunks == math.ceil(load_data(whole).num_items / CHUNK) >= 4
    assert not (tmp_path / "whole" / SIDECAR).exists()  # the sidecar goes once the files are written

    cfg = whole.replace(cache_dir=str(tmp_path / "resumed"))
    counted.update(calls=0, crash_at=3)  # killed while encoding the third chunk
    with pytest.raises(Crash):
        build_cache_from_config(cfg, dtype="float16")
    sidecar = tmp_path / "resumed" / SIDECAR
    shards = sorted(p.name for p in sidecar.glob("chunk-*"))
    assert shards == ["chunk-000000.safetensors", "chunk-000001.safetensors"]
    assert not cache_file(cfg.cache_dir, "text").exists()

    counted.update(calls=0, crash_at=None)
    build_cache_from_config(cfg, dtype="float16")
    assert counted["calls"] == chunks - 2  # only the missing chunks were encoded
    assert _bytes(tmp_path / "resumed") == _bytes(tmp_path / "whole")
    assert not sidecar.exists()
    build_model(cfg, load_data(cfg), torch.device("cpu"))  # and it loads as a cache


def test_a_build_folder_that_cannot_be_removed_is_named_in_full(tiny_config, tmp_path, monkeypatch, caplog):
    """Another user's shards in a shared .building: shutil.rmtree names a file by its bare name, which was the one
    line said ("chunk-000022.safetensors: Permission denied"), and a whole cache was a failed build."""
    import errno
    import shutil

    from iisan.data import cache_build
    from iisan.errors import OutputError

    def refuse(path, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", "chunk-000000.safetensors")

    rmtree = shutil.rmtree
    monkeypatch.setattr(shutil, "rmtree", refuse)
    cfg = tiny_config(cache_dir=str(tmp_path / "shared"), encode_batch_size=CHUNK)
    with caplog.at_level(logging.WARNING, logger="iisan.data.cache_build"):
        build_cache_from_config(cfg, dtype="float32")  # the cache is whole: said, not failed
    building = tmp_path / "shared" / SIDECAR
    assert all(cache_file(cfg.cache_dir, m).is_file() for m in ("text", "image"))
    assert [r.getMessage() for r in caplog.records if r.name == "iisan.data.cache_build"] == [
        f"could not remove {building}, a cache build's folder ({building}/chunk-000000."
        "safetensors): Permission denied; remove it by hand, or build into another --cache-dir (the cache is complete)"]
    with pytest.raises(OutputError, match=rf"^could not remove {re.escape(str(building))}, a cache build's folder "
                                          rf"\({re.escape(str(building))}/chunk-000000\.safetensors\): Permission"):
        cache_build.discard_partial_build(cfg.cache_dir)
    monkeypatch.setattr(shutil, "rmtree", rmtree)
    assert cache_build.discard_partial_build(cfg.cache_dir) and not building.exists()

    def refuse_the_folder(path, *args, **kwargs):  # (another user's mode-700 .building: the folder itself)
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(shutil, "rmtree", refuse_the_folder)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(OutputError) as err:
        cache_build.remove_build(Path("shared") / SIDECAR)
    assert str(err.value) == (f"could not remove shared/{SIDECAR}, a cache build's folder: Permission denied; "
                              "remove it by hand, or build into another --cache-dir")  # not shared/.b../shared/.b..


def test_partial_build_for_other_settings_or_torn_or_altered_shards_is_redone(tiny_config, tmp_path, counted):
    cfg = tiny_config(cache_dir=str(tmp_path / "c"), encode_batch_size=CHUNK)
    counted["crash_at"] = 4
    with pytest.raises(Crash):
        build_cache_from_config(cfg, dtype="float32")
    counted.update(calls=0, crash_at=None)
    chunks = math.ceil(load_data(cfg).num_items / CHUNK)
    build_cache_from_config(cfg, dtype="float16")  # another precision: the fp32 shards are discarded
    assert counted["calls"] == chunks

    whole = _bytes(tmp_path / "c")
    counted.update(calls=0, crash_at=3)
    with pytest.raises(Crash):
        build_cache_from_config(cfg, dtype="float16")
    shard = tmp_path / "c" / SIDECAR / "chunk-000000.safetensors"
    shard.write_bytes(shard.read_bytes()[:100])  # a torn write (e.g. a full disk)
    counted.update(calls=0, crash_at=None)
    build_cache_from_config(cfg, dtype="float16")
    assert counted["calls"] == chunks - 1  # chunk 0 again, and chunks 2.. ; chunk 1 kept
    assert _bytes(tmp_path / "c") == whole

    counted.update(calls=0, crash_at=3)
    with pytest.raises(Crash):
        build_cache_from_config(cfg, dtype="float16")
    shard = tmp_path / "c" / SIDECAR / "chunk-000001.safetensors"
    tensors = load_file(shard)
    tensors["text"][0, 0, 0] = float("nan")  # altered after it was checked and written
    save_file(tensors, shard)
    counted.update(calls=0, crash_at=None)
    build_cache_from_config(cfg, dtype="float16")
    assert counted["calls"] == chunks - 1  # chunk 1 again, and chunks 2.. ; chunk 0 kept
    assert _bytes(tmp_path / "c") == whole


@pytest.mark.usefixtures("stop_signals_as_in_a_terminal")
def test_sigterm_stops_a_build_as_ctrl_c_does_and_keeps_its_finished_chunks(tiny, tiny_config, monkeypatch,
                                                                             capsys):
    """A preempted job gets SIGTERM: one line saying what is kept, exit 143, then the build resumes."""
    original, state = LiveStates.forward, {"calls": 0, "sigterm_at": 2}

    def forward(self, items):
        state["calls"] += 1
        if state["calls"] == state["sigterm_at"]:
            signal.raise_signal(signal.SIGTERM)
        return original(self, items)

    monkeypatch.setattr(LiveStates, "forward", forward)
    handler = signal.getsignal(signal.SIGTERM)
    cfg = tiny_config(encode_batch_size=CHUNK)
    with pytest.raises(SystemExit) as info:
        main(["cache", "--users", tiny["users"], "--items", tiny["items"], "--images", tiny["images"],
              "--text-model", tiny["text_model"], "--image-model", tiny["image_model"], "--cache-dir",
              cfg.cache_dir, "--encode-batch-size", str(CHUNK), "--no-progress"])
    assert info.value.code == 143 and signal.getsignal(signal.SIGTERM) is handler
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("iisan: interrupted; nothing is left")
    shards = sorted(p.name for p in (Path(cfg.cache_dir) / SIDECAR).glob("chunk-*"))
    assert shards == ["chunk-000000.safetensors"]  # the first chunk's; the second was being encoded
    state.update(calls=0, sigterm_at=None)
    build_cache_from_config(cfg)
    assert state["calls"] == math.ceil(load_data(cfg).num_items / CHUNK) - 1


def test_progress_log_speaks_at_most_every_30_seconds_and_once_at_the_end(caplog):
    """Speed and time left count only what this process did (200 of 1,000 items were done before)."""
    now = [1000.0]
    lines = ProgressLog("text, image", 1000, 200, unit="items", clock=lambda: now[0])
    caplog.set_level(logging.INFO, logger="iisan.console")
    said = {}
    for chunk, seconds in enumerate((10, 29.9, 30, 45, 59.9, 60, 70, 80), start=3):
        now[0] = 1000.0 + seconds
        lines.advance(100)
        said[chunk] = [r.getMessage() for r in caplog.records]
        caplog.clear()
    lines.finish()
    assert {k: v for k, v in said.items() if v} == {
        5: ["text, image: 500 of 1,000 items (50 %), 10 items/s, about 50 s left"],  # 300 items in 30 s
        8: ["text, image: 800 of 1,000 items (80 %), 10 items/s, about 20 s left"],  # 30 s after the last line
    }
    assert [r.getMessage() for r in caplog.records] == [
        "text, image: 1,000 of 1,000 items (100 %), 10 items/s, 800 items in 80 s"]

    big = ProgressLog("text", 80 * 4096, clock=lambda: 0.0)
    big.advance(12 * 4096)
    assert big.line(32.0) == "text: 49,152 of 327,680 items (15 %), 1,536 items/s, about 3 min left"
    assert big.line(3200.0) == "text: 49,152 of 327,680 items (15 %), 15 items/s, about 5.0 h left"
    slow = ProgressLog("epoch 3", 400, 100, unit="steps", clock=lambda: 0.0)
    slow.advance(3)
    assert slow.line(4.0) == "epoch 3: 103 of 400 steps (25 %), 0.75 steps/s, about 7 min left"
    assert ProgressLog("x", 10, 4, clock=lambda: 0.0).line(31.0) == "x: 4 of 10 items (40 %)"  # nothing done here


def test_a_closing_progress_log_ends_with_the_time_taken_and_an_epochs_does_not(caplog):
    """build-lmdb's 40,000 images in a batch log: one line at 89 %, then nothing, not even how long it took."""
    from iisan.console import progress_bar

    now = [0.0]

    def clock():
        now[0] += 1.0
        return now[0]

    caplog.set_level(logging.INFO, logger="iisan.console")
    assert list(progress_bar(range(4), 4, desc="images", unit="images", clock=clock, closing=True)) == [0, 1, 2, 3]
    assert [r.getMessage() for r in caplog.records] == ["images: 4 of 4 images (100 %), 0.80 images/s, 4 images in 5 s"]
    caplog.clear()
    list(progress_bar(range(4), 4, desc="epoch 0", unit="steps", clock=clock))  # its own line ends it
    list(progress_bar([[1, 2], [3]], 3, desc="items", unit="items", clock=clock, size=len, closing=True))
    assert [r.getMessage() for r in caplog.records] == ["items: 3 of 3 items (100 %), 1.00 items/s, 3 items in 3 s"]


def test_a_build_without_progress_logs_only_its_last_progress_line(tiny_config, caplog):
    cfg = tiny_config(encode_batch_size=CHUNK)  # progress=False, as --no-progress
    items = load_data(cfg).num_items
    caplog.set_level(logging.INFO, logger="iisan")
    build_cache_from_config(cfg, dtype="float32")
    said = [r.getMessage() for r in caplog.records if r.name in ("iisan.console", "iisan.data.cache_build")]
    assert len(said) == 3, said
    assert re.fullmatch(rf"cache \(text, image\): {items:,} of {items:,} items \(100 %\), [\d,.]+ items/s, "
                        rf"{items:,} items in \d+ s", said[0]), said[0]
    assert [m.split(":")[0] for m in said[1:]] == [f"wrote {cache_file(cfg.cache_dir, m)}" for m in ("text", "image")]


def test_a_training_epoch_logs_where_it_stands_where_no_bar_can_be_shown(caplog):
    from iisan import console

    clock = iter(range(0, 1000, 20))  # 20 s per step
    caplog.set_level(logging.INFO, logger="iisan.console")
    steps = list(console.progress_bar(range(5), total=8, initial=3, desc="epoch 2", unit="steps",
                                      clock=lambda: next(clock)))  # stderr is not a terminal here
    assert steps == [0, 1, 2, 3, 4]
    assert [r.getMessage() for r in caplog.records] == [
        "epoch 2: 5 of 8 steps (62 %), 0.05 steps/s, about 60 s left",
        "epoch 2: 7 of 8 steps (87 %), 0.05 steps/s, about 20 s left"]
    caplog.clear()
    assert list(console.progress_bar(range(3), total=3, enabled=False)) == [0, 1, 2] and not caplog.records


def test_states_beyond_fp16_are_refused(tiny_config, tmp_path, monkeypatch):
    def huge(self, items):
        return {m: torch.full((len(items.ids), k, d), 1e6) for m, (k, d) in self.shapes().items()}

    monkeypatch.setattr(LiveStates, "forward", huge)
    with pytest.raises(CacheError, match=r"text states of item .* hold values beyond float16's range; "
                                         r"store as --cache-dtype bfloat16 or float32$"):
        build_cache_from_config(tiny_config(), dtype="float16")
    paths = build_cache_from_config(tiny_config(), dtype="bfloat16")  # bf16 holds them
    with safe_open(str(paths["text"]), "pt") as fh:
        states = fh.get_tensor("states")
        assert fh.metadata()["dtype"] == "bfloat16" and states.dtype == torch.bfloat16
    assert (states[0] == 0).all() and (states[1:] == torch.tensor(1e6, dtype=torch.bfloat16)).all()  # 0: padding


def test_states_the_encoder_computed_infinite_are_refused_without_advising_another_precision(tiny_config,
                                                                                                monkeypatch):
    """An encoder's own inf was reported as 'beyond float16 range; store as bfloat16 or float32': neither helps."""
    def infinite(self, items):
        return {m: torch.full((len(items.ids), k, d), math.inf) for m, (k, d) in self.shapes().items()}

    monkeypatch.setattr(LiveStates, "forward", infinite)
    for dtype in ("float16", "float32"):
        with pytest.raises(CacheError, match=r"^text states of item .* hold infinite values as the encoder computed "
                                             r"them$"):
            build_cache_from_config(tiny_config(), dtype=dtype)


def test_canonical_writer_is_safetensors_and_deterministic(tmp_path):
    table = torch.randn(5, 3, 4).to(torch.bfloat16)
    ids = torch.arange(5)
    specs = {"states": (torch.bfloat16, (5, 3, 4)), "ids": (torch.int64, (5,))}
    parts = [("ids", ids), ("states", table[:2]), ("states", table[2:])]  # rows streamed in blocks
    write_safetensors(tmp_path / "a.safetensors", specs, parts, {"z": "1", "a": "2"})
    write_safetensors(tmp_path / "b.safetensors", specs, parts, {"a": "2", "z": "1"})
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    with safe_open(str(tmp_path / "a.safetensors"), "pt") as fh:
        assert fh.metadata() == {"a": "2", "z": "1"}
        assert torch.equal(fh.get_tensor("states"), table) and torch.equal(fh.get_tensor("ids"), ids)
    with pytest.raises(ValueError, match="header declares"):
        write_safetensors(tmp_path / "c.safetensors", specs, parts[:2], {})
    assert not (tmp_path / "c.safetensors").exists()


def test_cache_whose_width_disagrees_with_the_config_is_one_line(tiny, towers, tiny_config, tmp_path, capsys):
    cfg = tiny_config()
    build_cache_from_config(cfg, dtype="float32")  # image tower: ViT 24 wide
    with pytest.raises(SystemExit) as info:
        main(["train", "--users", tiny["users"], "--items", tiny["items"], "--images", tiny["images"],
              "--text-model", tiny["text_model"], "--image-model", towers["deit40x4"],
              "--image-layers", "0,1,2,3", "--cache-dir", cfg.cache_dir, "--out-dir", cfg.out_dir, "--device", "cpu",
              "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert info.value.code == 2 and err.count("\n") == 0
    assert err.startswith(f"iisan: error: cache {cfg.cache_dir}/image.safetensors was built for width 24 "
                          "(config's encoder has 40)")


def test_cache_whose_array_disagrees_with_its_metadata_is_refused(tiny_config):
    cfg = tiny_config()
    build_cache_from_config(cfg, dtype="float32")
    path = cache_file(cfg.cache_dir, "text")
    with safe_open(str(path), "pt") as fh:
        meta, states = fh.metadata(), fh.get_tensor("states")
    write_safetensors(path, {"states": (torch.float32, tuple(states[:, :2].shape))},
                      [("states", states[:, :2].contiguous())], meta)  # one layer short of its metadata
    with pytest.raises(CacheError, match=r"holds states of shape \(\d+, 2, 32\), but its metadata says \d+ rows x 3"):
        build_model(cfg, load_data(cfg), torch.device("cpu"))


def test_a_shard_altered_in_place_but_still_finite_is_redone(tiny_config, tmp_path, counted, caplog):
    """Finite bytes written over a finished shard's states (a valid safetensors of the same shape, ids
    intact): the sha256 recorded when the shard was written no longer matches, so the chunk is encoded
    again and the final cache is an uninterrupted build's."""
    import json
    import struct

    whole = tiny_config(cache_dir=str(tmp_path / "whole"), encode_batch_size=CHUNK)
    build_cache_from_config(whole, dtype="float16")
    chunks = counted["calls"]
    cfg = whole.replace(cache_dir=str(tmp_path / "c"))
    counted.update(calls=0, crash_at=3)
    with pytest.raises(Crash):
        build_cache_from_config(cfg, dtype="float16")
    shard = tmp_path / "c" / SIDECAR / "chunk-000001.safetensors"
    data = bytearray(shard.read_bytes())
    (length,) = struct.unpack("<Q", data[:8])
    start = 8 + length + json.loads(data[8 : 8 + length])["text"]["data_offsets"][0]
    data[start : start + 8] = struct.pack("<4e", 1e4, -1e4, 1e4, -1e4)  # finite fp16 values
    shard.write_bytes(bytes(data))
    with safe_open(str(shard), "pt") as fh:  # still a valid shard of finite states
        assert bool(torch.isfinite(fh.get_tensor("text")).all()) and fh.get_tensor("text")[0, 0, 0] == 1e4
    counted.update(calls=0, crash_at=None)
    with caplog.at_level(logging.WARNING):
        build_cache_from_config(cfg, dtype="float16")
    assert f"{shard} does not match the sha256 it was written with" in caplog.text
    assert counted["calls"] == chunks - 1  # chunk 1 again, and chunks 2.. ; chunk 0 kept
    assert _bytes(tmp_path / "c") == _bytes(tmp_path / "whole")


def test_a_build_resumes_over_encoders_copied_elsewhere_or_touched(tiny, tiny_config, tmp_path, counted, caplog):
    """A job that copies its models to a node's scratch disk (or touches, rsyncs them) after a preemption
    reads the same weights: the interrupted build keeps its finished chunks."""
    import os
    import shutil

    first = {m: shutil.copytree(tiny[f"{m}_model"], tmp_path / "models" / m) for m in ("text", "image")}
    cfg = tiny_config(cache_dir=str(tmp_path / "c"), encode_batch_size=CHUNK, text_model=str(first["text"]),
                      image_model=str(first["image"]))
    chunks = math.ceil(load_data(cfg).num_items / CHUNK)
    counted["crash_at"] = 3
    with pytest.raises(Crash):
        build_cache_from_config(cfg, dtype="float16")
    scratch = {m: shutil.copytree(first[m], tmp_path / "scratch" / m) for m in first}  # new inodes and times
    for file in scratch["text"].iterdir():
        os.utime(file, (1e9, 1e9))
    counted.update(calls=0, crash_at=None)
    with caplog.at_level("INFO"):
        build_cache_from_config(cfg.replace(text_model=str(scratch["text"]), image_model=str(scratch["image"])),
                                dtype="float16")
    assert counted["calls"] == chunks - 2 and "2 of" in caplog.text and "discarding" not in caplog.text


def test_cache_files_of_two_builds_are_named_in_a_warning(tiny_config, tiny_cache, tmp_path, caplog):
    """Every build stores its towers in one precision; a float16 text file beside a float32 image file is
    what a rebuild stopped between its two files would leave: training goes on, and says so."""
    import shutil

    half = tiny_config(cache_dir=str(tmp_path / "half"))
    build_cache_from_config(half, dtype="float16")
    mixed = tmp_path / "mixed"
    shutil.copytree(tiny_cache, mixed)
    shutil.copy(cache_file(half.cache_dir, "text"), cache_file(mixed, "text"))
    cfg = tiny_config(cache_dir=str(mixed))
    with caplog.at_level("WARNING"):
        build_model(cfg, load_data(cfg), torch.device("cpu"))
    assert f"{mixed}: text.safetensors is float16, image.safetensors is float32: the files of two cache builds" \
        in caplog.text
    caplog.clear()
    build_model(half, load_data(half), torch.device("cpu"))
    assert "two cache builds" not in caplog.text


def test_shards_are_written_as_one_of_many_the_cache_files_synced_and_tidied(tiny_config, tmp_path, monkeypatch):
    """A build writes thousands of shards into one folder: each write looking through the folder for abandoned
    temporaries (and syncing) cost time growing with the shards written; a shard is checked by its digest."""
    import iisan.files as files

    tidied, synced = [], []
    monkeypatch.setattr(files, "remove_abandoned", lambda path: tidied.append(Path(path).name))
    monkeypatch.setattr(files, "fsync", lambda path: synced.append(Path(path).name))
    cfg = tiny_config(cache_dir=str(tmp_path / "c"), encode_batch_size=16)
    build_cache_from_config(cfg, dtype="float32")
    assert sorted(set(tidied)) == ["image.safetensors", "manifest.json", "text.safetensors"]
    assert not [name for name in synced if "chunk" in name] and any("text.safetensors" in n for n in synced)


def test_a_rebuild_stopped_while_writing_its_files_leaves_the_old_cache_whole(tiny_config, tmp_path, monkeypatch):
    """The new files are all written before any is renamed into place: Ctrl-C while the image file is
    written keeps the old text file too, not a new text file beside an old image file."""
    import iisan.data.cache_build as cache_build

    cfg = tiny_config(cache_dir=str(tmp_path / "c"))
    build_cache_from_config(cfg, dtype="float32")
    old = _bytes(cfg.cache_dir)
    write = cache_build.write_safetensors

    def stopped_at_the_image(path, specs, parts, metadata, atomic=True, bulk=False):
        if metadata.get("modality") == "image":
            raise KeyboardInterrupt
        return write(path, specs, parts, metadata, atomic, bulk)

    monkeypatch.setattr(cache_build, "write_safetensors", stopped_at_the_image)
    with pytest.raises(KeyboardInterrupt):
        build_cache_from_config(cfg, dtype="float16", overwrite=True)
    assert _bytes(cfg.cache_dir) == old and not [p for p in (tmp_path / "c").iterdir() if p.suffix == ".tmp"]


def test_a_build_an_earlier_version_began_resumes_and_one_of_other_images_does_not(tiny, tiny_config, tmp_path,
                                                                                    counted, caplog):
    """A build interrupted under the version before image caches recorded their images (its manifest key
    hashed the settings without them) keeps its finished chunks, as that version would have; a build
    begun today from other images is discarded."""
    import json

    import numpy as np

    from iisan.data.image_build import write_image_lmdb
    from iisan.data.interactions import read_items

    cfg = tiny_config(cache_dir=str(tmp_path / "c"), encode_batch_size=CHUNK)
    chunks = math.ceil(load_data(cfg).num_items / CHUNK)
    counted["crash_at"] = 3
    with pytest.raises(Crash):
        build_cache_from_config(cfg, dtype="float16")
    manifest = tmp_path / "c" / SIDECAR / "manifest.json"
    recorded = json.loads(manifest.read_text())
    for unrecorded in (("images", "encoder_dtype", "titles"), ("encoder_dtype", "titles"), ("titles",)):  # before each
        settings = {m: {k: v for k, v in meta.items() if k not in ("encoder", "items_file", "encoder_files",
                                                                     "imported_missing", *unrecorded)}
                    for m, meta in _final_metadata(cfg).items()}
        earlier = hashlib.sha256(json.dumps([settings, CHUNK], sort_keys=True).encode()).hexdigest()
        assert earlier != recorded["key"]
        manifest.write_text(json.dumps({**recorded, "key": earlier}))  # as the earlier version wrote it
        counted.update(calls=0, crash_at=None)
        with caplog.at_level("INFO"):
            build_cache_from_config(cfg, dtype="float16")
        assert counted["calls"] == chunks - 2 and "an earlier version began" in caplog.text
        assert _bytes(tmp_path / "c") == _bytes(tmp_path / "c-scratch")  # what an uninterrupted build writes
        caplog.clear()
        counted.update(calls=0, crash_at=3)  # interrupted again, for the next version
        with pytest.raises(Crash):
            build_cache_from_config(cfg, dtype="float16", overwrite=True)

    grey = str(tmp_path / "grey.lmdb")
    write_image_lmdb(grey, read_items(tiny["items"]).ids, lambda _: (np.full((64, 64, 3), 7, np.uint8), None),
                     size=64, progress=False)
    other = cfg.replace(cache_dir=str(tmp_path / "d"))
    counted.update(calls=0, crash_at=3)
    with pytest.raises(Crash):
        build_cache_from_config(other, dtype="float16")
    counted.update(calls=0, crash_at=None)
    build_cache_from_config(other.replace(images=grey), dtype="float16")
    assert counted["calls"] == chunks  # the other images' chunks were not taken


def _final_metadata(cfg) -> dict:
    """The metadata the finished build of ``cfg`` writes (read back from a build into a scratch folder)."""
    from iisan.data.cache import read_metadata

    scratch = cfg.replace(cache_dir=cfg.cache_dir + "-scratch")
    build_cache_from_config(scratch, dtype="float16")
    return {m: read_metadata(cache_file(scratch.cache_dir, m)) for m in ("text", "image")}


def test_a_build_killed_before_its_manifest_was_in_place_is_started_again(tiny_config, tmp_path):
    """Killed between making .building and renaming its manifest in: the folder holds the manifest's temporary
    alone, which is ours; every later build had refused it as someone else's folder."""
    from iisan.files import temporary_sibling

    cfg = tiny_config(cache_dir=str(tmp_path / "c"), encode_batch_size=CHUNK)
    (tmp_path / "c" / SIDECAR).mkdir(parents=True)
    temporary_sibling(tmp_path / "c" / SIDECAR / "manifest.json").write_text('{"format": ')
    build_cache_from_config(cfg, dtype="float32")
    assert sorted(p.name for p in (tmp_path / "c").iterdir() if not p.name.startswith(".iisan-lock")) == [
        "cache-build.log", "image.safetensors", "text.safetensors"]


@pytest.mark.parametrize("before", ["a cache", "nothing"])
def test_a_rename_that_fails_between_the_two_files_leaves_the_cache_as_it_was(tiny_config, tmp_path, monkeypatch,
                                                                             before):
    """The two files are renamed one after the other: a failure of the second (EIO, EACCES) had left a new image
    file beside an old text file (of another precision, which training took), or one new file where there was
    no cache. The file renamed first is put back as it was."""
    import errno
    import os

    import iisan.files as files

    cfg = tiny_config(cache_dir=str(tmp_path / "c"), encode_batch_size=CHUNK)
    if before == "a cache":
        build_cache_from_config(cfg, dtype="float32")
    was = {p.name: p.read_bytes() for p in (tmp_path / "c").glob("*.safetensors")}
    renamed = os.replace

    def failing(src, dst):
        if Path(dst).name == "text.safetensors":
            raise OSError(errno.EIO, "Input/output error")
        renamed(src, dst)

    monkeypatch.setattr(files.os, "replace", failing)
    with pytest.raises(OSError, match="text.safetensors: Input/output error"):
        build_cache_from_config(cfg, dtype="float16", overwrite=True)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in (tmp_path / "c").glob("*.safetensors")} == was
    assert [p.name for p in (tmp_path / "c").iterdir() if p.name.endswith(".tmp")] == []


def test_chunks_left_without_their_manifest_are_taken_for_ours_and_anything_else_is_not(tiny_config, tmp_path,
                                                                                       counted):
    """Two nodes building one cache where locks stay on each node: the one that finished removed the build folder
    and the other's chunks came back into it with no manifest; --overwrite then refused IISAN's own chunks as
    someone else's folder."""
    from iisan.files import temporary_sibling

    whole = tiny_config(cache_dir=str(tmp_path / "whole"), encode_batch_size=CHUNK)
    build_cache_from_config(whole, dtype="float16")
    cfg = whole.replace(cache_dir=str(tmp_path / "c"))
    counted.update(calls=0, crash_at=3)
    with pytest.raises(Crash):
        build_cache_from_config(cfg, dtype="float16")
    sidecar = tmp_path / "c" / SIDECAR
    (sidecar / "manifest.json").unlink()
    temporary_sibling(sidecar / "chunk-000002.safetensors").write_bytes(b"torn")
    temporary_sibling(sidecar / "manifest.json").write_text('{"format": ')  # and the manifest's own, killed
    for foreign, metadata in (("notes.txt", None), ("chunk-000009.safetensors", None),
                              ("chunk-000009.safetensors", {"other": "x"}), ("mine.safetensors", {"sha256": "x"})):
        if metadata is None:  # not a chunk: the folder is not ours, and nothing in it is removed
            (sidecar / foreign).write_text("mine")
        else:  # a safetensors file, but not one a build wrote (no digest of its data, or not a chunk's name)
            save_file({"ids": torch.zeros(1)}, str(sidecar / foreign), metadata=metadata)
        with pytest.raises(OutputError, match="is not a cache build in progress"):
            build_cache_from_config(cfg, dtype="float16", overwrite=True)
        (sidecar / foreign).unlink()
    counted.update(calls=0, crash_at=None)
    build_cache_from_config(cfg, dtype="float16", overwrite=True)
    assert _bytes(tmp_path / "c") == _bytes(tmp_path / "whole") and not sidecar.exists()


def test_a_chunk_that_goes_away_before_the_cache_is_assembled_is_one_line(tiny_config, tmp_path, monkeypatch):
    """Its build folder removed by a build on another node (a lock that does not reach it): a traceback
    naming no file."""
    from iisan.data import cache_build

    cfg = tiny_config(cache_dir=str(tmp_path / "c"), encode_batch_size=CHUNK)
    real = cache_build.ShardDir.read

    def other_node_finished(self, k, modality):
        shutil.rmtree(self.path, ignore_errors=True)
        return real(self, k, modality)

    monkeypatch.setattr(cache_build.ShardDir, "read", other_node_finished)
    with pytest.raises(CacheError) as caught:
        build_cache_from_config(cfg, dtype="float32")
    assert str(caught.value) == (
        f"{tmp_path / 'c' / SIDECAR / 'chunk-000000.safetensors'} went away while this build assembled its cache: "
        "another process, on another node where locks do not reach (docs/robust_runs.md), built or removed this "
        "folder's cache; run the same command again")
    assert not cache_file(cfg.cache_dir, "text").exists()


def test_a_cache_whose_header_no_reader_would_take_is_refused_before_any_item_is_encoded(tiny_config, tmp_path,
                                                                                        counted, monkeypatch):
    """Millions of item ids in its metadata: the build encoded every item, then wrote a file no reader opens."""
    from iisan import tensorfiles

    monkeypatch.setattr(tensorfiles, "HEADER_LIMIT", 1_000)  # (a tiny catalog's ids, as millions would be)
    cfg = tiny_config(cache_dir=str(tmp_path / "c"), encode_batch_size=CHUNK)
    with pytest.raises(OutputError, match=r"^could not write .*/c/\w+\.safetensors: its header would take 0.0 MB, "
                                          r"0.0 MB of them its 'item_ids', and a safetensors reader takes at most"):
        build_cache_from_config(cfg, dtype="float32")
    assert counted["calls"] == 0 and not (tmp_path / "c" / SIDECAR).exists()
    assert not cache_file(cfg.cache_dir, "text").exists()


def test_a_build_killed_after_its_files_were_in_place_leaves_no_build_folder_behind(tiny_config, tmp_path,
                                                                                   monkeypatch, caplog):
    """Killed between putting its cache files in place and removing its .building (here: the removal skipped), a
    build left the folder for good: every later command found the cache built and kept it, .building too. The
    next command that writes the cache folder removes it."""
    import iisan.data.cache_build as cache_build

    cfg = tiny_config(cache_dir=str(tmp_path / "c"), encode_batch_size=CHUNK)
    monkeypatch.setattr(cache_build, "remove_build", lambda path: None)  # (killed before it)
    build_cache_from_config(cfg, dtype="float16")
    monkeypatch.undo()
    built, sidecar = _bytes(cfg.cache_dir), Path(cfg.cache_dir) / SIDECAR
    assert (sidecar / "manifest.json").is_file()
    with caplog.at_level(logging.INFO):
        build_cache_from_config(cfg, dtype="float16", reuse=True)
    assert "built before with these settings; kept as it is" in caplog.text
    assert not sidecar.exists() and _bytes(cfg.cache_dir) == built
