"""Data parallelism: sharding, chunk blocks, and two CPU processes under torchrun (gloo)."""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import BatchSampler, RandomSampler

from iisan.cli.main import main
from iisan.data.batches import CollateTrain, epoch_batches
from iisan.data.epochs import epoch_order, shard_users, steps_per_epoch
from iisan.data.run_data import load_data
from iisan.distributed import Dist, chunk_block
from iisan.evaluate import evaluate_model, evaluate_ranks
from iisan.model.build import build_model
from iisan.model.caching import build_cache_from_config
from iisan.train.optim import make_optimizer
from iisan.train.weights import load_weights

from ._batches import first_epoch

ROOT = Path(__file__).resolve().parent.parent


def test_single_process_batches_are_those_of_random_and_batch_samplers():
    collate = CollateTrain(np.zeros((103, 3), dtype=np.int64), "items")
    for epoch in range(3):
        generator = torch.Generator().manual_seed(7 * 1000 + epoch)
        expected = list(BatchSampler(RandomSampler(range(103), generator=generator), 16, drop_last=False))
        order = epoch_order(103, 7, epoch)
        assert [b.tolist() for b in epoch_batches(order, 16, collate).user_batches()] == expected
        resumed = epoch_batches(order, 16, collate, start_step=4)
        assert [b.tolist() for b in resumed.user_batches()] == expected[4:] and len(resumed) == len(expected) - 4


def test_no_two_seed_and_epoch_pairs_share_an_order():
    """Seed s at epoch 1000 drew seed s + 1's first order (seed * 1000 + epoch); beyond epoch 999 the pair
    makes its seed another way, and every earlier epoch keeps its order."""
    from iisan.data.epochs import order_seed

    assert epoch_order(103, 1, 1000).tolist() != epoch_order(103, 2, 0).tolist()
    assert order_seed(1, 999) == 1999 and order_seed(1, 1000) not in range(1000 * 2**32)
    assert len({order_seed(s, e) for s in (1, 2) for e in (1000, 1001)}) == 4


def test_the_authors_user_order_is_their_distributed_samplers_whatever_the_seed():
    """--user-order authors: one process's users in the order of the authors' DistributedSampler (seed 0,
    set_epoch(epoch + 1)), the same for every run seed; seeded orders differ between seeds."""
    from torch.utils.data import DistributedSampler

    from iisan.config import Config

    authors = [Config(seed=seed, user_order="authors").order_seed for seed in (1, 2)]
    assert authors == [None, None] and Config(seed=3).order_seed == 3
    for epoch in range(3):
        sampler = DistributedSampler(range(103), num_replicas=1, rank=0, shuffle=True)
        sampler.set_epoch(epoch + 1)
        expected = [list(b) for b in BatchSampler(list(sampler), 16, drop_last=False)]
        assert [b.tolist() for b in np.array_split(epoch_order(103, None, epoch), range(16, 103, 16))] == expected
        assert epoch_order(103, 1, epoch).tolist() != epoch_order(103, 2, epoch).tolist()


def test_the_authors_user_order_under_torchrun_is_their_padded_distributed_sampler():
    """--user-order authors on several processes: each rank's users are those of the authors'
    DistributedSampler on that rank (drop_last=False: the permutation filled up by repeating its first
    users), and its steps are as many as that sampler's batches."""
    from torch.utils.data import DistributedSampler

    collate = CollateTrain(np.zeros((103, 3), dtype=np.int64), "items")
    for epoch in range(2):
        for rank in range(4):
            sampler = DistributedSampler(range(103), num_replicas=4, rank=rank, shuffle=True)
            sampler.set_epoch(epoch + 1)
            order = epoch_order(103, None, epoch, rank=rank, world_size=4)
            assert order.tolist() == list(sampler)  # 26 users each: 104, the first of the permutation twice
            assert len(epoch_batches(order, 8, collate)) == steps_per_epoch(103, 8, 4, padded=True) == 4
    assert steps_per_epoch(103, 8, 4) == 4 and steps_per_epoch(100, 25, 4, padded=True) == 1
    assert steps_per_epoch(101, 25, 4) == 1 and steps_per_epoch(101, 25, 4, padded=True) == 2


