"""What this process has said already. A sweep resolves, builds and trains many runs in one process, and a
warning true of all of them is a warning the first time (``first``); where each run's train.log should hold it
too, the later runs say it at INFO (``level``). ``said`` and ``said_under`` ask what was said: a train.log,
opened after the config was resolved, names what the console said before it."""

from __future__ import annotations

import logging
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
    """WARNING the first time ``key`` is said under ``topic``, INFO after (a sweep's later runs, for their log)."""
    return logging.WARNING if first(topic, key) else logging.INFO


def said(topic: str, key: Hashable) -> bool:
    return key in _SAID.get(topic, ())


def said_under(topic: str) -> frozenset:
    return frozenset(_SAID.get(topic, ()))
