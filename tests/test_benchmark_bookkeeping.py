"""The benchmark's bookkeeping around its measurements: which rows are measured once and reused, when a run
counts as failed, where each row sits in its table, every column of a table line and a figure's panels,
the notes' step counts and FLOP sample, damaged JSONs refused in one line, the diagnosis's epochs and
counts, the plain reference's inputs and steps, and the scripts' flags passed on or refused."""

from __future__ import annotations

import itertools
import json
import sys
from types import SimpleNamespace

import pytest
import torch

from iisan.efficiency import benchmark, diagnose, diagnose_steps, figures, options, plain_reference, report_notes
from iisan.errors import ConfigError, DataError, TrainingError

from ._scripts import load_script
from .test_bench_outputs import EXPECTED, benchmark_payload, damage, ending

CPU = torch.device("cpu")
GPU_MEMORY = {"max_allocated_gib": 1.25, "max_reserved_gib": 2.5}
EVALUATION = {"label": "evaluation, IISAN (cached)", "users": 1200, "items": 400, "evaluation_seconds": 0.25,
              "p90_evaluation_seconds": 0.75, "memory": {"peak_rss_gib": 1.5}}


def no_work(*args, **kwargs):
    raise AssertionError("the work started before the input was checked")


def script(name: str, monkeypatch):
    monkeypatch.setattr(sys, "argv", [f"{name}.py"])
    return load_script(f"{name}.py")


# --------------------------------------------------------------------------------------------------
# benchmark.py: rows measured, reused, failed and placed


def fake_row(cfg, error: str | None = None) -> dict:
    if error:
        return {"error": error}
    return {"device": "NVIDIA H200", "method": cfg.method, "batch_size": cfg.batch_size, "seconds_per_step": 0.5,
            "epoch_seconds": 9.5, "trainable_params": 10**6, "memory": dict(GPU_MEMORY)}


def test_a_row_is_reused_only_at_the_same_batch_size(tmp_path, monkeypatch):
    """FFT at 16 in 'equal' and 32 in 'paper': two measurements; at 32 in both, one."""
    calls = []

    def measure(fn, cfg, **kwargs):
        calls.append(cfg.batch_size)
        return fake_row(cfg)

    monkeypatch.setattr(benchmark, "in_fresh_process", measure)
    monkeypatch.setattr(benchmark, "prepare", lambda work, data, backbones: {})
    written = benchmark.run_benchmark({}, equal_batch=16, labels=("FFT",), authors_way=(), work=tmp_path,
                                      out=tmp_path / "out", tag="a")
    assert calls == [16, 32]
    assert [json.loads(p.read_text())["rows"][0]["batch_size"] for p in written] == [16, 32]
    calls.clear()
    benchmark.run_benchmark({}, equal_batch=32, labels=("FFT",), authors_way=(), work=tmp_path,
                            out=tmp_path / "out", tag="b")
    assert calls == [32]
    said = (tmp_path / "out" / "benchmark.log").read_text().splitlines()  # each benchmark's lines after a header
    assert [line.split(":")[0] for line in said if line.startswith("===")] == ["=== benchmark"] * 2
    assert sum(" | FFT | batch 32 | default (row 1 of 1)" in line for line in said) == 2


