"""The training methods as data (``METHOD_TABLE``): each method's config name, the paper's name, what kind
of item encoder it trains and its paper settings, which sit below every flag and file in ``config.resolve``'s
precedence rule. ``METHODS``, ``METHOD_NAMES`` and ``METHOD_DEFAULTS`` are views of it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Method:
    """A training method: its config name, the paper's name (results files, tables), its kind (what its item
    encoder is: san = IISAN's side adapters, baseline = a PEFT method on trained backbones, ``model.baselines.
    APPLY``, id = item-ID embeddings) and its paper settings (a key left out keeps its field default)."""

    name: str
    paper_name: str
    kind: str  # san, baseline or id
    defaults: dict


# The paper settings come from the authors' run scripts (run_IISAN.py: batch 64, lr 2e-4 recsys, 1e-4 image,
# 5e-5 text, 1e-4 adapters; run_fft.py / run_adapter.py / run_lora.py / run_bitfit.py: batch 32).
METHOD_TABLE = {m.name: m for m in (
    Method("iisan", "IISAN", "san", {"batch_size": 64, "lr": 2e-4, "lr_image": 1e-4, "lr_text": 5e-5,
                                      "lr_adapter_image": 1e-4, "lr_adapter_text": 1e-4}),
    Method("fft", "FFT", "baseline", {"batch_size": 32, "lr": 1e-4, "lr_image": 1e-4, "lr_text": 5e-5}),
    Method("adapter", "Adapter", "baseline", {"batch_size": 32, "lr": 2e-4, "lr_adapter_image": 4e-4,
                                              "lr_adapter_text": 4e-4}),
    # LoRA's image/text rates train only the Q/V biases of --lora-random-base (the authors' loralib layers).
    Method("lora", "LoRA", "baseline", {"batch_size": 32, "lr": 2e-4, "lr_image": 1e-4, "lr_text": 5e-5,
                                        "lr_adapter_image": 4e-4, "lr_adapter_text": 4e-4}),
    Method("bitfit", "BitFit", "baseline", {"batch_size": 32, "lr": 2e-4, "lr_image": 1e-4, "lr_text": 5e-5}),
    # SASRec over item IDs (no encoder): IISAN's batch and recsys learning rate, which the table trains with.
    Method("id", "SASRec-ID", "id", {"batch_size": 64, "lr": 2e-4}),
)}
METHODS = tuple(METHOD_TABLE)
METHOD_NAMES = {name: m.paper_name for name, m in METHOD_TABLE.items()}
METHOD_DEFAULTS = {name: m.defaults for name, m in METHOD_TABLE.items()}
