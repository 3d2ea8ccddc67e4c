"""Decisions rank 0 takes for every rank under torchrun (which run folder to lock, which checkpoint to
resume from): rank 0 decides, every rank learns whether it could and what it chose (``decide``); and checks
every rank makes of its own node, whose failure on one is every rank's (``everywhere``). Single-process,
``broadcast_text`` returns its input, so the same code runs everywhere."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch

from ..distributed import Dist, broadcast_text, gather_same
from ..errors import (
    CacheError,
    CheckpointError,
    ConfigError,
    DataError,
    EncoderError,
    ImageStoreError,
    OutputError,
    RunInUse,
    TrainingError,
    UserError,
)

T = TypeVar("T")


# The errors rank 0 may raise in a decision, by name: every rank raises the same kind, so that each takes
# the same branch (a sweep skips a point another process is training, ``RunInUse``, on every rank alike).
KINDS = {kind.__name__: kind for kind in (RunInUse, TrainingError, ConfigError, OutputError, CheckpointError,
                                          DataError, CacheError, EncoderError, ImageStoreError)}


def decide(choose: Callable[[], T], dist: Dist,
           describe: Callable[[T], str] = lambda answer: "") -> tuple[T | None, str]:
    """``choose()`` on rank 0: its answer there (None on the other ranks) and ``describe(answer)`` on
    every rank. Rank 0's ``UserError`` is raised there, and of the same kind (``KINDS``; else a
    ``TrainingError``) and text on the other ranks."""
    answer, ok, text, error = None, True, "", None
    if dist.is_main:
        try:
            answer = choose()
            text = describe(answer)
        except UserError as err:
            ok, text, error = False, f"{type(err).__name__}\0{err}", err
    ok, text = broadcast_outcome(ok, text, dist)
    if error is not None:
        try:
            raise error
        finally:  # the error's traceback holds this frame: no cycle back to the error through it
            error = None
    if not ok:
        kind, _, said = text.partition("\0")
        raise KINDS.get(kind, TrainingError)(said)
    return answer, text


def broadcast_outcome(ok: bool, text: str, dist: Dist) -> tuple[bool, str]:
    """Rank 0's (ok, text) on every rank, in one broadcast: a leading '1' or '0', then the text."""
    answer = broadcast_text(("1" if ok else "0") + text, dist)
    return answer[0] == "1", answer[1:]


def everywhere(check: Callable[[], object], dist: Dist) -> None:
    """``check()`` on every rank (what each finds on its own node: a data file, an encoder folder): a ``UserError``
    on some rank is raised on every rank, of its kind (``KINDS``), where it did not fail in the words of the first
    rank that failed (``rank 1: ...``). Alone, a rank's failure left the others waiting in the next collective."""
    error = None
    try:
        check()
    except UserError as err:
        error = err
    failed = [r for r, flag in enumerate(gather_same(torch.tensor([int(error is not None)]), dist)) if flag.item()]
    if not failed:
        return
    text = broadcast_text(f"{type(error).__name__}\0{error}" if error is not None else "", dist, source=failed[0])
    if error is not None:
        try:
            raise error
        finally:  # (no cycle back to the error through this frame: ``decide``)
            error = None
    kind, _, said = text.partition("\0")
    raise KINDS.get(kind, TrainingError)(f"rank {failed[0]}: {said}")
