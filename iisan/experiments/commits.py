"""Whether a seeded run gives the same numbers at two commits of this repository, and which commit changed them
(``scripts/numbers_by_commit.py``).

Each commit's own ``iisan demo`` runs (synthetic data, tiny random encoders, a cache, cached IISAN: every commit
from the first makes the same data, tiny models and images) on one CPU thread, where a seeded run gives the same
bits every time; with ``live`` methods, each also trains ``LIVE_STEPS`` on the live feed from the demo's config.
A run's numbers (``run_numbers``) are each epoch's loss and metrics and the best epoch with its validation and
test metrics, compared as exact floats; timings, paths and dates are not numbers. A commit's code is a
``git archive`` copy in a temporary folder under the working folder, removed with the runs' outputs once their
numbers are read; the checkout itself is never touched.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from ..claims import claim_output
from ..errors import ConfigError, DataError, UserError, parse_json
from ..files import json_text, starts_with, write_json_atomic, write_text_atomic
from ..metric_names import HEADLINE, label

log = logging.getLogger(__name__)

FORMAT = "iisan-commits/1"  # the JSON's "format": a file that says so may be replaced by a later run
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # one thread: the same bits every run
KEPT = ("epoch", "loss", "steps", "valid", "test")  # what of an epoch's record is a number of the run
LIVE_STEPS = ["--feed", "live", "--epochs", "2", "--max-steps-per-epoch", "12", "--patience", "10"]
LIVE = ("iisan", "fft", "adapter", "lora", "bitfit")  # what ``live`` may name: flags every commit knows


def git(repo: Path, *args: str) -> str:
    """The output of ``git -C repo args``; a failure is one line with git's own last words."""
    try:
        done = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise ConfigError("git is not installed: comparing commits needs it") from None
    if done.returncode:
        said = (done.stderr.strip().splitlines() or ["(no message)"])[-1]
        raise ConfigError(f"git {' '.join(args)} in {repo}: {said}")
    return done.stdout


def resolve(repo: Path, name: str) -> str:
    """The full hash of the commit ``name`` (a hash, a branch, ``HEAD~3``) names in ``repo``."""
    if not Path(repo).is_dir():
        raise ConfigError(f"--repo {repo} is not a folder")
    git(repo, "rev-parse", "--git-dir")  # (not a checkout: git's own words)
    try:
        return git(repo, "rev-parse", "--verify", "--quiet", f"{name}^{{commit}}").strip()
    except ConfigError:
        raise ConfigError(f"{name!r} is not a commit of {repo}") from None


def first_parent_line(repo: Path, old: str, new: str) -> list[str]:
    """The commits after ``old`` up to ``new`` that descend from ``old``, oldest first, along ``new``'s first
    parents (the branch as it was committed to: a side branch's commits show as the merge that brought them)."""
    try:
        git(repo, "merge-base", "--is-ancestor", old, new)
    except ConfigError:
        raise ConfigError(f"{old[:12]} is not an ancestor of {new[:12]}: give the older commit first") from None
    holding = set(git(repo, "rev-list", "--ancestry-path", f"{old}..{new}").split())  # (descendants of old)
    return [c for c in git(repo, "rev-list", "--first-parent", "--reverse", f"{old}..{new}").split() if c in holding]


def described(repo: Path, commit: str) -> dict:
    """The commit's short hash, date and first line."""
    short, date, subject = git(repo, "log", "-1", "--format=%h%x00%cs%x00%s", commit).rstrip("\n").split("\0")
    return {"commit": short, "date": date, "subject": subject}


def checkout(repo: Path, commit: str, into: Path) -> Path:
    """The files of ``commit`` (``git archive``) in the new folder ``into``."""
    archive = subprocess.Popen(["git", "-C", str(repo), "archive", "--format=tar", commit],
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}  # (Python 3.10.12 and 3.11.4 on)
    try:
        with archive, tarfile.open(fileobj=archive.stdout, mode="r|") as tar:
            tar.extractall(into, **safe)
    except tarfile.TarError as err:  # (an entry the filter refuses, a link out of the tree: no partial copy)
        raise ConfigError(f"git archive {commit[:12]} in {repo}: {err}") from None
    if archive.returncode or not into.is_dir():
        raise ConfigError(f"git archive {commit[:12]} in {repo} gave no files (status {archive.returncode})")
    return into


def run_numbers(run_dir: Path) -> dict:
    """What a finished run computed, from its results.json (every commit's has them): ``best_epoch``, its
    ``valid`` and ``test`` metrics, and each epoch's ``KEPT`` values."""
    try:
        results = parse_json((run_dir / "results.json").read_text(encoding="utf-8"))
        epochs = [{k: v for k, v in epoch.items() if k in KEPT} for epoch in results["epochs"]]
    except (OSError, ValueError, AttributeError, KeyError, TypeError) as err:
        raise DataError(f"{run_dir / 'results.json'}: not a finished run's results ({err!r:.80})") from None
    numbers = {"epochs": epochs, "best_epoch": results.get("best_epoch"), "valid": results.get("valid"),
               "test": results.get("test")}
    return parse_json(json_text(numbers))  # as kept on disk (NaN and inf as null), so fresh and kept compare alike


