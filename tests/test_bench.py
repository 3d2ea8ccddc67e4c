"""The efficiency benchmark: TPME against hand-computed values, one measured row, the script's files,
and the GPU diagnosis script's dry run (the script a lent GPU runs first must not fail there)."""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from iisan.efficiency.bench import add_tpme, measure_training
from iisan.isolate import died, in_fresh_process

from ._batches import first_epoch
from ._scripts import script_error

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def row(label: str, seconds: float, params: int, gib: float) -> dict:
    return {"label": label, "epoch_seconds": seconds, "trainable_params": params,
            "memory": {"max_allocated_gib": gib, "max_reserved_gib": gib}}


def test_tpme_by_hand():
    rows = add_tpme([row("a", 10, 100, 2.0), row("b", 20, 300, 6.0), row("c", 30, 200, 3.0)])
    # time (0, .5, 1), params (0, 1, .5), memory (0, 1, .25) -> .45 t + .1 p + .45 m
    assert [r["tpme"] for r in rows] == pytest.approx([0.0, 0.45 * 0.5 + 0.1 + 0.45, 0.45 + 0.05 + 0.45 * 0.25])
    assert rows[2]["tpme_terms"] == pytest.approx({"time": 1.0, "params": 0.5, "memory": 0.25})


def test_tpme_constant_column_and_failed_rows():
    failed = {"label": "oom", "error": "TrainingError: batch_size=32 does not fit"}
    rows = add_tpme([row("a", 10, 5, 1.0), failed, row("b", 30, 5, 1.0)])
    assert rows[0]["tpme_terms"] == {"time": 0.0, "params": 0.0, "memory": 0.0}
    assert rows[2]["tpme"] == pytest.approx(0.45)  # only time varies
    assert "tpme" not in rows[1]
    cpu = [{"label": "x", "epoch_seconds": 1.0, "trainable_params": 1, "memory": {"peak_rss_gib": 3.0}},
           {"label": "y", "epoch_seconds": 1.0, "trainable_params": 1, "memory": {"peak_rss_gib": 5.0}}]
    assert [r["tpme"] for r in add_tpme(cpu)] == pytest.approx([0.0, 0.45])  # CPU: resident memory


def test_tpme_leaves_out_a_row_without_memory():
    unmeasured = {"label": "hand-made", "epoch_seconds": 100.0, "trainable_params": 10**9, "memory": {}}
    rows = add_tpme([row("a", 10, 100, 2.0), unmeasured, row("b", 20, 300, 6.0)])
    assert "tpme" not in rows[1]  # no NaN in the JSON, and its time and parameters do not stretch the others'
    assert [rows[0]["tpme"], rows[2]["tpme"]] == pytest.approx([0.0, 1.0])


