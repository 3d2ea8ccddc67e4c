"""The trainer end to end on tiny models: results, checkpoints, invariants, determinism."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from iisan.data.run_data import load_data
from iisan.model.build import build_model
from iisan.train.optim import make_optimizer, optimizer_groups
from iisan.train.step import make_train_step
from iisan.train.trainer import train
from iisan.train.weights import load_weights

from ._batches import first_epoch


@pytest.fixture()
def cached_cfg(tiny_config, tiny_cache):
    return tiny_config(cache_dir=tiny_cache)


def test_cached_training_writes_results_and_best_weights(cached_cfg):
    results = train(cached_cfg.replace(epochs=3))
    run = Path(results["run_dir"])
    saved = json.loads((run / "results.json").read_text())
    assert saved["method"] == "IISAN" and saved["feed"] == "cached"
    assert saved["config"] == cached_cfg.replace(epochs=3).to_dict()
    assert set(saved["test"]) == {f"{m}@{k}" for m in ("hit", "ndcg") for k in (5, 10, 20)}
    assert len(saved["epochs"]) == 3 and all(e["train_seconds"] > 0 for e in saved["epochs"])
    assert saved["versions"]["torch"] == torch.__version__ and "CPU" in saved["device"]
    assert saved["step"]["cache_dtypes"] == {"text": "float32", "image": "float32"}  # what cache_dtype auto became
    assert json.loads((run / "config.json").read_text())["batch_size"] == 16
    # best weights round-trip and reproduce the reported test metrics
    data = load_data(cached_cfg)
    model, _ = build_model(cached_cfg, data, torch.device("cpu"))
    load_weights(model, run / "best.safetensors")
    from iisan.evaluate import evaluate_model

    again = evaluate_model(model, data, "test", cached_cfg, torch.device("cpu"))
    assert again == pytest.approx(saved["test"], abs=1e-9)


def test_same_seed_gives_identical_metrics(cached_cfg):
    a = train(cached_cfg.replace(epochs=2, run_name="a"))
    b = train(cached_cfg.replace(epochs=2, run_name="b"))
    assert a["test"] == b["test"] and [e["loss"] for e in a["epochs"]] == [e["loss"] for e in b["epochs"]]


ONE_STEP_GRADIENTS = """
import hashlib, json, sys
import torch
from iisan.data.batches import CollateTrain, epoch_batches
from iisan.data.epochs import epoch_order
from iisan.data.run_data import load_data
from iisan.model.build import build_model
from iisan.config import Config
torch.set_num_threads(2)
cfg = Config(**json.loads(sys.argv[1]))
torch.manual_seed(0)
data = load_data(cfg)
model, _ = build_model(cfg, data, torch.device("cpu"))
model.train()
sequences = data.train_sequences()
model(next(iter(epoch_batches(epoch_order(len(sequences), 0, 0), 64, CollateTrain(sequences, "items"))))).backward()
digest = hashlib.sha256()
grads = [p.grad for p in model.parameters() if p.grad is not None]
for grad in grads:
    digest.update(grad.numpy().tobytes())
