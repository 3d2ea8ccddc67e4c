"""Run by tests/test_distributed.py under ``torchrun --nproc_per_node N`` (gloo on CPU, NCCL on CUDA).

In one launch: an uninterrupted 3-epoch run (checkpointed every 2 steps too); a 2-epoch run resumed to 3
epochs; and the distributed evaluation of fixed weights. Rank 0 writes what it saw to ``argv[2]`` as JSON.

With ``own`` as ``argv[3]``, instead: one run that makes and leaves the process group itself, as ``iisan
train`` under torchrun does, counting the DDP wrappers still alive as it leaves; ``own-fail``: the same with
a run whose second optimiser step raises (the frames of the error in flight hold the wrapper). A wrapper alive then
destroyed the group later, in its destructor, holding the GIL while gloo's threads waited for it: now and
then a rank never exited.

With ``copies``: each rank reads its own copy of the data (``argv[1]``.{step}.{RANK}, as a job that copies the data
set to each node's own disk): a whole copy under another folder's name, trained, then run again (finished), again
with rank 1's copy not yet whole (rank 0's look: finished on both), longer with rank 1 reading another cache, then
longer with a copy not yet whole on rank 1 (both refused in one line on every rank), then a live run whose encoder
folder rank 1 lacks (its own check, failed on every rank). Each rank writes what it got to
``argv[2]``.{RANK}.
"""

from __future__ import annotations

import gc
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as torch_dist
from torch.nn.parallel import DistributedDataParallel

from iisan import distributed
from iisan.config import Config
from iisan.console import setup_logging
from iisan.data.run_data import load_data
from iisan.evaluate import evaluate_ranks
from iisan.model.build import build_model
from iisan.train.trainer import train
from iisan.train.weights import load_weights


def own_group(cfg: Config, out_file: str, fail: bool) -> None:
    alive, leave = [], torch_dist.destroy_process_group

    def counted(*args, **kwargs):  # the wrappers train() still holds as it leaves the group it made
        alive.append(sum(isinstance(o, DistributedDataParallel) for o in gc.get_objects()))
        return leave(*args, **kwargs)

    torch_dist.destroy_process_group = counted
    if fail:
        steps, real = [], torch.optim.Adam.step

        def failing(self, *args, **kwargs):
            steps.append(1)
            if len(steps) == 2:
                raise RuntimeError("a step failed on purpose")
            return real(self, *args, **kwargs)

        torch.optim.Adam.step = failing
    try:
        train(cfg)
    except RuntimeError as err:
        assert fail and "on purpose" in str(err), err
    Path(f"{out_file}.{os.environ['RANK']}").write_text(json.dumps({"alive": alive}))  # every rank its own


def copies(config_file: str, out_file: str) -> None:
    from iisan.errors import UserError

    dist, _, created = distributed.setup("cpu")
    assert created
    got = []
    for step in ("whole", "again", "again-partial", "other-cache", "partial", "no-encoder"):
        cfg = Config(**json.loads(Path(f"{config_file}.{step}.{dist.rank}").read_text()))
        try:
            results = train(cfg)
            got.append({"run_dir": results["run_dir"], "ended": results["ended"], "epochs": len(results["epochs"])})
        except UserError as err:
            got.append({"error": str(err), "kind": type(err).__name__})
    Path(f"{out_file}.{dist.rank}").write_text(json.dumps(got))
    distributed.teardown(finished=True)


def main(config_file: str, out_file: str) -> None:
    torch.set_num_threads(1)
    setup_logging()
    if sys.argv[3:] == ["copies"]:
        return copies(config_file, out_file)
    cfg = Config(**json.loads(Path(config_file).read_text()))
    if sys.argv[3:] in (["own"], ["own-fail"]):
        return own_group(cfg, out_file, fail=sys.argv[3] == "own-fail")
    # The group is ours, so the three train() calls below join it and leave it up.
    dist, device, created = distributed.setup(cfg.device)
    assert created and torch_dist.get_backend() == ("nccl" if device.type == "cuda" else "gloo")
    full = train(cfg.replace(run_name="full", epochs=3, checkpoint_every=2))  # (collective saves within epochs)
    train(cfg.replace(run_name="part", epochs=2))
    resumed = train(cfg.replace(run_name="part", epochs=3))

    data = load_data(cfg)
    model, _ = build_model(cfg, data, device)
    load_weights(model, Path(full["run_dir"]) / "best.safetensors")
    lo, hi = distributed.chunk_block(data.num_users, cfg.eval_batch_size, dist)
    ranks = {split: evaluate_ranks(model, data, split, cfg, device, dist=dist) for split in ("valid", "test")}
    counts = torch.zeros(dist.world_size, dtype=torch.int64, device=dist.comm_device())
    counts[dist.rank] = hi - lo
    torch_dist.all_reduce(counts)
    if dist.is_main:
        Path(out_file).write_text(json.dumps({
            "full": full, "resumed": resumed, "users": data.num_users, "per_rank": counts.tolist(),
            "ranks": {k: v.tolist() for k, v in ranks.items()}, "backend": dist.backend,
        }, default=str))
    distributed.teardown(finished=True)  # every rank waits for the others, then leaves


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])  # (argv[3]: own, own-fail, copies, or nothing)
