"""A grid's points and what became of each (``sweep.run_grid``): the listing ``--list-grid`` prints, the summary
table printed at the end, and the time and the disk a sweep has left."""

from __future__ import annotations

import os
import shutil
from collections import Counter
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from ..config import Config
from ..console import duration, fixed
from ..files import shown_bytes
from ..metric_names import HEADLINE, SELECTED_BY, label


@dataclass
class GridPoint:
    index: int
    values: dict  # the swept keys' values at this point
    config: Config | None  # None when the values make no valid config
    error: str = ""  # why not
    made: str = ""  # what it makes where it trains no run (a cache build: its folder), named instead of a run

    @property
    def name(self) -> str:
        return self.made or (self.config.run_name if self.config else "-")


class Status(str, Enum):
    """What became of a grid point: finished (trained now), finished before (its run folder already held
    its results), in use (another process is training it), failed, interrupted, or not run (the grid
    stopped before it). Printed as its value."""

    FINISHED = "finished"
    FINISHED_BEFORE = "finished before"
    IN_USE = "in use"
    FAILED = "failed"
    INTERRUPTED = "interrupted"
    NOT_RUN = "not run"

    def __str__(self) -> str:  # "finished", not "Status.FINISHED", in str() and f-strings alike
        return self.value


@dataclass
class Outcome:
    point: GridPoint
    status: Status
    result: object = None
    reason: str = ""


def values_text(values: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in values.items())


def listing(points: list[GridPoint], total: int) -> str:
    lines = [f"{total} grid point(s); run one alone with --grid-index I:"]
    for p in points:
        lines.append(f"{p.index:4d}  {p.name}  {values_text(p.values)}" + (f"  (invalid: {p.error})" if p.error
                                                                           else ""))
    return "\n".join(lines) + "\n"


def summary(outcomes: list[Outcome], made=None) -> str:
    """A markdown table of every point: status and, for runs, the validation metric a point is chosen by
    (choosing by test would tune on the test set) and the test metrics at the best-validation epoch; for
    an action that trains no run, what each point made instead (``made(config, result)``, see ``run_script``)."""
    counts = Counter(o.status for o in outcomes)
    columns = ["#", "made", "status"] if made else ["#", "run", "status", f"valid {label(SELECTED_BY)}",
                                                    *(f"test {label(m)}" for m in HEADLINE)]
    lines = [f"\ngrid summary: {len(outcomes)} point(s): " + ", ".join(f"{n} {s}" for s, n in counts.items()),
             f"| {' | '.join(columns)} |", "|" + "---|" * len(columns)]
    for o in outcomes:
        status = f"{o.status}: {o.reason}" if o.reason else o.status
        if made:
            done = o.status is Status.FINISHED and o.point.config is not None
            lines.append(f"| {o.point.index} | {made(o.point.config, o.result) if done else o.point.name} | {status} |")
            continue
        result = o.result if isinstance(o.result, dict) else {}
        valid, test = result.get("valid") or {}, result.get("test") or {}
        cells = ("" if v is None else fixed(v) for v in (valid.get(SELECTED_BY), *map(test.get, HEADLINE)))
        lines.append(f"| {o.point.index} | {o.point.name} | {status} | {' | '.join(cells)} |")
    return "\n".join(lines) + "\n"


def time_left(trained: list[float], left: int) -> str:
    """What a grid's log line adds about the time left: ``left`` points to train (this one included; not those
    found finished before the grid started) at the mean of the ``trained`` points' times so far (points found
    finished take none; none trained yet: nothing said)."""
    if not trained or left < 1:
        return ""
    mean = sum(trained) / len(trained)
    return (f"; about {duration(mean * left)} left for {left} point(s), at the {duration(mean)} each of the "
            f"{len(trained)} trained so far")


def folder_bytes(folder: str | Path) -> int:
    """The bytes of the files under ``folder`` (links not followed; a file gone meanwhile counts nothing)."""
    total = 0
    for root, _, names in os.walk(folder):
        for name in names:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total


def disk_short(kept: list[int], left: int, runs: Path, keep_checkpoints: int) -> str | None:
    """A warning when the ``left`` points still to train, each keeping as much as the largest of the run folders
    trained so far (``kept`` bytes), would keep more than the disk holding ``runs`` has free: a full disk stops a
    point at an epoch's end, hours into a grid. None when they fit, or when nothing is known yet."""
    if not kept or left < 1:
        return None
    try:
        need, free = max(kept) * left, shutil.disk_usage(runs).free
    except OSError:  # a look that fails (the folder gone, a network file system's error) is a warning not given
        return None
    if need <= free:
        return None
    fewer = "" if keep_checkpoints == 0 else ", or run it with --keep-checkpoints 0 (a finished point keeps its " \
        "best.safetensors alone)"
    return (f"the {left} point(s) left to train would keep about {shown_bytes(need)} in {runs}, at the "
            f"{shown_bytes(max(kept))} of the largest run folder so far, and its disk has {shown_bytes(free)} free: "
            f"free some space{fewer}, or a full disk stops a point at an epoch's end")
