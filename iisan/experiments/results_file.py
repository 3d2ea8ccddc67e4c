"""Reading the results.json files of runs for a table: finding them under the folders given (each
file once, however it was named), and checking that every field a row or a curve reads is there and of
its type (``check_results``); a file that fails says which field and what it should be. And the header row of
a CSV file (``csv_header``): what tells a table of runs ``iisan results`` wrote from someone else's file."""

from __future__ import annotations

import csv
import json
import logging
import os
from pathlib import Path

from ..config import Config
from ..errors import ConfigError, parse_json
from ..files import failure_reason
from ..locks import RUN_LOCK, held
from ..methods import METHOD_NAMES
from ..metric_names import SELECTED_BY, TABLED

log = logging.getLogger(__name__)


def find_results(folders: list[str]) -> list[Path]:
    """Every results.json under ``folders`` (a results.json itself is accepted too), sorted, each once:
    overlapping arguments (``runs/ runs/demo-seed0``) name the same file twice."""
    found: list[Path] = []
    for folder in map(Path, folders):
        if folder.is_file() and folder.name == "results.json":
            found.append(folder)
        elif folder.is_dir():
            found += sorted(results_under(folder))
        elif not folder.exists():
            raise ConfigError(f"{folder} does not exist")
        else:
            raise ConfigError(f"{folder} is neither a run folder nor a results.json")
    if not found:
        raise ConfigError(f"no results.json under {', '.join(folders)} (a run writes one once it has read its data; "
                          "one stopped before, or by an older IISAN version that wrote it at the end, has none: its "
                          "command, run again, resumes it)")
    first: dict[Path, Path] = {}
    for path in found:
        first.setdefault(path.resolve(), path)  # resolved: links and relative paths are the same run too
    return list(first.values())


# A run folder's folders that hold no run: ``train.checkpoint.CHECKPOINTS`` and ``train.records.TENSORBOARD``
# (named here: reading results loads no torch).
RUN_PARTS = ("checkpoints", "tensorboard")


def results_under(folder: Path) -> list[Path]:
    """Every results.json below ``folder``, through linked folders too (a run folder linked into a folder
    of runs is one of them), each real folder walked once (a link back up is no loop); a folder that cannot
    be listed (another user's) is named in a warning. A run folder's checkpoints and tensorboard folders, where
    no run is, are not walked (``RUN_PARTS``)."""
    found, walked = [], set()

    def unlisted(err: OSError) -> None:  # (os.walk passes a folder it cannot list by, without a word)
        if isinstance(err, FileNotFoundError):  # gone since its parent was listed (a run's temporary, renamed)
            return
        log.warning("could not list %s (%s): the runs under it are left out", err.filename, failure_reason(err))

    for root, dirs, files in os.walk(folder, followlinks=True, onerror=unlisted):
        if (real := os.path.realpath(root)) in walked:
            dirs.clear()
            continue
        walked.add(real)
        if "results.json" in files:
            found.append(Path(root) / "results.json")
            dirs[:] = [d for d in dirs if d not in RUN_PARTS]  # (a listing of every checkpoint, each time)
        if "results.json" not in files and {"config.json", "best.safetensors"} <= set(files):  # (damaged: counted)
            log.warning("%s holds a run's config.json and best.safetensors but no results.json: left out", root)
    return found


def csv_header(path: Path) -> list[str] | None:
    """The column names on the first line of a CSV file; None where its first 64 KiB hold no whole line of
    UTF-8 text (no table of runs has such a header)."""
    with open(path, "rb") as fh:
        line, newline, _ = fh.read(1 << 16).partition(b"\n")
    try:
        return next(csv.reader([line.decode()]), None) if newline else None
    except (UnicodeDecodeError, csv.Error):
        return None


class DamagedResults(ValueError):
    """A results.json this table cannot use; the message says which field is wrong and what it should be."""


def _shown(value) -> str:
    """A JSON value as a message shows it: a container by its kind, anything else as JSON writes it."""
    if isinstance(value, (dict, list)):
        return "an object" if isinstance(value, dict) else "a list"
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