def test_ranks_train_on_disjoint_equal_shards_of_one_permutation():
    order = np.random.default_rng(0).permutation(103)
    shards = [shard_users(order, r, 4) for r in range(4)]
    assert {len(s) for s in shards} == {25}
    together = np.concatenate(shards)
    assert len(set(together)) == 100 and set(together) <= set(order[:100])
    collate = CollateTrain(np.zeros((103, 3), dtype=np.int64), "items")
    steps = {len(epoch_batches(epoch_order(103, 1, 0, rank=r, world_size=4), 8, collate)) for r in range(4)}
    assert steps == {math.ceil(25 / 8)}  # DDP needs the same number of steps on every rank


@pytest.mark.parametrize("rows,chunk,world", [(160, 64, 2), (12076, 1024, 8), (5, 64, 3), (100, 10, 3)])
def test_chunk_blocks_cover_every_row_once_in_whole_chunks(rows, chunk, world):
    blocks = [chunk_block(rows, chunk, Dist(r, world, backend="gloo")) for r in range(world)]
    covered = np.concatenate([np.arange(lo, hi) for lo, hi in blocks])
    np.testing.assert_array_equal(covered, np.arange(rows))  # every row once, in rank order
    assert all(lo % chunk == 0 for lo, hi in blocks if hi > lo)


@pytest.mark.parametrize("modality", ["intra_inter", "intra", "inter"])
def test_iisan_uses_every_trainable_parameter_in_a_step(tiny_config, modality):
    """Why DDP can run IISAN with find_unused_parameters=False."""
    cfg = tiny_config(modality=modality)
    build_cache_from_config(cfg, dtype="float32")
    data = load_data(cfg)
    model, _ = build_model(cfg, data, torch.device("cpu"))
    make_optimizer(model, cfg, torch.device("cpu"))
    batch = next(iter(first_epoch(data.train_sequences(), 0)))
    model.train()
    model(batch).backward()
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    unused = [n for n in trained if dict(model.named_parameters())[n].grad is None]
    assert len(trained) > 10 and not unused


def test_a_numbered_gpu_under_torchrun_is_one_line_before_any_process_group(monkeypatch):
    from iisan.distributed import setup
    from iisan.errors import ConfigError

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(ConfigError, match=r"^device=cuda:1 under torchrun: use --device cuda \(each process takes "
                                          r"the GPU of its LOCAL_RANK\) or limit GPUs with CUDA_VISIBLE_DEVICES$"):
        setup("cuda:1")
    assert not torch.distributed.is_initialized()


@pytest.mark.parametrize("env, said", [
    ({"RANK": "0", "WORLD_SIZE": "1"}, "RANK and WORLD_SIZE are set but LOCAL_RANK is not: set it too (LOCAL_RANK of "
                                       "this process) or launch with torchrun, which sets all three"),
    ({"RANK": "x", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}, "RANK='x' in the environment: expected a whole number of at "
                                                          "least 0 (torchrun sets RANK, WORLD_SIZE and LOCAL_RANK)"),
    ({"RANK": "0", "WORLD_SIZE": "0", "LOCAL_RANK": "0"},
     "WORLD_SIZE='0' in the environment: expected a whole number of at least 1 (torchrun sets RANK, WORLD_SIZE and "
     "LOCAL_RANK)"),
    ({"RANK": "2", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}, "RANK=2 in the environment is not below WORLD_SIZE=2 (ranks "
                                                          "count from 0)"),
])
def test_a_hand_set_launch_environment_is_one_line_before_any_process_group(tiny_config, monkeypatch, capsys, env,
                                                                             said):
    """A launcher's variables set by hand: KeyError 'LOCAL_RANK' or int('x') came through as tracebacks."""
    cfg = tiny_config(method="id", epochs=1)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("LOCAL_RANK", raising=False) if "LOCAL_RANK" not in env else None
    with pytest.raises(SystemExit) as stopped:
        main(["train", "--method", "id", "--users", cfg.users, "--items", cfg.items, "--epochs", "1", "--out-dir",
              cfg.out_dir, "--device", "cpu", "--no-progress"])
    assert stopped.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"iisan: error: {said}"
    assert not torch.distributed.is_initialized()


