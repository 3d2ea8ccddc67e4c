"""Checkpoints on disk: one folder per checkpoint, written atomically, checked before use.

Layout of ``<run>/checkpoints/``::

    epoch-0006/               epoch 6 finished (with its validation, early stopping and history)
    epoch-0007-step-00040/    interrupted (Ctrl-C) after 40 steps of epoch 7
        model.safetensors     trainable weights
        train_state.safetensors   optimiser tensors, RNG states, partial-epoch losses
        state.json            everything else, including the resolved config
        MANIFEST.json         sha256 and size of the three files above; written last

A checkpoint is written into a hidden temporary folder and renamed into place (``checkpoint_writing``), so a
crash, a kill or a full disk never leaves a half-written checkpoint under a real name, and the previous
checkpoints are only pruned after the new one is complete. Loading verifies the manifest and compares configs;
a checkpoint that fails either is refused with a one-line message and the one before it is tried.
"""

from __future__ import annotations

import logging
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..config import BEFORE_THE_FIELD, DEFAULT_MODELS, Config, is_default_model, model_location
from ..data.run_data import images_content
from ..digests import known_fingerprint, sha256
from ..distributed import launched_processes
from ..errors import TrainingError, UserError, error_line, parse_json
from ..files import check_readable, failure_reason
from ..methods import MAY_CHANGE, unread_keys
from ..model.build import picked_layers
from ..spelling import one_spelling
from . import runstate

log = logging.getLogger(__name__)

FORMAT = "iisan-checkpoint/1"
MODEL, TRAIN_STATE, STATE = "model.safetensors", "train_state.safetensors", "state.json"
MANIFEST = "MANIFEST.json"
FILES = (MODEL, TRAIN_STATE, STATE)
NAME = re.compile(r"^epoch-(\d{4,})(?:-step-(\d+))?$")

DATA_PATHS = ("users", "items", "images")  # relative paths are taken from the working folder
MODEL_PATHS = ("text_model", "image_model")  # so are encoder folders found from there
PATHS = frozenset({*DATA_PATHS, *MODEL_PATHS})  # spelt otherwise by a resumed run; their contents are compared apart


def same_paths(values: dict, working_dir: object = None, spelling: bool = True) -> dict:
    """``values`` with each data path, and each encoder folder found there, absolute: a relative one taken
    from ``working_dir`` (the folder the run that saved ``values`` ran in; here when not known), so that
    two spellings of one file are one setting (the data files' contents are compared by fingerprint:
    ``same_inputs.refuse_changed_data``; two places of one content are one setting by ``data_content``, in run
    names and in ``config_differences``). ``spelling``: an encoder folder's spelling counts for nothing either
    (a default's with a trailing ``/``, one under ``~``, one not here as ``x/``); without it, as run names
    hashed paths before commit fe0d88d (``runnames.HASHES``)."""
    base = working_dir if isinstance(working_dir, str) and working_dir else os.getcwd()

    def same(key: str, value: object) -> object:
        if not isinstance(value, str) or not value or key not in PATHS:
            return value
        if key in MODEL_PATHS and (is_default_model(value) if spelling else value in DEFAULT_MODELS.values()):
            return str(model_location(value))  # under the repository, from any folder
        value = os.path.expanduser(value) if key in MODEL_PATHS and spelling else value  # (as the loader finds it)
        there = os.path.abspath(os.path.join(base, value))
        if key in DATA_PATHS or os.path.isdir(there):
            return there
        # a model folder not here: a Hub id, or a cached run's encoder elsewhere (``x/``, ``./x`` and ``x`` alike)
        return os.path.normpath(value) if spelling else value

    return {k: same(k, v) for k, v in values.items()}


def data_content(key: str, path: object, cache_dir: str | None = None) -> str | None:
    """What names the content of the data at ``path`` for the config key ``key`` (one of ``DATA_PATHS``): a users or
    items file's fingerprint, the images' digest (``run_data.images_content``: the LMDB's, or where it is not here
    the image cache's in ``cache_dir``, a cached run's); None where that cannot be told (no such file here)."""
    if not isinstance(path, str) or not path:
        return None
    try:
        if key == "images":
            return images_content(path, cache_dir)
        return known_fingerprint(path) if os.path.isfile(path) else None
    except (OSError, UserError):
        return None


