"""Which hidden states of a tower a SAN reads: the rules that pick them from its depth (``--layer-rule``) and the
check of a list given by hand."""

from __future__ import annotations

from ..errors import EncoderError

MAX_DEPTH = 1024  # layers an encoder may have (the largest LLMs have about 130)


def group_layers(depth: int, groups: int, include_embedding: bool = True) -> tuple[int, ...]:
    """``--layer-rule groups``: split layers 1..depth into ``groups`` runs of consecutive layers and keep
    the last of each run (12 layers, 6 groups -> 2, 4, ..., 12: the authors' IISAN list of block indices
    1, 3, ..., 11, as hidden-state indices). Index 0 (the embedding output) is prepended unless
    ``include_embedding`` is false."""
    groups = min(groups, depth)
    picked = [round(depth * (g + 1) / groups) for g in range(groups)]
    return tuple(([0] if include_embedding else []) + picked)


def stride_layers(depth: int, picks: int, include_embedding: bool = True) -> tuple[int, ...]:
    """The last layer and every k-th below it, ``picks`` layers in all, with the largest k that keeps them
    above the embeddings: the authors' lists (12 layers -> 2, 4, ..., 12; 32 -> 2, 8, 14, 20, 26, 32;
    80 -> 5, 20, ..., 80; 28 -> 3, 8, ..., 28; 48 -> 3, 12, ..., 48). Index 0 as in ``group_layers``."""
    picks = min(picks, depth)
    stride = (depth - 1) // (picks - 1) if picks > 1 else 0
    picked = sorted(depth - stride * k for k in range(picks))
    return tuple(([0] if include_embedding else []) + picked)


def check_layers(layers: tuple[int, ...], depth: int, what: str) -> None:
    if max(layers) > depth:
        raise EncoderError(f"{what} layers {list(layers)} do not fit an encoder with {depth} layers "
                           f"(valid hidden-state indices are 0..{depth})")
