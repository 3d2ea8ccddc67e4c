"""Uncached IISAN with the paper's defaults (authors' Code_Uncached/scripts/run_IISAN.py): the frozen
BERT and ViT run live on titles and LMDB images at every step.

Edit SWEEP to run a grid in this process; every key is also a flag. `--text-encoder-dropout`
reproduces the authors' BERT dropout inside the frozen encoder (off by default).
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
    run_method("iisan", SWEEP, __doc__, feed="live")