def recorded_content(record: dict) -> dict[str, str]:
    """What a run's results.json (``record``) says the data it read held, by config key (a checkpoint's
    state.json holds it as ``data_content``): the users and items files' fingerprints, the digest of the image
    LMDB's records (as its cache or its live run recorded it); a key without a record is left out."""
    found = {"users": record.get("users_fingerprint"), "items": record.get("items_fingerprint")}
    for part in (record.get("encoders"), record.get("cache")):
        image = part.get("image") if isinstance(part, dict) else None
        if isinstance(image, dict) and not found.get("images"):
            found["images"] = image.get("images")
    return {k: v for k, v in found.items() if isinstance(v, str) and v}


CHECKPOINTS = "checkpoints"  # a run folder's folder of checkpoints


def checkpoint_name(epoch: int, step: int | None = None) -> str:
    """``epoch-0006``: epoch 6 finished; ``epoch-0007-step-00040``: 40 steps of epoch 7 done."""
    return f"epoch-{epoch:04d}" + ("" if step is None else f"-step-{step:05d}")


def move_newer_out(root: Path, best) -> str:
    """Advice where the checkpoint of epoch ``best`` is kept under ``root`` but a newer one is what a resume takes:
    moving the newer ones out lets the run resume from it and write its best weights again ('' where none is)."""
    holder = root / checkpoint_name(best) if type(best) is int and best >= 0 else None
    return f"move the checkpoints newer than {holder} out of {root} to resume from it, " \
        if holder in checkpoints(root) else ""


def checkpoint_order(path: Path) -> tuple[int, float]:
    epoch, step = NAME.match(path.name).groups()
    return int(epoch), float("inf") if step is None else int(step)


def checkpoints(root: Path) -> list[Path]:
    """Checkpoint folders under ``root``, newest first (complete or not; temporary folders excluded)."""
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and NAME.match(p.name)), key=checkpoint_order, reverse=True)


# --------------------------------------------------------------------------------------------------
# reading


@dataclass
class Checkpoint:
    path: Path
    state: dict
    model: dict[str, torch.Tensor]
    train_state: dict[str, torch.Tensor]


