"""Where a run lives: its folder (named by ``runnames``), and what an earlier run left there means (a finished
run is reused, a folder of another config refused). A run writes only into its own folder
(``claim_run_folder``): absent, empty, one a run made (its config or results say so, or it holds only what a
run writes first, as a run writes it), and one process at a time (``lock_run_folder``).
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

from safetensors import safe_open

from ..claims import refuse_broken_link
from ..config import Config
from ..console import metrics_text
from ..distributed import Dist, main_process
from ..errors import ConfigError, OutputError, TrainingError, UserError, error_line, parse_json
from ..files import TEMPORARY, check_readable, failure_reason, remove, write_failure
from ..locks import RUN_LOCK, OutputLock, is_lock_file
from ..metric_names import HEADLINE, SELECTED_BY, UNSAID
from . import checkpoint, runstate
from .checkpoint import CHECKPOINTS, checked_state, checkpoints, config_differences, recorded_content
from .checkpoint_writing import prune, prune_finished, recorded_keep
from .decisions import decide
from .plan import ran_otherwise
from .run_results import is_finished, read_results, results_or_reason
from .runnames import run_dir
from .same_inputs import kept_nothing, refuse_changed_data

log = logging.getLogger(__name__)

RESULTS, BEST = "results.json", "best.safetensors"


def reusable_results(cfg: Config, again: bool = False, folder: Path | None = None) -> dict | None:
    """``finished_results``, logged when found, with the summary line the run ended with: what a run or a
    sweep returns instead of training again, its ``run_dir`` the folder it is in now (a copied run's results
    name the folder it was copied from). A run folder whose run read another content of the users or
    items file is refused first (``refuse_changed_data``), whatever its status; a finished run whose best
    weights are missing or damaged is not reused (``unfinished_weights``; ``again``, a second look once the
    folder is locked: left to the resume quietly, as the first look said). What an attempt killed before its
    pruning left is pruned at the first look (``tidy_finished``). ``folder``: the run's, where known (else
    ``run_dir``'s)."""
    folder = folder or run_dir(cfg)
    earlier = read_results(folder / RESULTS)
    refuse_changed_data(cfg, earlier, folder)
    done = finished_results(cfg, earlier)
    if done is not None and (best_weights_problem(folder) is None if again else
                             not unfinished_weights(folder, cfg, done)):
        if not again and main_process():
            tidy_finished(folder, recorded_keep(done, cfg.keep_checkpoints), cfg.to_dict())
        done = {**done, "run_dir": str(folder)}
        otherwise = ran_otherwise(cfg, done)
        log.log(logging.WARNING if otherwise and main_process() else logging.INFO, "%s finished before with this "
                "config; not training it again%s", folder, otherwise)  # (said once under torchrun: by rank 0)
        log_summary(done, folder / RESULTS)
        return done
    return None


def agreed_results(cfg: Config, dist: Dist, again: bool = False, folder: Path | None = None) -> dict | None:
    """``reusable_results`` of rank 0 on every rank, in a process group (collective): rank 0's copy of the data
    names the run (``runnames``), and every rank must take the same branch (one returning a finished run while
    the others train waits for ever). Its refusal is every rank's (``decisions.decide``)."""
    if not dist.enabled:
        return reusable_results(cfg, again, folder)
    done, text = decide(lambda: reusable_results(cfg, again, folder), dist,
                        lambda done: "" if done is None else json.dumps(done))
    return done if dist.is_main else parse_json(text) if text else None


def tidy_finished(folder: Path, keep: int, config: dict) -> None:
    """A finished run's checkpoints (in ``folder``) pruned by its own ``keep`` where an attempt killed before its
    pruning left more (``checkpoint_writing.prune_finished``), with the folder locked; left as they are where it
    cannot be (in use: a longer run resuming it; a folder this user may not write)."""
    if not prune(folder / CHECKPOINTS, keep, config, None, dry=True):
        return
    try:
        with OutputLock(folder / LOCK, f"run folder {folder}"):
            prune_finished(folder / CHECKPOINTS, keep, config)
    except UserError as err:
        log.debug("%s: its finished run's checkpoints are left unpruned: %s", folder, err)