def test_measure_training_reports_a_full_row(tiny_config, tiny_cache):
    cfg = tiny_config(cache_dir=tiny_cache, method="iisan", feed="cached", batch_size=16)
    out = measure_training(cfg, warmup=1, steps=2)
    assert out["loss_finite"] and out["timed_steps"] == 2 and out["compiled"] == "off"
    assert out["steps_per_epoch"] == math.ceil(out["users"] / 16) == 10
    times = out["step_seconds"]
    assert times["count"] == 2 and times["min"] <= times["median"] <= times["p90"] <= times["max"]
    assert out["seconds_per_step"] == times["median"] and out["p90_seconds_per_step"] == times["p90"]
    assert out["epoch_seconds"] == pytest.approx(times["median"] * 10)
    assert out["trainable_params"] == out["total_params"] > 0  # cached IISAN holds no backbone
    assert out["memory"]["peak_rss_gib"] > 0
    if sys.platform.startswith("linux"):  # the process's own peak since the warm-up, as the GPU's peaks
        assert (out["memory"]["rss_peak_source"], out["memory"]["rss_peak_since"]) == ("VmHWM", "the warm-up's end")
    assert not out["static_shapes"] and out["buckets"] is None and out["encodes"] == "distinct items"
    # the two timed batches follow the warm-up one: their distinct non-padding items, counted here
    from iisan.data.run_data import load_data

    batches = [b for b in first_epoch(load_data(cfg).train_sequences(), cfg.seed) if len(b.seq) == 16]
    distinct = [len(set(b.seq.flatten().tolist()) - {0}) for b in batches[1:3]]
    assert out["items_per_step"] == pytest.approx(sum(distinct) / 2)
    # the SAN's rows: each distinct item and the padding item, which the batches here all hold
    assert out["encoded_rows_per_step"] == pytest.approx(sum(distinct) / 2 + 1) and out["padding_rows_per_step"] == 1
    # model FLOPs: the mean over the two timed batches, each replayed here through the same counter (checked
    # against hand-counted FLOPs in test_count_flops_by_hand): the row averages the timed batches, no others
    from iisan.efficiency.bench import training_setup
    from iisan.efficiency.flops import step_flops

    setup = training_setup(cfg)
    timed = [b for b, _ in zip(setup.full_batches(), range(3))][1:]
    before = {n: p.detach().clone() for n, p in setup.model.named_parameters()}
    assert out["flops_per_step"] == pytest.approx(sum(step_flops(setup, b) for b in timed) / 2)
    assert out["useful_flops_per_step"] is None and out["padding_overhead_flops"] is None  # cached: as run only
    for name, p in setup.model.named_parameters():  # counting trains nothing and leaves no gradient
        assert p.grad is None and torch.equal(p, before[name]), name
    assert out["model_tflops_per_second"] == pytest.approx(out["flops_per_step"] / out["seconds_per_step"] / 1e12)
    every = measure_training(cfg.replace(dedup_items="off"), warmup=1, steps=2)  # repeats encoded too
    assert every["items_per_step"] == pytest.approx(sum(int((b.seq != 0).sum()) for b in batches[1:3]) / 2)
    assert every["encodes"] == "every slot" and every["encoded_rows_per_step"] == 16 * 11


def test_live_rows_report_padding_and_the_authors_way(tiny_config):
    """Uncached IISAN with static shapes: rows and padding per step against the bucket ladder, FLOPs of
    the padded batches and of the same batches without padding rows, a real epoch; the authors' way
    encodes every slot with full titles."""
    from iisan.data.batches import without_padding_rows
    from iisan.efficiency.bench import training_setup
    from iisan.efficiency.flops import step_flops
    from iisan.efficiency.rows import AUTHORS_WAY

    cfg = tiny_config(method="iisan", feed="live", batch_size=16)
    out = measure_training(cfg, warmup=1, steps=3, full_epoch=True)
    setup = training_setup(cfg)
    hosts = [b for b, _ in zip(setup.host_batches(), range(4))][1:]  # the three timed batches
    real = [len(b.items.real) for b in hosts]
    rows = [setup.buckets.bucket(len(np.unique(b.seq.numpy()))) for b in hosts]
    assert out["static_shapes"] and out["buckets"]["item_bucket_growth"] == 0.125
    assert out["items_per_step"] == pytest.approx(np.mean(real))
    assert out["encoded_rows_per_step"] == pytest.approx(np.mean(rows))
    assert out["padding_overhead_items"] == pytest.approx(sum(rows) / sum(real) - 1) and sum(rows) > sum(real)
    assert out["title_columns_per_step"] == 16 and 1 <= out["distinct_shapes"] <= 3
    padded = [step_flops(setup, b.to(setup.device)) for b in hosts]
    useful = [step_flops(setup, without_padding_rows(b).to(setup.device)) for b in hosts]
    assert out["flops_per_step"] == pytest.approx(np.mean(padded))
    assert out["useful_flops_per_step"] == pytest.approx(np.mean(useful)) and np.mean(useful) < np.mean(padded)
    assert out["padding_overhead_flops"] == pytest.approx(np.mean(padded) / np.mean(useful) - 1)
    assert out["full_epoch_steps"] == 10 and out["full_epoch_seconds"] > 0  # 160 users: 9 of 16 and one last
    authors = measure_training(cfg.replace(**AUTHORS_WAY), warmup=1, steps=3, flop_batches=1)
    stream = training_setup(cfg.replace(**AUTHORS_WAY)).host_batches()
    next(stream)  # the warm-up batch
    first = next(stream)
    assert authors["flop_batches"] == 1 and out["flop_batches"] == 3  # a sample: the first timed batch only
    assert authors["flops_per_step"] == step_flops(setup, first.to(setup.device))  # same model shapes as setup
    sequences = [b.seq for b in first_epoch(setup.data.train_sequences(), cfg.seed)][1:4]
    assert authors["encodes"] == "every slot" and authors["title_columns_per_step"] is None
    assert authors["encoded_rows_per_step"] == 16 * 11  # every slot, padding included
    assert authors["items_per_step"] == pytest.approx(np.mean([int((s != 0).sum()) for s in sequences]))
    assert authors["padding_overhead_items"] == pytest.approx(16 * 11 * 3 / sum(int((s != 0).sum()) for s in sequences)
                                                              - 1)