def test_a_launch_variable_with_a_blank_strip_removes_is_read_as_with_spaces(monkeypatch):
    """'1\\x1f' passed the digits check (on the stripped text) and then int() of the whole: a traceback."""
    from iisan.distributed import launch_env

    monkeypatch.setenv("RANK", "1\x1f")
    monkeypatch.setenv("WORLD_SIZE", " 2\x1c")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert launch_env(local=True) == {"RANK": 1, "WORLD_SIZE": 2, "LOCAL_RANK": 0}


def test_run_names_under_torchrun_carry_the_process_count(tiny_config, monkeypatch):
    """Each process has its own batch of users: 2 processes compute another run than 1 (not "finished
    before with this config"); a run name given by hand resumes across counts."""
    from iisan.train.runnames import default_run_name, run_dir

    cfg = tiny_config(run_name="")
    single = default_run_name(cfg)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert default_run_name(cfg) == single.rsplit("-", 1)[0] + "-2proc-" + single.rsplit("-", 1)[1]
    assert run_dir(cfg.replace(run_name="mine")).name == "mine"


def launch(cfg, nproc: int, tmp_path: Path) -> tuple[dict, str]:
    """tests/_torchrun_worker.py under torchrun: a 3-epoch run (with --checkpoint-every 2), a 2-epoch run
    resumed to 3 (without), and the distributed evaluation of the first run's best weights."""
    config_file, out_file = tmp_path / "config.json", tmp_path / "out.json"
    config_file.write_text(json.dumps(cfg.to_dict()))
    proc = torchrun(ROOT / "tests" / "_torchrun_worker.py", [str(config_file), str(out_file)], nproc, tmp_path,
                    timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out_file.read_text()), proc.stderr


def check_launch(cfg, out: dict, log: str, nproc: int, device: torch.device) -> None:
    full, resumed = out["full"], out["resumed"]
    # training completed, data-parallel, and only rank 0 logged: 3 + 2 + 1 epoch lines, once each
    assert full["world_size"] == nproc and len(full["epochs"]) == 3
    assert full["epochs"][0]["steps"] > 2  # so its --checkpoint-every 2 wrote within each epoch, on every rank
    assert len(re.findall(r"epoch +\d+ \| loss", log)) == 6
    assert sorted(p.name for p in Path(cfg.out_dir).iterdir()) == ["full", "part"]
    # resume under torchrun continues exactly where it stopped
    assert resumed["resumed_from"] == ["epoch-0001"]
    assert (resumed["valid"], resumed["test"], [e["loss"] for e in resumed["epochs"]]) == \
        (full["valid"], full["test"], [e["loss"] for e in full["epochs"]])

    # evaluation: every user once, and exactly the single-process numbers for the same weights
    data = load_data(cfg)
    assert out["users"] == sum(out["per_rank"]) == data.num_users and min(out["per_rank"]) > 0
    model, _ = build_model(cfg, data, device)
    load_weights(model, Path(full["run_dir"]) / "best.safetensors")
    for split in ("valid", "test"):
        single = evaluate_ranks(model, data, split, cfg, device)
        assert len(out["ranks"][split]) == data.num_users
        assert out["ranks"][split] == single.tolist()
    assert evaluate_model(model, data, "test", cfg, device) == full["test"]