print(len(grads), digest.hexdigest())
"""


def test_gradients_are_bit_identical_across_processes_with_two_threads(cached_cfg):
    """The item embeddings' gather is the one backward where CPU threads could race (parallel atomic
    adds of repeated rows); separate processes must still agree to the bit."""
    procs = [subprocess.Popen([sys.executable, "-c", ONE_STEP_GRADIENTS, json.dumps(cached_cfg.to_dict())],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(3)]
    outs = [p.communicate() for p in procs]  # the three at once: two cores, and most of each is importing
    assert [p.returncode for p in procs] == [0, 0, 0], [err[-2000:] for _, err in outs]
    runs = {out for out, _ in outs}
    assert len(runs) == 1 and int(runs.pop().split()[0]) > 10  # one digest, of gradients there are


def test_live_feed_trains_only_the_san_and_user_encoder(tiny_config):
    cfg = tiny_config(feed="live")
    data = load_data(cfg)
    model, pixels = build_model(cfg, data, torch.device("cpu"))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert all(n.startswith("item_encoder.states.encoders.") for n in frozen)
    assert not any(n.startswith("item_encoder.states.") for n in trainable)
    step = make_train_step(model, make_optimizer(model, cfg, torch.device("cpu")), None, torch.device("cpu"))
    model.train()
    assert not model.item_encoder.states.encoders["text"].training  # frozen encoders stay in eval mode
    for i, batch in enumerate(first_epoch(data.train_sequences(), 0, pixels=pixels)):
        loss = step(batch)
        assert torch.isfinite(loss)
        if i == 2:
            break
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    changed = [n for n, p in model.named_parameters() if n in trainable and not torch.equal(p, trainable[n])]
    assert len(changed) == len(trainable)


@pytest.mark.parametrize("authors", [False, True])
def test_authors_text_dropout_makes_only_the_text_states_random_in_training(tiny_config, authors):
    """The tiny BERT has dropout 0.1: with the flag two training passes over the same items give other
    text states (as the authors' uncached runs did), the image states and evaluation stay fixed."""
    cfg = tiny_config(feed="live", text_encoder_dropout=authors)
    data = load_data(cfg)
    model, pixels = build_model(cfg, data, torch.device("cpu"))
    states = model.item_encoder.states
    items = next(iter(first_epoch(data.train_sequences(), 0, "slots", pixels))).items
    model.train()
    assert states.encoders["text"].training is authors and not states.encoders["image"].training
    torch.manual_seed(0)
    first, second = states(items), states(items)
    assert torch.equal(first["image"], second["image"])
    assert torch.equal(first["text"], second["text"]) is not authors
    model.eval()
    assert torch.equal(states(items)["text"], states(items)["text"])


def test_distinct_items_slots_and_all_slots_give_the_same_loss(cached_cfg):
    data = load_data(cached_cfg)
    model, _ = build_model(cached_cfg, data, torch.device("cpu"))
    model.eval()  # no dropout: the three batchings must agree exactly
    a, b, c = (next(iter(first_epoch(data.train_sequences(), 0, encoding)))
               for encoding in ("items", "slots", "all"))
    assert torch.equal(a.seq, b.seq) and torch.equal(a.seq, c.seq)
    assert len(a.items.ids) < len(b.items.ids) < len(c.items.ids)
    for batch in (b, c):
        torch.testing.assert_close(model.calculate_loss(a), model.calculate_loss(batch))


def test_slots_give_each_slot_with_an_item_its_own_row_and_padding_one():
    import numpy as np

    from iisan.data.batches import CollateTrain

    sequences = np.array([[0, 0, 5, 7, 5], [0, 7, 7, 3, 9]])
    batch = CollateTrain(sequences, "slots", None)([0, 1])
    assert batch.items.ids.tolist() == [0, 5, 7, 5, 7, 7, 3, 9]  # row 0: padding; one row per real slot
    assert batch.inverse.tolist() == [0, 0, 1, 2, 3, 0, 4, 5, 6, 7]
    assert (batch.items.ids[batch.inverse].view(2, 5) == torch.as_tensor(sequences)).all()
    with pytest.raises(ValueError, match="encoding must be one of items, slots, all, not 'some'"):
        CollateTrain(sequences, "some", None)


def test_learning_rate_groups_follow_the_authors(cached_cfg):
    model, _ = build_model(cached_cfg, load_data(cached_cfg), torch.device("cpu"))
    groups = {g["name"]: g for g in optimizer_groups(model, cached_cfg)}
    assert {k: g["lr"] for k, g in groups.items()} == {"recsys": 2e-4, "image_net": 1e-4, "text_encoder": 5e-5,
                                                     "adapter_image": 1e-4, "adapter_text": 1e-4}
    assert sum(len(g["params"]) for g in groups.values()) == len(list(model.parameters()))
    optimizer = make_optimizer(model, cached_cfg, torch.device("cpu"))  # Adam without weight decay, as theirs
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0] * len(groups)
    assert type(optimizer) is torch.optim.Adam


def test_time_per_epoch_leaves_the_first_out_where_there_are_more():
    from iisan.train.progress import EarlyStopping, Progress

    epochs = [{"train_seconds": 10.0, "eval_seconds": 1.0}, {"train_seconds": 2.0, "eval_seconds": 3.0},
              {"train_seconds": 4.0, "eval_seconds": 2.0}]
    timing = Progress(EarlyStopping(1), epochs=epochs).timing()
    assert timing == {"train_seconds_per_epoch": 3.0, "first_epoch_train_seconds": 10.0, "eval_seconds_per_epoch": 2.0}
    assert Progress(EarlyStopping(1), epochs=epochs[:1]).timing()["train_seconds_per_epoch"] == 10.0  # one: its own
    assert Progress(EarlyStopping(1)).timing()["train_seconds_per_epoch"] is None