def test_measure_evaluation_ranks_every_user(tiny_config, tiny_cache):
    from iisan.efficiency.bench import measure_evaluation

    cfg = tiny_config(cache_dir=tiny_cache)
    row = measure_evaluation(cfg, warmup=0, reps=2)
    assert row["users"] == 160 and row["items"] == 56 and row["evaluation_times"]["count"] == 2
    assert 0 < row["evaluation_seconds"] <= row["p90_evaluation_seconds"]
    assert row["label"] == "evaluation, IISAN (cached)" and row["eval_batch_size"] == 64


def test_failure_in_the_measuring_process_becomes_a_row_field(tiny_config):
    out = in_fresh_process(measure_training, tiny_config(users="/nonexistent/users.tsv"), warmup=1, steps=1)
    assert out["error"].startswith("DataError") and "/nonexistent/users.tsv" in out["error"]


def test_a_measuring_process_appends_its_lines_to_its_parents_log_file(tmp_path):
    """A benchmark's log (``benchmark.log``) held the parent's lines only: a row's warnings, said in the process
    that measured it, reached the console alone."""
    from iisan.logfiles import Logging

    log_file = Logging()
    log_file.open(tmp_path / "bench.log", "=== head\n")
    try:
        in_fresh_process(logging.getLogger("iisan.efficiency.bench").warning, "said in the measuring process")
    finally:
        log_file.close()
    lines = (tmp_path / "bench.log").read_text().splitlines()
    assert len(lines) == 2 and lines[0] == "=== head"
    assert lines[1].endswith(" WARNING iisan.efficiency.bench: said in the measuring process")


def test_a_measuring_process_killed_without_a_result_becomes_a_row_not_a_hang():
    """The OOM killer sends SIGKILL: nothing is posted, and waiting on the queue alone would never end."""
    out = in_fresh_process(signal.raise_signal, signal.SIGKILL)
    assert out["error"] == "the measuring process died without a result: killed by SIGKILL (out of memory?)"
    assert died(3) == "exit status 3" and died(-signal.SIGSEGV) == "killed by SIGSEGV"


def test_a_result_posted_just_before_the_process_ended_is_kept():
    """The child may post its row and exit between two looks at it: the row is still read, not lost as
    'died without a result'."""
    import queue as queue_module

    from iisan import isolate

    class Ended:
        def is_alive(self) -> bool:
            return False

    posted = queue_module.Queue()
    posted.put(("ok", {"seconds_per_step": 0.5}))
    assert isolate._wait(Ended(), posted) == ("ok", {"seconds_per_step": 0.5})
    assert isolate._wait(Ended(), posted) is None  # nothing more posted: it died without a result


def run_script(name: str, *args: str, status: int = 0) -> subprocess.CompletedProcess:
    # one thread per process: tiny models gain nothing from more, and a loaded machine makes them crawl
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(SCRIPTS / name), *args], capture_output=True, text=True, env=env)
    assert done.returncode == status, done.stderr[-3000:]
    return done


