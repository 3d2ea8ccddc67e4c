"""What the benchmark tools measure and write, beyond their flags: a measuring process's own peak memory,
the notes under a table (only what the rows' fields say), damaged JSONs refused before anything is
written, runs that cannot fill a batch or find enough fresh shapes ending, and outputs never written
over or outside their folder."""

from __future__ import annotations

import copy
import json
import os
import resource
import signal
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch

from iisan.efficiency import benchmark, diagnose
from iisan.efficiency.figures import figure_title, table
from iisan.errors import ConfigError
from iisan.isolate import in_fresh_process
from iisan.memory import peak_memory, reset_peak_memory

from ._scripts import load_script

ROOT = Path(__file__).resolve().parents[1]
EXPECTED = "expected a benchmark JSON written by scripts/benchmark_efficiency.py"
CPU = torch.device("cpu")
LINUX = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="VmHWM and clear_refs are Linux's")


@contextmanager
def within(seconds: int):
    """A ``TimeoutError`` where the block would otherwise never end (the hangs these tests guard)."""
    def expired(*_):
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def ending(module, argv: list[str], capsys) -> str:
    """``module.main(argv)`` -> the last line of its stderr, after checking it exits with status 2."""
    with pytest.raises(SystemExit) as stopped:
        module.main(argv)
    assert stopped.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


def no_work(*args, **kwargs):
    raise AssertionError("the work started before the input was checked")


# --------------------------------------------------------------------------------------------------
# peak memory on the CPU