@pytest.mark.slow
def test_two_processes_under_torchrun(tiny_config, tmp_path):
    cfg = tiny_config(epochs=3, patience=20, lr=3e-3, lr_text=3e-3, lr_image=3e-3, lr_adapter_text=3e-3,
                      lr_adapter_image=3e-3)
    build_cache_from_config(cfg, dtype="float32")
    out, log = launch(cfg, 2, tmp_path)
    assert out["backend"] == "gloo"
    check_launch(cfg, out, log, 2, torch.device("cpu"))


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["own", "own-fail"])
def test_a_run_that_makes_its_process_group_lets_go_of_its_ddp_wrapper_before_leaving_it(tiny_config, tiny_cache,
                                                                                        tmp_path, mode):
    """As ``iisan train`` under torchrun: train() makes the group and leaves it, after a finished run and after
    a failed step. A DDP wrapper still alive then destroyed the group later, in its destructor, holding the GIL
    while gloo's threads waited for it: about one launch in ten never returned, one rank idle at its end."""
    cfg = tiny_config(cache_dir=tiny_cache, epochs=1, max_steps_per_epoch=2, run_name="own")
    config_file, out_file = tmp_path / "config.json", tmp_path / "alive.json"
    config_file.write_text(json.dumps(cfg.to_dict()))
    proc = torchrun(ROOT / "tests" / "_torchrun_worker.py", [str(config_file), str(out_file), mode], 2, tmp_path,
                    timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    alive = [json.loads(Path(f"{out_file}.{rank}").read_text())["alive"] for rank in (0, 1)]
    assert alive == [[0], [0]]  # on both ranks, no wrapper left as the group was destroyed


def test_teardown_waits_for_every_rank_only_after_a_finished_run(monkeypatch):
    """A finished run meets the other ranks before closing its connections; after a failure a peer may
    be gone, and waiting for it would hang."""
    from iisan import distributed

    calls = []
    monkeypatch.setattr(distributed.torch_dist, "is_initialized", lambda: True)
    monkeypatch.setattr(distributed.torch_dist, "barrier", lambda: calls.append("barrier"))
    monkeypatch.setattr(distributed.torch_dist, "destroy_process_group", lambda: calls.append("destroy"))
    distributed.teardown(finished=True)
    distributed.teardown(finished=False)
    assert calls == ["barrier", "destroy", "destroy"]


def test_mean_over_ranks_leaves_the_callers_values_as_they_were(monkeypatch):
    """all_reduce sums in place: the mean must come from a copy, or a rank's own step losses (saved at a
    mid-epoch stop) become the sum over ranks, and the resumed epoch's loss comes out doubled."""
    from iisan import distributed

    monkeypatch.setattr(distributed.torch_dist, "all_reduce", lambda t, **kw: t.mul_(2))  # two equal ranks
    dist = distributed.Dist(0, 2, 0, "gloo")
    losses = torch.tensor([1.5, 3.0])
    assert distributed.mean_over_ranks(losses, dist).tolist() == [1.5, 3.0]
    assert losses.tolist() == [1.5, 3.0]


def test_a_decision_refused_on_rank_0_is_the_same_kind_of_error_on_every_rank(monkeypatch):
    """A run folder another process is training: rank 0 raises RunInUse, and so must rank 1, or a sweep
    skips the point on one rank and fails it on the other."""
    from iisan import distributed
    from iisan.errors import RunInUse, TrainingError
    from iisan.train import decisions

    said = {}

    def broadcast(text, dist):  # rank 0 keeps what it says; the other ranks hear it
        said.setdefault("text", text)
        return said["text"]

    monkeypatch.setattr(decisions, "broadcast_text", broadcast)

    def busy():
        raise RunInUse("run folder runs/x is in use by pid 7")

    with pytest.raises(RunInUse, match="^run folder runs/x is in use by pid 7$"):
        decisions.decide(busy, distributed.Dist(0, 2, 0, "gloo"))
    with pytest.raises(RunInUse, match="^run folder runs/x is in use by pid 7$"):
        decisions.decide(busy, distributed.Dist(1, 2, 1, "gloo"))
    said["text"] = "0SomethingElse\0text"  # a kind the other ranks do not know: a TrainingError
    with pytest.raises(TrainingError, match="^text$"):
        decisions.decide(busy, distributed.Dist(1, 2, 1, "gloo"))


def test_a_check_failed_on_one_rank_is_every_ranks_error_in_its_words(monkeypatch):
    """What each rank checks of its own node (an encoder folder there): rank 1's failure is rank 0's error too, of its
    kind and in its words; rank 1 raises its own; alone it left rank 0 waiting in the next collective."""
    from iisan import distributed
    from iisan.errors import EncoderError
    from iisan.train import decisions

    sent = []
    monkeypatch.setattr(decisions, "gather_same", lambda local, dist: [torch.tensor([0]), torch.tensor([1])])
    monkeypatch.setattr(decisions, "broadcast_text", lambda text, dist, source=0: sent.append((text, source)) or
                        "EncoderError\0model folder '/n1/bert' does not exist")
    with pytest.raises(EncoderError, match="^rank 1: model folder '/n1/bert' does not exist$"):
        decisions.everywhere(lambda: None, distributed.Dist(0, 2, 0, "gloo"))
    assert sent == [("", 1)]  # rank 1 speaks

    def missing():
        raise EncoderError("model folder '/n1/bert' does not exist")

    with pytest.raises(EncoderError, match="^model folder '/n1/bert' does not exist$"):
        decisions.everywhere(missing, distributed.Dist(1, 2, 1, "gloo"))
    assert sent[1] == ("EncoderError\0model folder '/n1/bert' does not exist", 1)
    monkeypatch.undo()
    decisions.everywhere(lambda: None, distributed.SINGLE)  # one process: its own check, nothing else
    with pytest.raises(EncoderError, match="^model folder '/n1/bert' does not exist$"):
        decisions.everywhere(missing, distributed.SINGLE)


def test_a_peer_that_died_is_one_line_not_a_traceback(monkeypatch, capsys):
    from iisan.console import entry_point

    def collective():
        raise RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer "
                           "[10.0.0.2]:41327\nmore lines")

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit) as stopped:
        entry_point("iisan", collective)
    assert stopped.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "iisan: error: lost contact with another process of this torchrun launch (it stopped or was killed: "
        "[../third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer [10.0.0.2]:41327); the "
        "checkpoints already written are intact: run the same command again to resume"]
    long = ("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Read error [127.0.0.1]:44165: Connection reset by "
            "peer. This is typically caused by a remote process that exited or crashed " + "on purpose " * 20)
    for text, said in ((long, "Read error [127.0.0.1]:44165: Connection reset by peer.)"),  # its first sentence
                       ("Connection closed by peer " + "word " * 40, "word word ...)")):  # cut between words
        with pytest.raises(SystemExit):
            entry_point("iisan", lambda text=text: (_ for _ in ()).throw(RuntimeError(text)))
        assert said + "; the checkpoints" in capsys.readouterr().err
    monkeypatch.delenv("RANK")
    with pytest.raises(RuntimeError):  # not under torchrun: not this error
        entry_point("iisan", collective)


