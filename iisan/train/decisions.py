"""Decisions rank 0 takes for every rank under torchrun (which run folder to lock, which checkpoint to
resume from): rank 0 decides, every rank learns whether it could and what it chose. Single-process,
``broadcast_text`` returns its input, so the same code runs everywhere."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from ..distributed import Dist, broadcast_text
from ..errors import TrainingError, UserError

T = TypeVar("T")


def decide(choose: Callable[[], T], dist: Dist,
           describe: Callable[[T], str] = lambda answer: "") -> tuple[T | None, str]:
    """``choose()`` on rank 0: its answer there (None on the other ranks) and ``describe(answer)`` on
    every rank. Rank 0's ``UserError`` is raised there, and as a ``TrainingError`` of the same text on
    the other ranks."""
    answer, ok, text, error = None, True, "", None
    if dist.is_main:
        try:
            answer = choose()
            text = describe(answer)
        except UserError as err:
            ok, text, error = False, str(err), err
    ok, text = broadcast_outcome(ok, text, dist)
    if error is not None:
        raise error
    if not ok:
        raise TrainingError(text)
    return answer, text


def broadcast_outcome(ok: bool, text: str, dist: Dist) -> tuple[bool, str]:
    """Rank 0's (ok, text) on every rank, in one broadcast: a leading '1' or '0', then the text."""
    answer = broadcast_text(("1" if ok else "0") + text, dist)
    return answer[0] == "1", answer[1:]