def verify(path: Path, digests: bool = True) -> str | None:
    """Why ``path`` is not a complete, intact checkpoint (None when it is); its files' sha256 against the
    manifest's only with ``digests`` (pruning reads no weights: each epoch would hash gigabytes for FFT)."""
    try:
        manifest = parse_json((path / MANIFEST).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return f"{path / MANIFEST} is missing (the checkpoint was never completed)"
    except OSError as err:  # 'Permission denied'
        return f"{path / MANIFEST} cannot be read ({failure_reason(err)})"
    except ValueError:  # not JSON, an integer of over 4300 digits, nesting too deep
        return f"{path / MANIFEST} is damaged (not valid JSON)"
    if not isinstance(manifest, dict):
        return f"{path / MANIFEST} is damaged (not a JSON object)"
    if manifest.get("format") != FORMAT:
        return f"{path / MANIFEST} has format {manifest.get('format')!r}, expected {FORMAT}"
    files = manifest.get("files")
    if not (isinstance(files, dict) and set(files) == set(FILES) and all(
            isinstance(e, dict) and type(e.get("bytes")) is int and isinstance(e.get("sha256"), str)
            for e in files.values())):
        return f"{path / MANIFEST} is damaged (no {{bytes, sha256}} entry for each of {', '.join(FILES)})"
    for file, expected in files.items():
        target = path / file
        if not target.is_file():
            return f"{target} is missing" if not os.path.lexists(target) else f"{target} is not a file"
        try:
            check_readable(target)  # present is not readable: safetensors would call it missing
            size = target.stat().st_size
            if size != expected["bytes"]:
                return f"{target} is truncated or damaged ({size} bytes, the manifest says {expected['bytes']})"
            if digests and sha256(target) != expected["sha256"]:
                return f"{target} does not match its sha256 in the manifest (damaged)"
        except OSError as err:  # not for this user ('Permission denied'), or a read that failed
            return f"{target} cannot be read ({failure_reason(err)})"
    return None


def config_differences(saved: dict, current: dict, saved_in: object = None,
                       ignore: frozenset = frozenset(), content: dict | None = None) -> list[str]:
    """``key=old there, new now`` for each field that decides what a step computes and differs. A field
    either config lacks was added by a later version of this library; the version that wrote it behaved as
    the field's default does, or as ``BEFORE_THE_FIELD`` says, which stands in for it. A ``layer_rule`` that
    differs only so counts when the two rules pick other layers of ``current``'s towers (they agree on 12
    and 24 layers in 6 groups, not on 32, nor on 12 in 3), or when those towers' depths cannot be read.
    ``saved_in``: the working folder of the run that saved ``saved`` (its relative data paths are from there);
    ``ignore``: keys not compared (``current``'s still say where its towers are), besides those ``current``'s
    method never reads (``methods.unread_keys``: an ID run's encoder folders). ``content``: what the data that
    ``saved`` names held (``recorded_content``): a data path elsewhere now whose data holds the same (a copy on
    a node's own disk, a moved project) is the same setting."""
    before = {**Config().to_dict(), **BEFORE_THE_FIELD}
    ignore = ignore | unread_keys(*(current.get(k, before[k]) for k in ("method", "towers", "feed")))
    keys = sorted((set(saved) | set(current)) - MAY_CHANGE - ignore)
    # (each in one spelling: a run saved before -0.0 and "query, value" were written 0.0 and query,value)
    old, now = (one_spelling({k: values.get(k, before.get(k)) for k in keys}) for values in (saved, current))
    same_old, same_now = same_paths(old, saved_in), same_paths(now)
    content = content if isinstance(content, dict) else {}
    cache = current.get("cache_dir") if current.get("feed") == "cached" else None  # (only IISAN keeps feed cached)
    differ = [k for k in keys if same_old[k] != same_now[k]
              and not (k in DATA_PATHS and content.get(k) and data_content(k, same_now[k], cache) == content[k])]
    if "layer_rule" in differ and "layer_rule" not in saved and same_layers({**before, **current}, old["layer_rule"]):
        differ.remove("layer_rule")
    # one spelling from two working folders (a run folder reached another way: a copy, a container's mount) is
    # shown as the two paths it means
    return [f"{k}={same_old[k]!r} there, {same_now[k]!r} now" if old[k] == now[k] else
            f"{k}={_shown(k, old[k])} there, {_shown(k, now[k])} now" for k in differ]


def _shown(key: str, value) -> str:
    """A value as a difference names it: layers left to the rule (None) as what picks them."""
    return "auto (by --layer-rule)" if key in ("text_layers", "image_layers") and value is None else repr(value)


def same_layers(config: dict, rule: str) -> bool:
    """Whether ``config`` (whole: its encoders, cache folder and download switch say where its towers'
    depths are read) picks the same layers of its towers under ``rule`` as under its own rule."""
    try:
        cfg = Config.from_dict(config)
    except UserError:  # not a config this version builds
        return False
    picked = picked_layers(cfg)
    return picked is not None and picked == picked_layers(cfg.replace(layer_rule=rule))


def read(path: Path, state: dict | None = None) -> Checkpoint:
    """The checkpoint at ``path``; ``state``: its state.json, already read. A file this user may not read
    raises the OS's error, naming it (safetensors would call it missing)."""
    state = parse_json((path / STATE).read_text(encoding="utf-8")) if state is None else state
    for name in (MODEL, TRAIN_STATE):
        check_readable(path / name)
    return Checkpoint(path, state, load_file(str(path / MODEL)), load_file(str(path / TRAIN_STATE)))


def examine(path: Path, config: dict) -> Checkpoint | str:
    """The checkpoint at ``path`` when it is intact, of fields of the types this version writes that agree
    with each other and with its tensors, and of ``config``; else why not, in one line starting with the path."""
    state = checked_state(path, config)
    if isinstance(state, str):
        return state
    try:
        found = read(path, state)
    except OSError as err:  # readable when verified, but not necessarily still ('Permission denied')
        return f"{err.filename or path} cannot be read ({failure_reason(err)})"
    except Exception as err:  # safetensors raises its own types for damaged files
        return f"{path} is unreadable ({type(err).__name__}: {err})"
    if problem := partial_losses_problem(state, found.train_state, launched_processes()):
        return f"{path / STATE} is damaged ({problem})"
    return found


NEW_RUN = "give it the values it ran with to go on with it, or use another --run-name to start a new run"


def checked_state(path: Path, config: dict, digests: bool = True) -> dict | str:
    """``examine`` short of reading the tensors: the state.json of the checkpoint at ``path`` when it is intact
    (``verify``), of fields that agree with each other, and of ``config``; else why not, in one line starting
    with the path."""
    if reason := verify(path, digests):
        return reason
    try:
        state = parse_json((path / STATE).read_text(encoding="utf-8"))
    except OSError as err:
        return f"{path / STATE} is unreadable ({failure_reason(err)})"
    except ValueError:  # not JSON, an integer of over 4300 digits, nesting too deep
        return f"{path / STATE} is damaged (not valid JSON)"
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        shown = state.get("format") if isinstance(state, dict) else state
        return f"{path / STATE} has format {runstate.short_repr(shown)}, expected {FORMAT}"
    if not isinstance(state.get("config"), dict):
        return f"{path / STATE} holds no config (an object), so cannot be checked against this run's"
    if problem := runstate.state_problem(state):
        return f"{path / STATE} is damaged ({problem})"
    if differences := config_differences(state["config"], config, state.get("working_dir"),
                                         content=state.get("data_content")):
        older = "data_content" not in state and all(d.split("=")[0] in DATA_PATHS for d in differences)
        said = " (saved by commit b583a5a or earlier, before checkpoints recorded what the data held: data paths " \
            "count as they are)" if older else ""
        return f"{path / STATE} belongs to a different config ({'; '.join(differences)}){said}; {NEW_RUN}"
    return state


def partial_losses_problem(state: dict, tensors: dict[str, torch.Tensor], processes: int) -> str | None:
    """Why a checkpoint saved within an epoch lacks the losses of its steps so far that a resume by
    ``processes`` processes reads, one tensor per rank (None when it has them, or was saved at an epoch's
    end). Every such checkpoint holds rank 0's; a resume by another number of processes reads none (its
    epoch starts again), so only then may the other ranks' be missing."""
    step = state["step"]
    if step is None:
        return None
    for rank in range(state["world_size"] if state["world_size"] == processes else 1):
        losses = tensors.get(f"partial_losses.{rank}")
        if losses is None or tuple(losses.shape) != (step,):
            held = "none" if losses is None else f"shape {tuple(losses.shape)}"
            shown = runstate.short_repr(step)
            return f"step={shown}: expected partial_losses.{rank} of shape ({shown},) in {TRAIN_STATE}, found {held}"
    return None


def latest(root: Path, config: dict) -> tuple[Checkpoint | None, list[str]]:
    """The newest checkpoint under ``root`` that ``examine`` accepts, and one line per newer checkpoint
    that was refused, newest first: logged as warnings when an older one is found, the caller's error
    (``cannot_resume``) when none is."""
    refused = []
    for path in checkpoints(root):
        found = examine(path, config)
        if isinstance(found, Checkpoint):
            for passed in refused:
                log.warning("refusing checkpoint: %s", passed)
            return found, refused
        refused.append(found)
    return None, refused


def cannot_resume(refused: list[str]) -> str:
    """One line for checkpoints that were all refused, newest first: the newest's reason, then the first
    reason of each other kind, with how many more there are of each (a reason starts with its path)."""
    kinds: dict[str, list[str]] = {}
    for reason in refused:
        kinds.setdefault(reason.split(" ", 1)[-1], []).append(reason)
    parts = []
    for n, (first, *more) in enumerate(kinds.values()):
        parts.append(first if n else f"cannot resume: {first}")
        if more:
            parts.append(f"{len(more)} older checkpoint(s) refused for the same reason")
    return "; ".join(parts)


@contextmanager
def restoring(path: str | Path):
    """Restoring the checkpoint at ``path``: what its content makes fail (another version wrote it, or a
    hand edit that its manifest was made to match) is one line naming it, and so is a file of it this process
    may not read."""
    try:
        yield
    except UserError:  # said already, in one line (e.g. fewer --epochs than trained)
        raise
    except OSError as err:  # another rank reads the checkpoint rank 0 chose: a file it may not read
        raise TrainingError(f"cannot resume: {err.filename or path} cannot be read ({failure_reason(err)}): make "
                            "it readable, or use another --run-name to start a new run") from None
    except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as err:
        raise TrainingError(f"cannot resume: {path} holds a state this version cannot restore "
                            f"({error_line(err)}); use another --run-name to start a new run") from None