def test_fused_adam_and_the_authors_loop_make_the_same_update_up_to_rounding(cached_cfg):
    """--no-fused-adam: torch's loop over the parameters, as the authors' code ran Adam. Fed the same
    gradients, three steps each way keep the same weights within float32 rounding, bias correction and
    moments included. (Two runs of their own would not: after a step apart by rounding, Adam's
    m / (sqrt(v) + eps) amplifies it wherever a gradient is near eps, by most of a step on some CPUs.)"""
    import copy

    data = load_data(cached_cfg)
    batches = list(first_epoch(data.train_sequences(), 0))[:3]
    torch.manual_seed(0)
    model, _ = build_model(cached_cfg.replace(fused_adam=True), data, torch.device("cpu"))
    twin = copy.deepcopy(model)
    fused = make_optimizer(model, cached_cfg.replace(fused_adam=True), torch.device("cpu"))
    loop = make_optimizer(twin, cached_cfg.replace(fused_adam=False), torch.device("cpu"))
    assert [(o.defaults["fused"], o.defaults["foreach"]) for o in (fused, loop)] == [(True, None), (False, False)]
    pairs = [(n, p, q) for (n, p), q in zip(model.named_parameters(), twin.parameters()) if p.requires_grad]
    start = {n: p.detach().clone() for n, p, _ in pairs}
    fused_step = fused.step

    def both(*args, **kwargs):  # the twin steps on this step's gradients, before they are cleared
        for _, p, q in pairs:
            q.grad = None if p.grad is None else p.grad.clone()
        loop.step()
        return fused_step(*args, **kwargs)

    fused.step = both
    step = make_train_step(model, fused, None, torch.device("cpu"))
    model.train()
    atol = 1e-3 * max(group["lr"] for group in fused.param_groups)  # a thousandth of a step
    for batch in batches:
        step(batch)
        for name, p, q in pairs:
            torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=atol, msg=name)
    assert all(not torch.equal(start[n], p) for n, p, _ in pairs if n.endswith("weight"))


def test_smoke_switch_shrinks_the_same_config(cached_cfg):
    from iisan.config import Config

    assert (Config(smoke=True).epochs, Config(smoke=True).max_steps_per_epoch) == (2, 5)
    assert Config(smoke=True, epochs=1, max_steps_per_epoch=3).to_dict() == {
        **Config(epochs=1, max_steps_per_epoch=3).to_dict(), "smoke": True}  # only ever shrinks
    results = train(cached_cfg.replace(smoke=True, run_name="", batch_size=4))
    assert [e["steps"] for e in results["epochs"]] == [5, 5]  # 160 users / 4 would be 40 steps
    data = Path(cached_cfg.users).parent.name
    assert re.fullmatch(rf"iisan-cached-{data}-smoke-[0-9a-f]{{8}}", Path(results["run_dir"]).name)
    assert set(results["test"]) == {f"{m}@{k}" for m in ("hit", "ndcg") for k in (5, 10, 20)}


def test_results_record_the_step_that_ran_when_a_cuda_graph_fails_to_capture(cached_cfg, monkeypatch, caplog):
    """A graphed step whose capture fails trains eagerly; results.json says so, not what was asked for.
    (On a CPU the capture fails at its first CUDA call, which is the failure path a GPU takes too.)"""
    import iisan.train.plan as plan

    monkeypatch.setattr(plan, "use_compile", lambda cfg, device: "cudagraph")
    with caplog.at_level("WARNING", logger="iisan.train.graphs"):
        results = train(cached_cfg.replace(epochs=1, run_name="graph-failed"))
    assert "CUDA graph capture failed" in caplog.text
    saved = json.loads((Path(results["run_dir"]) / "results.json").read_text())
    assert saved["step"]["compiled"] == "off (cudagraph capture failed)" == results["step"]["compiled"]