def test_a_file_named_benchmark_log_that_is_not_one_is_left_as_it_is(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(benchmark, "in_fresh_process", lambda fn, cfg, **kw: fake_row(cfg))
    monkeypatch.setattr(benchmark, "prepare", lambda work, data, backbones: {})
    (tmp_path / "out").mkdir()
    (mine := tmp_path / "out" / "benchmark.log").write_text("my notes\n")
    with caplog.at_level("WARNING"):
        benchmark.run_benchmark({}, setting_names=("paper",), labels=("FFT",), authors_way=(), work=tmp_path,
                                out=tmp_path / "out", tag="t")
    assert mine.read_text() == "my notes\n"
    assert f"{mine} is not a benchmark log of IISAN's: left as it is, and this command keeps no log" in caplog.text


def test_one_failed_row_beside_a_measured_one_is_no_failed_run(tmp_path, monkeypatch):
    monkeypatch.setattr(benchmark, "in_fresh_process", lambda fn, cfg, **kw: fake_row(
        cfg, "TrainingError: out of memory" if cfg.method == "fft" else None))
    monkeypatch.setattr(benchmark, "prepare", lambda work, data, backbones: {})
    (path,) = benchmark.run_benchmark({}, setting_names=("paper",), labels=("FFT", "LoRA"), authors_way=(),
                                      work=tmp_path, out=tmp_path / "out", tag="t", figs=tmp_path / "figs")
    rows = json.loads(path.read_text())["rows"]
    assert [("error" in r, "tpme" in r) for r in rows] == [(True, False), (False, True)]
    assert (tmp_path / "figs" / "efficiency-out-t-paper.png").is_file()  # a figure of the measured row
    monkeypatch.setattr(benchmark, "in_fresh_process", lambda fn, cfg, **kw: fake_row(cfg, "TrainingError: no"))
    with pytest.raises(TrainingError, match="every measured row failed"):
        benchmark.run_benchmark({}, setting_names=("paper",), labels=("FFT", "LoRA"), authors_way=(),
                                 work=tmp_path, out=tmp_path / "out2", tag="t")


def test_each_authors_way_row_sits_under_its_default_row():
    assert benchmark.table_position("FFT") == (0, 0)
    assert benchmark.table_position("FFT (every slot)") == (0, 1)
    assert benchmark.table_position("IISAN (cached, every slot)") == (5, 1)
    labels = ["IISAN (cached, every slot)", "LoRA", "FFT (every slot)", "IISAN (cached)", "FFT"]
    assert sorted(labels, key=benchmark.table_position) == [
        "FFT", "FFT (every slot)", "LoRA", "IISAN (cached)", "IISAN (cached, every slot)"]


# --------------------------------------------------------------------------------------------------
# figures.py: table lines and panels


def gpu_row() -> dict:
    return {"label": "FFT", "method": "FFT", "encodes": "every slot", "batch_size": 32, "items_per_step": 190.0,
            "encoded_rows_per_step": 208.0, "padding_overhead_items": 0.09, "padding_overhead_flops": 0.08,
            "seconds_per_step": 0.5, "p90_seconds_per_step": 0.75, "epoch_seconds": 19.0,
            "full_epoch_seconds": 21.5, "model_tflops_per_second": 0.0123, "memory": dict(GPU_MEMORY),
            "trainable_params": 1_234_567, "tpme": 0.4567}


def test_a_training_line_puts_each_value_in_its_column():
    head = ("| method | encodes | batch | items / step | rows / step | padding (rows / FLOPs) | s / step | "
            "p90 s / step | s / epoch | full epoch s | model TFLOP/s | allocated GiB | reserved GiB | "
            "trainable params | TPME |")
    line = ("| FFT | every slot | 32 | 190 | 208 | +9 % / +8 % | 0.5 | 0.75 | 19.00 | 21.50 | 0.0123 | 1.25 | 2.50 | "
            "1.23 M | 0.457 |")
    assert figures.training_line(gpu_row(), gpu=True, columns=15) == line
    payload = {**benchmark_payload(), "rows": [gpu_row()], "evaluation": dict(EVALUATION)}
    lines = figures.table(payload).splitlines()
    assert lines[0] == head and lines[2] == line


def test_the_tasks_table_puts_median_and_p90_in_their_columns():
    cache = {"cache_build_seconds": 12.34, "memory": {"peak_rss_gib": 2.25}}
    evaluation = {**EVALUATION, "evaluation_times": {"median": 0.25, "p90": 0.75, "count": 5}}
    assert figures.tasks_table({"evaluation": evaluation, "cache_build": cache}) == [
        "| task | runs | s (median of the runs) | s (p90) | memory GiB |", "|---|---|---|---|---|",
        "| evaluation, IISAN (cached): every one of 1,200 users ranked over all 400 items, item table included | "
        "5 | 0.25 | 0.75 | 1.50 |",
        "| cache build, both towers | 1 | 12.3 | | 2.25 |"]  # built once: one run, no p90
    failed = figures.tasks_table({"evaluation": {"error": "OOM"}, "cache_build": {"error": "disk full"}})
    assert failed[2:] == ["| evaluation | | failed: OOM | | |", "| cache build | | failed: disk full | | |"]


def drawn_axes(payload: dict, monkeypatch) -> list:
    """The four panels ``figures.figure`` draws for ``payload``."""
    drawn = []

    class Kept(figures.Figure):  # the figure drawn, kept to read its panels
        def subplots(self, *args, **kwargs):
            drawn.append(super().subplots(*args, **kwargs))
            return drawn[-1]

    monkeypatch.setattr(figures, "Figure", Kept)
    assert figures.figure(payload).startswith(b"\x89PNG")
    axes, = drawn
    return list(axes)


def test_the_figure_plots_each_default_rows_epoch_memory_params_and_tpme(monkeypatch):
    payload = benchmark_payload()
    fft, authors, iisan = payload["rows"]
    iisan.update(seconds_per_step=0.25, epoch_seconds=7.0, trainable_params=50, memory={"peak_rss_gib": 0.5})
    time, memory, params, tpme = drawn_axes(payload, monkeypatch)
    heights = [[bar.get_height() for bar in ax.patches] for ax in (time, memory, tpme)]
    assert heights == [[19.0, 7.0], [1.0, 0.5], [1.0, 0.0]]  # the default rows: FFT, IISAN
    # each value above its bar or point, as the tables write it (memory 2 decimals, TPME 3)
    assert [[t.get_text() for t in ax.texts] for ax in (time, memory, params, tpme)] == [
        ["19", "7"], ["1.00", "0.50"], ["1 k", "50"], ["1.000", "0.000"]]
    # parameters: points on a log axis, no bars (a bar's length there depends on where the axis starts)
    assert not params.patches and params.get_yscale() == "log"
    assert params.collections[0].get_offsets().tolist() == [[0, 1000], [1, 50]]
    assert [ax.get_title() for ax in (time, memory, params, tpme)] == [
        "training time per epoch (s), training only\nmedian step × steps per epoch; whisker: p90 step",
        "peak process resident memory (GiB)",
        "trainable parameters (log scale)", "TPME, lower is better\n(0: the best of these methods, 1: the worst)"]
    assert [t.get_text() for t in time.figure.legends[0].get_texts()] == ["IISAN", "the other methods"]


def test_the_time_bars_carry_a_whisker_up_to_the_p90_step_where_the_results_hold_one(monkeypatch):
    """The table gave the p90 step, the figure only the median: two methods with the same median and very
    different tails looked alike."""
    payload = benchmark_payload()
    fft, authors, iisan = payload["rows"]
    fft.pop("p90_seconds_per_step", None)  # results written before the p90 was kept: no whisker
    iisan.update(seconds_per_step=0.25, p90_seconds_per_step=0.4, epoch_seconds=7.0)  # 28 steps per epoch
    time, memory, *_ = drawn_axes(payload, monkeypatch)
    (whiskers,) = [c for c in time.collections if c.get_segments()]
    assert [s.tolist() for s in whiskers.get_segments()] == [[[1.0, 7.0], [1.0, pytest.approx(11.2)]]]  # 28 x 0.4 s
    values = {t.get_text(): t.xy for t in time.texts}
    assert values["7"] == (1, pytest.approx(11.2)) and values["19"][1] == 19.0  # a value sits above its whisker
    assert not [c for c in memory.collections if c.get_segments()]  # the other panels have none
    iisan.pop("p90_seconds_per_step")
    time, *_ = drawn_axes(payload, monkeypatch)  # none has a p90: no whisker, and the title promises none
    assert not [c for c in time.collections if c.get_segments()]
    assert time.get_title() == "training time per epoch (s), training only\nmedian step × steps per epoch"


def test_a_method_that_failed_keeps_its_place_in_the_figure_marked_failed(monkeypatch):
    """It vanished: five bars and no word of the sixth, though the table said it failed."""
    payload = benchmark_payload()
    fft, authors, iisan = payload["rows"]
    payload["rows"].insert(1, {"label": "LoRA", "method": "LoRA", "feed": "live", "batch_size": 32,
                               "measured": "default", "error": "CUDA out of memory"})
    axes = drawn_axes(payload, monkeypatch)
    for ax in axes:
        assert [t.get_text() for t in ax.get_xticklabels()] == ["FFT", "LoRA\n(failed)", "IISAN\n(uncached)"]
        assert [t.get_text() for t in ax.texts if t.get_text() == "failed"] == ["failed"]
    assert [bar.get_x() + bar.get_width() / 2 for bar in axes[0].patches] == [0, 2]  # no bar in LoRA's place


# --------------------------------------------------------------------------------------------------
# report_notes.py


def test_too_few_warmup_steps_alone_make_a_quick_check():
    assert not report_notes.quick_check({"timed_steps": 50, "warmup_steps": 10})
    assert report_notes.quick_check({"timed_steps": 50, "warmup_steps": 9})
    assert report_notes.quick_check({"timed_steps": 49, "warmup_steps": 10})
    assert figures.figure_title(benchmark_payload(steps=50, warmup=9)).endswith(
        "\nquick check: 50 timed steps after 9 warm-up (the benchmark's timing: 50 after 10)")


def test_the_flop_note_names_a_sample_only_when_it_is_one():
    every = figures.table(benchmark_payload())  # flop_batches 50 == timed_steps 50
    assert "counted with torch.utils.flop_counter on the timed batches) per second of the median step." in every
    payload = benchmark_payload()
    for row in payload["rows"]:
        row["flop_batches"] = 5
    assert "counted with torch.utils.flop_counter on the first 5 timed batches)" in figures.table(payload)


def test_the_fft_memory_note_gives_the_authors_way_rows():
    payload = benchmark_payload()
    payload["rows"][0]["memory"]["peak_rss_gib"] = 1.5
    (note,) = report_notes.memory_note(payload)
    assert ("so FFT's memory grows with the items per step: 190 here (every slot with an item; 1.50 GiB), 352 rows "
            "the authors' way (1.00 GiB).") in note


# --------------------------------------------------------------------------------------------------
# report_checks.py: damaged JSONs, one line each


@pytest.mark.parametrize("where, value, field", [
    ("rows.0.batch_size", True, "rows[0] (FFT).batch_size is true, not an integer"),
    ("rows.0.memory", dict(GPU_MEMORY), "its rows mix GPU and CPU memory figures"),
    ("rows.0.buckets.title_multiple", "8", 'rows[0] (FFT).buckets.title_multiple is "8", not an integer'),
    ("rows.1.buckets.title_tokens", 30.5, "rows[1] (FFT (every slot)).buckets.title_tokens is 30.5, not an integer"),
    ("evaluation.memory", {}, "evaluation.memory.peak_rss_gib is missing"),
    ("evaluation.memory", {"max_allocated_gib": 1.0}, "evaluation.memory.max_reserved_gib is missing"),
    ("evaluation.evaluation_times", [0.25], "evaluation.evaluation_times is [0.25], not an object"),
    ("evaluation.evaluation_times", {"count": "5"}, 'evaluation.evaluation_times.count is "5", not an integer'),
])
def test_a_damaged_json_is_refused_in_one_line(where, value, field, tmp_path, monkeypatch, capsys):
    payload = damage({**benchmark_payload(), "evaluation": dict(EVALUATION)}, where, value)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(payload))
    from iisan.efficiency.report_checks import read_benchmark

    with pytest.raises(DataError) as refused:
        read_benchmark(path)
    assert str(refused.value) == f"{path}: {field}; {EXPECTED}"
    plot = script("plot_figures", monkeypatch)
    assert ending(plot, ["--results", str(path), "--figs", str(tmp_path / "figs")], capsys) == (
        f"plot_figures.py: error: {path}: {field}; {EXPECTED}")
    assert [p.name for p in tmp_path.iterdir()] == ["bad.json"]


