"""What long work tells the user while it runs, and what the tables and figures show: evaluation's item
table, its ranking report and the image LMDB build say where they stand (a bar, or log lines where none
can be shown) without changing a number; slow work is measured in seconds per unit; the cache build names
its precision one way; a figure names no run that has no line in it; seconds per epoch below 1 s keep
their significant digits."""

from __future__ import annotations

import io
import logging
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import tqdm as tqdm_module

from iisan import console
from iisan.console import ProgressLog


def fake_clock(monkeypatch, step: float) -> None:
    """``ProgressLog``'s default clock advances ``step`` seconds at every reading."""
    now = [0.0]

    def monotonic() -> float:
        now[0] += step
        return now[0]

    monkeypatch.setattr(console, "time", SimpleNamespace(monotonic=monotonic))


def console_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "iisan.console"]


def test_an_evaluation_logs_where_it_stands_where_no_bar_can_be_shown(tiny_config, monkeypatch, caplog):
    """stderr is no terminal here: with progress on, the item table and the ranking log lines (40 s pass
    between the clock's readings); with it off, nothing. The numbers are the same either way."""
    from iisan.data.run_data import load_data
    from iisan.evaluate import evaluate_model
    from iisan.model.build import build_model

    cfg = tiny_config(method="id", progress=True, encode_batch_size=16, eval_batch_size=32)
    data = load_data(cfg)
    torch.manual_seed(0)
    model, _ = build_model(cfg, data, torch.device("cpu"))
    caplog.set_level(logging.INFO, logger="iisan.console")
    fake_clock(monkeypatch, 40.0)
    shown = evaluate_model(model, data, "valid", cfg, torch.device("cpu"))
    said = console_lines(caplog)
    items, users = data.num_items + 1, len(data.eval_split("valid")[1])
    assert said[0] == f"encoding items: 16 of {items} items ({1600 // items} %), 0.40 items/s, about " \
        f"{console.duration((items - 16) / 0.4)} left", said
    assert any(re.match(rf"ranking valid: 32 of {users} users \(\d+ %\)", line) for line in said), said
    caplog.clear()
    quiet = evaluate_model(model, data, "valid", cfg.replace(progress=False), torch.device("cpu"))
    assert not console_lines(caplog) and quiet == shown


def test_a_training_epoch_line_carries_its_mean_loss_so_far(tiny_config, monkeypatch, caplog):
    """Where no bar can be shown, each epoch line ends with the mean loss of the epoch's steps so far: the
    last line of an epoch, at its last step, says the epoch's loss as metrics.jsonl records it."""
    import json
    from pathlib import Path

    from iisan.train.trainer import train

    cfg = tiny_config(method="id", progress=True, epochs=1, batch_size=32)
    caplog.set_level(logging.INFO, logger="iisan.console")
    fake_clock(monkeypatch, 40.0)  # a line at every step
    results = train(cfg)
    said = [line for line in console_lines(caplog) if line.startswith("epoch 0:")]
    n = results["epochs"][0]["steps"]
    assert len(said) == n and all(re.fullmatch(r"epoch 0: \d+ of \d+ steps .*, loss \d+\.\d{4}", s) for s in said)
    record = json.loads((Path(results["run_dir"]) / "metrics.jsonl").read_text().splitlines()[0])
    assert said[-1].startswith(f"epoch 0: {n} of {n} steps") and said[-1].endswith(f", loss {record['loss']:.4f}")


def slow_checkpoint_writes(monkeypatch, now: list[float]) -> None:
    """Every checkpoint write moves the epoch's clock (``time.perf_counter``) and a fake clock's reading ``now[0]``
    (the progress bar's) on by 1000 s."""
    import time

    import iisan.train.resuming as resuming

    offset, perf_counter, write = [0.0], time.perf_counter, resuming.write_checkpoint

    def writing(*args):
        path = write(*args)
        offset[0] += 1000.0
        now[0] += 1000.0
        return path

    monkeypatch.setattr(time, "perf_counter", lambda: perf_counter() + offset[0])
    monkeypatch.setattr(resuming, "write_checkpoint", writing)


def test_checkpoint_every_leaves_its_writes_out_of_an_epoch_lines_speed(tiny_config, monkeypatch, caplog):
    """--checkpoint-every 3 on 10 steps of 50 s (a line at each), each write 1000 s: every line says 0.02 steps/s
    and the time the steps leave, as the epoch's training seconds leave the writes out (after the first write
    the lines said 6 min/step, about 45 min left)."""
    from iisan.train.trainer import train

    now = [0.0]

    def monotonic() -> float:
        now[0] += 50.0
        return now[0]

    monkeypatch.setattr(console, "time", SimpleNamespace(monotonic=monotonic))
    slow_checkpoint_writes(monkeypatch, now)
    caplog.set_level(logging.INFO, logger="iisan.console")
    results = train(tiny_config(method="id", progress=True, epochs=1, checkpoint_every=3))
    said = [line for line in console_lines(caplog) if line.startswith("epoch 0:")]
    assert now[0] >= 3000 and results["epochs"][0]["steps"] == len(said) == 10, said
    assert said[2].startswith("epoch 0: 3 of 10 steps (30 %), 0.02 steps/s, about 6 min left, loss "), said
    assert all(", 0.02 steps/s, " in line for line in said) and ", 10 steps in 8 min, loss " in said[-1], said