@LINUX
def test_a_measuring_child_reports_its_own_peak_not_its_parents():
    """ru_maxrss crosses fork and exec: a child measured while its parent held 1.5 GiB reported 1.5 GiB."""
    blob = np.ones(3 * 2**30 // 16)  # 1.5 GiB, every page touched
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 >= 1.5 * 2**30
    child = in_fresh_process(peak_memory, CPU)
    del blob
    assert child["rss_peak_source"] == "VmHWM" and child["rss_peak_since"] == "the process's start"
    assert 0 < child["peak_rss_gib"] < 1.0, child  # the child's own (python and torch), not its parent's


@LINUX
def test_the_cpu_peak_starts_over_at_a_reset_as_the_gpu_peaks_do():
    blob = np.ones(2**29 // 8)  # 512 MiB, then freed: the peak stays above the resident set
    del blob
    before = peak_memory(CPU)
    assert before["peak_rss_gib"] - before["current_rss_gib"] >= 0.45
    assert reset_peak_memory(CPU)
    after = peak_memory(CPU, "the warm-up's end")
    assert after["peak_rss_gib"] - after["current_rss_gib"] < 0.1
    assert (after["rss_peak_source"], after["rss_peak_since"]) == ("VmHWM", "the warm-up's end")


@LINUX
def test_a_run_starts_its_peak_from_what_is_in_use_not_what_earlier_work_freed():
    """A sweep's points share a process: memory an earlier point freed but the C heap kept stayed resident, so
    each later point's CPU peak started higher (0.86, 1.01, 1.13 GiB for one config). Released at a run's start,
    the resident set falls back to what is in use."""
    import psutil

    from iisan.memory import release_free_memory

    def resident() -> float:
        return psutil.Process().memory_info().rss / 2**30

    before = resident()
    blobs = [bytearray(4000) for _ in range(100_000)]  # 0.4 GB of small blocks in the C heap
    kept = blobs[::50]  # one in 50 still in use: the heap cannot shrink from its top
    del blobs
    assert resident() - before > 0.3
    release_free_memory(CPU)
    assert resident() - before < 0.1
    assert len(kept) == 2000


# --------------------------------------------------------------------------------------------------
# a benchmark JSON: its notes, its damage


def benchmark_payload(steps: int = 50, warmup: int = 10) -> dict:
    """A CPU benchmark JSON as the benchmark writes it now: a baseline encoding every slot with an item,
    uncached IISAN each distinct item, FFT the authors' way."""
    memory = {"peak_rss_gib": 1.0, "current_rss_gib": 0.5, "rss_peak_source": "VmHWM",
              "rss_peak_since": "the warm-up's end"}
    buckets = {"item_bucket_growth": 0.125, "row_multiple": 16, "title_multiple": 8, "title_tokens": 30}

    def row(label, method, encodes, measured, **more):
        return {"label": label, "method": method, "feed": "live", "batch_size": 32, "seconds_per_step": 0.5,
                "p90_seconds_per_step": 0.6, "step_seconds": {"median": 0.5}, "epoch_seconds": 19.0,
                "trainable_params": 1000, "memory": dict(memory), "encodes": encodes, "items_per_step": 190.0,
                "encoded_rows_per_step": 208.0, "padding_overhead_items": 0.09, "padding_overhead_flops": 0.08,
                "static_shapes": True, "buckets": dict(buckets), "measured": measured,
                "model_tflops_per_second": 0.01, "flop_batches": steps, **more}

    rows = [row("FFT", "FFT", "every slot with an item", "default", tpme=1.0),
            row("FFT (every slot)", "FFT", "every slot", "authors", encoded_rows_per_step=352.0,
                buckets={**buckets, "title_multiple": 0}),
            row("IISAN (uncached)", "IISAN", "distinct items", "default", tpme=0.0)]
    return {"setting": "paper", "description": "paper: baselines 32, IISAN 64", "backbones": "tiny", "data": "demo",
            "device": "CPU (x86_64, 2 cores, 2 torch threads)", "rows": rows, "cache_build": None,
            "evaluation": None, "timed_steps": steps, "warmup_steps": warmup, "complete": True,
            "command": "python scripts/benchmark_efficiency.py", "git_commit": "abc1234"}


def test_the_notes_say_what_each_rows_fields_show():
    notes = table(benchmark_payload()).split("\n\n")[-1]
    assert "Encodes 'every slot with an item' (FFT): each slot of the batch that holds an item" in notes
    assert "Encodes 'distinct items' (IISAN (uncached)): each distinct item" in notes
    assert "Encodes 'every slot' (FFT (every slot)): every slot of the batch" in notes
    assert "(the default)" not in notes  # the default rows encode differently per method
    assert "Static shapes (FFT, IISAN (uncached)): the encoded rows padded up to a bucket size" in notes
    assert "titles cut to the batch's longest, rounded up to 8 tokens" in notes
    assert "Static shapes (FFT (every slot)): a batch's rows are its slots, a fixed count; titles at their full " \
           "30 tokens" in notes
    assert ("Peak RSS (FFT, FFT (every slot), IISAN (uncached)): the measuring process's own resident high-water "
            "mark (VmHWM), since the warm-up's end.") in notes
    assert "quick check" not in notes and "median" in notes
    assert "image LMDB" not in notes  # no row recorded its pages
    payload = benchmark_payload()
    payload["rows"][2]["memory"]["lmdb_resident_gib"] = 0.056
    assert ("Of it, pages of the image LMDB the reads brought in (GiB, at the window's end: IISAN (uncached) 0.06): "
            "the file's, which the kernel may drop, counted in the resident set; a cached row reads none."
            ) in table(payload).split("\n\n")[-1]


def read_images_then_measure(store: str, items: str, count: int) -> dict:
    """(a child's) ``peak_memory`` after reading the first ``count`` items' images of ``store`` (none: no store
    opened)."""
    if count:
        from iisan.data.images import ImageStore
        from iisan.data.interactions import read_items

        images = ImageStore(store)
        ids = read_items(items).ids[:count]
        images.get(ids, np.zeros((len(ids), images.size, images.size, 3), dtype=np.uint8))
    return peak_memory(CPU)


@LINUX
def test_the_cpu_peak_says_how_much_of_it_is_an_image_lmdbs_pages(tiny):
    """A live row reads the image LMDB through a memory map: the resident set, so VmHWM, counts the pages it
    brought in (the file's, which the kernel may drop), which a cached row never has: they are said apart."""
    read = in_fresh_process(read_images_then_measure, tiny["images"], tiny["items"], 60)
    assert read["lmdb_resident_gib"] * 2**30 >= 60 * 64 * 64 * 3  # every image read is resident
    assert read["lmdb_resident_gib"] < read["peak_rss_gib"]
    assert "lmdb_resident_gib" not in in_fresh_process(read_images_then_measure, tiny["images"], tiny["items"], 0)


def test_the_notes_of_an_older_json_say_nothing_of_fields_it_lacks():
    """H200 runs 1 and 2: no encodes, no static shapes, no per-step times, no FLOPs, no memory source."""
    old = json.loads((ROOT / "results" / "efficiency" / "h200-run2" / "base-scientific-h200-paper.json").read_text())
    notes = table(old).split("\n\n")[-1]
    for claim in ("distinct items", "every slot", "Static shapes", "TFLOP/s", "median", "Items / step", "Padding",
                  "Peak RSS", "Encodes"):
        assert claim not in notes, claim
    assert "s / step is their mean (a results file without per-step times)" in notes
    assert "Memory (FFT, Adapter, LoRA, BitFit, IISAN (uncached), IISAN (cached), cache build): the CUDA " \
           "allocator's peaks" in notes


def test_a_quick_checks_figure_says_its_step_counts():
    assert "quick check" not in figure_title(benchmark_payload())
    assert figure_title(benchmark_payload(steps=2, warmup=1)).endswith(
        "\nquick check: 2 timed steps after 1 warm-up (the benchmark's timing: 50 after 10)")


def damage(payload: dict, where: str, value) -> dict:
    """``payload`` with the field at ``where`` ('rows.0.memory') set to ``value`` (``...``: removed)."""
    payload = copy.deepcopy(payload)
    *path, last = where.split(".")
    entry = payload
    for key in path:
        entry = entry[int(key) if isinstance(entry, list) else key]
    if value is ...:
        del entry[last]
    else:
        entry[last] = value
    return payload


@pytest.mark.parametrize("where, value, field", [
    ("rows.0.memory", ..., "rows[0] (FFT).memory is missing"),
    ("rows.0.label", ..., "rows[0].label is missing"),
    ("rows.0.memory.peak_rss_gib", None, "rows[0] (FFT).memory.peak_rss_gib is null, not a finite number"),
    ("rows.0.trainable_params", None, "rows[0] (FFT).trainable_params is null, not an integer"),
    ("rows.1.seconds_per_step", "fast", 'rows[1] (FFT (every slot)).seconds_per_step is "fast", not a finite number'),
    ("rows.1.seconds_per_step", float("nan"), "rows[1] (FFT (every slot)).seconds_per_step is NaN, not a finite "
                                              "number"),
    ("cache_build", "x", 'cache_build is "x", not an object or null'),
    ("evaluation", {"evaluation_seconds": 1.0}, "evaluation.label is missing"),
    ("timed_steps", "x", 'timed_steps is "x", not an integer'),
])
def test_plot_figures_refuses_a_damaged_json_before_writing_anything(where, value, field, tmp_path, monkeypatch,
                                                                      capsys):
    """A good JSON first in the folder, the damaged one after it: one line naming the file and the field,
    and no table or figure of either written."""
    monkeypatch.setattr(sys, "argv", ["plot_figures.py"])
    plot = load_script("plot_figures.py")
    results = tmp_path / "results"
    results.mkdir()
    (results / "a-good.json").write_text(json.dumps(benchmark_payload()))
    (results / "b-bad.json").write_text(json.dumps(damage(benchmark_payload(), where, value)))
    figs = tmp_path / "figs"
    assert ending(plot, ["--results", str(results), "--figs", str(figs)], capsys) == (
        f"plot_figures.py: error: {results / 'b-bad.json'}: {field}; {EXPECTED}")
    assert sorted(p.name for p in results.iterdir()) == ["a-good.json", "b-bad.json"] and not figs.exists()


def test_plot_figures_draws_the_committed_and_failed_results(tmp_path):
    """The checks take every JSON the benchmark wrote: H200 runs 1 and 2, a failed row, no measured tasks."""
    from iisan.efficiency.figures import write_reports

    for path in (ROOT / "results" / "efficiency").rglob("*.json"):
        (tmp_path / f"{path.parent.name}-{path.name}").write_text(path.read_text())
    failed = benchmark_payload()
    failed["rows"].append({"label": "LoRA", "error": "TrainingError: no", "traceback": ""})
    failed["cache_build"] = {"error": "OutputError: no", "traceback": ""}
    (tmp_path / "failed.json").write_text(json.dumps(failed))
    made = write_reports([tmp_path], tmp_path / "figs")
    assert len(made) == 2 * len(list(tmp_path.glob("*.json")))


def test_the_documented_redraw_draws_every_committed_figure_and_names_only_the_colours_drawn(tmp_path,
                                                                                            monkeypatch):
    """`plot_figures.py --results results/efficiency --figs figs` read the folder's top level only: the committed
    figures of the runs in its subfolders were not redrawn (one stayed in an older drawing), and a figure of
    baselines alone had IISAN in its legend."""
    from matplotlib.figure import Figure

    from iisan.efficiency.figures import benchmark_files, figure, read_benchmark, report_paths

    found = benchmark_files([ROOT / "results" / "efficiency"])
    assert sorted(report_paths(path, tmp_path)[1].name for path in found) == \
        sorted(p.name for p in (ROOT / "figs").glob("*.png"))  # (drawn: test_plot_figures_draws_the_committed...)
    legends, save = [], Figure.savefig

    def kept(fig, *args, **kwargs):
        legends.append(tuple(t.get_text() for t in fig.legends[0].texts))
        return save(fig, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", kept)
    for name in ("tiny-demo-cpu-paper.json", "cpu-towers-aec5b7f/after-aec5b7f.json"):  # with IISAN, baselines alone
        figure(read_benchmark(ROOT / "results" / "efficiency" / name))
    assert legends == [("IISAN", "the other methods"), ("the other methods",)]


# --------------------------------------------------------------------------------------------------
# runs that would never end


def test_a_batch_larger_than_the_users_is_refused_not_waited_for(tiny_config, tmp_path, monkeypatch, capsys):
    from iisan.efficiency.bench import training_setup

    setup = training_setup(tiny_config(method="iisan", feed="live", batch_size=500))
    with within(60), pytest.raises(ConfigError, match="batch_size=500 exceeds the 160 users of .*users.tsv; a "
                                                      "timed step needs a full batch: choose at most 160"):
        next(setup.host_batches())
    monkeypatch.setattr(sys, "argv", ["benchmark_efficiency.py"])
    bench = load_script("benchmark_efficiency.py")
    monkeypatch.setattr(benchmark, "prepare", no_work)
    monkeypatch.setattr(benchmark, "in_fresh_process", no_work)
    folders = ["--work", str(tmp_path / "work"), "--out", str(tmp_path / "out"), "--figs", str(tmp_path / "figs")]
    assert ending(bench, ["--settings", "equal", "--equal-batch", "5000", "--device", "cpu", *folders], capsys) == (
        "benchmark_efficiency.py: error: --equal-batch 5000 exceeds the 1,200 users of the demo data; every timed "
        "step needs a full batch: choose at most 1200")
    monkeypatch.setattr(sys, "argv", ["profile_step.py"])
    profile = load_script("profile_step.py")
    monkeypatch.setattr(benchmark, "prepare", no_work)
    assert ending(profile, ["--batch-size", "20000", "--data", "scientific"], capsys) == (
        "profile_step.py: error: --batch-size 20000 exceeds the 12,076 users of the scientific data; every timed "
        "step needs a full batch: choose at most 12076")
    assert not any(tmp_path.iterdir())


def test_the_diagnosis_seeks_fresh_shapes_over_one_epoch_only(tiny_config):
    """160 users in batches of 16: ten full batches, one the fixed one; asking for 50 fresh shapes ends."""
    from iisan.efficiency.bench import training_setup
    from iisan.efficiency.diagnose_steps import shape_phases

    setup = training_setup(tiny_config(method="iisan", feed="live", batch_size=16))
    with within(120):
        shapes, found = shape_phases(setup, 50)
    assert found["wanted"] == 50 and found["batches_searched"] == 10 and 1 <= found["found"] <= 9
    assert [len(shapes[k]["rows"]) for k in ("fresh", "seen", "fixed", "bucketed_first")] == [found["found"]] * 4


def test_a_shape_is_fresh_when_either_of_its_row_counts_is():
    """A batch whose slots repeat a count met before is still a fresh shape for a tower that runs by
    distinct item when its distinct count is new; a batch repeating both counts is not."""
    from types import SimpleNamespace

    from iisan.efficiency.diagnose_steps import shape_phases

    def batch(rows, by_item):
        distinct = SimpleNamespace(ids=[0] * by_item)
        return SimpleNamespace(items=SimpleNamespace(ids=[0] * rows, distinct=distinct), to=lambda device: batch(
            rows, by_item))

    pairs = [(10, 5), (10, 6), (10, 5), (12, 5), (12, 6)]
    stepped = []
    setup = SimpleNamespace(buckets=[16], cfg=SimpleNamespace(batch_size=1), collate=SimpleNamespace(
        sequences=[0] * len(pairs)), device=torch.device("cpu"), step=lambda b: stepped.append(b),
        host_batches=lambda buckets: (batch(*p) for p in pairs))
    shapes, found = shape_phases(setup, 3)
    assert found == {"wanted": 3, "found": 3, "batches_searched": 5}
    assert list(zip(shapes["fresh"]["rows"], shapes["fresh"]["rows_by_item"])) == [(10, 6), (12, 5), (12, 6)]
    assert shapes["fixed"]["rows_by_item"] == [5, 5, 5]


# --------------------------------------------------------------------------------------------------
# the diagnosis script's inputs and output


def test_gpu_diagnose_replaces_only_its_own_json_and_needs_a_frozen_count(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["gpu_diagnose.py"])
    script = load_script("gpu_diagnose.py")
    nothing = ["--device", "cpu", "--iisan", "", "--skip-plain"]
    theirs = {"mine.json": '{"warmup": 1}', "notes.txt": "mine"}
    for name, text in theirs.items():
        (tmp_path / name).write_text(text)
        assert ending(script, [*nothing, "--out", str(tmp_path / name)], capsys) == (
            f"gpu_diagnose.py: error: --out {tmp_path / name} exists and is not a diagnosis JSON IISAN wrote; "
            "IISAN replaces only what it wrote itself, so choose another path or move that one away")
    assert {p.name: p.read_text() for p in tmp_path.iterdir()} == theirs
    monkeypatch.setattr(diagnose, "plain_section", no_work)
    ours = tmp_path / "diagnose.json"
    for _ in range(2):  # written, then its own earlier report replaced
        script.main([*nothing, "--out", str(ours)])
        assert diagnose.is_diagnosis(ours) and json.loads(ours.read_text())["device"]["device"].startswith("CPU")
    assert ending(script, ["--iisan", "", "--fft-items", "", "--frozen-items", "", "--device", "cpu",
                           "--out", str(tmp_path / "d.json")], capsys) == (
        "gpu_diagnose.py: error: --frozen-items names no item count; the plain section needs at least one (the "
        "first also runs the variants), or pass --skip-plain")
    assert not (tmp_path / "d.json").exists()


# --------------------------------------------------------------------------------------------------
# the benchmark's names and flags


def test_a_tag_stays_inside_out_and_a_label_given_twice_is_measured_once(tmp_path):
    payload = {"setting": "paper", "backbones": "tiny", "data": "demo"}
    assert benchmark.result_path(tmp_path, "../escaped", payload, [], {}) == tmp_path / "escaped-paper.json"
    assert benchmark.result_path(tmp_path, "a/../../b c", payload, [], {}).parent == tmp_path
    chosen = benchmark.selection("IISAN (cached),IISAN (cached)", "IISAN (cached), IISAN (cached)", "", "paper",
                                 warmup=10, steps=50, flop_batches=0)
    assert chosen["labels"] == chosen["authors_way"] == ("IISAN (cached)",)
    assert benchmark.measuring_order(("FFT", "FFT"), ("FFT", "FFT")) == [("FFT", "default"), ("FFT", "authors")]


def test_the_benchmarks_step_and_label_messages_point_the_right_way():
    with pytest.raises(ConfigError) as refused:
        benchmark.selection("FFT", "none", "", "paper", warmup=10, steps=0, flop_batches=0)
    assert "--steps >= 1" in str(refused.value) and "--few-steps" not in str(refused.value)
    with pytest.raises(ConfigError) as refused:
        benchmark.selection("FFT", "none", "LoRA", "paper", warmup=10, steps=50, flop_batches=0)
    assert str(refused.value) == "--full-epoch: ['LoRA'] not among --methods ['FFT']; add them there or leave them out"
    with pytest.raises(ConfigError, match=r"--full-epoch: unknown method label\(s\) \['SASRec'\]"):
        benchmark.selection("FFT", "none", "SASRec", "paper", warmup=10, steps=50, flop_batches=0)


def test_a_method_outside_the_papers_table_is_measured_when_named_and_only_then(monkeypatch):
    """A method added to METHOD_TABLE has a row by its paper name (SASRec-ID, with no item encoder, none): named
    in --methods it is measured, listed after the table; 'all' stays the paper's table, whose TPME it is."""
    from iisan.efficiency.rows import TABLE_METHODS
    from iisan.methods import METHOD_TABLE, Method

    assert benchmark.BENCH_METHODS == TABLE_METHODS  # today: every method with an item encoder is in the table
    added = {**METHOD_TABLE, "ia3": Method("ia3", "IA3", "baseline", {"batch_size": 32})}
    assert benchmark.bench_methods(added) == {**TABLE_METHODS, "IA3": {"method": "ia3"}}
    monkeypatch.setitem(benchmark.BENCH_METHODS, "BitFit (again)", {"method": "bitfit"})  # as a new one would be
    chosen = benchmark.selection("BitFit (again),FFT", "none", "BitFit (again)", "paper", warmup=10, steps=50,
                                 flop_batches=0)
    assert chosen["labels"] == ("BitFit (again)", "FFT") and chosen["full_epoch"] == ("BitFit (again)",)
    assert benchmark.selection("all", "none", "", "paper", warmup=10, steps=50, flop_batches=0)["labels"] == \
        tuple(TABLE_METHODS)
    assert benchmark.table_position("BitFit (again)") == (len(TABLE_METHODS), 0)
    assert benchmark.method_config({}, "BitFit (again)").method == "bitfit"
    with pytest.raises(ConfigError, match=r"^--methods: unknown method label\(s\) \['SASRec-ID'\]"):
        benchmark.selection("SASRec-ID", "none", "", "paper", warmup=10, steps=50, flop_batches=0)


def test_gpu_check_shows_the_benchmarks_own_lines_on_the_console(tmp_path):
    """The console (what a device call brings back in its tail) keeps the benchmark's lines about the cache
    build, the evaluation, each row and what it wrote, and leaves the rest to bench.log (a stand-in python
    prints lines as the benchmark logs them)."""
    lines = ["12:00:00 INFO iisan.efficiency.benchmark: building the cache (timed)",
             "12:00:01 INFO iisan.data.cache_build: wrote /w/text.safetensors: 10 items",
             "12:00:02 INFO iisan.efficiency.benchmark:   -> 1.0 s to build the cache, peak 0.50 GiB",
             "12:00:03 INFO iisan.efficiency.benchmark: evaluating every user (timed)",
             "12:00:03 INFO iisan.efficiency.benchmark:   -> 0.1 s to rank every user (median), peak 0.40 GiB",
             "12:00:04 INFO iisan.efficiency.benchmark: paper | FFT | batch 32 | default (row 1 of 5)",
             "12:00:05 INFO iisan.efficiency.benchmark:   -> 17 s per epoch (median step x steps), 447 ms per step",
             "12:00:06 INFO iisan.efficiency.benchmark: wrote /out/efficiency/base-scientific-paper.json and its "
             "table /out/efficiency/base-scientific-paper.md"]
    fake = tmp_path / "python"
    fake.write_text("#!/usr/bin/env bash\n[ \"$1\" = scripts/benchmark_efficiency.py ] && printf '%s\\n' "
                    + " ".join(f"'{line}'" for line in lines) + "\nexit 0\n")
    fake.chmod(0o755)
    env = {**os.environ, "PYTHON": str(fake), "PART": "bench", "OUT": str(tmp_path / "out")}
    done = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh")], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    shown = [line for line in done.stdout.splitlines() if "iisan." in line]
    assert shown == [line for line in lines if "cache_build" not in line], done.stdout
    assert (tmp_path / "out" / "bench.log").read_text().splitlines() == lines


@pytest.mark.parametrize("device, given, dtype", [("cpu", None, "float32"), ("cuda", None, "bfloat16"),
                                                  ("cpu", "auto", "auto")])
def test_gpu_check_stores_the_cache_in_float32_on_a_cpu(device, given, dtype, tmp_path):
    """The script's own choice, read from the benchmark's command line (a stand-in python records it)."""
    fake = tmp_path / "python"
    fake.write_text(f'#!/usr/bin/env bash\nprintf "%s\\n" "$@" >> {tmp_path / "calls"}\n')
    fake.chmod(0o755)
    env = {**os.environ, "PYTHON": str(fake), "PART": "bench", "DEVICE": device, "OUT": str(tmp_path / "out")}
    env.pop("CACHE_DTYPE", None)
    if given:
        env["CACHE_DTYPE"] = given
    done = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh")], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    calls = (tmp_path / "calls").read_text().splitlines()
    assert calls[calls.index("--cache-dtype") + 1] == dtype


@pytest.mark.parametrize("exit_status", [0, 1])
def test_gpu_check_runs_the_versa_gpu_check_as_a_part_of_its_own(exit_status, tmp_path):
    """PART=versa runs scripts/versa_gpu_check.py on the device asked for, its report in $OUT and its work
    under $WORK, makes no benchmark data, and exits as the check did (a stand-in python records its calls)."""
    fake = tmp_path / "python"
    fake.write_text(f'#!/usr/bin/env bash\nif [ "$1" = scripts/versa_gpu_check.py ]; then printf "%s\\n" "$@" '
                    f'> {tmp_path / "calls"}; echo "versa_gpu_check.py: failed: x"; exit {exit_status}; fi\n')
    fake.chmod(0o755)
    out, work = tmp_path / "out", tmp_path / "work"
    env = {**os.environ, "PYTHON": str(fake), "PART": "versa", "DEVICE": "cpu", "OUT": str(out), "WORK": str(work)}
    done = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh")], env=env, capture_output=True, text=True)
    assert done.returncode == exit_status, done.stdout + done.stderr
    assert (tmp_path / "calls").read_text().splitlines() == [
        "scripts/versa_gpu_check.py", "--device", "cpu", "--out", str(out), "--work", str(work / "versa-gpu")]
    assert f"versa check (exit {exit_status}): " in (out / "gpu.txt").read_text()
    assert (out / "versa_gpu.log").read_text() == "versa_gpu_check.py: failed: x\n"
    assert not work.exists()  # no benchmark data made for this part
    bad = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh")], env={**env, "PART": "everything"},
                         capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stdout == "gpu_check: PART=everything; expected all, diagnose, bench, " \
        "tests or versa\n"


def test_a_measurement_is_one_line_to_read_not_the_json_dict():
    """Each row's line was the row's dict, 1,300 to 1,800 characters of 18-digit floats."""
    from iisan.efficiency.benchmark import measured_line

    row = {"epoch_seconds": 16.97334358704029, "seconds_per_step": 0.44666693650106026, "trainable_params": 768640,
           "memory": {"peak_rss_gib": 1.0903663635253906}, "step_seconds": {"median": 0.4466}}
    assert measured_line(row) == ("17 s per epoch (median step x steps), 447 ms per step, 768,640 trainable "
                                  "parameters, peak 1.09 GiB")
    gpu = {"evaluation_seconds": 0.0673, "memory": {"max_allocated_gib": 0.25, "peak_rss_gib": 3.0}}
    assert measured_line(gpu, "evaluation_seconds", "s to rank every user (median)") == \
        "0.0673 s to rank every user (median), peak 0.25 GiB"
    assert measured_line({"error": "CUDA out of memory"}) == "failed: CUDA out of memory"
    slow = {"epoch_seconds": 1234.5, "seconds_per_step": 1.14}  # a step of a second or more was 1.14e+03 ms
    assert measured_line(slow) == "1,234 s per epoch (median step x steps), 1,140 ms per step"


@pytest.mark.parametrize("count, shown", [(8_030_261_248, "8.03 B"), (999_600_000, "1 B"), (194_903_040, "195 M"),
                                          (4_970_000, "4.97 M"), (999_999, "1 M"), (797_184, "797 k"),
                                          (262_351, "262 k"), (12_345, "12.3 k"), (999, "999")])
def test_a_figure_labels_parameter_counts_in_millions_and_thousands_not_e_notation(count, shown):
    """The parameters panel read 1.95e+08 and 7.97e+05 beside a table's 194.90 M."""
    from iisan.efficiency.figures import millions

    assert millions(count) == shown


@pytest.mark.parametrize("value, shown", [(1234.5, "1,234"), (999.7, "1,000"), (43.52, "43.5"), (0.0039, "0.0039"),
                                          (0.0, "0")])
def test_a_time_keeps_three_digits_without_e_notation_or_rounding_to_zero(value, shown):
    """A 0.0039 s part of the cache build read 0.0 s, and a 1,140 ms step 1.14e+03 ms."""
    from iisan.efficiency.figures import plain

    assert plain(value) == shown