def commit_numbers(repo: Path, commit: str, work: Path, timeout: float, live: tuple[str, ...] = ()) -> dict:
    """``{"numbers": {"demo": ..., <each live method>: ...}, "seconds": ...}`` of ``commit``'s runs, or
    ``{"error": the failed run's last line, ...}``; their whole output is kept in ``work/demo-<commit>.log``."""
    with tempfile.TemporaryDirectory(prefix=f"demo-{commit[:12]}-", dir=work) as scratch:
        tree = checkout(repo, commit, Path(scratch) / "code")
        out, numbers, log_text, start = Path(scratch) / "out", {}, [], time.perf_counter()
        try:
            demo = _run(tree, ["demo", "--out", str(out), "--no-progress"], out / "runs", timeout, log_text)
            numbers["demo"] = run_numbers(demo)
            for method in live:
                numbers[method] = run_numbers(_run(tree, [
                    "train", "--config", str(demo / "config.json"), "--method", method, *LIVE_STEPS,
                    "--out-dir", str(out / "live"), "--run-name", method, "--no-progress"], out / "live" / method,
                    timeout, log_text))
        except (_Failed, DataError) as err:
            return {"error": str(err)[:300], "seconds": round(time.perf_counter() - start, 1)}
        finally:
            write_text_atomic(log_file(work, commit), "".join(log_text))
        return {"numbers": numbers, "seconds": round(time.perf_counter() - start, 1)}


def log_file(work: Path, commit: str) -> Path:
    """Where the output of ``commit``'s runs is kept."""
    return work / f"demo-{commit[:12]}.log"


class _Failed(Exception):
    """A run of a commit's code ended without its results."""


def _run(tree: Path, args: list[str], runs: Path, timeout: float, log_text: list[str]) -> Path:
    """The run folder that ``python -m iisan args`` made (the one under ``runs``, or ``runs`` itself), run with
    ``tree``'s code on one thread; its output appended to ``log_text``."""
    env = {**os.environ, **ONE_THREAD, "PYTHONPATH": str(tree)}
    log_text.append(f"$ iisan {' '.join(args)}\n")
    try:
        done = subprocess.run([sys.executable, "-m", "iisan", *args], cwd=tree, env=env, capture_output=True,
                              text=True, timeout=timeout, check=False)
        output, failed = done.stdout + done.stderr, done.returncode and f"exit status {done.returncode}"
    except subprocess.TimeoutExpired as err:
        output, failed = _text(err.stdout) + _text(err.stderr), f"over --timeout {timeout:g} s"
    log_text.append(output)
    found = [runs] if (runs / "results.json").is_file() else [p.parent for p in sorted(runs.glob("*/results.json"))]
    if failed or len(found) != 1:
        last = (output.strip().splitlines() or [""])[-1]
        raise _Failed(f"iisan {args[0]}: {failed or f'{len(found)} run folders'}: {last}")
    return found[0]


def _text(value: bytes | str | None) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else value or ""


def differences(before: dict, after: dict, most: int = 3) -> list[str]:
    """Up to ``most`` numbers that differ, as ``where: before -> after``, in the order they were computed."""
    found: list[str] = []

    def walk(a, b, where: str) -> None:
        if len(found) >= most:
            return
        if isinstance(a, dict) and isinstance(b, dict):
            for key in dict.fromkeys([*a, *b]):
                walk(a.get(key, ABSENT), b.get(key, ABSENT), f"{where} {key}".strip())
        elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
            for i, (x, y) in enumerate(zip(a, b, strict=True)):  # (epochs 3 -> epoch 3)
                walk(x, y, f"{where.removesuffix('s')} {i}")
        elif a != b:
            found.append(f"{where}: {a!r} -> {b!r}" if not isinstance(a, list) else f"{where}: {len(a)} -> "
                         f"{len(b) if isinstance(b, list) else b!r} entries")

    walk(before, after, "")
    return found


class _Absent:
    """A number one side does not have, as ``differences`` says it."""

    def __repr__(self) -> str:
        return "(absent)"


ABSENT = _Absent()


def first_change(line: list[str], base: dict,
                 numbers_of: Callable[[str], dict | None]) -> tuple[str | None, list[str]]:
    """The first commit of ``line`` whose numbers differ from ``base`` (None: the last one's do not), by halving:
    about log2(len(line)) runs; and the commits just before it whose runs failed (``numbers_of`` gives None; the
    last commit's must not), skipped as ``git bisect skip`` does: the change came with one of them or with the
    commit named. Right when numbers, once changed, never come back to ``base``'s; otherwise one of the commits
    where they change."""
    if not line or numbers_of(line[-1]) == base:
        return None, []
    same, differs = -1, len(line) - 1  # line[same] gives base's numbers (-1: the commit before the line)
    failed: set[int] = set()
    while untried := [i for i in range(same + 1, differs) if i not in failed]:
        middle = min(untried, key=lambda i: abs(2 * i - same - differs))  # the middle, or the nearest not failed
        if (numbers := numbers_of(line[middle])) is None:
            failed.add(middle)
        else:
            same, differs = (middle, differs) if numbers == base else (same, middle)
    return line[differs], line[same + 1:differs]