# --------------------------------------------------------------------------------------------------
# the diagnosis


def test_the_plain_cache_builds_epoch_is_the_items_over_its_batch(tmp_path, monkeypatch):
    for name in ("plain_fft_step", "plain_frozen_forward", "plain_patch_embedding"):
        monkeypatch.setattr(diagnose, name, lambda *args, **kwargs: {"seconds_per_step": 0.5})
    assert (diagnose.SCIENTIFIC_USERS, diagnose.SCIENTIFIC_ITEMS) == (12076, 20314)
    args = options.DiagnosisOptions(out=tmp_path / "d.json", cache_batch=512, fft_items=[4], frozen_items=[6])
    report = {}
    diagnose.plain_section(args, CPU, None, report)
    plain = report["plain"]
    assert plain["steps_per_epoch"] == {"fft": 378, "frozen": 189, "cache": 40}  # 20,314 items / 512, rounded up
    assert plain["cache_build_forward"][0]["epoch_seconds"] == pytest.approx(20.0)
    assert plain["fft_step"][0]["epoch_seconds"] == pytest.approx(189.0)


def test_the_diagnosis_epoch_is_the_pipeline_fed_step_and_counts_real_items(tiny_config, tmp_path, monkeypatch):
    """Each ``timed`` call returns its own value (0.1, 0.2, ...) after running its calls as ``timed`` does:
    the epoch comes from the step fed by the pipeline, and items per batch count the non-padding slots."""
    cfg = tiny_config(method="fft", batch_size=16)
    made, training_setup = [], diagnose_steps.training_setup
    readings = itertools.count(1)

    def timed(fn, device, warmup, reps):
        for _ in range(warmup + reps):
            fn()
        return next(readings) / 10

    def setup_of(config):
        made.append(training_setup(config))
        return made[-1]

    monkeypatch.setattr(diagnose_steps, "timed", timed)
    monkeypatch.setattr(diagnose_steps, "prepare", lambda work, data, size: {})
    monkeypatch.setattr(diagnose_steps, "method_config", lambda base, label: cfg)
    monkeypatch.setattr(diagnose_steps, "training_setup", setup_of)
    args = SimpleNamespace(work=tmp_path, data="demo", size="tiny", device="cpu", workers=0, shape_reps=1,
                           warmup=0, reps=1)
    row = diagnose_steps.iisan_rows(args, "FFT")
    assert row["steps_per_epoch"] == 10 and row["step_with_pipeline_seconds"] != row["step_on_device_seconds"]
    assert row["epoch_seconds"] == pytest.approx(row["step_with_pipeline_seconds"] * 10)
    # the pipeline's timing drew the stream's first batch; the row's batches are the next one
    (batch,) = itertools.islice(made[0].host_batches(), 1, 2)
    assert row["items_per_batch"] == int((batch.seq != 0).sum()) < len(batch.items.ids)


