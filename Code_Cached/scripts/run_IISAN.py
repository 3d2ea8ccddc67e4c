"""Cached IISAN with the paper's defaults (authors' Code_Cached/scripts/run_IISAN.py).

Edit SWEEP to run a grid in this process; every key is also a flag (`--lr 1e-4 2e-4`), and every
Config key is accepted (`python run_IISAN.py --help`). Build the cache first: `cd .. && python
preprocess_vectors.py`.
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
    run_method("iisan", SWEEP, __doc__, feed="cached")
