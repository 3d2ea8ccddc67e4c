"""What a failed or refused run leaves in its process: no image-reader threads once ``train`` returns or
raises (a kept traceback, as a notebook keeps the last one, holds the run), and no reference cycle that keeps
a refused run alive until the collector happens to run (an application may run with it off)."""

from __future__ import annotations

import gc
import threading

import pytest

import iisan.train.trainer as trainer
from iisan.errors import TrainingError
from iisan.train.trainer import train


def readers() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("iisan-pixels")]


def live_images(tiny_config, **overrides):
    """FFT on the live feed: its image batches are read by 2 threads (``data.batches.PixelSource``)."""
    return tiny_config(method="fft", feed="live", num_workers=2, epochs=1, batch_size=32, **overrides)


def test_a_live_runs_image_readers_end_with_it_finished_or_failed_and_kept(tiny_config, monkeypatch):
    train(live_images(tiny_config, run_name="finished"))
    assert readers() == []

    def fails(*args, **kwargs):
        assert readers(), "the test's run read no images with threads"
        raise RuntimeError("evaluation failed")

    monkeypatch.setattr(trainer, "evaluate_model", fails)
    with pytest.raises(RuntimeError, match="evaluation failed") as kept:  # its traceback holds the run's frames
        train(live_images(tiny_config, run_name="failed"))
    assert readers() == [], kept


def test_a_refused_run_is_freed_without_the_cycle_collector(tiny_config, tiny_cache):
    """Rank 0's refusal is raised by ``decisions.decide``: its frame no longer holds the error whose traceback
    holds that frame, so the refused run goes as soon as the caller lets the error go."""
    cfg = tiny_config(run_name="kept", epochs=1, cache_dir=tiny_cache)
    train(cfg)
    gc.collect()
    before = sum(type(o) is trainer.Run for o in gc.get_objects())
    gc.disable()
    try:
        for _ in range(3):
            with pytest.raises(TrainingError, match="cannot resume"):
                train(cfg.replace(lr=cfg.lr * 2))  # another config under the finished run's name
        left = sum(type(o) is trainer.Run for o in gc.get_objects())
    finally:
        gc.enable()
    assert left == before


class ReaderFailed(RuntimeError):
    """(a class of its own: a weak reference can follow it)"""


def test_an_error_raised_in_the_prefetch_thread_is_freed_without_the_cycle_collector():
    """The consumer re-raises the reader thread's error; its frame no longer holds the error whose traceback
    holds that frame, so the error (and the batches and pixels its frames reach) goes with the caller's."""
    import weakref

    from iisan.data.batches import Prefetch

    def batches():
        yield 1
        raise ReaderFailed("image read failed")

    gc.collect()
    gc.disable()
    try:
        with pytest.raises(ReaderFailed) as caught:
            list(Prefetch(batches()))
        error = weakref.ref(caught.value)
        del caught
        assert error() is None
    finally:
        gc.enable()
