"""Where a run lives. A run folder's default name comes from what the run computes (method, feed, data
set and a short hash of the config), never from the clock, so running the same command again finds the
same folder: a run with checkpoints resumes, a finished one is skipped.

The hash leaves out the keys that may change between a checkpoint and the run resuming it
(``checkpoint.MAY_CHANGE``: where and how fast things run, how long, how they are reported), so that a
longer ``--epochs`` or another ``--device`` continues the same run, and every key at its field default,
so that a field added to ``Config`` later leaves the names of earlier runs as they were.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from pathlib import Path

from ..config import Config
from ..distributed import launched_processes
from ..errors import ConfigError, error_line
from ..files import failure_reason
from .checkpoint import MAY_CHANGE, config_differences

log = logging.getLogger(__name__)

RESULTS = "results.json"
CHECKPOINTS = "checkpoints"  # the run folder's folder of checkpoints (``checkpoint.py``)


def config_hash(cfg: Config) -> str:
    """Eight hex digits naming what ``cfg`` computes (see the module docstring)."""
    defaults = Config().to_dict()
    values = {k: v for k, v in cfg.to_dict().items() if k not in MAY_CHANGE and v != defaults[k]}
    return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:8]


def path_component(text: str) -> str:
    """``text`` made safe as (part of) one folder name: runs of other characters become ``_``."""
    return re.sub(r"[^A-Za-z0-9.+=-]+", "_", text).strip("._") or "_"


def data_name(cfg: Config) -> str:
    """The data set's name: the users file's folder (``Dataset/Scientific/...tsv`` -> ``Scientific``)."""
    users = Path(cfg.users)
    return path_component(users.parent.name or users.stem or "nodata")


def default_run_name(cfg: Config, tag: str = "") -> str:
    """``iisan-cached-Scientific-3fa2c1d0``; ``tag`` (a sweep's varying values, e.g. ``lr0.0001``) and
    ``smoke`` are added before the hash, to be read by people; the hash alone keeps runs apart, with the
    number of processes under torchrun (``-4proc``): each process has its own batch of users, so a run
    of 4 processes computes something else than one of 1 (``--run-name`` resumes across counts)."""
    processes = launched_processes()
    parts = [cfg.method, cfg.feed, data_name(cfg), "smoke" if cfg.smoke else "", path_component(tag) if tag else "",
             f"{processes}proc" if processes > 1 else "", config_hash(cfg)]
    return "-".join(p for p in parts if p)


def run_dir(cfg: Config) -> Path:
    return Path(cfg.out_dir) / (cfg.run_name or default_run_name(cfg))


def reusable_results(cfg: Config) -> dict | None:
    """``finished_results``, logged when found, with the summary line the run ended with: what a run or a
    sweep returns instead of training again."""
    done = finished_results(cfg)
    if done is not None:
        log.info("%s finished before with this config; not training it again", done["run_dir"])
        log_summary(done, run_dir(cfg) / RESULTS)
    return done


def log_summary(results: dict, path: Path) -> None:
    """The last line of a finished run (and of a rerun that finds it finished): the best epoch, its valid
    and test HR@10 / NDCG@10, and the results file. A results file whose numbers are not numbers (written
    by hand) gets no summary rather than a logging error."""
    valid, test = results.get("valid") or {}, results.get("test") or {}
    numbers = [results.get("best_epoch")] + [m.get(k, 0) if isinstance(m, dict) else None
                                             for m in (valid, test) for k in ("hit@10", "ndcg@10")]
    if all(isinstance(n, (int, float)) and not isinstance(n, bool) for n in numbers):
        log.info("best epoch %d | valid hit@10 %.4f ndcg@10 %.4f | test hit@10 %.4f ndcg@10 %.4f | %s",
                 *numbers, path)


def results_or_reason(path: Path) -> tuple[dict, str]:
    """The results file at ``path`` as a dict and ''; or {} and why it cannot be used ('' when absent)."""
    try:
        results = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}, ""
    except OSError as err:
        return {}, f"cannot be read ({failure_reason(err)})"
    except json.JSONDecodeError as err:
        return {}, f"not valid JSON ({err.msg} at line {err.lineno})"
    except (ValueError, RecursionError) as err:  # not UTF-8, an integer of over 4300 digits, nesting too deep
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
    if not results or results.get("status", "finished") != "finished":
        return None
    return results


def finished_results(cfg: Config) -> dict | None:
    """The results of ``cfg``'s run folder when that run has finished with exactly this config's
    computation, epochs and patience (nothing left to do), else None."""
    results = finished_file(run_dir(cfg) / RESULTS)
    if results is None:
        return None
    saved, current = results.get("config") or {}, cfg.to_dict()
    if config_differences(saved, current) or any(saved.get(k) != current[k] for k in ("epochs", "patience")):
        return None
    return results


def refuse_to_overwrite(folder: Path, cfg: Config) -> None:
    """Before a fresh start in ``folder`` with no checkpoint to resume: a run there that left results
    (its checkpoints removed to save space) would be overwritten. Refused when that run had another
    config or had finished; a same-config run that stopped before its first checkpoint starts again."""
    earlier, damage = results_or_reason(folder / RESULTS)
    if damage:
        log.warning("%s: %s; the run there is judged by its config.json alone", folder / RESULTS, damage)
    if not earlier:  # its config.json alone still says what its best.safetensors is
        written = read_results(folder / "config.json")
        differences = config_differences(written, cfg.to_dict()) if written else []
        if differences:
            raise ConfigError(f"{folder / 'config.json'} belongs to a run of another config ({'; '.join(differences)}) "
                              "and no checkpoint or results are left; use another --run-name to start a new run")
        return
    saved = earlier.get("config")
    differences = config_differences(saved if isinstance(saved, dict) else {}, cfg.to_dict())
    if differences:
        raise ConfigError(f"{folder / RESULTS} belongs to a run of another config ({'; '.join(differences)}) and "
                          "no checkpoint is left to resume; use another --run-name to start a new run")
    if earlier.get("status", "finished") == "finished":
        raise ConfigError(f"{folder / RESULTS} is a finished run with no checkpoint left to continue it; starting "
                          "again would overwrite it: use another --run-name")