def test_a_finished_run_asked_for_under_another_compile_mode_is_reused_with_a_warning_saying_so(cached_cfg, caplog):
    """compile changes how a step runs, not the run (its folder, its resume), but inductor's random streams
    (dropout masks) are not eager's: the eager run's numbers come back for --compile inductor, said in a
    warning; auto, which comes to eager on a CPU, is the same mode and is reused as ever."""
    cfg = cached_cfg.replace(epochs=1, run_name="eager")
    first = train(cfg)
    caplog.clear()
    with caplog.at_level("INFO", logger="iisan.train.runfolder"):
        assert train(cfg.replace(compile="auto"))["test"] == first["test"]
        assert not [r for r in caplog.records if r.levelname == "WARNING"]
        assert train(cfg.replace(compile="inductor"))["test"] == first["test"]
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warned == [f"{first['run_dir']} finished before with this config; not training it again; it ran with "
                      "compile off, and this config's comes to inductor: its numbers are off's (random streams, item "
                      "encoding); another --run-name trains it with inductor"]


def test_a_finished_run_asked_for_where_amp_auto_comes_to_another_precision_is_reused_with_a_warning(cached_cfg,
                                                                                                     monkeypatch,
                                                                                                     caplog):
    """--amp auto is fp32 on a CPU and bf16 on a GPU, one config and one run folder: the CPU run's numbers came
    back on a GPU without a word (here the GPU's choice is stood in for)."""
    import torch

    import iisan.train.plan as plan

    cfg = cached_cfg.replace(epochs=1, run_name="cpu-fp32")
    first = train(cfg)
    monkeypatch.setattr(plan, "amp_dtype", lambda amp, device: torch.bfloat16)
    with caplog.at_level("INFO", logger="iisan.train.runfolder"):
        assert train(cfg)["test"] == first["test"]
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and r.name == "iisan.train.runfolder"]
    assert warned == [f"{first['run_dir']} finished before with this config; not training it again; it trained in "
                      "fp32, and this config's --amp auto comes to bfloat16 here: its numbers are fp32's; another "
                      "--run-name trains it in bfloat16"]


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated")  # torch's inductor, imported
def test_a_torch_compiled_run_says_before_its_first_step_that_compiling_takes_minutes(cached_cfg, monkeypatch,
                                                                                      caplog):
    """Inductor compiles at the first step and again at an epoch's smaller last batch, a minute or more each
    on a CPU: without a word, the run looked hung. (torch.compile made the identity here: the line is said
    before any compiling.)"""
    import iisan.train.step as step

    compiled = []
    monkeypatch.setattr(step.torch, "compile", lambda loss, **how: compiled.append(how) or loss)
    with caplog.at_level("INFO", logger="iisan.train.trainer"):
        results = train(cached_cfg.replace(epochs=1, compile="inductor", run_name="inductor"))
    assert compiled == [{"mode": "reduce-overhead", "dynamic": False}] and results["step"]["compiled"] == "inductor"
    lines = [r.getMessage() for r in caplog.records]
    said = lines.index("torch.compile compiles the step for each new batch shape (the first, an epoch's smaller last "
                       "batch): a minute or more each, once per run")
    assert lines[said - 1].startswith("run folder ") and lines[said + 1].startswith("epoch   0 |")


def test_early_stopping_stops_after_patience_epochs_without_a_better_score():
    from iisan.train.progress import EarlyStopping

    stopper = EarlyStopping(patience=2)
    improved = [stopper.update(e, s) for e, s in enumerate([0.1, 0.2, 0.2, 0.15])]
    assert improved == [True, True, False, False]  # a tie is not an improvement
    assert (stopper.best, stopper.best_epoch, stopper.bad_epochs, stopper.should_stop) == (0.2, 1, 2, False)
    assert not stopper.update(4, 0.19) and stopper.should_stop  # the third epoch without a better score
    again = EarlyStopping(patience=2)
    again.load(stopper.state())
    assert again == stopper and EarlyStopping(2).state() == {"best": None, "best_epoch": -1, "bad_epochs": 0,
                                                             "metric": "hit@10"}