# What a field can be asked to hold: a test, and how a message says it.
EXPECTED = {
    "object": (lambda v: isinstance(v, dict), "an object"),
    "list": (lambda v: isinstance(v, list), "a list"),
    "string": (lambda v: isinstance(v, str), "a string"),
    "integer": (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
    "number": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "a number"),  # NaN too
}


def _field(parent: dict, key: str, expected: str, where: str = "", optional: bool = False):
    """``parent[key]`` if it holds the ``expected`` kind; an ``optional`` field may be absent or null
    (None then). ``where`` names the parent in the message (``"test."``)."""
    test, what = EXPECTED[expected]
    value = parent.get(key)
    if optional and value is None:
        return None
    if key not in parent:
        raise DamagedResults(f"{where}{key} is missing, expected {what}")
    if not test(value):
        raise DamagedResults(f"{where}{key} is {_shown(value)}, expected {what}{' or null' if optional else ''}")
    return value


def check_results(results) -> None:
    """Raise ``DamagedResults`` at the first field that a row or a curve reads and that is missing or of
    the wrong type (``train.records`` writes them: metrics, timing and memory are empty or null until an
    epoch ends). The config is checked as ``Config`` checks one, keys the file predates at their defaults
    and keys since dropped ignored."""
    if not isinstance(results, dict):
        raise DamagedResults(f"the file holds {_shown(results)}, expected an object")
    for key in ("method", "feed", "device"):
        _field(results, key, "string")
    if "status" in results:  # a file without one was written only at the end: finished
        _field(results, "status", "string")
    _field(results, "best_epoch", "integer")
    _field(results, "world_size", "integer", optional=True)  # the table's processes column
    sizes = _field(results, "world_sizes", "list", optional=True) or []  # files since commit 97f1c17
    if not all(EXPECTED["integer"][0](n) for n in sizes):
        raise DamagedResults(f"world_sizes is {json.dumps(sizes)[:40]}, expected a list of integers")
    _field(results, "stopped", "string", optional=True)  # why --nonfinite authors ended training
    _field(results, "working_dir", "string", optional=True)  # what relative data paths are relative to
    step = _field(results, "step", "object", optional=True) or {}
    for key in _field(step, "cache_dtypes", "object", "step.", optional=True) or {}:
        _field(step["cache_dtypes"], key, "string", "step.cache_dtypes.")
    parameters = _field(results, "parameters", "object")
    _field(parameters, "trainable", "integer", "parameters.")
    for key in _field(parameters, "by_rate", "object", "parameters.", optional=True) or {}:  # files since 2026-12
        _field(parameters["by_rate"], key, "integer", "parameters.by_rate.")
    for split, metrics in (("valid", [SELECTED_BY]), ("test", TABLED)):
        scores = _field(results, split, "object", optional=True) or {}
        for metric in metrics:
            _field(scores, metric, "number", f"{split}.", optional=True)
    timing = _field(results, "timing", "object", optional=True) or {}
    _field(timing, "train_seconds_per_epoch", "number", "timing.", optional=True)
    memory = _field(results, "peak_memory", "object", optional=True) or {}
    training = _field(_field(results, "peak_memory_by_phase", "object", optional=True) or {}, "training", "object",
                      "peak_memory_by_phase.", optional=True) or {}
    for key in ("max_allocated_gib", "peak_rss_gib"):
        _field(memory, key, "number", "peak_memory.", optional=True)
        _field(training, key, "number", "peak_memory_by_phase.training.", optional=True)
    for i, epoch in enumerate(_field(results, "epochs", "list")):
        if not isinstance(epoch, dict):
            raise DamagedResults(f"epochs[{i}] is {_shown(epoch)}, expected an object")
        _field(epoch, "epoch", "integer", f"epochs[{i}].")
        _field(epoch, "loss", "number", f"epochs[{i}].", optional=True)  # null: non-finite (files.json_text)
        _field(_field(epoch, "valid", "object", f"epochs[{i}]."), SELECTED_BY, "number", f"epochs[{i}].valid.")
    if results["method"] not in METHOD_NAMES.values():
        raise DamagedResults(f"method is {_shown(results['method'])}, expected one of "
                             f"{', '.join(METHOD_NAMES.values())}")
    last = max((e["epoch"] for e in results["epochs"]), default=-1)
    if not -1 <= results["best_epoch"] <= last:
        raise DamagedResults(f"best_epoch is {results['best_epoch']}, expected -1 (none yet) to {last}, the last epoch "
                             "it records")
    config = _field(results, "config", "object")
    try:
        Config.from_dict({k: v for k, v in config.items() if k in Config.__dataclass_fields__})
    except ConfigError as err:
        raise DamagedResults(f"config: {err}") from None