@pytest.mark.slow
def test_benchmark_script_writes_json_table_and_figure(tmp_path):
    """The script end to end on the cheapest rows (no encoder in the step; the live rows' fields are
    checked in-process above): cached IISAN the default and the authors' way, a real epoch, the cache
    build and the evaluation."""
    run_script("benchmark_efficiency.py", "--methods", "IISAN (cached)", "--full-epoch", "--settings", "paper",
               "--few-steps", "--warmup", "1", "--steps", "2", "--num-workers", "1", "--work", str(tmp_path / "work"),
               "--out", str(tmp_path / "out"), "--figs", str(tmp_path / "figs"), "--tag", "t")
    payload = json.loads((tmp_path / "out" / "t-paper.json").read_text())
    cached, authors = payload["rows"]
    for r in payload["rows"]:
        assert "error" not in r, r.get("traceback")
    assert payload["complete"] and payload["timed_steps"] == 2 and payload["warmup_steps"] == 1
    assert (cached["label"], authors["label"]) == ("IISAN (cached)", "IISAN (cached, every slot)")
    assert [r["measured"] for r in payload["rows"]] == ["default", "authors"]
    assert cached["method"] == "IISAN" and cached["batch_size"] == 64 and not cached["static_shapes"]
    assert authors["encodes"] == "every slot" and authors["encoded_rows_per_step"] == 64 * 11
    assert "tpme" not in authors and cached["tpme"] == 0.0  # TPME compares the default rows only
    assert cached["full_epoch_steps"] == 19 and "full_epoch_seconds" not in authors  # 1,200 users of 64
    assert payload["evaluation"]["users"] == 1200 and payload["cache_build"]["cache_build_seconds"] > 0
    assert payload["configs"]["IISAN (cached)"]["method"] == "iisan" and payload["versions"]["torch"]
    assert payload["configs"]["IISAN (cached, every slot)"]["dedup_items"] == "off"
    md = (tmp_path / "out" / "t-paper.md").read_text()
    items, rows = cached["items_per_step"], cached["encoded_rows_per_step"]
    assert f"| IISAN (cached) | distinct items | 64 | {items:.0f} | {rows:.0f} | +1 % |" in md  # rows only
    assert f"| IISAN (cached, every slot) | every slot | 64 | {authors['items_per_step']:.0f} | 704 |" in md
    assert "| evaluation, IISAN (cached): every one of 1,200 users ranked over all" in md
    assert "| cache build, both towers, stored in float32 (loading data and encoders" in md
    # figures are named after the results folder (here "out") and the JSON
    assert (tmp_path / "figs" / "efficiency-out-t-paper.png").stat().st_size > 10_000
    assert f"wrote the figure {tmp_path / 'figs' / 'efficiency-out-t-paper.png'}\n" in \
        (tmp_path / "out" / "benchmark.log").read_text()  # said, with the name it got


def test_benchmark_script_refuses_short_timing_without_the_flag(tmp_path, capsys):
    error = script_error("benchmark_efficiency", ["--steps", "5", "--work", str(tmp_path)], capsys)
    assert "the benchmark times at least 50 steps after 10 warm-up steps; pass --few-steps" in error
    error = script_error("benchmark_efficiency", ["--methods", "FFT", "--authors-way", "LoRA"], capsys)
    assert "--authors-way: ['LoRA'] not among --methods ['FFT']; add them there or leave them out" in error
    error = script_error("benchmark_efficiency", ["--few-steps", "--steps", "0"], capsys)
    assert "--steps >= 1" in error


