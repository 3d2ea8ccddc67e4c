"""The benchmark's statistics by hand: per-step durations between consecutive marks, their median and
p90 on skewed samples, the mean seconds per call after warm-up, the allocator's activity in a window,
the FLOPs of attention's backward on a CPU and what tells two batches' FLOPs apart; then what a
measured row makes of them (median-based epoch, TFLOP/s and evaluation, wall time per step, steps per
epoch, peak memory, a FLOP sample no longer than the timed steps) and the full batches a step is timed
on. Clocks are fakes: nothing here depends on how fast this machine is."""

from __future__ import annotations

import itertools
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from iisan.efficiency import bench, timing
from iisan.errors import ConfigError

CPU = torch.device("cpu")
SKEWED = [1.0, 1.0, 1.0, 1.0, 10.0]  # median 1, mean 2.8, p90 1 + 0.6 * 9 = 6.4 (linear), p75 1


def fake_clock(*readings: float):
    """A ``time`` module stand-in whose ``perf_counter`` returns ``readings`` in turn."""
    return SimpleNamespace(perf_counter=iter(readings).__next__)


# --------------------------------------------------------------------------------------------------
# timing.py


def test_summary_of_a_skewed_sample_by_hand():
    assert timing.summary(SKEWED) == {"median": 1.0, "p90": pytest.approx(6.4), "mean": pytest.approx(2.8),
                                      "min": 1.0, "max": 10.0, "count": 5}
    # ten values 1..10: median 5.5, p90 at rank 8.1 -> 9.1 (p75 would be 7.75)
    ten = timing.summary([float(v) for v in range(10, 0, -1)])
    assert (ten["median"], ten["p90"], ten["mean"]) == (5.5, pytest.approx(9.1), 5.5)


def test_the_step_clock_times_each_step_between_consecutive_marks(monkeypatch):
    monkeypatch.setattr(timing, "time", fake_clock(100.0, 101.0, 103.0, 106.0))
    clock = timing.StepClock(CPU)
    for _ in range(4):
        clock.mark()
    assert clock.durations() == [1.0, 2.0, 3.0]  # not 1, 3, 6 from the first mark


def test_timed_is_the_mean_over_the_timed_calls_only(monkeypatch):
    calls = []
    monkeypatch.setattr(timing, "time", fake_clock(50.0, 56.0))  # read before and after the timed calls
    assert timing.timed(lambda: calls.append(1), CPU, warmup=2, reps=3) == pytest.approx(2.0)
    assert len(calls) == 5  # two warm-up calls, untimed, then three timed


def test_allocator_activity_is_what_happened_inside_the_window():
    before = {"num_alloc_retries": 1, "num_device_alloc": 10, "reserved_gib": 2.0}
    after = {"num_alloc_retries": 1, "num_device_alloc": 14, "reserved_gib": 3.5}
    assert timing.allocator_activity(before, after) == {"num_alloc_retries": 0, "num_device_alloc": 4,
                                                        "reserved_gib": 1.5}


# --------------------------------------------------------------------------------------------------
# flops.py


def test_cpu_attention_forward_and_backward_are_counted_with_the_gpu_formulas():
    """Q (1 batch, 2 heads, 3 tokens, head dim 4): forward Q K^T and P V, 144 FLOPs each; backward recomputes
    the scores, then dP = dO V^T, dV = P^T dO, dQ = dS K, dK = dS^T Q: five products of 144 each."""
    from iisan.efficiency.flops import count_flops

    q = torch.randn(1, 2, 3, 4, requires_grad=True)

    def forward_and_backward():
        torch.autograd.grad(torch.nn.functional.scaled_dot_product_attention(q, q, q).sum(), [q])

    assert count_flops(forward_and_backward) == 2 * 144 + 5 * 144


def test_batches_differing_only_in_title_columns_have_different_flop_keys():
    from iisan.efficiency.flops import shape_key

    def batch(columns):
        items = SimpleNamespace(ids=[0] * 12, distinct=None, title_columns=columns, encoded_rows=lambda: 16)
        return SimpleNamespace(seq=torch.zeros(4, 11), items=items)

    assert shape_key(batch(16)) == shape_key(batch(16))
    assert shape_key(batch(16)) != shape_key(batch(24))  # longer titles: more encoder work
    assert shape_key(batch(None)) != shape_key(batch(24))


# --------------------------------------------------------------------------------------------------
# bench.py: the full batches a step is timed on