def test_checkpoint_every_leaves_its_writes_out_of_an_epoch_bars_speed(tiny_config, monkeypatch):
    """The same on a terminal, steps of about 0.5 s: tqdm's time taken and rate (after each write, 16 min more and
    about 460 s/step, 50 min for the epoch)."""
    import tqdm.std as tqdm_std

    from iisan.train.trainer import train

    made, tqdm, now = [], tqdm_module.tqdm, [0.0]

    def on_a_terminal(*args, **kwargs):
        made.append(tqdm(*args, **{**kwargs, "disable": False}, file=io.StringIO()))
        return made[-1]

    def clock() -> float:  # tqdm's
        now[0] += 0.25
        return now[0]

    monkeypatch.setattr(tqdm_module, "tqdm", on_a_terminal)
    monkeypatch.setattr(tqdm_std, "time", clock)
    slow_checkpoint_writes(monkeypatch, now)
    train(tiny_config(method="id", progress=True, epochs=1, checkpoint_every=3))
    epoch = next(bar for bar in made if bar.desc == "epoch 0")
    shown = re.findall(r"\| (\d+)/10 \[(\d\d):(\d\d)<[^,]*, +([\d.?]+)(s/step|step/s)\]", epoch.fp.getvalue())
    assert now[0] >= 3000 and [int(n) for n, *_ in shown] == sorted(int(n) for n, *_ in shown) and len(shown) >= 10
    assert all(minutes == "00" and (per == "step/s" or float(rate) < 2) for _, minutes, _, rate, per in shown), shown


def test_a_pause_leaves_out_its_own_seconds_not_the_units_before_it(monkeypatch):
    """Steps of 10 s, a 1000 s pause after the second: the bar took 40 s at 0.1 steps/s. tqdm's ``unpause`` restarts
    the clock from the last print, which came before the second step: it would say 30 s, with that step in no time."""
    import tqdm.std as tqdm_std

    made, tqdm, now = [], tqdm_module.tqdm, [0.0]

    def on_a_terminal(*args, **kwargs):
        made.append(tqdm(*args, **{**kwargs, "disable": False}, file=io.StringIO()))
        return made[-1]

    monkeypatch.setattr(tqdm_module, "tqdm", on_a_terminal)
    monkeypatch.setattr(tqdm_std, "time", lambda: now[0])  # (tqdm's clock)
    steps = console.progress_bar(range(4), total=4, desc="epoch 0", unit="steps")
    for step in steps:
        now[0] += 10.0
        if step == 1:
            now[0] += 1000.0
            steps.pause(1000.0)
    assert made[0].format_dict["elapsed"] == 40.0 and made[0].format_dict["rate"] == pytest.approx(0.1)
    lines = ProgressLog("epoch 0", 4, unit="steps", clock=lambda: now[0])
    now[0] += 1020.0
    lines.advance(2)
    lines.pause(1000.0)
    assert lines.line(now[0]) == "epoch 0: 2 of 4 steps (50 %), 0.10 steps/s, about 20 s left"


def test_a_bar_shows_a_status_at_most_every_ten_seconds(monkeypatch):
    """On a terminal the status (the loss) is read after a step only once ten seconds have passed since the
    last reading (each reading of a GPU loss waits for the device), and counts the units done, resumed
    ones included."""
    made, tqdm, read = [], tqdm_module.tqdm, []  # (console imports it when a bar is made)

    def on_a_terminal(*args, **kwargs):
        made.append(tqdm(*args, **{**kwargs, "disable": False}, file=io.StringIO()))
        return made[-1]

    monkeypatch.setattr(tqdm_module, "tqdm", on_a_terminal)
    clock = iter([0.0, 4.0, 11.0, 15.0, 25.0, 26.0])  # the start, then after each of five steps

    def status(done):
        read.append(done)
        return f"loss {done}"

    steps = console.progress_bar(range(5), total=7, initial=2, desc="epoch 0", unit="steps", status=status,
                                 clock=lambda: next(clock))
    assert list(steps) == [0, 1, 2, 3, 4]
    assert read == [4, 6] and made[0].postfix == "loss 6" and made[0].disable  # closed at the end


