"""LoRA on query and value of every layer of both backbones (authors' run_lora.py), through peft, wrapping
the pretrained weights (the authors' loralib code replaced them with random ones), r 8, alpha 1, batch
32.

Edit SWEEP to run a grid in this process; every key is also a flag (`--lr 1e-4 2e-4`), and every
Config key is accepted (`python run_lora.py --help`).
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
    run_method("lora", SWEEP, __doc__)