def test_a_sweep_under_torchrun_runs_every_point_in_one_process_group(monkeypatch, tiny, tiny_cache, tmp_path):
    """Each point joins the group the grid made; a group made and destroyed per point hung or refused to
    connect within one launch (gloo)."""
    from iisan import distributed
    from iisan.experiments.sweep import parse_script_args, run_grid
    from iisan.train import runfolder, trainer

    calls = []
    for key, value in (("RANK", "0"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "0")):  # as torchrun sets them
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(distributed, "setup", lambda device: calls.append(f"setup {device}") or (None, None, True))
    monkeypatch.setattr(distributed, "teardown", lambda finished=True: calls.append(f"teardown {finished}"))
    monkeypatch.setattr(trainer, "train", lambda cfg, reuse=True: calls.append(f"train {cfg.lr}") or {})
    monkeypatch.setattr(runfolder, "reusable_results", lambda cfg, *again_folder: None)
    argv = ["--users", tiny["users"], "--items", tiny["items"], "--cache-dir", tiny_cache, "--device", "cpu",
            "--out-dir", str(tmp_path / "runs"), "--lr", "1e-3", "2e-3"]
    points, args = parse_script_args({"method": "iisan", "feed": "cached"}, {"lr": [2e-4]}, argv)
    run_grid(points, args)
    assert calls == ["setup cpu", "train 0.001", "train 0.002", "teardown True"]


def torchrun(script: Path, args: list[str], nproc: int, tmp_path: Path, timeout: int) -> subprocess.CompletedProcess:
    """``script args`` under ``torchrun --standalone --nproc_per_node nproc``, this checkout importable; the
    launcher's log folder under ``tmp_path`` (by default a torchelastic_* folder in $TMPDIR, never removed)."""
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                           str(nproc), "--log-dir", str(tmp_path / "torchrun-logs"), str(script), *args], env=env,
                          capture_output=True, text=True, timeout=timeout)


def two_point_grid(script: Path, tiny: dict, cache: str, tmp_path: Path, epochs: int) -> subprocess.CompletedProcess:
    """``script`` under torchrun, two CPU processes, over two learning rates of tiny runs."""
    flags = ["--users", tiny["users"], "--items", tiny["items"], "--cache-dir", cache, "--device", "cpu",
             "--out-dir", str(tmp_path / "runs"), "--no-progress", "--batch-size", "16", "--epochs", str(epochs),
             "--max-steps-per-epoch", "2", "--eval-batch-size", "64", "--lr", "1e-3", "2e-3"]
    return torchrun(script, flags, 2, tmp_path, timeout=240)


