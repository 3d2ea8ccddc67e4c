"""Run by tests/test_distributed.py under ``torchrun --nproc_per_node 2``: an entry script's grid whose first
point fails on rank 0 alone (its best-weights write, as on a full disk), so the ranks fall out of step."""

from __future__ import annotations

import os

from iisan.errors import OutputError
from iisan.experiments.sweep import run_script
from iisan.train import trainer

save_weights = trainer.save_weights


def fails_once_on_rank_0(*args, **kwargs):
    if os.environ["RANK"] == "0" and not os.environ.get("FAILED"):
        os.environ["FAILED"] = "1"
        raise OutputError("could not write best.safetensors: No space left on device (rank 0 only)")
    return save_weights(*args, **kwargs)


trainer.save_weights = fails_once_on_rank_0
run_script({"method": "iisan", "feed": "cached"}, {"lr": [2e-4]})
