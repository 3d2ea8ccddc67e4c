"""Full fine-tuning (FFT) of both backbones (authors' run_fft.py): every BERT and ViT weight trains (BERT
pooler excluded), batch 32, lr 1e-4 (ViT 1e-4, BERT 5e-5).

Edit SWEEP to run a grid in this process; every key is also a flag (`--lr 1e-4 2e-4`), and every
Config key is accepted (`python run_fft.py --help`).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # runs from a checkout without installing

from iisan.experiments.sweep import run_method  # noqa: E402

SWEEP = {
    "lr": [1e-4],
    "seed": [12345],
}

if __name__ == "__main__":
    run_method("fft", SWEEP, __doc__)