@pytest.mark.slow
def test_a_sweep_of_two_points_under_torchrun(tiny, tiny_cache, tmp_path):
    proc = two_point_grid(ROOT / "Code_Cached" / "scripts" / "run_IISAN.py", tiny, tiny_cache, tmp_path, epochs=1)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("grid summary: 2 point(s): 2 finished") == 1  # rank 0's table only
    assert len([p for p in (tmp_path / "runs").iterdir() if (p / "results.json").is_file()]) == 2


@pytest.mark.parametrize("argv", [["cache", "--items", "items.tsv", "--cache-dir", "c"], ["evaluate", "runs/x"],
                                  ["results", "runs"]])
def test_commands_that_run_in_one_process_refuse_torchrun_in_one_line(argv, monkeypatch, capsys):
    """Under torchrun each rank would run the whole command: a cache build's ranks lock each other out
    (its message blamed "another cache build"), evaluate prints its table once per rank."""
    for key, value in (("RANK", "1"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "1")):
        monkeypatch.setenv(key, value)
    with pytest.raises(SystemExit) as stopped:
        main(argv)
    assert stopped.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"iisan: error: iisan {argv[0]} runs in one process: start it without torchrun (only iisan train and the "
        "entry scripts are data-parallel; RANK and WORLD_SIZE in the environment say a launch)"]


def test_the_cache_script_refuses_torchrun_in_one_line(monkeypatch, capsys, tmp_path):
    import runpy

    script = ROOT / "Code_Cached" / "preprocess_vectors.py"
    for key, value in (("RANK", "0"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "0")):
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(sys, "argv", [str(script), "--items", str(tmp_path / "items.tsv"), "--cache-dir",
                                      str(tmp_path / "c")])
    with pytest.raises(SystemExit) as stopped:
        runpy.run_path(str(script), run_name="__main__")
    assert stopped.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == ("preprocess_vectors.py: error: preprocess_vectors.py "
                                                                "runs in one process: start it without torchrun (RANK "
                                                                "is set)")
    assert not (tmp_path / "c").exists()


@pytest.mark.slow
def test_a_grid_point_failing_on_one_rank_ends_the_launch_instead_of_hanging(tiny, tiny_cache, tmp_path):
    """Rank 0 alone fails a point (a write only it does); rank 1 learns why from rank 0. The grid ends on both
    ranks in one line naming the point and the reason: no hang, no next point."""
    proc = two_point_grid(ROOT / "tests" / "_torchrun_grid_worker.py", tiny, tiny_cache, tmp_path, epochs=2)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if "error:" in line and "_torchrun_grid_worker.py" in line]
    said = [line for line in errors if "grid point 0 " in line and "No space left on device (rank 0 only)" in line
            and "under torchrun a point that fails while training ends the grid" in line]
    # rank 1 learns rank 0's reason (``Run.on_main``): it says that, or torchrun stops it first; never a lost peer
    assert 1 <= len(said) <= 2 and not [line for line in errors if "lost contact" in line], errors
    assert "grid point 1 (2 of 2)" not in proc.stderr  # (then torchrun's own report of the failed workers)


def test_a_launch_environment_without_its_rendezvous_address_is_one_line(monkeypatch):
    """RANK, WORLD_SIZE and LOCAL_RANK left set by hand (a cluster's profile) but no MASTER_ADDR: torch's
    ValueError traceback; with the address but no MASTER_PORT, the same."""
    from iisan.distributed import setup
    from iisan.errors import ConfigError

    for key, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    with pytest.raises(ConfigError, match=r"^RANK and WORLD_SIZE are set but MASTER_ADDR and MASTER_PORT not: launch "
                                          r"with torchrun, which sets them, or unset RANK and WORLD_SIZE"):
        setup("cpu")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    with pytest.raises(ConfigError, match=r"^RANK and WORLD_SIZE are set but MASTER_PORT not"):
        setup("cpu")


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_a_stop_signal_ends_a_rank_waiting_for_a_launch_that_never_gathers(tiny_config, tmp_path, sig):
    """Rank 0 of two, the other never started: torch's rendezvous waits (30 minutes) without returning to Python,
    whose handler would have run only then, so neither SIGTERM (`timeout`, scancel) nor Ctrl-C ended it."""
    import signal
    import socket
    import time

    cfg = tiny_config(method="id", epochs=1)
    with socket.socket() as s:  # a free port
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    command = [sys.executable, "-m", "iisan", "train", "--method", "id", "--users", cfg.users, "--items", cfg.items,
               "--epochs", "1", "--out-dir", str(tmp_path), "--device", "cpu", "--no-progress"]
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        said = ""
        while "joining the 2 processes of this launch" not in said and proc.poll() is None:
            said += proc.stderr.readline()
        assert proc.poll() is None, said
        time.sleep(1.0)  # inside the rendezvous
        proc.send_signal(getattr(signal, sig))
        assert proc.wait(timeout=30) == -getattr(signal, sig)
    finally:
        proc.kill()
        proc.wait()