def best_weights_problem(folder: Path) -> tuple[str, str] | None:
    """Why the best weights of the run in ``folder`` are not usable, and the start of a remedy: the file is
    missing, cannot be read, or is no safetensors file whose header parses (only the header is read); None
    when they are usable."""
    best = folder / BEST
    try:
        check_readable(best)  # safetensors calls a file it may not read missing
        with safe_open(str(best), framework="pt"):
            return None
    except FileNotFoundError:
        return f"{best} is missing", ""
    except OSError as err:  # present, but not for this user ('Permission denied'), or a folder
        return f"{best} cannot be read ({failure_reason(err)})", \
            "make it readable, " if isinstance(err, PermissionError) else ""
    except Exception as err:  # safetensors raises its own types for damaged files
        return f"{best} is not a readable safetensors file ({error_line(err)})", ""


def unfinished_weights(folder: Path, cfg: Config, done: dict) -> bool:
    """Whether the finished run in ``folder`` (``done``: its results) lacks usable best weights
    (``best_weights_problem``). Its resume then writes them again when its newest checkpoint holds its best
    epoch (``weights.ensure_best_weights``); otherwise nothing can, and the run is refused."""
    found = best_weights_problem(folder)
    if found is None:
        return False
    (problem, remedy), config, best, root = found, cfg.to_dict(), done.get("best_epoch"), folder / CHECKPOINTS
    # the newest checkpoint resuming would take (its state alone: the resume loads it)
    path, state = next(((p, s) for p in checkpoints(root) if isinstance(s := checked_state(p, config), dict)),
                       (None, None))
    if state is not None and state["step"] is None and state["early_stopping"]["best_epoch"] == state["epoch"]:
        log.warning("%s, so the run is not finished: resuming from %s, which holds its best epoch, to write it "
                    "again", problem, path)
        return True
    raise TrainingError(f"{problem}, and the checkpoint of {folder} a resume takes (the newest) does not hold its best "
                        f"epoch ({best}) to write it again from: {checkpoint.move_newer_out(root, best)}{remedy}"
                        f"restore {BEST} from a copy, or use another --run-name to train again")


def log_summary(results: dict, path: Path) -> None:
    """The last line of a finished run (and of a rerun that finds it finished): the best epoch, its valid
    and test HR@10 / NDCG@10, and the results file. A results file whose numbers are not numbers (written
    by hand) gets no summary rather than a logging error."""
    splits = [{k: m.get(k, 0) for k in HEADLINE} if isinstance(m, dict) else {}
              for m in (results.get("valid") or {}, results.get("test") or {})]
    numbers = [results.get("best_epoch"), *(split.get(k) for split in splits for k in HEADLINE)]
    if all(isinstance(n, (int, float)) and not isinstance(n, bool) for n in numbers):
        log.info("best epoch %d | valid %s | test %s | %s", numbers[0], *map(metrics_text, splits), path)


def finished_results(cfg: Config, results: dict) -> dict | None:
    """``results`` (what ``cfg``'s run folder holds) when that run has finished with exactly this config's
    computation, epochs and patience (nothing left to do), its best epoch chosen by the metric that chooses
    now (``metric_names.SELECTED_BY``; files that do not say: ``UNSAID``), else None."""
    saved, current = results.get("config"), cfg.to_dict()
    if not is_finished(results) or not isinstance(saved, dict):  # a config edited into no object proves nothing
        return None
    differences = config_differences(saved, current, results.get("working_dir"), content=recorded_content(results))
    if differences or any(saved.get(k) != current[k] for k in ("epochs", "patience")) or \
            results.get("selected_by", f"valid {UNSAID}") != f"valid {SELECTED_BY}":
        return None
    return results


