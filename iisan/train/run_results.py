"""A run's results.json read back (``records`` writes it): as a dict, or why it cannot be used, and whether
it is that of a finished run."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import error_line, parse_json
from ..files import failure_reason


def results_or_reason(path: Path) -> tuple[dict, str]:
    """The results file at ``path`` as a dict and ''; or {} and why it cannot be used ('' when absent)."""
    try:
        results = parse_json(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}, ""
    except IsADirectoryError:
        return {}, "is a folder, not a file"
    except OSError as err:
        return {}, f"cannot be read ({failure_reason(err)})"
    except json.JSONDecodeError as err:
        return {}, f"not valid JSON ({err.msg} at line {err.lineno})"
    except ValueError as err:  # not UTF-8, an integer of over 4300 digits, nesting too deep
        return {}, f"not valid JSON ({error_line(err)})"
    return (results, "") if isinstance(results, dict) else ({}, "not a JSON object")


def read_results(path: Path) -> dict:
    """The results file at ``path`` as a dict; {} when it is absent, unreadable or not a JSON object."""
    return results_or_reason(path)[0]


def finished_file(path: Path) -> dict | None:
    """The results file at ``path`` when it is that of a finished run, else None. A run writes it from its
    start on, with its status (``running``, ``failed``, ``interrupted``); files of older runs have none and
    were written only at the end."""
    results = read_results(path)
    return results if is_finished(results) else None


def is_finished(results: dict) -> bool:
    return bool(results) and results.get("status", "finished") == "finished"