@pytest.mark.slow
def test_gpu_diagnosis_dry_run(tmp_path):
    out = tmp_path / "diagnose.json"
    run_script("gpu_diagnose.py", "--size", "tiny", "--device", "cpu", "--fft-items", "4", "--frozen-items", "6",
               "--cache-batch", "5", "--iisan", "FFT", "--data", "demo", "--workers", "1", "--warmup", "0",
               "--reps", "1", "--shape-reps", "2", "--work", str(tmp_path / "work"), "--out", str(out))
    report = json.loads(out.read_text())
    plain = report["plain"]
    assert report["device"]["device"].startswith("CPU") and report["shape_reps"] == 2
    (fft,) = report["iisan"]
    assert "error" not in fft, fft.get("traceback", "")
    # the plain rows run at the item count iisan's step ran most, then at the options' counts
    assert [r["items"] for r in plain["fft_step"]] == [fft["most_common_rows"], 4]
    assert [r["items"] for r in plain["frozen_forward"]] == [6] and plain["cache_build_forward"][0]["items"] == 5
    variants = plain["frozen_variants"]
    assert [(v["items"], v["weights"], v["attn"], v["hidden_states"]) for v in variants] == [
        (6, "bfloat16", "sdpa", False), (6, "float32", "eager", False), (6, "float32", "sdpa", True),
        (6, "float32", "sdpa", False)]
    for r in plain["fft_step"] + plain["frozen_forward"] + variants:
        assert "error" not in r and r["seconds_per_step"] > 0
        assert r["tflops_per_second"] == pytest.approx(r["flops_per_step"] / r["seconds_per_step"] / 1e12)
        assert r["epoch_seconds"] == pytest.approx(r["seconds_per_step"] * (378 if r in plain["fft_step"] else 189))
    patch = plain["patch_embedding"][0]
    assert all(patch[f"{m}{p}_seconds"] > 0 for m in ("conv_nchw", "conv_channels_last", "matmul_nchw")
               for p in ("", "_fwd_bwd"))
    assert fft["batch_size"] == 32 and fft["steps_per_epoch"] == 38 and fft["items_per_batch"] > 32
    assert fft["static_shapes"] and fft["rows_per_batch"] >= fft["items_per_batch"]
    assert fft["most_common_rows"] % 16 == 0 and fft["title_columns"] == [16]
    shapes = fft["shapes"]
    assert list(shapes) == ["warmup_fixed", "fresh", "seen", "fixed", "bucketed_first", "bucketed_seen"]
    fresh, bucketed = shapes["fresh"]["rows"], shapes["bucketed_first"]["rows"]
    assert shapes["seen"]["rows"] == fresh  # two new shapes, then the same again
    # FFT's ViT drops nothing out: it runs by distinct item, and a shape is its pair of row counts
    assert fft["towers_by_item"] == ["image"] and fft["rows_by_item_per_batch"] < fft["rows_per_batch"]
    pairs = [list(zip(shapes[k]["rows"], shapes[k]["rows_by_item"])) for k in ("fixed", "fresh")]
    assert len(set(pairs[1])) == 2 and not set(pairs[0]) & set(pairs[1])
    assert all(n % 16 == 0 for n in shapes["bucketed_first"]["rows_by_item"])
    assert all(n % 16 == 0 for n in bucketed) and all(b >= f for b, f in zip(bucketed, fresh))
    for name, phase in shapes.items():
        assert phase["step_seconds"]["count"] == len(phase["rows"]) and phase["allocator"] == {}, name  # CPU
        assert phase["host_seconds"]["median"] <= phase["step_seconds"]["median"], name
    assert fft["enqueue"]["host_seconds"]["count"] == fft["enqueue"]["device_step_seconds"]["count"] == 1
    assert fft["linear_output_dtypes"] == {"float32": fft["linear_output_dtypes"]["float32"]}  # CPU: no autocast
    assert fft["flops_per_step"] > 0 and fft["step_on_device_tflops_per_second"] > 0
    for key in ("pipeline_seconds_per_batch", "encoder_forward_seconds", "step_on_device_seconds",
                "step_on_device_with_background_pipeline_seconds", "step_with_pipeline_seconds"):
        assert fft[key] > 0


def test_gpu_diagnosis_refuses_unknown_labels(tmp_path, capsys):
    error = script_error("gpu_diagnose", ["--iisan", "FFT,SASRec", "--out", str(tmp_path / "d.json")], capsys)
    assert "--iisan: unknown label(s) ['SASRec']" in error
    error = script_error("gpu_diagnose", ["--shape-reps", "0", "--out", str(tmp_path / "d.json")], capsys)
    assert "must be >= 1" in error


def test_gpu_profile_sums_kernel_time_and_says_when_it_saw_none(monkeypatch):
    """The profile's arithmetic, which only a GPU runs: kernel time over wall time, the costliest kernels
    first; a profile with no kernels is reported as such, not as a GPU that was idle."""
    from types import SimpleNamespace

    from iisan.efficiency import timing

    events = []

    class FakeProfile:
        def __init__(self, activities):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def key_averages(self):
            return events

    clock = iter([10.0, 10.5])  # 0.5 s of wall time over the profiled steps
    monkeypatch.setattr(timing, "profile", FakeProfile)
    monkeypatch.setattr(timing, "sync", lambda device: None)
    monkeypatch.setattr(timing.time, "perf_counter", lambda: next(clock))
    events += [SimpleNamespace(key="gemm", self_device_time_total=300_000.0),  # microseconds
               SimpleNamespace(key="aten::mm", self_device_time_total=0.0),
               SimpleNamespace(key="softmax", self_device_time_total=100_000.0)]
    out = timing.gpu_profile(lambda: None, torch.device("cuda"), steps=2, top=1)
    assert out["gpu_busy"] == pytest.approx(0.8) and out["kernel_seconds_per_step"] == pytest.approx(0.2)
    assert out["wall_seconds_per_step"] == pytest.approx(0.25)
    assert out["top_kernels"] == [{"name": "gemm", "ms_per_step": pytest.approx(150.0)}]
    events.clear()
    clock = iter([10.0, 10.5])
    assert timing.gpu_profile(lambda: None, torch.device("cuda"), steps=2) == {
        "profile_error": "the profiler recorded no GPU kernels over 2 steps"}