def pure_setup(users: int, batch_size: int) -> bench.TrainingSetup:
    """A ``TrainingSetup`` holding only what ``host_batches`` reads: ``users`` sequences, ids 1..users."""
    sequences = np.zeros((users, 5), dtype=np.int64)
    sequences[:, 2:] = np.arange(1, users + 1)[:, None]
    cfg = SimpleNamespace(batch_size=batch_size, order_seed=0, users="users.tsv")
    from iisan.data.batches import CollateTrain

    return bench.TrainingSetup(cfg, None, None, None, None, CPU, None, "off", CollateTrain(sequences, "items"))


def test_host_batches_are_all_full_over_several_epochs():
    """10 users in batches of 4: each epoch is 4, 4 and a last batch of 2, which is never yielded."""
    batches = list(itertools.islice(pure_setup(10, 4).host_batches(), 7))  # three and a half epochs' worth
    assert [len(b.seq) for b in batches] == [4] * 7
    users = [set(b.seq[:, -1].tolist()) for b in batches]
    assert len(users[0] | users[1]) == 8 and not users[0] & users[1]  # an epoch's two full batches, then the next


def test_a_batch_of_every_user_is_a_full_batch():
    (batch,) = itertools.islice(pure_setup(10, 10).host_batches(), 1)
    assert sorted(batch.seq[:, -1].tolist()) == list(range(1, 11))
    with pytest.raises(ConfigError, match="batch_size=11 exceeds the 10 users of users.tsv"):
        next(pure_setup(10, 11).host_batches())


# --------------------------------------------------------------------------------------------------
# bench.py: a measured row


class FakeStepClock:
    """``StepClock`` whose durations are ``SKEWED`` (one per timed step)."""

    def __init__(self, device):
        self.marks = 0

    def mark(self):
        self.marks += 1

    def durations(self):
        assert self.marks == len(SKEWED) + 1
        return list(SKEWED)


def test_a_rows_epoch_rate_and_wall_time_come_from_the_median_step(tiny_config, tiny_cache, monkeypatch):
    """160 users in batches of 24: 7 steps an epoch (6 full and one of 16). Step times 1, 1, 1, 1, 10 s: the
    epoch is 7 x the median (not the mean, 2.8); the window's wall time (30 s) is 6 s a step; FLOPs sampled
    over 9 batches are counted over the 5 timed ones at most."""
    monkeypatch.setattr(bench, "StepClock", FakeStepClock)
    monkeypatch.setattr(bench, "time", fake_clock(1000.0, 1030.0))  # timed_window's start and end
    cfg = tiny_config(cache_dir=tiny_cache, method="iisan", feed="cached", batch_size=24)
    row = bench.measure_training(cfg, warmup=1, steps=5, flop_batches=9)
    assert row["users"] == 160 and row["steps_per_epoch"] == 7 == math.ceil(160 / 24)
    assert row["seconds_per_step"] == 1.0 and row["p90_seconds_per_step"] == pytest.approx(6.4)
    assert row["epoch_seconds"] == pytest.approx(7.0)
    assert row["wall_seconds_per_step"] == pytest.approx(6.0)
    assert row["flop_batches"] == 5
    assert row["flops_per_step"] > 0
    assert row["model_tflops_per_second"] == pytest.approx(row["flops_per_step"] / 1.0 / 1e12)


def test_the_evaluation_time_is_the_median_repetition(tiny_config, tiny_cache, monkeypatch):
    def fake_timed_each(fn, device, reps):
        assert reps == len(SKEWED)
        return {"step_seconds": timing.summary(SKEWED)}

    monkeypatch.setattr(bench, "timed_each", fake_timed_each)
    row = bench.measure_evaluation(tiny_config(cache_dir=tiny_cache), warmup=0, reps=5)
    assert row["evaluation_seconds"] == 1.0 and row["p90_evaluation_seconds"] == pytest.approx(6.4)
    assert row["evaluation_times"]["mean"] == pytest.approx(2.8)


def test_a_rows_memory_is_the_allocated_peak_on_a_gpu_and_the_resident_peak_on_a_cpu():
    assert bench.memory_gib({"memory": {"max_allocated_gib": 1.5, "max_reserved_gib": 3.0}}) == 1.5
    assert bench.memory_gib({"memory": {"peak_rss_gib": 2.5, "current_rss_gib": 1.0}}) == 2.5