ZERO_COLUMNS = """
import fcntl, os, pty, struct, sys, termios
pid, fd = pty.fork()
if pid == 0:  # stderr: a terminal that says it is 0 x 0, as `script -qc` from a batch job makes one
    fcntl.ioctl(2, termios.TIOCSWINSZ, struct.pack("HHHH", 0, 0, 0, 0))
    from iisan.console import progress_bar, setup_logging
    setup_logging()
    now = [0.0]
    def clock():
        now[0] += 11.0
        return now[0]
    for _ in progress_bar(range(20), total=20, desc="epoch 0", unit="steps", clock=clock):
        pass
    os._exit(0)
out = b""
while True:
    try:
        chunk = os.read(fd, 4096)
    except OSError:  # the child has gone
        break
    if not chunk:
        break
    out += chunk
os.waitpid(pid, 0)
sys.stdout.write(out.decode())
"""


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="a pseudo-terminal needs fork")
def test_a_terminal_0_columns_wide_gets_log_lines_in_place_of_a_bar():
    """tqdm, given a terminal, draws a bar as wide as it says it is: at 0 columns nothing, and as stderr was a
    terminal no log lines took the bar's place: a run under `script -qc` said nothing for a whole epoch."""
    import subprocess
    import sys

    from ._scripts import ROOT

    done = subprocess.run([sys.executable, "-c", ZERO_COLUMNS], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert "INFO iisan.console: epoch 0: 3 of 20 steps (15 %), 0.09 steps/s, about 3 min left" in done.stdout


def test_slow_work_is_measured_in_seconds_per_unit():
    """Below 0.01 units a second the rate reads as time per unit, not '0.00 steps/s'; above, as before."""
    slow = ProgressLog("epoch 3", 400, 100, unit="steps", clock=lambda: 0.0)
    slow.advance(2)
    assert slow.line(500.0) == "epoch 3: 102 of 400 steps (25 %), 4 min/step, about 20.7 h left"
    assert slow.line(250.0) == "epoch 3: 102 of 400 steps (25 %), 2 min/step, about 10.3 h left"
    assert slow.line(200.0) == "epoch 3: 102 of 400 steps (25 %), 0.01 steps/s, about 8.3 h left"
    done = ProgressLog("cache (text)", 2, unit="items", clock=lambda: 0.0)
    done.advance(2)
    assert done.line(600.0) == "cache (text): 2 of 2 items (100 %), 5 min/item, 2 items in 10 min"


def test_a_bar_shows_its_rate_per_one_unit(monkeypatch):
    """tqdm shows the unit only in a rate: '1.50s/step', not '1.50s/steps'; the log lines keep counting in
    'steps'."""
    made, tqdm = [], tqdm_module.tqdm

    def on_a_terminal(*args, **kwargs):
        made.append(tqdm(*args, **{**kwargs, "disable": False}, file=io.StringIO()))
        return made[-1]

    monkeypatch.setattr(tqdm_module, "tqdm", on_a_terminal)
    assert list(console.progress_bar(range(3), total=3, desc="epoch 2", unit="steps")) == [0, 1, 2]
    assert made[0].unit == "step" and tqdm.format_meter(1, 8, 1.5, unit=made[0].unit).endswith("1.50s/step]")
    # chunks: the bar moves by each chunk's size
    assert list(console.progress_bar([[1, 2], [3]], total=3, unit="items", size=len)) == [[1, 2], [3]]
    assert made[1].unit == "item" and made[1].n == 3


def test_the_cache_build_names_its_precision_one_way(tiny_config, caplog):
    """'caching ... (float32)' as the 'wrote ... (float32, 48.2 KiB)' lines after it, not 'torch.float32'; the size
    in the binary units of the space check's 'need about 2.8 GiB' (it said MB)."""
    from iisan.model.caching import build_cache_from_config

    caplog.set_level(logging.INFO, logger="iisan")
    build_cache_from_config(tiny_config(), dtype="float32")
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith(("caching", "wrote"))]
    assert len(said) == 3 and "torch." not in said[0], said
    assert re.fullmatch(r"caching \d+ items \(text, image\) with text: layers \[.*\] x 32 \(float32\), "
                        r"image: layers \[.*\] x 24 \(float32\)", said[0]), said[0]
    assert all(re.search(r"\(float32, [\d.,]+ (bytes|KiB|MiB)\)$", line) for line in said[1:]), said