def refuse_to_overwrite(folder: Path, cfg: Config) -> None:
    """Before a fresh start in ``folder`` with no checkpoint to resume: a run there that left results
    (its checkpoints removed to save space) would be overwritten. Refused when that run had another
    config or had finished; a same-config run that stopped before its first checkpoint starts again, and so
    does one of any config that ended before its first epoch (a refused value, a missing file), or that left
    only its config.json (killed as it set up: with data at another place, say). Results this
    user may not read are refused: they may be those of a finished run."""
    earlier, damage = results_or_reason(folder / RESULTS)
    if damage.startswith("cannot be read"):
        raise OutputError(f"{RESULTS} of {folder} {damage}: make it readable, or use another --run-name")
    if damage:
        log.warning("%s: %s; the run there is judged by its config.json alone", folder / RESULTS, damage)
    if not earlier:  # its config.json alone still says what its best.safetensors is
        written = read_results(folder / "config.json")
        differences = config_differences(written, cfg.to_dict()) if written else []
        if differences and not damage and kept_nothing(folder):  # killed as it set up, before its results.json
            log.info("%s: the run there left no results, checkpoint or best weights (killed as it set up); it starts "
                     "again with this config", folder)
            return
        if differences:
            raise ConfigError(f"{folder / 'config.json'} belongs to a run of another config ({'; '.join(differences)}) "
                              "and no checkpoint or results are left; use another --run-name to start a new run")
        return
    if earlier.get("epochs") == [] and kept_nothing(folder):  # no epoch, no weights: nothing lost but a record
        log.info("%s: the run there ended before its first epoch (%s); it starts again with this config (train.log "
                 "keeps the record)", folder, earlier.get("error") or earlier["status"].replace("running", "killed"))
        return
    saved = earlier.get("config") if isinstance(earlier.get("config"), dict) else {}
    differences = config_differences(saved, cfg.to_dict(), earlier.get("working_dir"),
                                     content=recorded_content(earlier))
    if differences:
        raise ConfigError(f"{folder / RESULTS} belongs to a run of another config ({'; '.join(differences)}) and "
                          "no checkpoint is left to resume; use another --run-name to start a new run")
    if earlier.get("status", "finished") == "finished":
        raise ConfigError(f"{folder / RESULTS} is a finished run with no checkpoint left to continue it; starting "
                          "again would overwrite it: use another --run-name")


# --------------------------------------------------------------------------------------------------
# claiming the folder: a run writes only into its own


LOCK = RUN_LOCK