def test_signals_end_the_process_while_joining_and_their_handlers_come_back_after():
    """Inside: SIGINT and SIGTERM at their default (ending the process); one ignored when the command started
    stays ignored (nohup's SIGHUP). After, normally or on an error, the handlers that were there."""
    import signal

    from iisan.distributed import signals_end_the_process

    def mine(signum, frame):
        pass

    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        signal.signal(signal.SIGTERM, mine)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        for failing in (False, True):
            with contextlib.suppress(RuntimeError), signals_end_the_process():
                assert signal.getsignal(signal.SIGINT) is signal.SIG_DFL
                assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
                assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
                if failing:
                    raise RuntimeError("the rendezvous failed")
            assert signal.getsignal(signal.SIGTERM) is mine and signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
            assert signal.getsignal(signal.SIGINT) is before[signal.SIGINT]
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


@pytest.mark.parametrize("rank, hosts", [("1", "rank 0 hosts it"), ("0", "it hosts it")])
def test_a_rank_waiting_for_its_launch_says_so_after_a_while(tiny_config, tmp_path, rank, hosts):
    """One process of a launch of two, the other never started: rank 0 said it joins and then nothing, and a rank
    whose rank 0 never started said nothing at all, for torch's 30 minutes. Each now says, after
    ``WAIT_SAID_AFTER`` seconds (here 0.5), which rank waits where, and how to end it."""
    import select
    import socket
    import time

    cfg = tiny_config(method="id", epochs=1)
    with socket.socket() as s:  # a free port
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "RANK": rank, "WORLD_SIZE": "2", "LOCAL_RANK": rank, "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    code = ("import sys, iisan.distributed as d; d.WAIT_SAID_AFTER = 0.5; from iisan.cli.main import main; "
            "main(sys.argv[1:])")
    command = [sys.executable, "-c", code, "train", "--method", "id", "--users", cfg.users, "--items", cfg.items,
               "--epochs", "1", "--out-dir", str(tmp_path), "--device", "cpu", "--no-progress"]
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        said, deadline = "", time.monotonic() + 60  # (a process that says nothing: no test waiting forever)
        while "has waited" not in said and proc.poll() is None and time.monotonic() < deadline:
            if select.select([proc.stderr], [], [], 1.0)[0]:
                said += proc.stderr.readline()
        assert proc.poll() is None and "has waited" in said, said
        line = said.splitlines()[-1]
        assert line.endswith(f"rank {rank} of 2 has waited 0.5 s for the other processes of its launch at 127.0.0.1:"
                             f"{port} ({hosts}): one that never started keeps every other waiting until torch's "
                             "timeout (30 min); launch all 2 with the same MASTER_ADDR, MASTER_PORT and WORLD_SIZE, "
                             "or stop this one (Ctrl-C)"), line
    finally:
        proc.kill()
        proc.wait()


def test_a_rank_that_joins_in_time_says_nothing_of_waiting(monkeypatch, caplog):
    """The timer is cancelled once the rendezvous returns: a launch that gathers quickly says nothing of waiting."""
    import logging
    import time

    import iisan.distributed as distributed

    monkeypatch.setattr(distributed, "WAIT_SAID_AFTER", 0.2)
    with caplog.at_level(logging.WARNING, logger="iisan"):
        with distributed.said_while_waiting(1, 2, "gloo"):
            pass
        time.sleep(0.5)
        assert "has waited" not in caplog.text
        with distributed.said_while_waiting(1, 2, "gloo"):
            time.sleep(0.5)
    assert caplog.text.count("rank 1 of 2 has waited 0.2 s") == 1