def test_a_run_stops_early_and_a_rerun_trains_no_further(cached_cfg, monkeypatch):
    """patience 0: the first epoch without a better valid HR@10 ends the run, here epoch 1 of up to 6."""
    import iisan.train.trainer as trainer

    real, calls = trainer.evaluate_model, []

    def worse_each_epoch(model, data, split, *args, **kwargs):
        metrics = real(model, data, split, *args, **kwargs)
        if split == "valid":
            calls.append(1)
            metrics["hit@10"] = 1.0 / len(calls)
        return metrics

    monkeypatch.setattr(trainer, "evaluate_model", worse_each_epoch)
    cfg = cached_cfg.replace(epochs=6, patience=0, run_name="early")
    results = train(cfg)
    assert [e["epoch"] for e in results["epochs"]] == [0, 1] and results["best_epoch"] == 0
    assert "early stop: valid hit@10 has not improved for 1 epoch(s)" in \
        (Path(results["run_dir"]) / "train.log").read_text()
    assert results["ended"] == "early stopping"  # results.json says why a finished run ended, and train.log too:
    log = (Path(results["run_dir"]) / "train.log").read_text().splitlines()
    assert re.search(r"INFO iisan\.train\.trainer: finished \(early stopping\) after 2 epoch\(s\); this attempt "
                     r"took \d+ s$", log[-2]) and "best epoch 0 |" in log[-1]
    again = train(cfg.replace(epochs=8))  # a longer budget: the run had stopped, so nothing trains
    assert len(calls) == 2 and [e["epoch"] for e in again["epochs"]] == [0, 1] and again["ended"] == "early stopping"
    assert train(cached_cfg.replace(epochs=1, run_name="one"))["ended"] == "last epoch"


def test_a_full_disk_while_writing_metrics_is_one_error_and_no_half_line(cached_cfg, monkeypatch):
    """metrics.jsonl is rewritten whole through a temporary file: the disk filling up in epoch 1 keeps
    epoch 0's whole line, the run fails with one error naming the file, and the folder lock is released."""
    import errno
    import os

    from iisan.errors import OutputError
    from iisan.train import records

    calls, real_fsync = [], os.fsync

    def fsync(fd):
        if "metrics.jsonl" in os.readlink(f"/proc/self/fd/{fd}"):
            calls.append(fd)
            if len(calls) == 3:  # the fresh run's empty file, epoch 0, then epoch 1
                raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(records.os, "fsync", fsync)
    cfg = cached_cfg.replace(epochs=3, run_name="full-disk")
    with pytest.raises(OutputError, match=r"^could not write .*full-disk/metrics.jsonl: .*No space left on device"):
        train(cfg)
    run = Path(cfg.out_dir) / "full-disk"
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [0]
    assert json.loads((run / "results.json").read_text())["status"] == "failed"
    assert not (run / ".lock").exists() and not list(run.glob(".*tmp"))


def test_a_batch_as_tensors_is_what_the_eager_and_graphed_steps_both_take(cached_cfg):
    """``TrainBatch.tensors`` / ``from_tensors``: the one order of a step's inputs (TrainStep.loss, GraphedStep)."""
    from iisan.data.batches import TrainBatch
    from iisan.train.step import TrainStep

    data = load_data(cached_cfg)
    batch = next(iter(first_epoch(data.train_sequences(), 0)))
    again = TrainBatch.from_tensors(*batch.tensors())
    assert again.seq is batch.seq and again.inverse is batch.inverse and again.items == batch.items
    assert TrainBatch.from_tensors(*batch.tensors(real=False)).items.real is None
    torch.manual_seed(0)
    model, _ = build_model(cached_cfg, data, torch.device("cpu"))
    model.eval()
    step = TrainStep(model, make_optimizer(model, cached_cfg, torch.device("cpu")), None, torch.device("cpu"))
    torch.testing.assert_close(step.loss(*batch.tensors(real=False)), model.calculate_loss(batch), rtol=0, atol=0)


def test_a_non_finite_loss_report_is_built_from_what_it_is_given(tmp_path):
    from iisan.train.nonfinite import nonfinite_loss

    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD([{"params": model.parameters(), "name": "recsys"}], lr=0.0)
    asked = []

    def states(step):
        asked.append(step)
        return ["2 item(s) of that batch have non-finite text states"]

    assert nonfinite_loss(torch.ones(3), 0, 10, 3, optimizer, model, states, tmp_path, lambda: "x") is None
    report = nonfinite_loss(torch.tensor([1.0, float("nan"), 1.0]), 2, 10, 3, optimizer, model, states, tmp_path,
                            lambda: "some/epoch-0001")
    assert asked == [1]
    assert report == ("non-finite loss at step 11 (epoch 2, steps 10..12); the learning rate of group 'recsys' is "
                      "0.0; 2 item(s) of that batch have non-finite text states; last good checkpoint: "
                      "some/epoch-0001; best weights: none yet")