class Outcomes:
    """Each commit's outcome: its runs' numbers (``commit_numbers``), kept in ``work/numbers-<commit>.json`` with
    the environment they were computed in, so that a second call in the same environment (another range, an
    interrupted bisection, other ``live`` methods) runs no commit twice, and the JSON ``out`` written after
    every commit. ``numbers`` holds the demo's and those of the ``live`` methods alone."""

    def __init__(self, repo: Path, work: Path, out: Path, timeout: float, live: tuple[str, ...] = ()):
        work, out = Path(work).resolve(), Path(out).resolve()  # (each run's working folder is its commit's code)
        self.repo, self.work, self.out, self.timeout, self.live, self.rows = repo, work, out, timeout, live, {}
        self.runs, self.ran, self.environment = ("demo", *live), 0, environment()
        claim_output(out, is_own, "a result of numbers_by_commit.py", "--out", overwrite=True)
        work.mkdir(parents=True, exist_ok=True)

    def outcome(self, commit: str) -> dict:
        if commit not in self.rows:
            row = self.kept_or_run(commit)
            if "numbers" in row:
                row = {**row, "numbers": {run: row["numbers"][run] for run in self.runs}}
            self.rows[commit] = row
            self.save()
        return self.rows[commit]

    def kept_or_run(self, commit: str) -> dict:
        """``commit``'s kept row where it was computed in this environment and holds every run asked for; else
        its runs now (a failure is not kept: it is tried again next time, it may have been the machine)."""
        kept_path = self.work / f"numbers-{commit}.json"
        kept = _payload(kept_path)
        kept = kept if kept and kept.get("environment") == self.environment and "numbers" in kept else None
        if kept is not None and set(self.runs) <= set(kept["numbers"]):
            return kept
        for path, what, owned in ((kept_path, "a result", is_own), (log_file(self.work, commit), "a log", _is_log)):
            claim_output(path, owned, f"{what} of numbers_by_commit.py", "--work", overwrite=True)
        about = described(self.repo, commit)
        log.info("%s: running its %s on one thread (%.60s)", commit[:12], " and ".join(self.runs), about["subject"])
        row = {"format": FORMAT, **about, "full": commit, "environment": self.environment,
               **commit_numbers(self.repo, commit, self.work, self.timeout, self.live)}
        self.ran += 1
        if "numbers" in row:
            row["numbers"] = {**(kept or {}).get("numbers", {}), **row["numbers"]}  # runs asked before too
            write_json_atomic(kept_path, row)
        return row

    def numbers(self, commit: str) -> dict:
        row = self.outcome(commit)
        if "numbers" not in row:
            raise UserError(f"the runs of {commit[:12]} failed ({row['error']}); their output: "
                            f"{log_file(self.work, commit)}")
        return row["numbers"]

    def save(self) -> None:
        write_json_atomic(self.out, {"format": FORMAT, "environment": self.environment,
                                     "rows": list(self.rows.values())})


def environment() -> dict:
    """What besides the code decides a run's bits: the interpreter, the libraries, the CPU, the threads and the
    live runs' steps."""
    from ..devices import cpu_model  # (torch: not for --help)
    from ..provenance import versions

    return {**versions(), "cpu": cpu_model(), "threads": 1, "live_steps": " ".join(LIVE_STEPS)}


def _is_log(path: Path) -> bool:
    return starts_with(path, "$ iisan ")


def _payload(path: Path) -> dict | None:
    """The JSON at ``path`` when this module wrote it (its ``format``), else None."""
    try:
        payload = parse_json(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return payload if isinstance(payload, dict) and payload.get("format") == FORMAT else None


def is_own(path: Path) -> bool:
    return _payload(path) is not None


def summary_line(row: dict, base: dict | None) -> str:
    """One commit's lines: its date and subject; each run's best epoch and headline metrics; how they compare."""
    head = f"{row['commit']} {row['date']} {row['subject'][:60]}"
    if "numbers" not in row:
        return f"{head}\n    failed: {row['error']}"
    lines = [head]
    for run, numbers in row["numbers"].items():
        metrics = " ".join(f"{split} {label(m)} {numbers[split][m]:.4f}" for split in ("valid", "test")
                           for m in HEADLINE if isinstance((numbers.get(split) or {}).get(m), float))
        lines.append(f"    {run}: best epoch {numbers['best_epoch']}, {metrics}")
    if base is not None:
        changed = [run for run, numbers in row["numbers"].items() if numbers != base.get(run)]
        lines.append("    " + (f"other numbers ({', '.join(changed)}): " + "; ".join(differences(base, row["numbers"]))
                               if changed else "the same numbers"))
    return "\n".join(lines)