def test_count_flops_by_hand():
    from iisan.efficiency.flops import count_flops

    linear, x = torch.nn.Linear(8, 4), torch.randn(5, 8)
    # forward 2*5*8*4, and the weight's gradient as much again (the input needs none; a bias grad is a sum)
    assert count_flops(lambda: torch.autograd.grad(linear(x).sum(), [linear.weight])) == 640
    q = torch.randn(1, 2, 3, 4)  # (batch, heads, tokens, head dim): Q K^T and P V, 2*1*2*3*3*4 each
    assert count_flops(lambda: torch.nn.functional.scaled_dot_product_attention(q, q, q)) == 288  # CPU kernel
    mask = torch.tensor([True, True, False]).expand(1, 2, 3, 3)
    assert count_flops(lambda: torch.nn.functional.scaled_dot_product_attention(q, q, q, attn_mask=mask)) == 288


def encoder_flops(config, tokens: int, pooler: bool = True) -> int:
    """One transformer encoder's forward per item, by hand: Q, K, V, O and the two MLP matmuls per token,
    Q K^T and P V per token pair, and the pooler's dense layer on the first token (BERT's; ViT loads
    without one)."""
    h, i = config.hidden_size, config.intermediate_size
    layer = 2 * tokens * (4 * h * h + 2 * h * i) + 2 * 2 * tokens * tokens * h
    return config.num_hidden_layers * layer + (2 * h * h if pooler else 0)