def is_run_folder(path: Path) -> bool:
    """Whether ``path`` is a run folder this project wrote: its ``config.json`` is a run's config, or its
    ``results.json`` records one (a run that failed before writing its config)."""
    for name, key in (("config.json", None), ("results.json", "config")):
        try:
            found = parse_json((path / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        config = found.get(key) if key and isinstance(found, dict) else found
        if isinstance(config, dict) and {"method", "feed", "lr"} <= set(config):
            return True
    return False


# What a run writes before its config (``records``): a folder holding only these was started by a run,
# when each is as a run writes it (``early_file_problem``).
EARLY = frozenset({LOCK, "train.log", "metrics.jsonl"})
ATOMIC = frozenset({"config.json", "results.json", "metrics.jsonl", "best.safetensors"})  # through a temporary sibling
# The first line of each start's header in train.log (``records.RunRecord.header``; an older run's: no zone).
LOG_HEAD = re.compile(r"=== [^\n]+: started \d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}(?: [+-]\d{4})? ===\n")


def early_file_problem(path: Path) -> str | None:
    """Why ``path``, one of the ``EARLY`` files, is not as a run writes it (None when it is): train.log is
    empty or starts with a header, metrics.jsonl is empty or one epoch record per line, .lock is empty
    or says ``pid N on HOST``."""
    if path.is_symlink() or not path.is_file():
        return "is not a plain file"
    try:
        if path.name == LOCK:
            return None if is_lock_file(path) else "is not a lock file IISAN wrote (empty or 'pid N on HOST')"
        with open(path, "rb") as fh:
            if path.name == "train.log":
                head = fh.readline(4096)
                return None if not head or LOG_HEAD.fullmatch(head.decode("utf-8", "replace")) else \
                    "does not start with the header an IISAN run writes ('=== <name>: started <time> ===')"
            for number, line in enumerate(fh, 1):
                try:
                    problem = runstate.epoch_problem(parse_json(line))
                except ValueError:  # not JSON (UnicodeDecodeError is a ValueError)
                    problem = "is not JSON"
                if problem:
                    return f"line {number} is not an epoch record of an IISAN run ({problem})"
    except OSError as err:
        return f"cannot be read ({failure_reason(err)})"
    return None


def killed_write(path: Path) -> bool:
    """Whether ``path`` is the temporary file of one of a run's atomic writes, left by a kill."""
    found = TEMPORARY.match(path.name)
    return found is not None and found.group("name") in ATOMIC and path.is_file() and not path.is_symlink()


def claim_run_folder(run_dir: Path) -> None:
    """A run writes into an absent or empty folder, or into its own run folder (to resume it); a folder
    holding anything else is refused, so a run never writes among files it did not create. A folder
    holding only ``EARLY`` files is a run's that stopped before writing its config when each of them is
    as a run writes it (``early_file_problem``); the temporary file of a write a kill cut short is a
    run's too (``killed_write``). A link to a folder is taken as that folder; a link to
    anything else is refused, and so is a folder inside a link to nothing (--out-dir)."""
    if not os.path.lexists(run_dir):
        refuse_broken_link(run_dir, "run folder")  # making it would fail with 'File exists'
        return
    if run_dir.is_symlink() and not run_dir.is_dir():  # a link to a folder is that folder
        raise OutputError(f"run folder {run_dir} is a symbolic link to no folder; give the path of a folder "
                          "(--out-dir, --run-name) or choose another --run-name")
    if not run_dir.is_dir():
        raise OutputError(f"run folder {run_dir} is a file; choose another --run-name")
    if is_run_folder(run_dir):
        return
    if unread := [f"{p} {why}" for p in (run_dir / "config.json", run_dir / RESULTS)  # not 'no run config.json'
                  if (why := results_or_reason(p)[1]).startswith("cannot be read")]:
        raise OutputError(f"run folder {run_dir} may be a run's, but {unread[0]}: make it readable, or choose "
                          "another --run-name or --out-dir")
    entries = [p for p in sorted(run_dir.iterdir()) if not killed_write(p)]
    why = "no run config.json" if any(p.name not in EARLY for p in entries) else next(
        (f"no run config.json, and {p} {problem}" for p in entries if (problem := early_file_problem(p))), None)
    if why:
        raise OutputError(f"run folder {run_dir} exists and is not an IISAN run folder ({why}); "
                          "IISAN writes only into its own run folders: choose another --run-name or --out-dir")


def lock_run_folder(run_dir: Path) -> OutputLock:
    """Claim ``run_dir`` (``claim_run_folder``) and hold an exclusive lock on it until the returned lock
    is closed, so that two processes never resume, and then overwrite, the same run. The OS drops the
    lock when its holder dies, even by SIGKILL, so a crashed run never leaves a stale lock behind."""
    claim_run_folder(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise write_failure(run_dir, err) from None
    lock = OutputLock(run_dir / LOCK, f"run folder {run_dir}", "wait for it to finish or use another --run-name",
                      ).acquire()
    for path in run_dir.iterdir():  # what killed runs left (no live writer: the lock is ours)
        if killed_write(path):
            remove(path)
    return lock
