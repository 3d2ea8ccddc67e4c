"""`iisan cache --reuse`, for the tasks of a job array sharing one cache folder: a cache built with the same
settings is kept, a build another process is running is waited for, and anything else is built or refused as
without the flag."""

from __future__ import annotations

import json
import logging
import os
import shutil
import time

import pytest

from iisan import locks
from iisan.cli.main import main
from iisan.data.cache import cache_file, read_metadata
from iisan.model import caching
from iisan.model.feeds import LiveStates


@pytest.fixture()
def passes(monkeypatch):
    """How many chunks the live feed encoded."""
    original, count = LiveStates.forward, {"n": 0}

    def forward(self, items):
        count["n"] += 1
        return original(self, items)

    monkeypatch.setattr(LiveStates, "forward", forward)
    return count


def cache_args(tiny, folder, *extra) -> list[str]:
    return ["cache", "--users", tiny["users"], "--items", tiny["items"], "--images", tiny["images"], "--text-model",
            tiny["text_model"], "--image-model", tiny["image_model"], "--cache-dir", str(folder), "--no-progress",
            "--device", "cpu", "--num-workers", "0", *extra]


def test_a_cache_built_with_the_same_settings_is_kept_and_one_built_otherwise_is_not(tiny, tmp_path, passes, capsys,
                                                                                     caplog, monkeypatch):
    from iisan.model.backbones import BackboneEncoder

    tokenised, title_inputs = [], BackboneEncoder.title_inputs
    monkeypatch.setattr(BackboneEncoder, "title_inputs", lambda self, titles, tokens: (
        tokenised.append(len(titles)), title_inputs(self, titles, tokens))[1])
    folder = tmp_path / "shared"
    main(cache_args(tiny, folder, "--reuse"))  # nothing there: built
    built, first = passes["n"], {m: cache_file(folder, m).read_bytes() for m in ("text", "image")}
    assert built > 0 and len(tokenised) == 1
    capsys.readouterr()
    with caplog.at_level(logging.INFO, logger="iisan"):
        main(cache_args(tiny, folder, "--reuse"))
    assert passes["n"] == built and len(tokenised) == 1  # nothing encoded again, no title tokenised (a million: 80 s)
    assert capsys.readouterr().out.split() == ["text:", str(cache_file(folder, "text")), "image:",
                                               str(cache_file(folder, "image"))]
    assert "built before with these settings; kept as it is (--overwrite builds it again)" in caplog.text
    assert {m: cache_file(folder, m).read_bytes() for m in ("text", "image")} == first
    main(cache_args(tiny, folder))  # without the flag too: a rerun of `iisan cache` encoded every item again
    assert passes["n"] == built
    main(cache_args(tiny, folder, "--overwrite"))  # built again in place, when asked (a cache damaged since)
    assert passes["n"] == 2 * built
    with pytest.raises(SystemExit) as stopped:  # other settings: refused as without the flag
        main(cache_args(tiny, folder, "--reuse", "--cache-dtype", "float16"))
    assert stopped.value.code == 2
    assert "holds a cache built with other settings (dtype float32 there, float16 now); pass --overwrite" in \
        capsys.readouterr().err
    main(cache_args(tiny, folder, "--reuse", "--cache-dtype", "float16", "--overwrite"))
    assert {read_metadata(cache_file(folder, m))["dtype"] for m in ("text", "image")} == {"float16"}
    built = passes["n"]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="iisan"):  # the same again: kept, with no hint to --overwrite
        main(cache_args(tiny, folder, "--reuse", "--cache-dtype", "float16", "--overwrite"))
    assert passes["n"] == built
    assert [r.getMessage() for r in caplog.records if "kept as it is" in r.getMessage()] == [
        f"{cache_file(folder, 'text')}, {cache_file(folder, 'image')}: built before with these settings; kept as it is"]