def test_live_feed_flops_are_one_forward_of_each_tower_per_distinct_item(tiny_config):
    """The uncached feed runs each tower once per distinct non-padding item (no second pass, padding
    never encoded), and ``count_flops`` agrees with the hand count of BERT and ViT."""
    from iisan.data.run_data import load_data
    from iisan.efficiency.flops import count_flops
    from iisan.model.build import build_model

    cfg = tiny_config(method="iisan", feed="live")
    data = load_data(cfg)
    model, pixels = build_model(cfg, data, torch.device("cpu"))
    batch = next(iter(first_epoch(data.train_sequences(), 0, pixels=pixels)))
    encoders = model.item_encoder.states.encoders
    text, image = encoders["text"].model.config, encoders["image"].model.config
    patches = (image.image_size // image.patch_size) ** 2
    per_item = (encoder_flops(text, cfg.title_tokens) + encoder_flops(image, patches + 1, pooler=False)
                + 2 * patches * (3 * image.patch_size ** 2) * image.hidden_size)  # the patch embedding conv
    real = len(batch.items.real)
    assert 0 < real < len(batch.items.ids)  # the batch has padding, which must not be encoded
    assert count_flops(lambda: model.item_encoder.states(batch.items)) == real * per_item


def test_measure_cache_build_reports_its_parts(tiny_config):
    from iisan.data.cache import cache_file
    from iisan.efficiency.bench import measure_cache_build
    from iisan.efficiency.figures import plain, table

    cfg = tiny_config(encode_batch_size=16)  # several chunks: shards written while the next is encoded
    row = measure_cache_build(cfg)
    parts = row["load_seconds"] + row["encode_seconds"] + row["assemble_seconds"]
    assert 0 < parts <= row["cache_build_seconds"]
    assert all(cache_file(cfg.cache_dir, m).is_file() for m in ("text", "image"))
    note = table({"rows": [], "cache_build": row, "device": "cpu", "description": "d",
                  "timed_steps": 1, "warmup_steps": 1, "command": "c", "git_commit": "x"})
    assert row["cache_dtype"] == "float32"  # auto, over fp32 encoders: the authors' precision
    assert (f"| cache build, both towers, stored in float32 (loading data and encoders "  # three digits: not 0.0 s
            f"{plain(row['load_seconds'])} s, encoding "
            f"{plain(row['encode_seconds'])} s, assembling the files {plain(row['assemble_seconds'])} s) | "
            f"1 | {row['cache_build_seconds']:.1f} | | {row['memory']['peak_rss_gib']:.2f} |") in note


def test_the_timed_cache_build_starts_from_nothing(tiny_config, tmp_path, caplog):
    """A build cut on a lent GPU leaves its shards; timing the next one from them would be too fast. Only
    a build in progress (our manifest) is discarded, never a folder of someone else's."""
    from iisan.data.cache_build import BUILD_FORMAT, SIDECAR, discard_partial_build
    from iisan.efficiency.bench import measure_cache_build

    cfg = tiny_config(encode_batch_size=16)
    sidecar = Path(cfg.cache_dir) / SIDECAR
    sidecar.mkdir(parents=True)
    (sidecar / "manifest.json").write_text(json.dumps({"format": BUILD_FORMAT, "key": "k", "chunks": 25}))
    (sidecar / "chunk-000000.safetensors").write_bytes(b"x")
    with caplog.at_level("INFO", logger="iisan"):
        measure_cache_build(cfg)
    assert f"discarded the shards of an earlier, unfinished build in {cfg.cache_dir}" in caplog.text
    assert not sidecar.exists()
    foreign = tmp_path / "other" / SIDECAR
    foreign.mkdir(parents=True)
    (foreign / "mine.txt").write_text("x")
    assert not discard_partial_build(tmp_path / "other") and (foreign / "mine.txt").read_text() == "x"


def test_benchmark_measures_default_rows_first_and_a_cut_keeps_its_json_and_table(tmp_path, monkeypatch):
    """A lent GPU's time limit cuts the benchmark: the default rows come first (the authors' way, the
    costliest, last, in the order given), and after every row the JSON and its table hold, in table
    order, what was measured, marked incomplete."""
    from iisan.efficiency import benchmark

    calls = []

    def fake_measure(fn, cfg, **kwargs):
        if len(calls) == 4:
            raise KeyboardInterrupt  # the cut, during the fifth row
        calls.append((cfg.method, cfg.dedup_items, cfg.batch_size))
        return {"device": "NVIDIA H200", "method": cfg.method, "batch_size": cfg.batch_size, "seconds_per_step": 0.5,
                "epoch_seconds": 9.5, "trainable_params": 10**6, "memory": {"max_allocated_gib": 1.0,
                                                                           "max_reserved_gib": 2.0}}

    monkeypatch.setattr(benchmark, "in_fresh_process", fake_measure)
    monkeypatch.setattr(benchmark, "prepare", lambda work, data, backbones: {})
    with pytest.raises(KeyboardInterrupt):
        benchmark.run_benchmark({}, setting_names=("paper",), labels=("IISAN (uncached)", "FFT", "LoRA"),
                                 authors_way=("IISAN (uncached)", "FFT"), work=tmp_path, out=tmp_path / "out")
    assert calls == [("iisan", "auto", 64), ("fft", "auto", 32), ("lora", "auto", 32),
                                                   ("iisan", "off", 64)]  # FFT's every-slot row was cut
    payload = json.loads((tmp_path / "out" / "tiny-demo-h200-paper.json").read_text())
    assert [r["label"] for r in payload["rows"]] == ["FFT", "LoRA", "IISAN (uncached)", "IISAN (uncached, every slot)"]
    assert payload["complete"] is False and not any("tpme" in r for r in payload["rows"])
    md = (tmp_path / "out" / "tiny-demo-h200-paper.md").read_text()
    assert md.index("| FFT |") < md.index("| LoRA |") < md.index("| IISAN (uncached) |") < md.index("every slot) |")
    assert "**Incomplete:** the run stopped before it measured every row" in md
    assert benchmark.measuring_order(("FFT",), ("FFT", "LoRA")) == [("FFT", "default"), ("FFT", "authors")]


def test_a_benchmark_figure_is_told_by_its_creator_chunk_not_by_words_anywhere(tmp_path):
    import matplotlib.pyplot as plt

    from iisan.efficiency.figures import CREATOR, is_figure

    fig = plt.figure(figsize=(2, 2))
    theirs, ours = tmp_path / "theirs.png", tmp_path / "ours.png"
    fig.savefig(theirs, metadata={"Creator": f"{CREATOR}, redrawn by hand"})  # the words begin another creator
    fig.savefig(ours, metadata={"Creator": CREATOR})
    plt.close(fig)
    assert not is_figure(theirs) and is_figure(ours)
    (tmp_path / "cut.png").write_bytes(ours.read_bytes()[:40])  # a damaged PNG is not ours either
    assert not is_figure(tmp_path / "cut.png")
