"""BitFit (authors' run_bitfit.py): the biases of both backbones train (ViT lr 1e-4, BERT 5e-5), batch 32.
The authors' script crashes as shipped; this one runs.

Edit SWEEP to run a grid in this process; every key is also a flag (`--lr 1e-4 2e-4`), and every
Config key is accepted (`python run_bitfit.py --help`).
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
    run_method("bitfit", SWEEP, __doc__)
