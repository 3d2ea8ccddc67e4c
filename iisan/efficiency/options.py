"""What the measuring scripts are asked, without torch: the encoders and synthetic data they run on
(``add_input_flags``), the benchmark's settings and the Config keys its command line may set, and the
diagnosis's options. Their ``--help`` answers from here in a second, not after loading the training stack."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

# Config keys a benchmark run may set from the command line (through ``add_config_arguments(only=...)``).
BENCH_KEYS = ("device", "amp", "dedup_items", "encoder_dtype", "cache_dtype", "patch_embedding", "num_workers",
              "static_shapes", "item_bucket_growth", "title_multiple")
BACKBONES = ("tiny", "base")
DATA = ("demo", "scientific")
SETTING_NAMES = {"equal": "equal batch for every method", "paper": "paper: baselines 32, IISAN 64"}


def add_input_flags(parser) -> None:
    """--backbones and --data: the encoders and synthetic data a measuring script runs on (``prepare``)."""
    parser.add_argument("--backbones", choices=BACKBONES, default="tiny",
                        help="tiny random encoders, or random-weight BERT-base + ViT-B/16 at 224 px (the paper's "
                             "compute; weights do not change time) (default: tiny)")
    parser.add_argument("--data", choices=DATA, default="demo",
                        help="synthetic data: the demo's size, or Scientific's shape (12,076 users, 20,314 items; "
                             "its LMDB of 224 px images takes about 3 GB under --work, beside the models and the "
                             "cache) (default: demo)")


@dataclass
class DiagnosisOptions:
    """What the GPU diagnosis runs (``diagnose.run_diagnosis``). Item counts of the plain rows, besides those
    iisan's steps ran: every slot of 32 users (352, FFT) and of 64 users (704, the frozen forward), the
    reference's settings. The first frozen count also runs the variants."""

    out: Path
    size: str = "base"
    data: str = "scientific"
    device: str = "auto"
    fft_items: list[int] = field(default_factory=lambda: [352])
    frozen_items: list[int] = field(default_factory=lambda: [704])
    cache_batch: int = 512
    iisan: list[str] = field(default_factory=lambda: ["FFT", "IISAN (uncached)"])
    skip_plain: bool = False
    warmup: int = 3
    reps: int = 10
    shape_reps: int = 6
    workers: int = 8
    work: Path = Path("bench_data")  # (not a fixed folder of /tmp, which other users may fill first)