def test_an_overflow_suggests_fp32_only_to_a_run_that_computes_in_a_half_type(tmp_path):
    """'or try --amp none' was said to CPU runs, which compute in fp32 whatever --amp says."""
    from iisan.train.nonfinite import nonfinite_loss, nonfinite_scores

    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD([{"params": model.parameters(), "name": "recsys"}], lr=1e-3)
    loss = torch.tensor([float("inf")])
    reports = [nonfinite_loss(loss, 0, 0, 1, optimizer, model, lambda step: [], tmp_path, lambda: "none yet", amp)
               for amp in (None, torch.float16)]
    assert "the loss itself overflowed (lower the learning rates); last good" in reports[0]
    assert "overflowed (lower the learning rates, or try --amp none (this run computes in float16))" in reports[1]
    scores = [nonfinite_scores({"hit@10": math.nan}, 0, model, tmp_path, lambda: "none yet", amp)
              for amp in (None, torch.bfloat16)]
    assert "the model's scores overflowed (lower the learning rates); last good" in scores[0]
    assert "(lower the learning rates, or try --amp none (this run computes in bfloat16))" in scores[1]


@pytest.mark.parametrize("users, batch, start", [(7, 3, 0), (6, 3, 0), (7, 3, 1), (7, 3, 3), (2, 5, 0)])
def test_an_epochs_batches_count_what_they_yield(users, batch, start):
    """len() of an epoch's batches (what a prefetching loader reports) is the batches left: the last one
    short, a resumed epoch's done ones not counted."""
    import numpy as np

    from iisan.data.batches import TrainBatches

    batches = TrainBatches(np.arange(users), batch, collate=lambda u: u, start_step=start)
    assert len(batches) == len(batches.user_batches()) == len(list(batches)) == max(0, -(-users // batch) - start)


@pytest.mark.parametrize("feed", ["cached", "live"])
def test_a_finished_run_leaves_nothing_alive_for_the_garbage_collector(tiny_config, tiny_cache, monkeypatch, feed):
    """A sweep runs its points in one process: the run and its checkpoints pointed at each other, and a step at
    its own bound method, so every finished point's model, optimizer and cache tables stayed in memory until
    Python's next full collection (12 dead runs at once in a 26-point live sweep, +25 MB a point)."""
    import gc
    import weakref

    from iisan.train import trainer

    alive = {}
    original = trainer.Run.run

    def run(self):
        alive.update(run=weakref.ref(self), model=weakref.ref(self.model), step=weakref.ref(self.step),
                     optimizer=weakref.ref(self.optimizer))
        return original(self)

    monkeypatch.setattr(trainer.Run, "run", run)
    gc.collect()
    gc.disable()
    try:
        train(tiny_config(feed=feed, epochs=1, max_steps_per_epoch=2, cache_dir=tiny_cache,
                          num_workers=2 if feed == "live" else 0))
        assert {name: ref() is None for name, ref in alive.items()} == dict.fromkeys(alive, True)
    finally:
        gc.enable()


def test_training_never_sees_a_test_target(cached_cfg, tmp_path):
    """The paper's protocol: a user's last item is the test target and nothing else. Every user's test item
    moved to the next user (the same items, so the same catalogue) trains to the same losses, validation
    and weights, bit for bit; only the test metrics move."""
    from safetensors.torch import load_file

    rows = [line.split("\t") for line in Path(cached_cfg.users).read_text().splitlines()]
    sequences = [items.split() for _, items in rows]
    moved = [s[:-1] + [sequences[i - 1][-1]] for i, s in enumerate(sequences)]
    assert sum(a[-1] != b[-1] for a, b in zip(sequences, moved)) > len(rows) // 2  # most targets changed
    users = tmp_path / "moved_test_targets.tsv"
    users.write_text("".join(f"{user}\t{' '.join(s)}\n" for (user, _), s in zip(rows, moved)))
    runs = [train(cached_cfg.replace(epochs=3, run_name=name, users=str(path)))
            for name, path in (("real", cached_cfg.users), ("moved", users))]
    real, other = ([(e["loss"], e["valid"]) for e in r["epochs"]] for r in runs)
    assert real == other and runs[0]["best_epoch"] == runs[1]["best_epoch"]
    weights = [load_file(Path(r["run_dir"]) / "best.safetensors") for r in runs]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert runs[0]["test"] != runs[1]["test"]  # the test targets were read: they are what moved


def test_the_least_gate_temperature_taken_still_trains_the_gates(cached_cfg):
    """``bounds.SMALLEST_GATE_TEMPERATURE``: at 1e-30 (the old floor) Adam's squared gradient of the gates
    overflowed and not one gate moved from 0, without a word; at the floor taken now every gate trains."""
    from safetensors.torch import load_file

    from iisan.bounds import SMALLEST_GATE_TEMPERATURE

    results = train(cached_cfg.replace(gate_temperature=SMALLEST_GATE_TEMPERATURE, epochs=1, max_steps_per_epoch=3))
    gates = {k: v for k, v in load_file(Path(results["run_dir"]) / "best.safetensors").items() if "gate_logits" in k}
    assert gates and all(bool((v != 0).all()) and bool(v.isfinite().all()) for v in gates.values()), gates


def test_train_computes_as_a_command_does_whatever_its_caller_set_and_puts_the_callers_state_back(cached_cfg):
    """Under a notebook's ``torch.no_grad()``, ``inference_mode()`` or ``set_default_dtype(float64)`` a run
    failed with a message of torch's; and the caller's random streams were left seeded, so what it drew next
    depended on whether the run folder already held the run. Now every case gives the plain run's numbers,
    and the caller's streams, grad mode and default dtype are as they were."""
    import random

    import numpy as np

    cfg = cached_cfg.replace(epochs=1, max_steps_per_epoch=3)
    plain = train(cfg.replace(run_name="plain"))
    for name, context in (("no-grad", torch.no_grad), ("inference", torch.inference_mode),
                          ("autocast", lambda: torch.autocast("cpu", dtype=torch.bfloat16))):
        with context():
            assert train(cfg.replace(run_name=name))["test"] == plain["test"]
            assert torch.is_grad_enabled() == (name == "autocast")
    torch.set_default_dtype(torch.float64)
    try:
        assert train(cfg.replace(run_name="float64"))["test"] == plain["test"]
        assert torch.get_default_dtype() == torch.float64
    finally:
        torch.set_default_dtype(torch.float32)
    for _ in ("trained", "found finished"):  # either way the caller's streams go on as if untouched
        random.seed(5), np.random.seed(5), torch.manual_seed(5)
        expected = random.random(), np.random.rand(), torch.rand(1).item()
        random.seed(5), np.random.seed(5), torch.manual_seed(5)
        assert train(cfg.replace(run_name="streams"))["test"] == plain["test"]
        assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_a_run_whose_best_epoch_another_metric_chose_is_neither_reused_nor_resumed(cached_cfg, monkeypatch):
    """With ``metric_names.SELECTED_BY`` changed, a resumed run compared the new metric's values with the best
    value of the old one (an HR@10 of 0.14 against NDCGs near 0.07), and a finished run was returned as it was."""
    from iisan.errors import TrainingError
    from iisan.train import progress, runfolder

    cfg = cached_cfg.replace(epochs=2, max_steps_per_epoch=3, run_name="chosen")
    results = train(cfg)
    assert results["selected_by"] == "valid hit@10"
    state = json.loads(next((Path(results["run_dir"]) / "checkpoints").glob("epoch-0001*/state.json")).read_text())
    assert state["early_stopping"]["metric"] == "hit@10"
    for module in (progress, runfolder):
        monkeypatch.setattr(module, "SELECTED_BY", "ndcg@10")
    for epochs in (2, 3):  # finished as it is, and asked for more
        with pytest.raises(TrainingError, match=r"epoch-0001 chose its best epoch by valid hit@10 and this code "
                                                r"chooses by valid ndcg@10 \(iisan/metric_names.py\): resume it where "
                                                r"SELECTED_BY is hit@10, or give another --run-name to train again$"):
            train(cfg.replace(epochs=epochs))
