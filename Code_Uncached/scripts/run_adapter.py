"""Houlsby adapters in both backbones (authors' run_adapter.py): bottleneck 64 after the attention-output
and FFN-output projections of every layer, batch 32, adapters at lr 4e-4.

Edit SWEEP to run a grid in this process; every key is also a flag (`--lr 1e-4 2e-4`), and every
Config key is accepted (`python run_adapter.py --help`).
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
    run_method("adapter", SWEEP, __doc__)