def test_the_plain_titles_run_from_8_to_30_tokens():
    _, _, mask = plain_reference.plain_inputs(100, CPU, 2000)
    lengths = mask.sum(1)
    assert torch.equal(mask, (torch.arange(30) < lengths[:, None]).long())  # each a prefix of ones
    assert (int(lengths.min()), int(lengths.max())) == (8, 30)


def test_the_plain_frozen_forward_takes_no_autocast_over_bf16_weights():
    bf16 = plain_reference.plain_frozen_forward("tiny", 2, CPU, torch.bfloat16, 0, 1, weights=torch.bfloat16)
    fp32 = plain_reference.plain_frozen_forward("tiny", 2, CPU, torch.bfloat16, 0, 1)
    assert (bf16["weights"], bf16["autocast"]) == ("bfloat16", False)
    assert (fp32["weights"], fp32["autocast"]) == ("float32", True)


def test_the_plain_fft_step_clears_its_gradients_after_each_step(monkeypatch):
    made = []
    models = plain_reference.plain_models

    def keep(*args, **kwargs):
        made.append(models(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(plain_reference, "plain_models", keep)
    row = plain_reference.plain_fft_step("tiny", 4, CPU, None, 0, 1)
    assert row["items"] == 4 and row["flops_per_step"] > 0
    ((text, image),) = made
    params = [*text.parameters(), *image.parameters()]
    assert params and all(p.grad is None for p in params)


# --------------------------------------------------------------------------------------------------
# the scripts' flags


def test_the_benchmark_script_passes_flop_batches_on(tmp_path, monkeypatch):
    bench = script("benchmark_efficiency", monkeypatch)
    seen = {}
    monkeypatch.setattr(benchmark, "run_benchmark", lambda settings, **kwargs: seen.update(kwargs) or [])
    bench.main(["--few-steps", "--warmup", "1", "--steps", "3", "--flop-batches", "2", "--work", str(tmp_path)])
    assert (seen["flop_batches"], seen["warmup"], seen["steps"]) == (2, 1, 3)


def test_a_negative_flop_sample_is_refused(tmp_path, monkeypatch, capsys):
    with pytest.raises(ConfigError) as refused:
        benchmark.selection("FFT", "none", "", "paper", warmup=10, steps=50, flop_batches=-1)
    assert str(refused.value) == "--warmup and --flop-batches must be >= 0 and --steps >= 1, not 10, -1 and 50"
    bench = script("benchmark_efficiency", monkeypatch)
    monkeypatch.setattr(benchmark, "run_benchmark", no_work)
    assert ending(bench, ["--flop-batches", "-1", "--work", str(tmp_path)], capsys) == (
        "benchmark_efficiency.py: error: --warmup and --flop-batches must be >= 0 and --steps >= 1, not 10, -1 and 50")


def test_the_diagnosis_refuses_a_negative_warmup_and_takes_none(tmp_path, monkeypatch, capsys):
    diag = script("gpu_diagnose", monkeypatch)
    monkeypatch.setattr(diagnose, "run_diagnosis", no_work)
    out = ["--device", "cpu", "--out", str(tmp_path / "d.json")]
    assert ending(diag, ["--warmup", "-1", *out], capsys) == (
        "gpu_diagnose.py: error: --reps, --shape-reps, --cache-batch and every item count must be >= 1, --warmup and "
        "--num-workers >= 0")
    seen = []
    monkeypatch.setattr(diagnose, "run_diagnosis", lambda options: seen.append(options.warmup) or {})
    diag.main(["--warmup", "0", *out])
    assert seen == [0]


@pytest.mark.parametrize("data", ["demo", "scientific"])
def test_a_batch_of_every_user_is_allowed_and_one_more_is_not(data):
    users = benchmark.USERS[data]
    benchmark.check_batch_size(users, data, "--equal-batch")  # one full batch of every user
    with pytest.raises(ConfigError, match=f"--equal-batch {users + 1} exceeds the {users:,} users of the {data} data"):
        benchmark.check_batch_size(users + 1, data, "--equal-batch")
