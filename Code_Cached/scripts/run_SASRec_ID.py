"""SASRec over learned item-ID embeddings (64-d): the same user encoder, in-batch loss, negatives,
evaluation and early stopping as IISAN, with no encoder, cache or images, so a run shows on the same
split what the multimodal item towers add.

Edit SWEEP to run a grid in this process; every key is also a flag (`--lr 1e-4 2e-4`), and every
Config key is accepted (`python run_SASRec_ID.py --help`). `--dataset Instrument` picks the data set.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # runs from a checkout without installing

from iisan.experiments.sweep import run_method  # noqa: E402

SWEEP = {
    "lr": [2e-4],
    "seed": [12345],
}

if __name__ == "__main__":
    run_method("id", SWEEP, __doc__)