def load_results(path: Path) -> dict:
    """The contents of a results.json, checked by ``check_results``; ``DamagedResults`` says why not."""
    try:
        results = parse_json(path.read_bytes())
    except OSError as err:
        raise DamagedResults(f"cannot be read ({err.strerror or err})") from None
    except UnicodeDecodeError as err:
        raise DamagedResults(f"not UTF-8 text (at byte offset {err.start}), so not JSON") from None
    except json.JSONDecodeError as err:
        raise DamagedResults(f"not valid JSON ({err.msg} at line {err.lineno})") from None
    except ValueError:  # a number of over 4300 digits, arrays nested thousands deep
        raise DamagedResults("not JSON this table can read (a number too long or nesting too deep)") from None
    check_results(results)
    return results


def status(path: Path, results: dict) -> str:
    """How the run ended, as its results file says (a file without a status was written only at the end);
    ``stopped`` for one that says ``running`` whose folder no process holds (killed: SIGKILL, a lost node)."""
    said = results.get("status", "finished")
    return "stopped" if said == "running" and held(path.parent / RUN_LOCK) is False else said


def run_ending(results: dict) -> str:
    """'failed (why)' or 'was interrupted (why)' from a run's results; '' for any other status."""
    said, error = results.get("status"), results.get("error", "")
    if said not in ("failed", "interrupted"):
        return ""
    return f"{said if said == 'failed' else 'was interrupted'} ({error})" if error else said


def without_weights(path: Path, results: dict) -> str:
    """Why the run of the results file ``path`` has no best.safetensors to use, by how it ended."""
    said, run_dir = status(path, results), path.parent
    if ended := run_ending(results) or ("was killed (its command, run again, starts it again)" if said == "stopped"
                                        else ""):
        return f"{run_dir} holds a run that {ended} before an epoch's validation wrote best.safetensors: nothing to use"
    if said == "finished" and results:  # deleted or moved since it finished
        return (f"{run_dir} is a finished run without its best.safetensors: its command, run again, writes it again "
                "from the checkpoint of its best epoch, where one is kept")
    return f"{run_dir} has no best.safetensors yet (written when an epoch's validation improves)"


def unfinished(path: Path, results: dict, epochs: int) -> str:
    """What a command that uses a run's best weights says of a run that stopped, was interrupted or failed
    after some epochs of its ``epochs`` ('' for any other): a rerun of its command finishes it."""
    ended, done = status(path, results), len(results.get("epochs") or [])
    if ended not in ("stopped", "interrupted", "failed") or not done:
        return ""
    return (f"{path.parent} {'failed' if ended == 'failed' else 'was ' + ended} after {done} of its {epochs} "
            "epochs: its best weights so far are used; its command, run again, resumes it")


def ran_from(path: Path, results: dict, cfg: dict) -> str:
    """The folder the run of the results file ``path`` ran from: as recorded; for files of versions that recorded
    none, the folder its relative ``out_dir`` leads from to the run's folder (``runs/<name>``), else ''."""
    if isinstance(results.get("working_dir"), str):
        return results["working_dir"]
    out, holder = Path(str(cfg.get("out_dir") or ".")), path.absolute().parent.parent
    if out.is_absolute() or ".." in out.parts or (out.parts and holder.parts[-len(out.parts):] != out.parts):
        return ""
    return str(Path(*holder.parts[:len(holder.parts) - len(out.parts)]))


def check_run_folder(run_dir: Path) -> None:
    """One line when ``run_dir`` is no folder: said before a command loads torch to read the run (seconds)."""
    if not run_dir.is_dir():
        raise ConfigError(f"run folder {run_dir} does not exist" if not run_dir.exists()
                          else f"{run_dir} is a file; expected a run folder (runs/<name>)")
