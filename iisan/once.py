"""What this process has said already. A sweep resolves, builds and trains many runs in one process, and a
warning true of all of them is a warning the first time (``first``); where each run's train.log should hold it
too, the later runs say it at INFO (``level``), as a launch's other ranks do (``other_rank``: rank 0 speaks for
all). ``said`` and ``said_under`` ask what was said: a train.log, opened after the config was resolved, names
what the console said before it."""

from __future__ import annotations

import logging
import os
from collections.abc import Hashable

_SAID: dict[str, set] = {}  # topic -> the keys said under it in this process (tests start each with none)


def first(topic: str, key: Hashable) -> bool:
    """True the first time ``key`` is said under ``topic`` in this process, then False."""
    keys = _SAID.setdefault(topic, set())
    if key in keys:
        return False
    keys.add(key)
    return True


def level(topic: str, key: Hashable) -> int:
    """WARNING the first time ``key`` is said under ``topic``, INFO after (a sweep's later runs, for their log)
    and on a launch's other ranks (each read the same data: rank 0 says it for all)."""
    return logging.WARNING if first(topic, key) and not other_rank() else logging.INFO


def in_a_launch() -> bool:
    """``distributed.launched``'s rule, without importing torch: a RANK alone, a plain run's, is no launch."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def other_rank() -> bool:
    """A process of a launch other than rank 0 (``distributed.main_process``'s rule)."""
    return in_a_launch() and os.environ["RANK"] != "0"


def said(topic: str, key: Hashable) -> bool:
    return key in _SAID.get(topic, ())


def said_under(topic: str) -> frozenset:
    return frozenset(_SAID.get(topic, ()))