def test_one_tower_missing_is_built_alone_and_the_other_kept(tiny, tmp_path, passes, monkeypatch, caplog):
    """Only the missing tower's encoder runs, and its cache is stored as a build of both would store it."""
    from iisan.model import feeds

    folder = tmp_path / "shared"
    main(cache_args(tiny, folder, "--reuse"))
    image = cache_file(folder, "image").read_bytes()
    cache_file(folder, "image").unlink()
    text = cache_file(folder, "text").stat()
    towers = []
    original = feeds.LiveStates.forward

    def forward(self, items):
        towers.append(sorted(self.encoders))
        return original(self, items)

    monkeypatch.setattr(feeds.LiveStates, "forward", forward)
    with caplog.at_level(logging.INFO, logger="iisan"):
        main(cache_args(tiny, folder, "--reuse"))
    assert towers and all(t == ["image"] for t in towers)  # the text tower never ran
    assert (cache_file(folder, "text").stat().st_ino, cache_file(folder, "text").stat().st_mtime_ns) == \
        (text.st_ino, text.st_mtime_ns)
    assert cache_file(folder, "image").read_bytes() == image  # the same bytes as in the build of both
    assert f"{cache_file(folder, 'text')}: built before with these settings; kept as it is (--overwrite builds it " \
        "again)" in caplog.text


@pytest.mark.parametrize("other_finishes", [True, False])
def test_a_build_another_task_is_running_is_waited_for(tiny, tmp_path, passes, monkeypatch, caplog, other_finishes):
    """The other task finishes: its cache is used, nothing encoded here; it is killed before writing: this
    task builds the cache itself."""
    main(cache_args(tiny, tmp_path / "built"))
    built, passes["n"] = passes["n"], 0
    shared = tmp_path / "shared"
    other = locks.OutputLock(shared / caching.LOCK, f"cache folder {shared}").acquire()
    waits, sleep = [], time.sleep

    def other_task_ends(seconds):
        if seconds != locks.WAIT_SECONDS:  # someone else's short sleep
            return sleep(seconds)
        waits.append(seconds)
        if other_finishes:
            for m in ("text", "image"):
                shutil.copy(cache_file(tmp_path / "built", m), cache_file(shared, m))
        other.release()

    monkeypatch.setattr(locks.time, "sleep", other_task_ends)
    with caplog.at_level(logging.INFO, logger="iisan"):
        main(cache_args(tiny, shared, "--reuse"))
    assert waits == [locks.WAIT_SECONDS] and passes["n"] == (0 if other_finishes else built)
    assert caplog.text.count(f"cache folder {shared} is in use by pid {os.getpid()} on ") == 1
    assert "waiting for it to be free (Ctrl-C stops)" in caplog.text
    assert ("built before with these settings" in caplog.text) == other_finishes


def test_without_reuse_a_build_another_task_is_running_is_one_line_and_no_wait(tiny, tmp_path, monkeypatch,
                                                                               capsys):
    shared = tmp_path / "shared"
    other = locks.OutputLock(shared / caching.LOCK, f"cache folder {shared}").acquire()
    monkeypatch.setattr(locks.time, "sleep", lambda s: pytest.fail("waited without --reuse"))
    with pytest.raises(SystemExit) as stopped:
        main(cache_args(tiny, shared))
    other.release()
    assert stopped.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"iisan: error: cache folder {shared} is in use by pid {os.getpid()} on ")
    assert err[-1].endswith("another cache build is writing it; wait for it to finish or choose another --cache-dir "
                            "(--reuse waits for it and keeps what it builds)")


def test_a_cache_of_every_layer_is_kept_for_a_task_asking_for_some(tiny, tmp_path, passes, capsys):
    """Runs read their own layers from an --all-layers cache: replacing it (the refusal's advice, --overwrite)
    would take the other layers from the tasks that read them."""
    folder = tmp_path / "shared"
    main(cache_args(tiny, folder, "--reuse", "--all-layers"))
    built = passes["n"]
    main(cache_args(tiny, folder, "--reuse", "--text-layers", "0,2"))
    assert passes["n"] == built
    assert json.loads(read_metadata(cache_file(folder, "text"))["layers"]) == [0, 1, 2]
    main(cache_args(tiny, folder, "--text-layers", "0,2"))  # without --reuse too
    assert passes["n"] == built
    with pytest.raises(SystemExit):  # another dtype is other settings: refused, with or without --reuse
        main(cache_args(tiny, folder, "--text-layers", "0,2", "--cache-dtype", "float16"))
    assert "holds a cache built with other settings (dtype float32 there, float16 now; layers [0, 1, 2] there, " \
        "[0, 2] now)" in capsys.readouterr().err