def test_a_figure_names_no_run_without_an_epoch(tmp_path, monkeypatch):
    """A run that failed before its first epoch has no point to draw, so no entry in the legend either."""
    from matplotlib.figure import Figure

    from iisan.experiments.curves import draw_curves

    drawn, savefig = [], Figure.savefig  # keep the figure to look at
    monkeypatch.setattr(Figure, "savefig", lambda fig, *args, **kwargs: (drawn.append(fig), savefig(fig, *args,
                                                                                                      **kwargs)))
    curves = {"failed": {"epoch": [], "valid_hit@10": [], "loss": [], "best_epoch": None},
              "good": {"epoch": [0, 1], "valid_hit@10": [0.1, 0.2], "loss": [2.0, 1.5], "best_epoch": 1}}
    draw_curves(curves, tmp_path / "c.png")
    (fig,) = drawn
    hit_ax, loss_ax = fig.axes
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["good"]  # (the figure's, beside both panels)
    assert len(loss_ax.get_lines()) == 1 and [line.get_label() for line in hit_ax.get_lines()][0] == "good"


@pytest.mark.parametrize("value, shown", [(65.4, "65.4"), (7.3691, "7.4"), (0.96, "1.0"), (0.4, "0.40"),
                                          (0.0449, "0.045"), (0.00123, "0.0012"), (0.0, "0.0")])
def test_seconds_per_epoch_keep_two_significant_digits_below_a_second(value, shown):
    from iisan.experiments.report import _cell

    assert _cell(value, "train_s_per_epoch", False) == shown


@pytest.mark.parametrize("value, shown", [(7936, "7,936"), (11840.0, "11,840"), (262351, "262,351"), (18, "18")])
def test_a_trainable_parameter_column_writes_every_count_with_separators(value, shown):
    """7936 stood above 11,840 in one column: separators began at 10,000."""
    from iisan.experiments.report import _cell

    assert _cell(value, "trainable_params", False) == shown


def test_an_image_lmdb_build_logs_where_it_stands_where_no_bar_can_be_shown(tmp_path, monkeypatch, caplog):
    """build-lmdb in a batch job or a pipe: a line per 30 s instead of a bar (here 40 s pass between
    readings), nothing with progress off; the same store either way."""
    from PIL import Image

    from iisan.data.image_build import build_image_lmdb
    from iisan.data.images import ImageStore

    folder = tmp_path / "img"
    folder.mkdir()
    for n in range(3):
        Image.new("RGB", (8, 8), (n, 0, 0)).save(folder / f"i{n}.jpg")
    ids = ["i0", "i1", "i2"]
    caplog.set_level(logging.INFO, logger="iisan.console")
    fake_clock(monkeypatch, 40.0)
    build_image_lmdb(folder, tmp_path / "shown.lmdb", ids, size=8, progress=True)
    assert console_lines(caplog)[:2] == ["images: 1 of 3 images (33 %), 0.03 images/s, about 80 s left",
                                         "images: 2 of 3 images (66 %), 0.03 images/s, about 40 s left"], caplog.text
    caplog.clear()
    build_image_lmdb(folder, tmp_path / "quiet.lmdb", ids, size=8, progress=False)
    assert not console_lines(caplog)
    shown, quiet = ImageStore(tmp_path / "shown.lmdb").get(ids), ImageStore(tmp_path / "quiet.lmdb").get(ids)
    np.testing.assert_array_equal(shown[0], quiet[0])


def test_a_cpu_result_names_the_cpu_model(monkeypatch, tmp_path):
    """Two CPUs print other last digits of the same run: the device line names the model Linux reports, and
    leaves it out where there is none to read."""
    import builtins

    from iisan import devices

    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD  EPYC 7B13\nflags\t: fpu\n")
    real_open = builtins.open

    def opened(path, *args, **kwargs):
        return real_open(info if path == "/proc/cpuinfo" else path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", opened)
    assert devices.cpu_model() == "AMD EPYC 7B13"
    assert re.fullmatch(r"CPU \(\w+, AMD EPYC 7B13, \d+ cores, \d+ torch threads\)", devices.device_name("cpu"))
    info.unlink()
    assert devices.cpu_model() == "" and ", ," not in devices.device_name("cpu")


def test_the_device_line_counts_the_cores_a_job_was_given(monkeypatch):
    """Under SLURM or taskset a job runs on some of a node's cores: the line says how many of how many, and the
    image readers start no more threads than the job has cores."""
    from iisan import devices
    from iisan.data.batches import PixelSource

    monkeypatch.setattr(devices.os, "cpu_count", lambda: 128)
    monkeypatch.setattr(devices.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    assert devices.usable_cores() == 4
    assert ", 4 of 128 cores, " in devices.device_name("cpu")
    assert PixelSource(store=None, item_ids=[], threads=16).threads == 4
    monkeypatch.setattr(devices.os, "sched_getaffinity", lambda pid: set(range(128)), raising=False)
    assert ", 128 cores, " in devices.device_name("cpu")
    monkeypatch.delattr(devices.os, "sched_getaffinity")  # macOS: no affinity call, every core counts
    assert devices.usable_cores() == 128
