"""One tower's view of a ``Config``: the ``text_*`` or ``image_*`` value of each per-tower field, picked
here once. A module of its own so that both ``build`` and ``baselines`` (which ``build`` imports) read it."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import Config


@dataclass(frozen=True)
class TowerSettings:
    """``model``: the encoder folder (or Hub id); ``layers``: the hidden states given explicitly
    (``--text-layers`` / ``--image-layers``), None for ``layer_rule``'s choice; ``adapter_down``: the
    bottleneck of the tower's side adapters and Houlsby adapters; ``pooling``: ``text_pooling`` for the
    text tower, 'auto' for the image tower (the CLS token; SigLIP's mean over patches), resolved per family by
    ``families.resolve_pooling``."""

    model: str
    layers: tuple[int, ...] | None
    adapter_down: int
    pooling: str


def tower_settings(cfg: Config, modality: str) -> TowerSettings:
    if modality == "text":
        return TowerSettings(cfg.text_model, cfg.text_layers, cfg.text_adapter_down, cfg.text_pooling)
    return TowerSettings(cfg.image_model, cfg.image_layers, cfg.image_adapter_down, "auto")
